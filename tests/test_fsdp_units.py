"""The fp32 unit rules, checked on real 2-rank gloo FSDP2 after parallelize_deepseek_v4."""

from __future__ import annotations

import torch

from distributed import run_on_ranks


def build_parallelized(world_size: int, mixed: str = "bfloat16", twice: bool = False):
    from torchtitan.config import JobConfig
    from torchtitan.distributed import ParallelDims

    from titan_dsv4.flavors import deepseek_v4_args
    from titan_dsv4.infra.parallelize import parallelize_deepseek_v4
    from titan_dsv4.model import DeepSeekV4Model

    job = JobConfig()
    job.training.mixed_precision_param = mixed
    dims = ParallelDims(dp_replicate=1, dp_shard=world_size, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=world_size)
    dims.build_mesh()
    args = deepseek_v4_args["debugmodel"].replace(max_seq_len=256)
    with torch.device("meta"):
        model = DeepSeekV4Model(args)
    parallelize_deepseek_v4(model, dims, job)
    if twice:
        parallelize_deepseek_v4(model, dims, job)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def _unit_report(rank, world_size, mixed, twice):
    from titan_dsv4.infra.unit_plan import fsdp_units

    model = build_parallelized(world_size, mixed)
    units = fsdp_units(model)
    report = {"units": units}
    if twice:
        from titan_dsv4.infra.parallelize import parallelize_deepseek_v4  # noqa: F401

        model2 = build_parallelized(world_size, mixed, twice=True)
        report["units_twice"] = fsdp_units(model2)
    # one forward/backward must run through the islands
    tokens = torch.randint(0, 2048, (1, 256), generator=torch.Generator().manual_seed(rank))
    model(tokens).float().logsumexp(-1).mean().backward()
    report["all_grads_finite"] = all(
        torch.isfinite(p.grad.full_tensor()).all().item() for p in model.parameters() if p.grad is not None
    )
    return report


def test_bf16_job_policy_gives_fp32_islands_and_bf16_blocks():
    report = run_on_ranks(_unit_report, 2, "bfloat16", True)[0]
    units = report["units"]
    by_kind = {}
    for u in units:
        by_kind.setdefault(u.kind, []).append(u)
        assert len(u.storage_dtypes) == 1, u
        assert len(u.compute_dtypes) == 1, u
    # 4 blocks: islands per block = attn_hc, ffn_hc, sinks + compressor (CSA: 3 + indexer 3; HCA: 3)
    assert len(by_kind["block"]) == 4
    assert {u.compute_dtypes for u in by_kind["block"]} == {frozenset({torch.bfloat16})}
    assert {u.storage_dtypes for u in by_kind["block"]} == {frozenset({torch.float32})}
    for u in by_kind["island"] + by_kind["holder"]:
        assert u.compute_dtypes == frozenset({torch.float32}), u
        assert u.reduce_dtype == torch.float32 and u.output_dtype == torch.float32, u
    assert all(u.reshard_after_forward for u in by_kind["island"]), by_kind["island"]
    assert not any(u.reshard_after_forward for u in by_kind["holder"]), by_kind["holder"]
    names = {u.name for u in units}
    for expected in (
        "hc_head", "lm_head", "layers.0.attn_hc", "layers.0.ffn_hc", "layers.0.self_attn.sinks_param",
        "layers.1.self_attn.compressor.wkv", "layers.1.self_attn.compressor.wgate",
        "layers.1.self_attn.compressor.ape_param", "layers.1.self_attn.compressor.indexer.wkv",
        "layers.1.self_attn.compressor.indexer.wgate", "layers.1.self_attn.compressor.indexer.ape_param",
        "layers.2.self_attn.compressor.wkv",
    ):
        assert expected in names, expected
    assert "layers.2.self_attn.compressor.indexer.wkv" not in names  # HCA has no indexer
    assert "layers.0.self_attn.compressor.wkv" not in names  # sliding layer has no compressor
    holders = {u.name for u in by_kind["holder"]}
    assert holders == {n for n in names if n.endswith(("sinks_param", "ape_param"))}
    # 3 per block + compressor islands (CSA 6, HCA 3) + hc_head, lm_head, 4 blocks, root
    assert len(units) == 4 * 3 + 6 + 3 + 6 + 2 + 4 + 1
    assert report["units_twice"] == units  # calling parallelize twice changes nothing
    assert report["all_grads_finite"]


def _fp32_report(rank, world_size):
    from titan_dsv4.infra.unit_plan import fsdp_units

    return fsdp_units(build_parallelized(world_size, "float32"))


def test_fp32_job_policy_needs_no_islands():
    units = run_on_ranks(_fp32_report, 2)[0]
    assert sorted(u.kind for u in units) == ["block"] * 4 + ["root"]
    assert all(u.compute_dtypes == frozenset({torch.float32}) for u in units)
