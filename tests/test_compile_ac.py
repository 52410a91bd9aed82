"""Activation checkpointing and torch.compile follow the job config and keep the fp32 unit rules."""

from __future__ import annotations

import torch
from distributed import run_on_ranks


def _step(rank, world_size, ac_mode, compile_enabled):
    from torchtitan.config import JobConfig
    from torchtitan.distributed import ParallelDims

    from titan_dsv4.flavors import deepseek_v4_args
    from titan_dsv4.infra.parallelize import parallelize_deepseek_v4
    from titan_dsv4.infra.unit_plan import fsdp_units
    from titan_dsv4.model import DeepSeekV4Model

    job = JobConfig()
    job.activation_checkpoint.mode = ac_mode
    job.compile.enable = compile_enabled
    dims = ParallelDims(dp_replicate=1, dp_shard=2, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=2)
    dims.build_mesh()
    with torch.device("meta"):
        model = DeepSeekV4Model(deepseek_v4_args["debugmodel"].replace(max_seq_len=256))
    parallelize_deepseek_v4(model, dims, job)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    tokens = torch.randint(0, 2048, (1, 256), generator=torch.Generator().manual_seed(rank))
    loss = model(tokens).float().logsumexp(-1).mean()
    loss.backward()
    total = loss.detach().clone()
    torch.distributed.all_reduce(total)
    grad = model.lm_head.weight.grad.full_tensor()
    return {"loss": total.item(), "grad_norm": grad.norm().item(), "units": fsdp_units(model)}


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


def test_full_ac_and_compile_keep_numerics_and_islands():
    eager = run_on_ranks(_step, 2, "none", False)[0]
    full_ac = run_on_ranks(_step, 2, "full", False)[0]
    compiled = run_on_ranks(_step, 2, "selective", True, timeout=600)[0]
    for other in (full_ac, compiled):
        _island_rules_hold(other["units"])
        assert [u.name for u in other["units"]] == [u.name for u in eager["units"]]
    assert abs(full_ac["loss"] - eager["loss"]) < 1e-6
    assert abs(compiled["loss"] - eager["loss"]) < 1e-2  # inductor reorders bf16 math
    assert abs(compiled["grad_norm"] - eager["grad_norm"]) < 1e-2 * eager["grad_norm"]
