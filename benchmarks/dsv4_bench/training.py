"""Sections a (training step) and b (collectives, FSDP unit layouts), and the step profile.

Every run is 2 CPU ranks over gloo (``titan_dsv4.multiprocess.run_on_ranks``, 1 thread per rank),
a model built on meta, sharded, materialised and initialised from a fixed seed, random tokens from a
fixed per-rank seed, and the Trainer's step: forward, summed cross-entropy over the global token
count, backward, grad-norm clipping, AdamW (with V4's expert-bias hook). Warmup steps are not timed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .shapes import LOCAL_BATCH, SEQ_LEN

# FSDP layouts of section b: label -> how it is built. "parallelize" is the Trainer's own path
# (parallelize_deepseek_v4 -> apply_fsdp(group_islands=True)), so layout (1) is also section a's run;
# (2) and (3) call apply_fsdp directly, binding the HCA sync group as parallelize does.
FSDP_LAYOUTS = {
    "parallelize": (
        "(1) ours, grouped",
        "apply_fsdp(group_islands=True) via parallelize_deepseek_v4: per block "
        "1 bf16 unit + 1 fp32 island unit + 1 fp32 holder unit",
    ),
    "per_island": (
        "(2) per-island",
        "apply_fsdp(group_islands=False): 1 bf16 unit + one fp32 unit per island",
    ),
    "fp32": (
        "(3) all-fp32",
        "apply_fsdp with MixedPrecisionPolicy(fp32, fp32): no islands, 1 unit per block",
    ),
}


@dataclass(frozen=True)
class TrainJob:
    shape: str
    layout: str = "parallelize"
    warmup: int = 2
    steps: int = 5
    seq_len: int = SEQ_LEN
    local_batch: int = LOCAL_BATCH
    profile: bool = False  # profile one extra step on rank 0 (after the timed ones)
    seed: int = 0


def _build(job: TrainJob, world_size: int):
    """Meta model -> FSDP by ``job.layout`` -> CPU storage -> seeded init; returns (model, args, dims, job_config)."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torchtitan.config import JobConfig
    from torchtitan.distributed import ParallelDims

    from titan_dsv4.infra.parallelize import (
        apply_fsdp,
        bind_hca_param_sync_group,
        data_parallel_mesh,
        hca_param_sync_group,
        parallelize_deepseek_v4,
    )
    from titan_dsv4.model import DeepSeekV4Model

    from .shapes import shape_args

    args = shape_args(job.shape, job.seq_len)
    config = JobConfig()
    config.training.seq_len = job.seq_len
    config.activation_checkpoint.mode = "none"
    dims = ParallelDims(
        dp_replicate=1, dp_shard=world_size, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=world_size
    )
    dims.build_mesh()
    with torch.device("meta"):
        model = DeepSeekV4Model(args)
    if job.layout == "parallelize":
        parallelize_deepseek_v4(model, dims, config)
    else:
        mesh = data_parallel_mesh(dims)
        fp32 = job.layout == "fp32"
        policy = MixedPrecisionPolicy(
            param_dtype=torch.float32 if fp32 else torch.bfloat16, reduce_dtype=torch.float32
        )
        apply_fsdp(
            model,
            mesh,
            mp_policy=policy,
            reshard_after_forward=True,
            group_islands=job.layout != "per_island",
        )
        # parallelize_deepseek_v4 binds this too: without it the per-forward alignment all-reduce is missing.
        bind_hca_param_sync_group(model, hca_param_sync_group(mesh))
    model.to_empty(device="cpu")
    torch.manual_seed(job.seed)
    model.init_weights()
    model.train()
    return model, args, dims, config


def _batches(job: TrainJob, rank: int, vocab_size: int, n: int):
    """n (inputs, labels) pairs of random token ids, the same for every layout (seeded by rank)."""
    import torch

    g = torch.Generator().manual_seed(1000 + rank)
    out = []
    for _ in range(n):
        x = torch.randint(0, vocab_size, (job.local_batch, job.seq_len + 1), generator=g)
        out.append((x[:, :-1].contiguous(), x[:, 1:].contiguous()))
    return out


def _train_step(model, optimizers, inputs, labels, global_tokens: int, counter, max_norm: float = 1.0):
    """One Trainer-equivalent step; phases are labelled for the collective counter and the profiler."""
    from torch.profiler import record_function
    from torchtitan.components.loss import cross_entropy_loss
    from torchtitan.distributed import utils as dist_utils

    optimizers.zero_grad()
    with counter.phase("forward"), record_function("## forward ##"):
        pred = model(inputs)
        loss = cross_entropy_loss(pred, labels) / global_tokens
        del pred
    with counter.phase("backward"), record_function("## backward ##"):
        loss.backward()
    with counter.phase("optimizer"), record_function("## clip + AdamW ##"):
        dist_utils.clip_grad_norm_([p for p in model.parameters()], max_norm, foreach=True)
        optimizers.step()
    return loss.detach()


def train_rank(rank: int, world_size: int, job: TrainJob) -> dict:
    """Run on each rank: build, warm up, time ``job.steps`` steps; RSS, collectives and (optionally) a profile."""
    import time

    from titan_dsv4.infra.optimizer import build_optimizers_with_v4_load_balancing
    from titan_dsv4.model.args import count_params

    from .comms import CollectiveCounter
    from .measure import current_rss_mib, peak_rss_mib

    rss_before_build = current_rss_mib()
    counter = CollectiveCounter().install()
    model, args, dims, config = _build(job, world_size)
    optimizers = build_optimizers_with_v4_load_balancing([model], config.optimizer, dims)
    counter.attach_block_hooks(list(model.layers.values()))
    batches = _batches(job, rank, args.vocab_size, job.warmup + job.steps + int(job.profile))
    global_tokens = job.local_batch * job.seq_len * world_size

    losses, step_s = [], []
    for i, (inputs, labels) in enumerate(batches[: job.warmup + job.steps]):
        counter.recording = i >= job.warmup
        start = time.perf_counter()
        losses.append(float(_train_step(model, optimizers, inputs, labels, global_tokens, counter)))
        if i >= job.warmup:
            step_s.append(time.perf_counter() - start)
    counter.recording = False
    peak = peak_rss_mib()  # before profiling, whose bookkeeping would add to it
    profile = None
    if job.profile:
        profile = _profiled_step(rank, model, optimizers, batches[-1], global_tokens, counter)
    total, active = count_params(args, model)
    return {
        "rank": rank,
        "job": asdict(job),
        "n_layers": args.n_layers,
        "params_total": total,
        "params_active": active,
        "tokens_per_step_per_rank": job.local_batch * job.seq_len,
        "step_s": step_s,
        "losses": losses,
        "rss_before_build_mib": rss_before_build,
        "peak_rss_mib": peak,
        "comms": counter.summary(job.steps, args.n_layers),
        "profile": profile,
    }


def _profiled_step(rank: int, model, optimizers, batch, global_tokens: int, counter) -> dict | None:
    """One more step under torch.profiler (CPU) on rank 0; the other rank runs it unprofiled."""
    import contextlib

    from torch.profiler import ProfilerActivity, profile

    ctx = profile(activities=[ProfilerActivity.CPU]) if rank == 0 else contextlib.nullcontext()
    with ctx as prof:
        _train_step(model, optimizers, *batch, global_tokens, counter)
    if rank != 0:
        return None
    return summarize_profile(prof)


FSDP_BUCKET = "FSDP hooks: all-gather / reduce-scatter, buffer copy-in/out, dtype casts"


def _where(event) -> str:
    """The innermost labelled scope an op ran in: an FSDP hook, or else the step phase."""
    while event is not None:
        if event.name.startswith("FSDP::"):
            return FSDP_BUCKET
        if event.name.startswith("## "):
            return "model " + event.name.strip("# ") if event.name != "## clip + AdamW ##" else "clip + AdamW"
        event = event.cpu_parent
    return "outside the labelled phases"


def summarize_profile(prof, top: int = 15) -> dict:
    """Top ops by self CPU time, self CPU time by where it was spent, and each phase's wall time (ms)."""
    averages = prof.key_averages()
    phases = {e.key.strip("# "): e.cpu_time_total / 1e3 for e in averages if e.key.startswith("## ")}
    ops = sorted(
        (e for e in averages if not e.key.startswith("## ")),
        key=lambda e: e.self_cpu_time_total,
        reverse=True,
    )
    where: dict[str, float] = {}
    for event in prof.events():
        key = _where(event)
        where[key] = where.get(key, 0.0) + event.self_cpu_time_total / 1e3
    return {
        "phases_ms": phases,
        "total_self_cpu_ms": sum(e.self_cpu_time_total for e in averages) / 1e3,
        "self_cpu_ms_by_where": dict(sorted(where.items(), key=lambda kv: -kv[1])),
        "top_ops": [
            {
                "name": e.key,
                "self_cpu_ms": e.self_cpu_time_total / 1e3,
                "cpu_total_ms": e.cpu_time_total / 1e3,
                "calls": e.count,
            }
            for e in ops[:top]
        ],
    }


def run_job(job: TrainJob, timeout: float = 600.0) -> dict:
    """Both ranks' results of one job, merged: the slower rank bounds the step, memory per rank."""
    from titan_dsv4.multiprocess import run_on_ranks

    from .measure import median

    ranks = run_on_ranks(train_rank, 2, job, timeout=timeout)
    step_s = [max(a, b) for a, b in zip(ranks[0]["step_s"], ranks[1]["step_s"])]
    step = median(step_s)
    tokens_per_rank = ranks[0]["tokens_per_step_per_rank"]
    return {
        "job": asdict(job),
        "layout": FSDP_LAYOUTS[job.layout][0],
        "layout_description": FSDP_LAYOUTS[job.layout][1],
        "params_total": ranks[0]["params_total"],
        "params_active": ranks[0]["params_active"],
        "step_s_median": step,
        "step_s_all": step_s,
        "tokens_per_s_per_rank": tokens_per_rank / step,
        "tokens_per_s_global": 2 * tokens_per_rank / step,
        "peak_rss_mib_per_rank": [r["peak_rss_mib"] for r in ranks],
        "rss_before_build_mib_per_rank": [r["rss_before_build_mib"] for r in ranks],
        "global_losses": [a + b for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])],
        "comms_per_rank": [r["comms"] for r in ranks],
        "profile": ranks[0].get("profile"),
    }


def run(quick: bool) -> dict:
    """Sections a and b (and the step profile): one 2-rank job per (shape, layout), in a fixed order.

    The two layouts compared side by side, (1) and (2), run back to back with the same seeds and data.
    """
    from .shapes import MID

    steps = dict(warmup=1, steps=2) if quick else dict(warmup=2, steps=8)
    jobs = {
        "debugmodel/parallelize": TrainJob("debugmodel", "parallelize", **steps),
        "debugmodel/per_island": TrainJob("debugmodel", "per_island", **steps),
        "debugmodel/fp32": TrainJob("debugmodel", "fp32", **steps),
        f"{MID}/parallelize": TrainJob(MID, "parallelize", profile=True, **steps),
    }
    return {name: run_job(job) for name, job in jobs.items()}
