"""Activation checkpointing and torch.compile follow the job config and keep the fp32 unit rules.

The model carries an MTP depth, so AC and compile are exercised on it as on the backbone's blocks.
"""

from __future__ import annotations

import pytest
import torch

from titan_dsv4.multiprocess import run_on_ranks


def _step(rank, world_size, ac_mode, compile_enabled):
    from torchtitan.distributed import ParallelDims

    from tests.helpers.sharded import titan_job
    from titan_dsv4.flavors import deepseek_v4_args
    from titan_dsv4.infra.parallelize import parallelize_deepseek_v4
    from titan_dsv4.infra.unit_plan import fsdp_units
    from titan_dsv4.model import DeepSeekV4Model

    job = titan_job()
    job.activation_checkpoint.mode = ac_mode
    job.compile.enable = compile_enabled
    dims = ParallelDims(dp_replicate=1, dp_shard=2, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=2)
    dims.build_mesh()
    with torch.device("meta"):
        model = DeepSeekV4Model(deepseek_v4_args["debugmodel"].replace(max_seq_len=256, mtp_layers=1))
    parallelize_deepseek_v4(model, dims, job)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    from titan_dsv4.infra.loss import deepseek_v4_loss

    tokens = torch.randint(0, 2048, (1, 257), generator=torch.Generator().manual_seed(rank))
    loss = deepseek_v4_loss(model(tokens[:, :-1]), tokens[:, 1:]) / 256
    loss.backward()
    mtp_grad = model.mtp.layers["0"].e_proj.weight.grad.full_tensor()
    total = loss.detach().clone()
    torch.distributed.all_reduce(total)
    grad = model.lm_head.weight.grad.full_tensor()
    return {
        "loss": total.item(),
        "grad_norm": grad.norm().item(),
        "mtp_grad_norm": mtp_grad.norm().item(),
        "units": fsdp_units(model),
    }


def _island_rules_hold(units):
    kinds = {u.kind for u in units}
    assert {"island", "holder", "block", "root"} <= kinds
    for u in units:
        assert len(u.storage_dtypes) == 1 and len(u.compute_dtypes) == 1, u
        if u.kind in ("island", "holder"):
            assert u.compute_dtypes == frozenset({torch.float32}), u
        if u.kind == "block":
            assert u.compute_dtypes == frozenset({torch.bfloat16}), u
        if u.kind == "holder":
            assert not u.reshard_after_forward, u


@pytest.mark.slow
def test_full_ac_and_compile_keep_numerics_and_islands(ranks):
    eager = ranks.run(_step, 2, "none", False)[0]
    full_ac = ranks.run(_step, 2, "full", False)[0]
    compiled = ranks.run(_step, 2, "selective", True, timeout=600)[0]
    for other in (full_ac, compiled):
        _island_rules_hold(other["units"])
        assert [u.name for u in other["units"]] == [u.name for u in eager["units"]]
    assert abs(full_ac["loss"] - eager["loss"]) < 1e-6
    assert abs(compiled["loss"] - eager["loss"]) < 1e-2  # inductor reorders bf16 math
    assert abs(compiled["grad_norm"] - eager["grad_norm"]) < 1e-2 * eager["grad_norm"]
    assert abs(full_ac["mtp_grad_norm"] - eager["mtp_grad_norm"]) < 1e-6 * eager["mtp_grad_norm"]
    assert abs(compiled["mtp_grad_norm"] - eager["mtp_grad_norm"]) < 2e-2 * eager["mtp_grad_norm"]
    assert any(u.kind == "mtp" for u in compiled["units"])


def _twice(rank, world_size):
    import torch.distributed as dist
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torchtitan.distributed.utils import init_fake_mode

    from tests.helpers.sharded import dims, job
    from titan_dsv4.flavors import deepseek_v4_args
    from titan_dsv4.infra.parallelize import UnsupportedParallelismError, parallelize_deepseek_v4
    from titan_dsv4.infra.unit_plan import fsdp_units
    from titan_dsv4.model import DeepSeekV4Model

    init_fake_mode(2, "fake_backend")
    with torch.device("meta"):
        model = DeepSeekV4Model(deepseek_v4_args["debugmodel"].replace(mtp_layers=1))
    config = job("bfloat16", ac="full", compile_model=True)
    parallel = dims(2, dp_shard=2)
    parallelize_deepseek_v4(model, parallel, config)
    before = (fsdp_units(model), [type(m).__name__ for m in model.modules()])
    parallelize_deepseek_v4(model, parallel, config)
    after = (fsdp_units(model), [type(m).__name__ for m in model.modules()])
    block = model.layers["0"]
    wrapped_once = isinstance(block, CheckpointWrapper) and not isinstance(
        block._checkpoint_wrapped_module, CheckpointWrapper
    )
    compiled_once = not hasattr(block._checkpoint_wrapped_module.attn_hc._orig_mod, "_orig_mod")
    refused = None
    try:
        parallelize_deepseek_v4(model, parallel, job("bfloat16", ac="none"))
    except UnsupportedParallelismError as e:
        refused = str(e)
    dist.destroy_process_group()
    return {
        "same": before == after,
        "wrapped_once": wrapped_once,
        "compiled_once": compiled_once,
        "refused": refused,
    }


@pytest.mark.slow
def test_parallelize_twice_with_ac_and_compile_changes_nothing():
    out = run_on_ranks(_twice, 1, backend=None)[0]
    assert out["same"] and out["wrapped_once"] and out["compiled_once"]
    assert "already parallelized" in out["refused"] and "ac_mode='none'" in out["refused"]
