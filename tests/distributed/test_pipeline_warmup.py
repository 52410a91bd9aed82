"""The indexer's dense warm-up under pipeline parallelism, through gradient clipping as Titan's trainer runs
it (the schedule's step, ``clip_grad_norm_`` over the pp mesh, the optimizer with its pre-hooks): pp 2 x
dp_shard 2 on 4 ranks gives the single process's global norm and clipped indexer gradients (fp32), AdamW
sees no other gradient and leaves every other parameter alone; with an inf in the LM logits too (the
single process never backpropagates the LM loss in the warm-up; a pipeline does, times 0, and 0 x NaN is
NaN), and on a rank whose stage holds no indexer."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow
LOCAL_BATCH, SEQ = 2, 256
ENDS = (40, 150, 151, 200)  # packed documents (eos) in every row
MAX_NORM = 1e-4  # below the indexers' gradient norm: clipping scales every gradient
INF_AT = (5, 7)  # (position, token) of the main head's logit set to inf, in every row
DEBUG = (0, 4, 128, 4)  # the debug flavor: sliding, CSA | HCA, CSA (pp 2: two layers a stage)
NO_INDEXER_LAST = (4, 4, 0, 128)  # CSA, CSA | sliding, HCA: the last stage (and its MTP depth) has no indexer
CASES = (
    ("1F1B", DEBUG, False),
    ("1F1B", DEBUG, True),
    ("ZBVZeroBubble", DEBUG, True),  # two stages per rank, split backward (input / weight gradients)
    ("1F1B", NO_INDEXER_LAST, True),
)


def _args(ratios):
    """The debug flavor with MTP 1, packed documents and the indexer's KL, at step 1 of a 2-step warm-up."""
    from titan_dsv4.flavors import deepseek_v4_args

    return deepseek_v4_args["debugmodel"].replace(
        max_seq_len=SEQ,
        mtp_layers=1,
        attn_mask_type="block_causal",
        compress_ratios=list(ratios),
        indexer_loss_weight=0.5,
        indexer_warmup_steps=2,  # a model without a training clock is at step 1
    )


def _global_batch(dp: int) -> tuple[torch.Tensor, torch.Tensor]:
    from tests.helpers.sharded import packed_global_batch

    return packed_global_batch(dp * LOCAL_BATCH, SEQ, ENDS)


def _inf_logit(module, inputs, output):
    """lm_head's forward hook: one logit of the main head (the first S positions) becomes inf."""
    output = output.clone()
    output[:, INF_AT[0], INF_AT[1]] = float("inf")
    return output


def _is_indexer(name: str) -> bool:
    return ".indexer." in f".{name}"


def _reference(ratios, inf: bool):
    """The whole model's step on the whole global batch, clipped: (loss, norm, {parameter: gradient})."""
    from tests.helpers.sharded import reference_model
    from titan_dsv4.infra.loss import deepseek_v4_loss

    model = reference_model(_args(ratios))
    model.train()
    if inf:
        model.lm_head.register_forward_hook(_inf_logit)
    inputs, labels = _global_batch(2)
    loss = deepseek_v4_loss(model(inputs), labels) / labels.numel()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), MAX_NORM, foreach=True)
    return loss.detach(), norm, {n: p.grad for n, p in model.named_parameters()}


def _full(part, values) -> dict:
    from titan_dsv4.infra.fsdp_units import canonical_name

    return {
        canonical_name(n): (None if v is None else v.full_tensor().clone())
        for n, v in zip((n for n, _ in part.named_parameters()), values)
    }


def _one_step(parallel, schedule: str, ratios, inf: bool) -> dict:
    """One training step as Titan's trainer runs it, from the reference's weights: what clipping and AdamW
    got, and which parameters AdamW changed."""
    from torchtitan.distributed import utils as dist_utils

    from tests.helpers.sharded import copy_weights, reference_model, titan_job
    from titan_dsv4.infra.loss import deepseek_v4_loss
    from titan_dsv4.infra.optimizer import build_optimizers_with_v4_load_balancing
    from titan_dsv4.infra.parallelize import parallelize_deepseek_v4
    from titan_dsv4.infra.pipeline import pipeline_deepseek_v4
    from titan_dsv4.model import DeepSeekV4Model

    job = titan_job(
        "--parallelism.pipeline_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "2",
        "--training.local_batch_size", str(LOCAL_BATCH), "--training.seq_len", str(SEQ),
        "--training.mixed_precision_param", "float32", "--training.max_norm", str(MAX_NORM),
        "--parallelism.pipeline_parallel_schedule", schedule,
    )  # fmt: skip
    ref = reference_model(_args(ratios))
    with torch.device("meta"):
        model = DeepSeekV4Model(_args(ratios))
    schedule_, parts, first, last = pipeline_deepseek_v4(
        model, parallel, job, torch.device("cpu"), model.model_args, parallelize_deepseek_v4, deepseek_v4_loss
    )
    for part in parts:
        copy_weights(ref, part)
        part.train()
        if inf and part.lm_head is not None:
            part.lm_head.register_forward_hook(_inf_logit)
    optimizers = build_optimizers_with_v4_load_balancing(parts, job.optimizer, parallel)
    seen = {}

    def what_adamw_sees(*args, **kwargs) -> None:  # a pre-hook after ours: the gradients AdamW steps with
        for part in parts:
            seen.update(_full(part, [p.grad for p in part.parameters()]))

    optimizers.register_step_pre_hook(what_adamw_sees)
    inputs, labels = _global_batch(2)
    dp_rank = parallel.get_mesh("fsdp").get_local_rank()
    rows = slice(dp_rank * LOCAL_BATCH, (dp_rank + 1) * LOCAL_BATCH)
    target, losses = (labels[rows], []) if last else (None, None)
    args = (inputs[rows],) if first else ()
    schedule_.step(*args, target=target, losses=losses, return_outputs=False)
    params = [p for m in parts for p in m.parameters()]
    at_clipping = {}
    for part in parts:
        at_clipping.update(_full(part, [p.grad for p in part.parameters()]))
    norm = dist_utils.clip_grad_norm_(
        params,
        job.training.max_norm,
        foreach=True,
        pp_mesh=parallel.get_optional_mesh("pp"),
        ep_enabled=parallel.ep_enabled,
    )
    clipped = {}
    for part in parts:
        clipped.update(_full(part, [p.grad for p in part.parameters()]))
    before = {}
    for part in parts:
        before.update(_full(part, [p.detach() for p in part.parameters()]))
    optimizers.step()
    changed = {}
    for part in parts:
        for name, value in _full(part, [p.detach() for p in part.parameters()]).items():
            changed[name] = not torch.equal(value, before[name])
    loss = torch.stack(losses).sum() if last else None
    return dict(
        norm=norm.detach().clone(),
        at_clipping=at_clipping,
        clipped=clipped,
        seen=seen,
        changed=changed,
        loss=loss,
    )


def _warmup_steps(rank: int, world: int):
    from tests.helpers.sharded import dims

    parallel = dims(world, pp=2, dp_shard=2)
    return {case: _one_step(parallel, *case) for case in CASES}


@pytest.fixture(scope="module")
def reports(ranks):
    references = {(ratios, inf): _reference(ratios, inf) for _, ratios, inf in CASES}
    return ranks.run(_warmup_steps, 4, timeout=1200), references


def _gathered(reports, case, key) -> dict:
    """{parameter: value} over the ranks (the dp ranks of a stage hold the same)."""
    got = {}
    for report in reports:
        for name, value in report[case][key].items():
            if name in got:
                if isinstance(value, torch.Tensor):
                    torch.testing.assert_close(value, got[name], rtol=0, atol=0, equal_nan=True)
                else:
                    assert value == got[name], (case, key, name)
            got[name] = value
    return got


@pytest.mark.parametrize(
    "case", CASES, ids=["-".join((c[0], str(c[1]), "inf" if c[2] else "finite")) for c in CASES]
)
def test_dense_warmup_under_pp_clips_and_steps_as_the_single_process(reports, case):
    schedule, ratios, inf = case
    ranks_reports, references = reports
    ref_loss, ref_norm, ref_grads = references[ratios, inf]
    assert torch.isfinite(ref_norm) and ref_norm > MAX_NORM, ref_norm  # clipping scales the gradients
    assert torch.isfinite(ref_loss) != inf, ref_loss  # an inf logit makes its row's log-softmax NaN
    learning = {n for n, g in ref_grads.items() if g is not None}
    assert learning and all(_is_indexer(n) for n in learning), sorted(learning)

    # The norm Titan clips by: the single process's, on every rank.
    for report in ranks_reports:
        norm = report[case]["norm"]
        torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0, msg=f"{case}: {norm} vs {ref_norm}")

    # No other gradient reaches clipping: only a rank whose stages hold no indexer keeps one exact zero.
    for report in ranks_reports:
        others = {n: g for n, g in report[case]["at_clipping"].items() if n not in learning and g is not None}
        held = [n for n in report[case]["at_clipping"] if n in learning]
        assert len(others) == (0 if held else 1), (case, sorted(others))
        assert all(torch.equal(g, torch.zeros_like(g)) for g in others.values()), (case, sorted(others))
    if ratios == NO_INDEXER_LAST:
        assert any(not any(n in learning for n in r[case]["at_clipping"]) for r in ranks_reports)

    # Clipped, and as AdamW sees them: the single process's gradients (the others absent), finite with an
    # inf in the logits; AdamW changes the indexers and nothing else.
    for key in ("clipped", "seen"):
        got = _gathered(ranks_reports, case, key)
        assert set(got) == set(ref_grads), (case, key)
        for name, expected in ref_grads.items():
            if key == "seen" or name in learning:
                assert (got[name] is None) == (expected is None), (case, key, name)
            if expected is not None:
                assert torch.isfinite(got[name]).all(), (case, key, name)
                torch.testing.assert_close(
                    got[name], expected, rtol=1e-5, atol=1e-9, msg=f"{case} {key} {name}"
                )
    changed = _gathered(ranks_reports, case, "changed")
    assert {n for n, c in changed.items() if c} == learning, case

    # The logged LM loss, summed over the last stage's microbatches and dp ranks: the single process's.
    losses = [r[case]["loss"] for r in ranks_reports if r[case]["loss"] is not None]
    assert len(losses) == 2, case  # the last stage's two dp ranks
    total = torch.stack(losses).sum() / (2 * LOCAL_BATCH * SEQ)
    torch.testing.assert_close(total, ref_loss, rtol=1e-5, atol=0, equal_nan=True, msg=str(case))
