"""Planning at scale: the analytic estimate agrees with measured activations, refuses what cannot fit with the
figures and a layout that can, and lets the debug model through. (Against the built unit plan:
tests/distributed/test_dry_run.py.)"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from titan_dsv4.infra import planning
from titan_dsv4.infra.planning import GIB, Layout, Training, refusal
from titan_dsv4.infra.planning.estimate import fsdp_unsharded
from titan_dsv4.model.args import ConfigError
from titan_dsv4.multiprocess import run_on_ranks

ROOT = Path(__file__).resolve().parents[2]
# The shipped Flash and Pro configs pipeline (pp 4 and 11); these flags plan them without PP.
NO_PIPELINE = ("--parallelism.pipeline_parallel_degree", "1", "--training.local_batch_size", "1")


def _dims(dp_shard: int, **degrees: int):
    """Titan's ParallelDims for ``dp_shard`` ranks (validated, no mesh built: nothing here communicates)."""
    from torchtitan.distributed import ParallelDims

    full = dict(dp_replicate=1, dp_shard=dp_shard, cp=1, tp=1, pp=1, ep=1, etp=1) | degrees
    return ParallelDims(
        **full, world_size=full["dp_replicate"] * dp_shard * full["cp"] * full["tp"] * full["pp"]
    )


def _job(config: str, *flags: str):
    from torchtitan.config import ConfigManager

    return ConfigManager().parse_args(["--job.config_file", str(ROOT / "train_configs" / config), *flags])


def _args(job):
    from titan_dsv4.flavors import deepseek_v4_args

    args = deepseek_v4_args[job.model.flavor].replace()
    args.update_from_config(job)
    return args


def _saved_bytes(model, forward) -> int:
    """Bytes autograd saves while ``forward`` runs: unique storages, the (gathered) parameters excluded."""
    import torch

    params, saved = set(), {}

    def note_params(module, _):
        params.update(p.untyped_storage().data_ptr() for p in module.parameters(recurse=False))

    def pack(t):
        saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    hooks = [m.register_forward_pre_hook(note_params) for m in model.modules()]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    for h in hooks:
        h.remove()
    return sum(n for ptr, n in saved.items() if ptr not in params)


def _measured_saved_activations(rank, world_size, cases):
    """Per case, the debug model's saved bytes in one training forward and loss, its args and MTP depths."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torchtitan.config import JobConfig
    from torchtitan.protocols.train_spec import get_train_spec

    from titan_dsv4.flavors import deepseek_v4_args
    from titan_dsv4.infra.parallelize import apply_fsdp
    from titan_dsv4.infra.planning import built_mtp_layers

    spec = get_train_spec("deepseek_v4")
    loss_fn = spec.build_loss_fn(JobConfig())
    results = []
    for batch, seq_len, dtype, parts in cases:
        args = deepseek_v4_args["debugmodel"].replace(mtp_layers=1, max_seq_len=seq_len, fp32_compute=parts)
        torch.manual_seed(0)
        model = spec.model_cls(args)
        model.init_weights()
        if dtype == "bfloat16":  # the real policy: bf16 blocks, fp32 islands whose inputs FSDP casts to fp32
            mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("fsdp",))
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            apply_fsdp(model, mesh, mp_policy=policy, reshard_after_forward=False)
        tokens = torch.randint(0, args.vocab_size, (batch, seq_len))
        measured = _saved_bytes(model, lambda: loss_fn(model(tokens), tokens))  # noqa: B023
        results.append((measured, args, built_mtp_layers(model, args)))
    return results


@pytest.mark.slow
def test_activation_model_matches_saved_tensors_on_the_debug_model():
    """Measured ratios (MTP included; fp32_compute the default pair unless named): bf16 1.006 at (2, 512) and
    1.007 at (1, 1024); fp32 1.025; bf16 with no part, or router and experts: 1.0006; all four: 1.006.

    The model is term by term, so what it leaves out is per-op scalars (Sinkhorn sums, masks): about 1%.
    3% catches a missing tensor of any size that matters (the smallest modelled per-block term of Flash,
    the shared expert's SwiGLU, is 1.2% of a block).
    """
    pair, others = ("attention_logits", "hc_mixing"), ("router", "experts")  # the default fp32_compute
    cases = [
        (2, 512, "bfloat16", pair),
        (1, 1024, "bfloat16", pair),
        (2, 512, "float32", pair),
        (2, 512, "bfloat16", ()),
        (2, 512, "bfloat16", others),
        (2, 512, "bfloat16", pair + others),
    ]
    results = run_on_ranks(_measured_saved_activations, 1, cases, timeout=240)[0]
    for (batch, seq_len, dtype, _), (measured, args, mtp) in zip(cases, results):
        training = Training(seq_len=seq_len, local_batch_size=batch, compute_dtype=dtype, ac_mode="none")
        estimated = planning.activation_estimate(args, training, mtp).saved
        assert measured / estimated == pytest.approx(1.0, abs=0.03), (
            batch,
            seq_len,
            dtype,
            measured,
            estimated,
        )


def test_attention_kernel_memory_follows_the_kernel():
    """attn_impl triton saves q, the output, the LSE, the ranges and the picks per token: no softmax over the
    window and entries, no window blocks; the planner's estimate follows the job's kernel."""
    from titan_dsv4.flavors import deepseek_v4_args
    from titan_dsv4.infra.planning.activations import block_activation_terms

    sparse = deepseek_v4_args["flash"].replace()
    triton = sparse.replace(attn_impl="triton")
    H, d, k = sparse.n_heads, sparse.head_dim, sparse.index_topk
    kernel = block_activation_terms(triton, sparse.csa_ratio, 4096, 2)["attention kernel"]
    assert kernel == H * d * 4 + 2 * H * d * 2 + H * 4 + 16 + 4 * k
    assert kernel < block_activation_terms(sparse, sparse.csa_ratio, 4096, 2)["attention kernel"]
    training = Training(seq_len=4096, local_batch_size=1, compute_dtype="bfloat16", ac_mode="none")
    saved = [planning.activation_estimate(a, training, 1).saved for a in (sparse, triton)]
    assert saved[1] < saved[0]


def test_packed_documents_under_cp_count_their_visibility_masks():
    """block_causal builds a [S_local, S / ratio] visibility mask per compressed layer (and its negation): at
    the long config's shard that is 1 GiB per CSA mask, on top of the worst moment; causal rows need none."""
    from titan_dsv4.flavors import deepseek_v4_args

    causal = deepseek_v4_args["flash"].replace()
    packed = causal.replace(attn_mask_type="block_causal")
    S, cp = 1 << 20, 256
    training = Training(seq_len=S, local_batch_size=1, compute_dtype="bfloat16", ac_mode="full", cp=cp)
    plain, docs = (planning.activation_estimate(a, training, 1) for a in (causal, packed))
    assert docs.saved == plain.saved and docs.transient > plain.transient
    csa = causal.compress_ratios.index(causal.csa_ratio)
    assert docs.blocks[csa].backward - plain.blocks[csa].backward == 2 * (S // cp) * (S // 4) == 2 * GIB


def test_activations_scale_with_tokens_and_shrink_with_checkpointing():
    flash = _args(_job("deepseek_v4_flash.toml"))
    one = Training(seq_len=4096, local_batch_size=1)
    two = replace(one, local_batch_size=2)
    assert planning.activation_estimate(flash, two).saved == pytest.approx(
        2 * planning.activation_estimate(flash, one).saved, rel=0.01
    )
    saved = {
        mode: planning.activation_estimate(flash, replace(one, ac_mode=mode, selective_ac_option=opt)).saved
        for mode, opt in (("none", "op"), ("selective", "2"), ("selective", "op"), ("full", "op"))
    }
    assert saved["none"] > saved["selective"] > saved["full"]
    # Full AC keeps each block's streams (n x D bf16 per token, 43 blocks) and the two heads' fp32
    # log-probabilities; the rest (HyperHead, norms, lm_head inputs, the MTP depth's inputs) is under 1 GiB.
    kept = 43 * 4096 * 4 * 4096 * 2 + 2 * 4096 * 129280 * 4
    assert kept < saved["full"] < kept + GIB


def test_refusal_names_the_figures_and_a_layout_that_fits():
    job = _job("deepseek_v4_flash.toml", *NO_PIPELINE)
    args = _args(job)
    dims = _dims(64)
    with pytest.raises(ConfigError) as refused:
        planning.refuse_layout_that_cannot_fit(args, dims, job, device_memory_bytes=80 * GIB)
    message = str(refused.value)
    for figure in (
        "parameters (float32 shards)",
        "AdamW state",
        "largest unsharded unit",
        "activations",
        "peak",
    ):
        assert figure in message
    assert "the device has 80.0 GiB" in message
    best = planning.smallest_layouts(args, Training.of(job, Layout(1, 64)), 80 * GIB)[0]
    assert f"A layout that fits 80.0 GiB: {best.launch()}" in message
    assert "--parallelism.expert_parallel_degree" in best.launch()


def test_flash_on_a_24_gb_cpu_machine_is_refused_with_what_would_fit(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # run_train.sh's default on CPU: 2 ranks
    monkeypatch.setattr(refusal.torch.cuda, "is_available", lambda: False)
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 24 * 10**9 // 4096}
    monkeypatch.setattr(refusal.os, "sysconf", pages.__getitem__)
    job = _job("deepseek_v4_flash.toml", *NO_PIPELINE)
    with pytest.raises(ConfigError) as refused:
        planning.refuse_layout_that_cannot_fit(_args(job), _dims(2), job)
    message = str(refused.value)
    assert "no GPU: host RAM" in message and "/ 2 local rank(s)" in message
    assert "the device has 11.2 GiB" in message
    assert "none, even at local_batch_size 1" in message  # activations alone exceed half of 24 GB
    assert "train_configs/debug_model.toml" in message


def test_debug_config_fits_a_12_gib_device():
    job = _job("debug_model.toml")
    found = planning.refuse_layout_that_cannot_fit(_args(job), _dims(2), job, device_memory_bytes=12 * GIB)
    assert found is not None and found.peak < 1 * GIB


def test_dry_runs_and_simulated_modes_are_not_checked():
    job = _job("deepseek_v4_flash.toml", "--comm.mode", "fake_backend")
    tiny = _dims(2)
    assert planning.refuse_layout_that_cannot_fit(_args(job), tiny, job, device_memory_bytes=GIB) is None


def test_device_memory_is_the_knob_else_the_device(monkeypatch):
    job = _job("debug_model.toml", "--deepseek_v4.gpu_memory_gib", "24")
    assert planning.device_memory(job) == (24 * GIB, "--deepseek_v4.gpu_memory_gib 24")
    monkeypatch.setattr(refusal.torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    memory, source = planning.device_memory(_job("debug_model.toml"))
    assert memory * 4 <= refusal.os.sysconf("SC_PAGE_SIZE") * refusal.os.sysconf("SC_PHYS_PAGES")
    assert source.endswith("/ 4 local rank(s)")


def test_smallest_layout_fits_and_nothing_smaller_does():
    job = _job("deepseek_v4_flash.toml", *NO_PIPELINE)
    args = _args(job)
    training = Training.of(job, Layout(1, 8))
    best = planning.smallest_layouts(args, training, 80 * GIB)
    assert best and all(e.fits(80 * GIB) and e.layout.world == best[0].layout.world for e in best)
    world = best[0].layout.world
    assert world % 8 == 0 and best[0].traffic == min(e.traffic for e in best)
    cps = planning.context_parallel_degrees(args, training, world)
    for layout in planning.candidate_layouts(args, world - 8, cps=cps):
        assert not planning.fits(args, layout, training, 80)
    for pp, schedule in planning.pipeline_degrees(args, training):  # nor any pipelined layout
        step = planning.pipeline_training(training, pp, schedule)
        for layout in planning.candidate_layouts(args, world - 8, pps=(pp,)):
            assert layout.pp != pp or not planning.fits(args, layout, step, 80)
    # local_batch_size 4: four whole rows' activations exceed an 80 GiB device; only CP, which splits
    # the rows, leaves layouts that fit.
    four = _job("deepseek_v4_flash.toml", *NO_PIPELINE[:2], "--training.local_batch_size", "4")
    found = planning.smallest_layouts(args, Training.of(four, Layout(1, 8)), 80 * GIB)
    assert found and all(e.layout.cp > 1 for e in found)
    assert not planning.smallest_layouts(args, Training.of(four, Layout(1, 8)), 80 * GIB, max_world=7 * 8)


@pytest.mark.parametrize("config", ["deepseek_v4_flash.toml", "deepseek_v4_pro.toml"])
def test_the_shipped_configs_use_the_layout_the_planner_recommends(config):
    """Fits 80 GB, then the least communication per token (within 5%), then the fewest GPUs, searched at 4
    microbatches per pipeline rank: with PP, at least 30% less traffic per token than the best layout without
    it."""
    job = _job(config)
    args, p = _args(job), job.parallelism
    per_rank = job.training.local_batch_size // p.pipeline_parallel_degree
    assert per_rank == 4
    base = Training.of(_job(config, *NO_PIPELINE, "--training.local_batch_size", str(per_rank)), Layout(1, 1))
    best = planning.recommended_layouts(args, base, 80 * GIB)[0]
    world = best.layout.world
    assert best.layout == Layout(
        1, world // p.pipeline_parallel_degree, p.expert_parallel_degree, 1, p.pipeline_parallel_degree
    )
    assert best.training.pipeline.schedule == p.pipeline_parallel_schedule
    assert best.training.local_batch_size == job.training.local_batch_size
    assert best.training.pipeline.microbatch_size == p.pipeline_parallel_microbatch_size
    shipped = planning.estimate(args, best.layout, Training.of(job, best.layout))
    assert shipped.fits(80 * GIB) and shipped.peak == best.peak
    without = planning.recommended_layouts(args, base, 80 * GIB, pipeline=False)[0]
    assert without.layout.pp == 1 and best.traffic_per_token < 0.7 * without.traffic_per_token
    assert best.tokens_per_rank == 4 * 4096  # 4 rows' tokens per GPU per step (without PP: the same global
    # batch on the GPUs that layout needs, with context parallelism where activations need it)


def test_search_skips_layouts_fsdp_cannot_shard():
    """More efsdp x ep ranks than experts shard the experts on dim 1, which FSDP2 needs to divide evenly."""
    pro = _args(_job("deepseek_v4_pro.toml"))
    assert not planning.experts_shardable(pro, Layout(1, 1848, 24))  # efsdp 77 divides neither 3072 nor 7168
    assert planning.experts_shardable(pro, Layout(1, 2048, 64))  # efsdp 32
    assert planning.experts_shardable(pro, Layout(1, 256, 2))  # 256 ranks, 384 experts: Shard(0), padded
    assert Layout(1, 1848, 24) not in planning.candidate_layouts(pro, 1848)


# Pipeline parallelism: the planner's terms on hand-checkable cases (the debug model: 4 layers, seq_len 512).


def _pipelined(config: str, pp: int, schedule: str, microbatches: int, *flags: str):
    """(model args, the job's step as ``microbatches`` microbatches of 1 row under ``schedule``)."""
    job = _job(config, *flags)
    training = Training.of(job, Layout(1, 1))
    step = replace(training, local_batch_size=microbatches)
    return _args(job), replace(step, pipeline=planning.Pipeline(schedule=schedule, microbatch_size=1))


@pytest.mark.parametrize("config", ["debug_model.toml", "deepseek_v4_flash.toml"])
def test_pipeline_stages_hold_every_parameter_once(config):
    """The stages' parameters sum to the whole model, MTP depth included; the first stage holds the embedding,
    the last the heads and the MTP depth; a pipeline rank's estimate holds its stages' parameters only."""
    from titan_dsv4.model.accounting import analytic_nparams

    for pp, schedule in ((2, "1F1B"), (3, "1F1B"), (2, "Interleaved1F1B")):
        args, step = _pipelined(config, pp, schedule, 2 * pp, "--deepseek_v4.mtp_layers", "1")
        whole = analytic_nparams(args)  # MTP depth included (Flash: 290,942,278,866)
        plan = planning.PipelinePlan.of(args, pp, step)
        layout = Layout(1, 1, pp=pp)  # no data parallelism: a unit's shard is all of it
        per_stage = [
            sum(u.local_numel for u in planning.analytic_units(args, layout, step, 1, names))
            for names in plan.stages
        ]
        assert sum(per_stage) == whole, (pp, schedule)
        assert "tok_embeddings" in plan.stages[0] and {"lm_head", "mtp"} <= set(plan.stages[-1])
        layers = sorted(i for s in range(plan.n_stages) for i in plan.layers(s))
        assert layers == list(range(args.n_layers))
        for rank in range(pp):
            held = sum(per_stage[s] for s in plan.rank_stages(rank))
            found = planning.estimate(args, layout, step, pp_rank=rank)
            assert found.parameters == 4 * held  # fp32: no data-parallel mesh, so no mixed precision
            assert found.training.compute_dtype == "float32"
        worst = planning.estimate(args, layout, step)
        assert worst.peak == max(planning.estimate(args, layout, step, pp_rank=r).peak for r in range(pp))
        sharded = planning.estimate(args, Layout(1, 2, pp=pp), step)  # FSDP over 2 ranks: bf16 compute
        assert sharded.training.compute_dtype == "bfloat16" and not sharded.training.reshard_after_forward


def test_pipeline_p2p_bytes_are_the_stage_boundaries():
    """Per microbatch: streams [S, hc_mult, dim] bf16, token ids int64 and (MTP training) the embeddings of
    S + 1 tokens ahead; their gradients back (not the ids'). A rank sends its stages' outputs and input
    gradients, except to a stage on the same rank; the estimate reports the busiest rank."""
    args, step = _pipelined("debug_model.toml", 3, "1F1B", 6, "--deepseek_v4.mtp_layers", "1")
    S, n, D = step.seq_len, args.hc_mult, args.dim
    forward = S * (n * D * 2 + 8) + (S + 1) * D * 2
    backward = S * n * D * 2 + (S + 1) * D * 2
    layout = Layout(1, 2, pp=3)
    sent = [planning.estimate(args, layout, step, pp_rank=r).collectives["p2p"] for r in range(3)]
    assert sent == [6 * forward, 6 * (forward + backward), 6 * backward]
    assert planning.estimate(args, layout, step).collectives["p2p"] == 6 * (forward + backward)
    # Interleaved1F1B, 2 ranks x 2 stages: rank 0 holds stages 0 and 2, rank 1 stages 1 and 3.
    args, step = _pipelined("debug_model.toml", 2, "Interleaved1F1B", 4, "--deepseek_v4.mtp_layers", "1")
    sent = [planning.estimate(args, Layout(1, 2, pp=2), step, pp_rank=r).collectives["p2p"] for r in (0, 1)]
    assert sent == [4 * (2 * forward + backward), 4 * (forward + 2 * backward)]
    # ZBVZeroBubble puts stages r and 3 - r on rank r: stages 1 and 2 meet on rank 1, nothing crosses there.
    zbv = planning.PipelinePlan("ZBVZeroBubble", 2, 4, 1, ((),) * 4)
    assert [zbv.p2p_sent(r, 10, 1) for r in (0, 1)] == [4 * (10 + 1), 4 * (10 + 1)]
    # Without MTP training no embeddings cross.
    args, step = _pipelined("debug_model.toml", 3, "1F1B", 6, "--deepseek_v4.mtp_layers", "0")
    assert planning.estimate(args, layout, step, pp_rank=2).collectives["p2p"] == 6 * S * n * D * 2


def test_pipeline_bubble_follows_the_schedule():
    assert planning.bubble_fraction("1F1B", 4, 4, 1) == 3 / 7
    assert planning.bubble_fraction("GPipe", 4, 12, 1) == 3 / 15
    assert planning.bubble_fraction("Interleaved1F1B", 4, 8, 2) == 3 / 19
    assert planning.bubble_fraction("LoopedBFS", 4, 8, 2) == 3 / 19
    assert planning.bubble_fraction("InterleavedZeroBubble", 4, 8, 2) == 3 / 51
    assert planning.bubble_fraction("ZBVZeroBubble", 4, 8, 2) == 0
    assert planning.bubble_fraction("ZBVZeroBubble", 4, 3, 2) == 4 / 7
    args, step = _pipelined("debug_model.toml", 2, "1F1B", 6)
    assert planning.estimate(args, Layout(1, 2, pp=2), step).pipeline.bubble == 1 / 7


def test_pipeline_memory_counts_microbatches_in_flight_and_gathered_units():
    """1F1B: rank r keeps min(n, pp - r) microbatches (each its stage's saved activations and, before the
    last stage, its output streams and the carried embeddings); FSDP keeps every unit gathered across the
    microbatches and its unsharded gradient in fp32 until the step's reduce-scatter; all-gathers: once
    per step, n + 1 times for a unit resharded after forward (the last stage's fp32 hc_head and lm_head)."""
    args, step = _pipelined("debug_model.toml", 2, "1F1B", 4, "--deepseek_v4.mtp_layers", "1")
    layout = Layout(1, 2, pp=2)
    plan = planning.PipelinePlan.of(args, 2, step)
    micro = replace(step, local_batch_size=1)
    S, D = step.seq_len, args.dim
    carried = S * args.hc_mult * D * 2 + (S + 1) * D * 2  # output streams and embeddings, bf16
    first, last = (planning.estimate(args, layout, step, pp_rank=r) for r in (0, 1))
    stage = [planning.activation_estimate(args, micro, 1, names) for names in plan.stages]
    assert first.pipeline.in_flight == (2,) and last.pipeline.in_flight == (1,)
    assert first.activations.saved == 2 * (stage[0].saved + carried)
    assert last.activations.saved == stage[1].saved
    assert stage[1].outside > 0 == stage[0].outside  # the heads and the loss live on the last stage
    for rank, found in enumerate((first, last)):
        units = planning.analytic_units(args, layout, step, 1, plan.stages[rank])
        gathered = [u for u in units if not u.resharded]
        assert not any(u.resharded for u in units)  # every unit, the root's islands too, stays gathered
        assert found.kept_unsharded == sum(u.unsharded_bytes for u in gathered)
        held = sum(u.gathered_numel * u.reduce_bytes for u in units)
        assert found.pipeline.fsdp_accumulated_gradients == held
        assert found.fsdp_backward == fsdp_unsharded(units)[2] + held
        ag = sum(
            u.local_numel * (u.shard_ranks - 1) * u.compute_bytes * (5 if u.resharded else 1) for u in units
        )
        rs = sum(u.local_numel * (u.shard_ranks - 1) * u.reduce_bytes for u in units)
        assert (found.collectives["all_gather"], found.collectives["reduce_scatter"]) == (ag, rs)


def test_pipeline_in_flight_matches_torchs_schedules():
    """The formulas of ``stages.in_flight`` against the action lists torch's looped schedules build
    (``_calculate_single_rank_operations``): never fewer microbatches per stage or in all than torch keeps
    (forward done, full backward or weight gradient not yet), and Interleaved1F1B's total exactly."""
    from types import SimpleNamespace

    from torch.distributed.pipelining import schedules as S

    kinds = {
        "Interleaved1F1B": S.ScheduleInterleaved1F1B,
        "LoopedBFS": S.ScheduleLoopedBFS,
        "InterleavedZeroBubble": S.ScheduleInterleavedZeroBubble,
        "ZBVZeroBubble": S.ScheduleZBVZeroBubble,
    }
    done = {S._ComputationType.FULL_BACKWARD, S._ComputationType.BACKWARD_WEIGHT}
    checked = 0
    for name, cls in kinds.items():
        for v in (2,) if name == "ZBVZeroBubble" else (2, 3):
            for pp in range(2, 7):
                for n in range(1, 3 * pp + 1):
                    rounds = max(1, n // pp)
                    if name in ("Interleaved1F1B", "InterleavedZeroBubble") and n % rounds:
                        continue  # torch refuses these
                    fake = SimpleNamespace(
                        pp_group_size=pp, n_local_stages=v, microbatches_per_round=n // rounds,
                        _n_microbatches=n, _stages=[None] * v, num_stages=pp * v, number_of_rounds=rounds,
                    )  # fmt: skip
                    for rank in range(pp):
                        live, most, most_per = {}, 0, {}
                        for action in cls._calculate_single_rank_operations(fake, rank):
                            if action is None:
                                continue
                            s = action.stage_index
                            if action.computation_type == S._ComputationType.FORWARD:
                                live[s] = live.get(s, 0) + 1
                            elif action.computation_type in done:
                                live[s] -= 1
                            most = max(most, sum(live.values()))
                            most_per[s] = max(most_per.get(s, 0), live.get(s, 0))
                        stages = planning.PipelinePlan(name, pp, n, 1, ((),) * (pp * v)).rank_stages(rank)
                        per, total = planning.in_flight(name, pp, n, rank, v)
                        assert all(p >= most_per.get(s, 0) for p, s in zip(per, stages)), (
                            name,
                            v,
                            pp,
                            n,
                            rank,
                        )
                        assert total >= most and (total == most or name != "Interleaved1F1B")
                        checked += 1
    assert checked > 500


def test_search_picks_pipeline_parallelism_when_nothing_else_fits():
    """Flash at seq_len 4224 (no cp splits it into 128-token chunks) and 4 rows per GPU: four whole rows
    fit no layout without PP; a pipeline runs them as microbatches of one row, a stage at a time."""
    job = _job(
        "deepseek_v4_flash.toml",
        *NO_PIPELINE[:2],
        "--training.seq_len",
        "4224",
        "--training.local_batch_size",
        "4",
    )
    args, training = _args(job), Training.of(job, Layout(1, 1))
    assert planning.context_parallel_degrees(args, training, 1024) == (1,)
    assert not planning.smallest_layouts(args, training, 80 * GIB, pipeline=False)
    found = planning.smallest_layouts(args, training, 80 * GIB)
    assert found and all(e.layout.pp > 1 and e.fits(80 * GIB) for e in found)
    best = found[0]
    assert best.training.local_batch_size == 4 * best.layout.pp and best.tokens_per_rank == 4 * 4224
    assert "--parallelism.pipeline_parallel_degree" in planning.fitting_layout(args, training, 80 * GIB)


def test_pipeline_with_context_parallelism_is_refused():
    args, step = _pipelined("debug_model.toml", 2, "1F1B", 2)
    with pytest.raises(ConfigError, match="context parallelism is not implemented"):
        planning.estimate(args, Layout(1, 2, cp=2, pp=2), step)
