"""Hugging Face checkpoints through ``./run_train.sh`` on 2 CPU ranks: load, train, export.

The same random debugmodel-shaped transformers model is stored three ways (save_pretrained, DeepSeek's
released names with MTP extras, and released FP8/FP4 storage). Each folder is loaded by one of the routes
(``--checkpoint.initial_load_path DIR --checkpoint.initial_load_in_hf`` on the command line or in the TOML
convert_config writes; Titan's ``--model.hf_assets_path``), at FSDP 2, pp 2 or EP 2, and the first step's loss
must be transformers' loss on the very batch Titan feeds (fp32). The export (``--checkpoint.last_save_in_hf``)
must load with ``DeepseekV4ForCausalLM.from_pretrained`` and give our model's logits.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.checkpoint_fixtures import make_checkpoints
from tests.helpers.titan_runs import (
    HF_LOAD,
    TOL,
    assert_each_rank_read_its_half,
    assert_first_step_matches,
    first_global_batch,
    our_model_from,
    transformers_loss,
)
from titan_dsv4.launch import ROOT, run_train


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return make_checkpoints(str(tmp_path_factory.mktemp("hf_checkpoints")))


@pytest.fixture(scope="module")
def batch():
    return first_global_batch()


@pytest.mark.slow
def test_save_pretrained_folder_trains_and_exports_a_folder_transformers_loads(checkpoints, batch, tmp_path):
    from transformers import DeepseekV4ForCausalLM

    rc, log = run_train(
        [
            *HF_LOAD,
            "--checkpoint.initial_load_path",
            checkpoints["folders"]["save_pretrained"],
            "--checkpoint.last_save_in_hf",
            "--job.dump_folder",
            str(tmp_path),
        ]
    )
    assert rc == 0, log[-4000:]
    assert "transformers save_pretrained layout, 122 tensors" in log
    assert_first_step_matches(log, transformers_loss(checkpoints["hf"], batch))
    assert_each_rank_read_its_half(log)

    export = tmp_path / "checkpoint" / "step-1"
    hf, info = DeepseekV4ForCausalLM.from_pretrained(
        str(export), dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours = our_model_from(str(export))
    tokens = batch[0][:2, :300]
    with torch.no_grad():
        diff = (ours(tokens)[0] - hf.eval()(input_ids=tokens).logits).abs().max().item()
    assert diff <= TOL, diff
    trained = hf.state_dict()["model.layers.2.mlp.experts.gate_up_proj"]
    assert not torch.equal(trained, checkpoints["hf"].state_dict()["model.layers.2.mlp.experts.gate_up_proj"])


@pytest.mark.slow
def test_save_pretrained_folder_loads_and_exports_under_pp2(checkpoints, tmp_path):
    """Pipeline stages (layer 0 | layers 1-3 and the head: hash layer 1 on the second stage) each read only
    their own tensors, train from them, and export one folder transformers loads."""
    from transformers import DeepseekV4ForCausalLM

    from titan_dsv4.launch import bytes_read

    rc, log = run_train(
        [
            *HF_LOAD, "--checkpoint.initial_load_path", checkpoints["folders"]["save_pretrained"],
            "--checkpoint.last_save_in_hf", "--parallelism.pipeline_parallel_degree", "2",
            "--parallelism.pipeline_parallel_first_stage_less_layers", "3",
            "--job.dump_folder", str(tmp_path),
        ]
    )  # fmt: skip
    assert rc == 0, log[-4000:]
    assert "Pipeline stage 1: rope, layers.1, layers.2, layers.3, hc_head, norm, lm_head" in log, log[-4000:]
    batch = first_global_batch(ranks=1)  # one data-parallel rank
    assert_first_step_matches(log, transformers_loss(checkpoints["hf"], batch))  # both ranks log the loss
    read = bytes_read(log)
    assert sorted(read) == [0, 1] and all(0 < mine < 0.8 * total for mine, total in read.values()), read
    assert sum(mine for mine, _ in read.values()) == pytest.approx(read[0][1], rel=0.02), read

    export = tmp_path / "checkpoint" / "step-1"
    hf, info = DeepseekV4ForCausalLM.from_pretrained(
        str(export), dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for layer in (0, 1):  # the hash tables of both stages
        key = f"model.layers.{layer}.mlp.gate.tid2eid"
        assert torch.equal(hf.state_dict()[key], checkpoints["hf"].state_dict()[key])
    ours = our_model_from(str(export))
    tokens = batch[0][:2, :300]
    with torch.no_grad():
        diff = (ours(tokens)[0] - hf.eval()(input_ids=tokens).logits).abs().max().item()
    assert diff <= TOL, diff


@pytest.mark.slow
def test_fp8_fp4_released_folder_through_the_generated_toml_at_ep_2_loads_and_exports(
    checkpoints, batch, tmp_path
):
    """The released FP8/FP4 folder (DeepSeek's names, MTP extras) through the TOML convert_config writes for
    it, at EP 2: dequantized on read, each rank reads its own experts (and its FSDP half of the rest), the
    first step is transformers' on the values the storage holds, and the export loads in transformers. (The
    plain released folder trains through --model.hf_assets_path below.)"""
    from transformers import DeepseekV4ForCausalLM

    from titan_dsv4.checkpoint.convert_config import render

    config = tmp_path / "from_checkpoint.toml"
    config.write_text(
        render(checkpoints["folders"]["quantized"], str(ROOT / "train_configs" / "debug_model.toml"))
    )
    rc, log = run_train(
        [
            "--config", str(config), *HF_LOAD[:4], "--parallelism.expert_parallel_degree", "2",
            "--checkpoint.last_save_in_hf", "--checkpoint.last_save_model_only",
            "--job.dump_folder", str(tmp_path / "run"),
        ]
    )  # fmt: skip
    assert rc == 0, log[-4000:]
    assert "released layout, 122 tensors, 3 MTP tensors not trained here, FP8/FP4 dequantized on read" in log
    assert_first_step_matches(log, transformers_loss(checkpoints["quantized_reference"], batch))
    assert_each_rank_read_its_half(log)
    export = tmp_path / "run" / "checkpoint" / "step-1"
    hf, info = DeepseekV4ForCausalLM.from_pretrained(
        str(export), dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tokens = batch[0][:2, :300]
    with torch.no_grad():
        logits = our_model_from(str(export))(tokens)[0]
        diff = (logits - hf.eval()(input_ids=tokens).logits).abs().max().item()
    assert diff <= TOL, diff


@pytest.mark.slow
def test_released_folder_as_hf_assets_path_exports_in_its_shards(checkpoints, batch, tmp_path):
    """Titan's other route: weights (and tokenizer) from --model.hf_assets_path; the export keeps its 2
    shards."""
    import shutil

    from transformers import DeepseekV4ForCausalLM

    assets = tmp_path / "assets"
    shutil.copytree(checkpoints["folders"]["released"], assets)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "titan_dsv4" / "assets" / "tokenizer" / f, assets / f)
    rc, log = run_train(
        [
            *HF_LOAD,
            "--model.hf_assets_path",
            str(assets),
            "--checkpoint.last_save_in_hf",
            "--job.dump_folder",
            str(tmp_path / "run"),
        ]
    )
    assert rc == 0, log[-4000:]
    assert_first_step_matches(log, transformers_loss(checkpoints["hf"], batch))
    export = tmp_path / "run" / "checkpoint" / "step-1"
    assert {
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model-hash-tables.safetensors",
    } <= {p.name for p in export.iterdir()}
    hf, info = DeepseekV4ForCausalLM.from_pretrained(
        str(export), dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert torch.equal(
        hf.state_dict()["model.layers.1.mlp.gate.tid2eid"],
        checkpoints["hf"].state_dict()["model.layers.1.mlp.gate.tid2eid"],
    )
