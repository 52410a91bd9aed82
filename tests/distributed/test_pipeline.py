"""Pipeline parallelism in one step: pp 2 x dp_shard 2 (and x EP 2) on 4 ranks, driven by Titan's schedule as
its trainer drives it, gives every parameter the single process's gradient (fp32), and each stage's FSDP
units keep the fp32 unit rules (bf16)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow
LOCAL_BATCH, SEQ = 2, 256
ENDS = (40, 150, 151, 200)  # packed documents (eos) in every row


def _args():
    """The debug flavor (hash and learned-router MoE layers, CSA, HCA) with MTP 1 and the indexer's KL on."""
    from titan_dsv4.flavors import deepseek_v4_args

    return deepseek_v4_args["debugmodel"].replace(
        max_seq_len=SEQ,
        mtp_layers=1,
        attn_mask_type="block_causal",
        indexer_loss_weight=0.5,
        indexer_warmup_steps=0,
    )


def _global_batch(dp: int) -> tuple[torch.Tensor, torch.Tensor]:
    from tests.helpers.sharded import packed_global_batch

    return packed_global_batch(dp * LOCAL_BATCH, SEQ, ENDS)


def _reference(dp: int):
    """One step of the whole model on the whole global batch: {parameter: gradient}."""
    from tests.helpers.sharded import reference_model
    from titan_dsv4.infra.loss import deepseek_v4_loss

    model = reference_model(_args())
    model.train()
    inputs, labels = _global_batch(dp)
    (deepseek_v4_loss(model(inputs), labels) / labels.numel()).backward()
    return model, {n: p.grad for n, p in model.named_parameters()}


# Per-op selective AC: blocks hold nested FSDP units (fp32 islands in bf16, experts under EP), whose
# pre-forward runs inside the checkpointed block and all-gathers in one microbatch's forward only.
OP_SAC = ("--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op")


def _stages(parallel, ep: int, mixed: str, schedule: str, ac: tuple[str, ...] = ()):
    """This rank's stage(s) of a meta model, split and parallelized as Titan's trainer does it."""
    from tests.helpers.sharded import titan_job
    from titan_dsv4.infra.loss import deepseek_v4_loss
    from titan_dsv4.infra.parallelize import parallelize_deepseek_v4
    from titan_dsv4.infra.pipeline import pipeline_deepseek_v4
    from titan_dsv4.model import DeepSeekV4Model

    job = titan_job(
        "--parallelism.pipeline_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "2",
        "--parallelism.expert_parallel_degree", str(ep), "--training.local_batch_size", str(LOCAL_BATCH),
        "--training.seq_len", str(SEQ), "--training.mixed_precision_param", mixed,
        "--parallelism.pipeline_parallel_schedule", schedule, *ac,
    )  # fmt: skip
    with torch.device("meta"):
        model = DeepSeekV4Model(_args())
    return pipeline_deepseek_v4(
        model, parallel, job, torch.device("cpu"), model.model_args, parallelize_deepseek_v4, deepseek_v4_loss
    )


def _one_step(parallel, ep: int, schedule: str, ref, mixed="float32", ac: tuple[str, ...] = ()) -> dict:
    """One schedule step from the reference's weights, as Titan's trainer calls it: {parameter: gradient}."""
    from tests.helpers.sharded import copy_weights, full_grads

    schedule_, parts, first, last = _stages(parallel, ep, mixed, schedule, ac)
    for part in parts:
        copy_weights(ref, part)
        part.train()
    inputs, labels = _global_batch(2)
    dp_rank = parallel.get_mesh("fsdp").get_local_rank()
    rows = slice(dp_rank * LOCAL_BATCH, (dp_rank + 1) * LOCAL_BATCH)
    target, losses = (labels[rows], []) if last else (None, None)
    args = (inputs[rows],) if first else ()
    schedule_.step(*args, target=target, losses=losses, return_outputs=False)
    grads = {}
    for part in parts:
        grads.update(full_grads(part))
    return grads


def _pipelined(rank: int, world: int, schedules: tuple[str, ...]):
    """Per layout and schedule, this rank's parameters' full gradients after one step (fp32); under EP also
    the units of a bf16 build. One spawn for both layouts (a spawn costs every rank its imports)."""
    from tests.helpers.sharded import dims, reference_model
    from titan_dsv4.infra.unit_plan import fsdp_units

    ref = reference_model(_args())  # the reference's initial weights
    plain = dims(world, pp=2, dp_shard=2)
    report = {("pp2-dp2", s): _one_step(plain, 1, s, ref) for s in schedules}
    expert = dims(world, pp=2, dp_shard=2, ep=2)
    report["pp2-dp2-ep2", "1F1B"] = _one_step(expert, 2, "1F1B", ref)
    # per-op SAC: fp32 (exact) and bf16 (the nested fp32 islands), each schedule with and without EP
    for mixed, layouts in (("float32", ((expert, 2, "1F1B"), (plain, 1, "Interleaved1F1B"))),
                           ("bfloat16", ((plain, 1, "1F1B"), (expert, 2, "Interleaved1F1B")))):  # fmt: skip
        for layout, ep, schedule in layouts:
            report["op-sac", mixed, ep, schedule] = _one_step(layout, ep, schedule, ref, mixed, OP_SAC)
            if mixed == "bfloat16":
                report["no-ac", mixed, ep, schedule] = _one_step(layout, ep, schedule, ref, mixed)
    report["units"] = [fsdp_units(p) for p in _stages(expert, 2, "bfloat16", "1F1B")[1]]
    return report


@pytest.fixture(scope="module")
def reports(ranks):
    from titan_dsv4.infra.pipeline import SUPPORTED_SCHEDULES

    return ranks.run(_pipelined, 4, SUPPORTED_SCHEDULES, timeout=900), _reference(2)[1]


def _assert_single_process_gradients(reports, key, expected: dict) -> None:
    got = {}
    for report in reports:
        for name, grad in report[key].items():
            if name in got:  # the dp ranks of a stage hold the same full gradient
                torch.testing.assert_close(grad, got[name], rtol=0, atol=0)
            got[name] = grad
    assert set(got) == set(expected), key
    for name, grad in expected.items():
        assert (got[name] is None) == (grad is None), (key, name)
        if grad is not None:
            torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=f"{key} {name}")


def test_every_schedule_at_pp2_dp2_gives_single_process_gradients(reports):
    from titan_dsv4.infra.pipeline import SUPPORTED_SCHEDULES

    for schedule in SUPPORTED_SCHEDULES:
        _assert_single_process_gradients(reports[0], ("pp2-dp2", schedule), reports[1])


def test_per_op_selective_ac_under_pp_gives_single_process_gradients(reports):
    """fp32: the single process's gradients, as without AC. bf16 (nested fp32 islands, whose all-gathers
    differ from one microbatch's forward to the next): it runs, and gives the step's gradients without AC."""
    keys = [k for k in reports[0][0] if k[0] == "op-sac"]
    assert len(keys) == 4
    for key in keys:
        if key[1] == "float32":
            _assert_single_process_gradients(reports[0], key, reports[1])
            continue
        for report in reports[0]:
            without_ac = report[("no-ac", *key[1:])]
            assert report[key].keys() == without_ac.keys()
            for name, grad in report[key].items():
                torch.testing.assert_close(grad, without_ac[name], rtol=1e-5, atol=1e-6, msg=f"{key} {name}")


def test_pp2_dp2_ep2_gives_single_process_gradients_and_keeps_the_fp32_unit_rules(reports):
    _assert_single_process_gradients(reports[0], ("pp2-dp2-ep2", "1F1B"), reports[1])
    kinds = {}
    for report in reports[0]:
        for units in report["units"]:
            for u in units:
                assert len(u.storage_dtypes) == 1 and len(u.compute_dtypes) == 1, u
                kinds.setdefault(u.kind, []).append(u)
    assert {u.compute_dtypes for u in kinds["block"]} == {frozenset({torch.bfloat16})}
    for u in kinds["island"] + kinds["holder"]:
        assert u.compute_dtypes == frozenset({torch.float32}), u
    assert kinds["experts"], "under EP each stage's routed experts are a unit of their own"
    # every block and MTP depth is a unit on the stage that holds it; the lm_head an fp32 island
    block_names = {u.name for u in kinds["block"] + kinds["mtp"]}
    assert {"layers.0", "layers.1", "layers.2", "layers.3", "mtp.layers.0"} <= block_names, block_names
    assert any(m.startswith("lm_head") for u in kinds["island"] for m in u.members)
