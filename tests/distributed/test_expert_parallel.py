"""Expert parallelism on real gloo meshes: gradients, the fp32 unit rules, the HCA group and the expert bias.

One launch per layout (dp_shard 2 x ep 2; dp_shard 4 x ep 2; dp_replicate 2 x dp_shard 2 x ep 2): a training
step of the debug model (hash-routed layers 0-1, learned layers 2-3) on different data per rank, in fp32,
compared with one process on the global batch; then the expert-bias update, compared likewise.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.sharded import (
    dims,
    full_grads,
    job,
    logged_messages,
    parallelized_copy,
    reference_model,
    sample,
)

SEQ = 256


def _ep_step(rank, world_size, degrees):
    from titan_dsv4.flavors import deepseek_v4_args
    from titan_dsv4.infra.optimizer import update_expert_bias
    from titan_dsv4.infra.parallelize import parallelize_deepseek_v4
    from titan_dsv4.infra.unit_plan import fsdp_units

    records = logged_messages()

    args = deepseek_v4_args["debugmodel"].replace(max_seq_len=SEQ)
    ref = reference_model(args)
    parallel = dims(world_size, **degrees)
    model = parallelized_copy(ref, parallel, job())
    inputs, labels = sample(rank, SEQ)
    loss = F.cross_entropy(model(inputs)[0].flatten(0, 1), labels.flatten(), reduction="sum") / (
        SEQ * world_size
    )
    loss.backward()
    update_expert_bias([model], parallel)
    out = {
        "grads": full_grads(model),
        "bias": {n: b.clone() for n, b in model.named_buffers() if n.endswith("expert_bias")},
        "experts": {
            n: (tuple(p.device_mesh.mesh_dim_names), tuple(p.to_local().shape))
            for n, p in model.named_parameters()
            if ".moe.experts." in n
        },
        "hca": {
            n: (
                None
                if m.hca_param_sync_group is None
                else torch.distributed.get_world_size(m.hca_param_sync_group)
            )
            for n, m in model.named_modules()
            if type(m).__name__ == "Compressor"
        },
        "log": [r for r in records if "HCA graph alignment disabled" in r],
    }
    # the fp32 unit rules, bf16 job policy, and a second parallelize call changes nothing
    bf16 = job("bfloat16")
    with torch.device("meta"):
        unit_model = type(ref)(args.replace())
    parallelize_deepseek_v4(unit_model, parallel, bf16)
    out["units"] = fsdp_units(unit_model)
    parallelize_deepseek_v4(unit_model, parallel, bf16)
    out["units_twice"] = fsdp_units(unit_model)
    if rank == 0:
        xs, ys = zip(*(sample(r, SEQ) for r in range(world_size)))
        x, y = torch.cat(xs), torch.cat(ys)
        ref_loss = F.cross_entropy(ref(x)[0].flatten(0, 1), y.flatten(), reduction="sum") / y.numel()
        ref_loss.backward()
        update_expert_bias([ref], dims_single())
        out["ref_grads"] = {n: p.grad for n, p in ref.named_parameters()}
        out["ref_bias"] = {n: b.clone() for n, b in ref.named_buffers() if n.endswith("expert_bias")}
    return out


def dims_single():
    class One:  # a one-process job: no data-parallel mesh, nothing to all-reduce
        @staticmethod
        def get_optional_mesh(name):
            return None

    return One()


def _check(out, ep_local_experts: int, hca_group: int | None):
    # every gradient equals one process's on the global batch, experts of both MoE kinds included
    assert {n for n, g in out["grads"].items() if g is not None} == {
        n for n, g in out["ref_grads"].items() if g is not None
    }
    for name, g in out["grads"].items():
        if g is not None:
            torch.testing.assert_close(g, out["ref_grads"][name], rtol=1e-4, atol=1e-6, msg=name)
    for layer in (0, 3):  # a hash-routed and a learned layer
        assert out["grads"][f"layers.{layer}.moe.experts.w1"].abs().sum() > 0
    # the expert bias counts every token once, globally: the same update as one process; hash layers have none
    assert (
        set(out["bias"]) == set(out["ref_bias"]) == {"layers.2.moe.expert_bias", "layers.3.moe.expert_bias"}
    )
    for name, b in out["bias"].items():
        assert torch.equal(b, out["ref_bias"][name]) and b.abs().sum() > 0, name
    # experts sharded over ep (and FSDP-sharded over the expert data-parallel mesh)
    mesh, local = out["experts"]["layers.0.moe.experts.w1"]
    assert "ep" in mesh and local[0] <= ep_local_experts
    assert out["hca"] == {
        "layers.1.self_attn.compressor": None,
        "layers.2.self_attn.compressor": hca_group,
        "layers.3.self_attn.compressor": None,
    }
    assert len(out["log"]) == (1 if hca_group is None else 0)
    _unit_rules_hold(out["units"])
    assert out["units_twice"] == out["units"]


def _unit_rules_hold(units):
    by_kind: dict[str, list] = {}
    for u in units:
        by_kind.setdefault(u.kind, []).append(u)
        assert len(u.storage_dtypes) == 1 and len(u.compute_dtypes) == 1, u  # no unit mixes dtypes
    assert len(by_kind["block"]) == 4 and len(by_kind["experts"]) == 4  # the block stays the main unit
    for u in by_kind["experts"] + by_kind["block"]:
        assert u.compute_dtypes == frozenset({torch.bfloat16}), u  # experts follow the block's policy
    for u in by_kind["island"] + by_kind["holder"]:
        assert u.compute_dtypes == frozenset({torch.float32}) and u.reduce_dtype == torch.float32, u
    assert not any(u.reshard_after_forward for u in by_kind["holder"])


@pytest.mark.slow
def test_dp_shard_2_ep_2(ranks):
    _check(ranks.run(_ep_step, 2, dict(dp_shard=2, ep=2))[0], ep_local_experts=4, hca_group=2)


@pytest.mark.slow
def test_dp_shard_4_ep_2(ranks):
    _check(ranks.run(_ep_step, 4, dict(dp_shard=4, ep=2), timeout=400)[0], ep_local_experts=4, hca_group=4)


@pytest.mark.slow
def test_hsdp_2x2_ep_2_disables_hca_alignment(ranks):
    _check(
        ranks.run(_ep_step, 4, dict(dp_replicate=2, dp_shard=2, ep=2), timeout=400)[0],
        ep_local_experts=4,
        hca_group=None,
    )


def test_refusals_name_the_degree_and_the_fix():
    from torchtitan.distributed import ParallelDims

    from titan_dsv4.infra.parallelize import UnsupportedParallelismError, refuse_unimplemented_parallelism

    config = job()
    config.parallelism.expert_parallel_comm_backend = "deepep"
    dims = dict(dp_replicate=1, dp_shard=2, cp=1, tp=1, pp=1, world_size=2)
    ep2 = ParallelDims(**dims, ep=2, etp=1)
    with pytest.raises(
        UnsupportedParallelismError,
        match="needs the DeepEP package.*--parallelism.expert_parallel_comm_backend standard",
    ):
        refuse_unimplemented_parallelism(ep2, config)
    with pytest.raises(UnsupportedParallelismError, match="expert_tensor_parallel_degree=2"):
        etp = ParallelDims(
            **{**dims, "tp": 2, "world_size": 4}, ep=2, etp=2
        )  # ETP = TP: Titan's other choice
        refuse_unimplemented_parallelism(etp, job())


def test_fp32_experts_under_deepep_is_refused(debug_args):
    from torchtitan.distributed import ParallelDims

    from titan_dsv4.infra.parallelize import UnsupportedParallelismError, refuse_fp32_experts_under_deepep

    ep2 = ParallelDims(dp_replicate=1, dp_shard=2, cp=1, tp=1, pp=1, ep=2, etp=1, world_size=2)
    config = job()
    config.parallelism.expert_parallel_comm_backend = "deepep"
    debug_args.fp32_compute = ["experts"]
    with pytest.raises(UnsupportedParallelismError, match="fp32_compute includes 'experts'.*standard"):
        refuse_fp32_experts_under_deepep(debug_args, ep2, config)
    debug_args.fp32_compute = ["attention_logits", "hc_mixing"]
    refuse_fp32_experts_under_deepep(debug_args, ep2, config)  # the other parts are served


def test_bad_expert_degrees_are_refused_before_any_work(debug_args):
    from titan_dsv4.job_config import check_job, check_parallel_degrees
    from titan_dsv4.model import ConfigError

    config = job()
    config.model.name, config.model.flavor = "deepseek_v4", "debugmodel"
    config.parallelism.expert_parallel_degree = 3
    with pytest.raises(ConfigError, match="expert_parallel_degree=3 must divide the 8 routed experts"):
        check_job(config)
    config.parallelism.expert_parallel_degree = 4
    with pytest.raises(
        ConfigError, match=r"expert_parallel_degree=4 .* must divide data_parallel_shard_degree"
    ):
        check_parallel_degrees(config.parallelism, 2)
