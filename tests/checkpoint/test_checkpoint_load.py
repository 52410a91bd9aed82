"""Loading Hugging Face / released folders in one process, and config.json -> flavor -> TOML."""

from __future__ import annotations

import json
import shutil
import tomllib

import pytest
import torch

from tests.helpers.checkpoint_fixtures import debug_args, load_through_adapter, make_checkpoints
from titan_dsv4.launch import ROOT

TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return make_checkpoints(str(tmp_path_factory.mktemp("hf_checkpoints")))


@pytest.mark.parametrize("variant", ["save_pretrained", "released", "quantized"])
def test_every_layout_loads_with_transformers_logits(checkpoints, variant):
    reference = checkpoints["quantized_reference" if variant == "quantized" else "hf"]
    ours = load_through_adapter(checkpoints["folders"][variant])
    tokens = torch.randint(0, 2048, (1, 256), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(tokens)[0] - reference(input_ids=tokens).logits).abs().max().item() <= TOL


def test_released_fixture_is_what_transformers_itself_reads(checkpoints):
    """The test's released renames agree with transformers' own loader (it reads the folder to the same
    weights)."""
    from transformers import DeepseekV4ForCausalLM

    loaded = DeepseekV4ForCausalLM.from_pretrained(checkpoints["folders"]["released"], dtype=torch.float32)
    original = checkpoints["hf"].state_dict()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in original.items())


def test_quantized_fixture_really_is_quantized(checkpoints):
    from titan_dsv4.checkpoint.files import scan_folder

    stored = scan_folder(checkpoints["folders"]["quantized"])
    assert stored["layers.1.attn.wq_b.weight"].dtype == "F8_E4M3"
    assert stored["layers.1.attn.wq_b.scale"].dtype == "F8_E8M0" and stored[
        "layers.1.attn.wq_b.scale"
    ].shape == (4, 1)
    assert stored["layers.2.ffn.experts.5.w2.weight"].dtype == "I8"
    assert stored["layers.2.ffn.experts.5.w2.weight"].shape == (256, 64)  # [D, I/2]
    assert stored["layers.2.ffn.experts.5.w2.scale"].shape == (256, 4)  # [D, I/32]


def test_released_index_at_hf_assets_path_is_translated_for_exports(checkpoints):
    from titan_dsv4.checkpoint.adapter import DeepSeekV4CheckpointAdapter

    adapter = DeepSeekV4CheckpointAdapter(debug_args(), checkpoints["folders"]["released"])
    exported = {k for k in adapter.expected_hf_shapes() if not k.endswith("tid2eid")}  # hash tables: own file
    assert set(adapter.fqn_to_index_mapping) == exported  # every exported tensor has a shard, nothing more
    assert adapter.fqn_to_index_mapping["model.layers.0.mlp.experts.gate_up_proj"] in (1, 2)


def test_convert_config_names_the_flavor_and_loads_the_folder(checkpoints, tmp_path):
    from titan_dsv4.checkpoint.convert_config import main, render

    folder = checkpoints["folders"]["quantized"]
    doc = tomllib.loads(render(folder, str(ROOT / "train_configs" / "debug_model.toml")))
    assert doc["model"] == {
        "name": "deepseek_v4",
        "flavor": "debugmodel",
        "hf_assets_path": "./titan_dsv4/assets/tokenizer",
    }
    assert (
        doc["checkpoint"]["initial_load_path"] == folder and doc["checkpoint"]["initial_load_in_hf"] is True
    )
    assert doc["training"]["dataset"] == "dsv4_corpus"  # the base config's other sections are kept
    # the checkpoint's indexer is trained: no dense warm-up, kept fixed (the base debug config trains it)
    assert doc["deepseek_v4"]["indexer_warmup_steps"] == 0 and doc["deepseek_v4"]["indexer_loss_weight"] == 0
    assert doc["deepseek_v4"]["mtp_layers"] == 0  # the base config's other [deepseek_v4] keys are kept
    assert main([str(tmp_path / "nowhere")]) == 2
    bare = tomllib.loads(render(folder, None))  # without a base: the extension that adds [deepseek_v4]
    assert bare["job"] == {"custom_config_module": "titan_dsv4.job_config"}


def test_a_config_no_flavor_matches_gets_a_checkpoint_flavor(checkpoints, tmp_path):
    from titan_dsv4.checkpoint.hf_config import checkpoint_overrides, model_args_from_checkpoint
    from titan_dsv4.flavors import deepseek_v4_args

    folder = tmp_path / "two_layers"
    shutil.copytree(checkpoints["folders"]["save_pretrained"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        num_hidden_layers=2,
        layer_types=config["layer_types"][:2],
        mlp_layer_types=config["mlp_layer_types"][:2],
    )
    (folder / "config.json").write_text(json.dumps(config))
    args = model_args_from_checkpoint(str(folder))
    assert args.n_layers == 2 and args.compress_ratios == [0, 4]
    flavor = checkpoint_overrides(str(folder))["model"]["flavor"]
    assert flavor == f"hf:{folder}"
    assert deepseek_v4_args[flavor] == args
