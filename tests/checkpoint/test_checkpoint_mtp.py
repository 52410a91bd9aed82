"""The released checkpoints' MTP depth (``mtp.0.*``): loaded (FP8/FP4 included), trained, exported back.

The export holds the released keys and shapes (experts per expert); transformers ignores ``mtp.*`` at load.
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors import safe_open

from tests.helpers.checkpoint_fixtures import (
    debug_args,
    debug_hf_model,
    legacy_config,
    load_through_adapter,
    quantize_released,
    released_mtp_depth,
    released_tensors,
    write_shards,
)
from titan_dsv4.launch import losses, run_train

# Released name -> our parameter name (independent of the package's maps, from the spec's section 7.2).
OURS = {
    "mtp.0.e_proj.weight": "mtp.layers.0.e_proj.weight",
    "mtp.0.hc_head_fn": "mtp.layers.0.hc_head.hc_fn",
    "mtp.0.attn.wq_b.weight": "mtp.layers.0.block.self_attn.wq_b.weight",
    "mtp.0.attn.attn_sink": "mtp.layers.0.block.self_attn.sinks_param.weight",
    "mtp.0.ffn.gate.bias": "mtp.layers.0.block.moe.expert_bias",
    "mtp.0.ffn.shared_experts.w2.weight": "mtp.layers.0.block.moe.shared_experts.w2.weight",
    "mtp.0.norm.weight": "mtp.layers.0.norm.weight",
}
EXPERT = ("mtp.0.ffn.experts.3.w3.weight", "mtp.layers.0.block.moe.experts.w3", 3)


def _ours(state: dict, key: str) -> torch.Tensor:
    if key == EXPERT[0]:
        return state[EXPERT[1]][EXPERT[2]]
    return state[OURS[key]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A released FP8/FP4 folder with one MTP depth, and the same backbone without MTP."""
    args = debug_args()
    hf = debug_hf_model(0)
    backbone = released_tensors(hf.state_dict(), args.moe_args.num_experts)
    mtp = released_mtp_depth(args, torch.Generator().manual_seed(5))
    stored, values = quantize_released({**backbone, **mtp}, seed=0)
    config = {
        **legacy_config(args),
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
    }
    root = tmp_path_factory.mktemp("mtp_checkpoints")
    with_mtp, without = str(root / "released_mtp"), str(root / "released_no_mtp")
    write_shards(with_mtp, stored, config, n_shards=3)
    write_shards(without, {k: v for k, v in stored.items() if not k.startswith("mtp.")}, config)
    return {"with": with_mtp, "without": without, "values": values, "mtp": mtp}


def test_the_released_depth_loads_fp8_and_fp4_included(folders):
    model = load_through_adapter(folders["with"], debug_args().replace(max_seq_len=256, mtp_layers=1))
    state = model.state_dict()
    for key in list(OURS) + [EXPERT[0]]:
        want = folders["values"].get(key, folders["mtp"][key])  # quantized ones: their float values
        assert torch.equal(_ours(state, key), want.float()), key


def test_depths_the_model_does_not_build_are_dropped_with_one_line(folders, caplog):
    with caplog.at_level(logging.INFO):
        load_through_adapter(folders["with"], debug_args().replace(max_seq_len=256, mtp_layers=0))
    assert sum("stores 1 MTP depth(s); the model builds 0" in r.getMessage() for r in caplog.records) == 1


def test_a_folder_without_mtp_initialises_the_depth_and_says_so(folders, caplog):
    with caplog.at_level(logging.INFO):
        model = load_through_adapter(folders["without"], debug_args().replace(max_seq_len=256, mtp_layers=1))
    assert any(
        "has no MTP weights: the 1 MTP depth(s) start from their initialisation" in r.getMessage()
        for r in caplog.records
    )
    assert model.mtp.layers["0"].e_proj.weight.abs().sum() > 0  # init_weights' values, not zeros


def test_more_depths_than_the_checkpoint_are_refused_by_name(folders):
    from titan_dsv4.checkpoint.validation import CheckpointMismatchError

    with pytest.raises(CheckpointMismatchError, match=r"stores 1 MTP depth\(s\).*--deepseek_v4.mtp_layers 1"):
        load_through_adapter(folders["with"], debug_args().replace(max_seq_len=256, mtp_layers=2))


@pytest.mark.slow
def test_loads_trains_3_steps_on_2_ranks_and_exports_the_trained_depth(folders, tmp_path):
    """Two identical seeded runs from the folder: one exports in HF, one saves DCP; the export's mtp.0.*
    (released names) equal the trained model's MTP weights. 3 steps: the debug config's 2 dense warm-up
    steps train only the indexer, the third trains the MTP depth too."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    common = [
        "--training.steps",
        "3",
        "--training.mixed_precision_param",
        "float32",
        "--debug.seed",
        "42",
        "--debug.deterministic",
        "--deepseek_v4.mtp_layers",
        "1",
        "--checkpoint.enable",
        "--checkpoint.initial_load_path",
        folders["with"],
        "--checkpoint.initial_load_in_hf",
        "--checkpoint.last_save_model_only",
        "--checkpoint.export_dtype",
        "float32",
    ]
    rc, log = run_train([*common, "--checkpoint.last_save_in_hf", "--job.dump_folder", str(tmp_path / "hf")])
    assert rc == 0, log[-4000:]
    assert "released layout" in log and "FP8/FP4 dequantized on read" in log and "mtp_loss:" in log
    rc2, log2 = run_train([*common, "--job.dump_folder", str(tmp_path / "dcp")])
    assert rc2 == 0, log2[-4000:]
    assert losses(log) == losses(log2) and sorted(losses(log)) == [1, 2, 3]
    dcp_to_torch_save(str(tmp_path / "dcp" / "checkpoint" / "step-3"), str(tmp_path / "trained.pt"))
    trained = torch.load(tmp_path / "trained.pt", weights_only=False)
    export = tmp_path / "hf" / "checkpoint" / "step-3"
    exported = {}
    for shard in export.glob("model-*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            exported.update({k: f.get_tensor(k) for k in f.keys() if k.startswith("mtp.")})
    # the released layout: the depth's 29 tensors plus 3 per expert, under the released names
    assert set(exported) == set(folders["mtp"]), sorted(set(exported) ^ set(folders["mtp"]))[:5]
    assert all(exported[k].shape == folders["mtp"][k].shape for k in exported)
    for key in list(OURS) + [EXPERT[0]]:
        assert torch.equal(exported[key], _ours(trained, key)), key
    assert not torch.equal(
        exported[EXPERT[0]], folders["values"][EXPERT[0]]
    )  # trained, not the loaded values
