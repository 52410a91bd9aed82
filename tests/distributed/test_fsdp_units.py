"""The fp32 unit rules, checked on real 2-rank gloo FSDP2 after parallelize_deepseek_v4."""

from __future__ import annotations

import pytest
import torch


def build_parallelized(
    world_size: int, mixed: str = "bfloat16", twice: bool = False, group_islands: bool = True
):
    from torchtitan.distributed import ParallelDims

    from tests.helpers.sharded import titan_job
    from titan_dsv4.flavors import deepseek_v4_args
    from titan_dsv4.infra.parallelize import parallelize_deepseek_v4
    from titan_dsv4.model import DeepSeekV4Model

    job = titan_job()
    job.training.mixed_precision_param = mixed
    dims = ParallelDims(
        dp_replicate=1, dp_shard=world_size, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=world_size
    )
    dims.build_mesh()
    args = deepseek_v4_args["debugmodel"].replace(max_seq_len=256)
    with torch.device("meta"):
        model = DeepSeekV4Model(args)
    if group_islands:
        parallelize_deepseek_v4(model, dims, job)
        if twice:
            parallelize_deepseek_v4(model, dims, job)
    else:  # the per-island baseline: parallelize's FSDP step with one unit per island
        from torch.distributed.fsdp import MixedPrecisionPolicy

        from titan_dsv4.infra.parallelize import apply_fsdp, data_parallel_mesh

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for _ in range(2 if twice else 1):
            apply_fsdp(
                model,
                data_parallel_mesh(dims),
                mp_policy=policy,
                reshard_after_forward=True,
                group_islands=False,
            )
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def _unit_report(rank, world_size, mixed, twice, group_islands=True):
    from titan_dsv4.infra.unit_plan import fsdp_units

    model = build_parallelized(world_size, mixed, group_islands=group_islands)
    units = fsdp_units(model)
    report = {"units": units}
    if twice:
        model2 = build_parallelized(world_size, mixed, twice=True, group_islands=group_islands)
        report["units_twice"] = fsdp_units(model2)
    # one forward/backward must run through the islands; count the forward's all-gathers
    import torch.distributed as dist

    tokens = torch.randint(0, 2048, (1, 256), generator=torch.Generator().manual_seed(rank))
    calls, original = [], dist.all_gather_single
    dist.all_gather_single = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    try:
        out, _ = model(tokens)
    finally:
        dist.all_gather_single = original
    report["forward_all_gathers"] = len(calls)
    out.float().logsumexp(-1).mean().backward()
    report["all_grads_finite"] = all(
        torch.isfinite(p.grad.full_tensor()).all().item() for p in model.parameters() if p.grad is not None
    )
    return report


ISLANDS = {
    "hc_head",
    "lm_head",
    "layers.0.attn_hc",
    "layers.0.ffn_hc",
    "layers.1.self_attn.compressor.wkv",
    "layers.1.self_attn.compressor.wgate",
    "layers.1.self_attn.compressor.indexer.wkv",
    "layers.1.self_attn.compressor.indexer.wgate",
    "layers.2.self_attn.compressor.wkv",
}
HOLDERS = {
    "layers.0.self_attn.sinks_param",
    "layers.1.self_attn.compressor.ape_param",
    "layers.1.self_attn.compressor.indexer.ape_param",
    "layers.2.self_attn.compressor.ape_param",
}
NOT_ISLANDS = {"layers.2.self_attn.compressor.indexer.wkv", "layers.0.self_attn.compressor.wkv"}


def _check_unit_rules(report):
    units = report["units"]
    by_kind = {}
    for u in units:
        by_kind.setdefault(u.kind, []).append(u)
        assert len(u.storage_dtypes) == 1, u
        assert len(u.compute_dtypes) == 1, u
    assert len(by_kind["block"]) == 4
    assert {u.compute_dtypes for u in by_kind["block"]} == {frozenset({torch.bfloat16})}
    assert {u.storage_dtypes for u in by_kind["block"]} == {frozenset({torch.float32})}
    for u in by_kind["island"] + by_kind["holder"]:
        assert u.compute_dtypes == frozenset({torch.float32}), u
        assert u.reduce_dtype == torch.float32 and u.output_dtype == torch.float32, u
    assert all(u.reshard_after_forward for u in by_kind["island"]), by_kind["island"]
    assert not any(u.reshard_after_forward for u in by_kind["holder"]), by_kind["holder"]
    island_members = {m for u in by_kind["island"] for m in u.members}
    holder_members = {m for u in by_kind["holder"] for m in u.members}
    assert ISLANDS <= island_members and HOLDERS <= holder_members
    assert not (NOT_ISLANDS & (island_members | holder_members))
    assert all(m.endswith(("sinks_param", "ape_param")) for m in holder_members)
    assert report["units_twice"] == units  # calling parallelize twice changes nothing
    assert report["all_grads_finite"]
    return by_kind


@pytest.mark.slow
def test_grouped_islands_default_two_fp32_units_per_block(ranks):
    report = ranks.run(_unit_report, 2, "bfloat16", True)[0]
    by_kind = _check_unit_rules(report)
    # forward: 3 all-gathers per block (bf16 block, fp32 islands, fp32 holders) + root + head islands
    assert report["forward_all_gathers"] == 4 * 3 + 1 + 1
    # per block: one island unit + one holder unit; the root level groups hc_head with lm_head
    assert len(by_kind["island"]) == 4 + 1 and len(by_kind["holder"]) == 4
    assert len(by_kind["root"]) == 1


@pytest.mark.slow
def test_per_island_baseline_one_unit_per_island(ranks):
    report = ranks.run(_unit_report, 2, "bfloat16", True, False)[0]
    by_kind = _check_unit_rules(report)
    assert report["forward_all_gathers"] == len(report["units"])  # one per unit
    # 2 mHC per block + compressor wkv/wgate (CSA: + indexer wkv/wgate) + hc_head, lm_head
    assert len(by_kind["island"]) == 4 * 2 + 2 * 4 + 2 + 2
    assert len(by_kind["holder"]) == 4 + 2 * 2 + 1


def _fp32_report(rank, world_size):
    from titan_dsv4.infra.unit_plan import fsdp_units

    return fsdp_units(build_parallelized(world_size, "float32"))


@pytest.mark.slow
def test_fp32_job_policy_needs_no_islands(ranks):
    units = ranks.run(_fp32_report, 2)[0]
    assert sorted(u.kind for u in units) == ["block"] * 4 + ["root"]
    assert all(u.compute_dtypes == frozenset({torch.float32}) for u in units)
