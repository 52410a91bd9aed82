"""``MeasuredTrainer``: titan_dsv4's Trainer, measuring its own steps for sections a, b and f.

The step is the real one (``DeepSeekV4Trainer.train_step`` -> Titan's ``train_step``: data, forward,
loss, backward, grad-norm clipping, AdamW, LR schedule, metrics); this subclass only wraps it, after
the Trainer is fully built:
  * the collective counter (``comms.py``) records the timed steps, by phase: ``forward`` (between the
    root model's pre- and post-forward hooks), ``backward`` (the rest of ``forward_backward_step``: loss
    and backward) and ``rest`` (the rest of ``train_step``: token count, clip, AdamW, logging);
  * per-block forward hooks attribute forward collectives to blocks;
  * each step's wall time; ru_maxrss right after the last timed step; the loss of every step;
  * optionally one more step (the last) under torch.profiler on rank 0, with the same phases labelled.
Configured by environment variables (run_train.sh passes them to every rank); each rank writes its
measurements to ``$DSV4_BENCH_OUT.rank<r>.json`` when training ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import torch
from torch.profiler import record_function

from titan_dsv4.trainer import DeepSeekV4Trainer

from .comms import CollectiveCounter
from .measure import current_rss_mib, peak_rss_mib
from .trainer_runs import OUT_ENV, PROFILE_ENV, WARMUP_ENV

LABELS = {
    "## forward ##": "model forward",
    "## forward + backward ##": "loss + backward",  # what of it is not under "## forward ##"
    "## train_step ##": "rest of train_step: data, clip, AdamW, logging",
}
FSDP_BUCKET = "FSDP hooks: all-gather / reduce-scatter, buffer copy-in/out, dtype casts"


class MeasuredTrainer(DeepSeekV4Trainer):
    """DeepSeekV4Trainer whose steps are timed, their collectives counted, and one optionally profiled."""

    def __init__(self, job_config):
        self.rss_before_build_mib = current_rss_mib()
        super().__init__(job_config)
        steps = job_config.training.steps
        self.warmup = int(os.environ.get(WARMUP_ENV, "1"))
        self.profile_step = steps if os.environ.get(PROFILE_ENV) == "1" else None
        self.last_timed = steps - (self.profile_step is not None)
        if self.last_timed <= self.warmup:
            raise ValueError(
                f"training.steps={steps} leaves no timed step after {self.warmup} warmup step(s)"
            )
        model = self.model_parts[0]
        self.counter = CollectiveCounter().install()
        self.counter.attach_block_hooks(list(model.layers.values()))
        label_forward(model, self.counter)
        self.step_s: list[float] = []
        self.losses: list[float] = []
        self.peak_rss_mib: float | None = None
        self.profile: dict | None = None

    def train_step(self, data_iterator):
        timed = self.warmup < self.step <= self.last_timed
        profiled = self.step == self.profile_step
        self.counter.recording, self.counter.step = timed, self.step
        with self._profiler(profiled) as prof:
            with self.counter.phase("rest"), record_function("## train_step ##"):
                start = time.perf_counter()
                super().train_step(data_iterator)
                elapsed = time.perf_counter() - start
        self.counter.recording = False
        if timed:
            self.step_s.append(elapsed)
        if self.step == self.last_timed:
            self.peak_rss_mib = peak_rss_mib()  # before profiling, whose bookkeeping would add to it
        if prof is not None:
            self.profile = summarize_profile(prof)

    def forward_backward_step(self, **kwargs):
        with self.counter.phase("backward"), record_function("## forward + backward ##"):
            loss = super().forward_backward_step(**kwargs)
        # This rank's loss sum / global tokens: summed over the ranks it is the step's loss.
        self.losses.append(float(loss.detach()))
        return loss

    def _profiler(self, on: bool):
        """torch.profiler (CPU) around the step on rank 0 when ``on``; elsewhere nothing."""
        if not (on and torch.distributed.get_rank() == 0):
            return contextlib.nullcontext()
        from torch.profiler import ProfilerActivity, profile

        return profile(activities=[ProfilerActivity.CPU])

    def train(self):
        super().train()
        self.write_measurements()

    def write_measurements(self) -> None:
        """This rank's figures as JSON (``$DSV4_BENCH_OUT.rank<r>.json``)."""
        from titan_dsv4.model.accounting import count_params

        model, cfg = self.model_parts[0], self.job_config
        total, active = count_params(self.model_args, model)
        rank = torch.distributed.get_rank()
        record = {
            "rank": rank,
            "world_size": torch.distributed.get_world_size(),
            "model": cfg.model.name,
            "flavor": cfg.model.flavor,
            "expert_parallel_degree": self.parallel_dims.ep,
            "mixed_precision_param": cfg.training.mixed_precision_param,
            "n_layers": self.model_args.n_layers,
            "params_total": total,
            "params_active": active,
            "tokens_per_step_per_rank": cfg.training.local_batch_size * cfg.training.seq_len,
            "warmup_steps": self.warmup,
            "steps": cfg.training.steps,
            "step_s": self.step_s,
            "losses": self.losses,
            "rss_before_build_mib": self.rss_before_build_mib,
            "peak_rss_mib": self.peak_rss_mib,
            "comms": self.counter.summary(len(self.step_s), self.model_args.n_layers),
            "routed_bytes_per_step": routed_bytes_per_step(model, cfg),
            "profile": self.profile,
        }
        with open(f"{os.environ[OUT_ENV]}.rank{rank}.json", "w") as f:
            json.dump(record, f)


def routed_bytes_per_step(model: torch.nn.Module, cfg) -> int:
    """What expert parallelism's all-to-alls must move per rank and step, averaged over ranks: every MoE
    block's dispatch and combine, forward and backward (4 passes), each of local tokens x top-k rows of dim
    values in the compute dtype (the tiny per-expert count exchange aside)."""
    args = model.model_args
    blocks = args.n_layers + (args.mtp_layers if model.mtp is not None and model.mtp.trains else 0)
    rows = cfg.training.local_batch_size * cfg.training.seq_len * args.moe_args.top_k
    itemsize = 4 if cfg.training.mixed_precision_param == "float32" else 2
    return blocks * 4 * rows * args.dim * itemsize


def label_forward(model: torch.nn.Module, counter: CollectiveCounter) -> None:
    """Mark the root model's forward as the ``forward`` phase, for the counter and the profiler.

    The pre-hook is prepended (before FSDP's root pre-forward, which all-gathers the root unit); the
    post-hook is appended (after FSDP's post-forward) and always runs.
    """
    scopes: list[tuple[contextlib.ExitStack, object]] = []

    def enter(module, args):
        stack = contextlib.ExitStack()
        stack.enter_context(counter.phase("forward"))
        stack.enter_context(record_function("## forward ##"))
        scopes.append(stack)

    def leave(module, args, output):
        if scopes:
            scopes.pop().close()

    model.register_forward_pre_hook(enter, prepend=True)
    model.register_forward_hook(leave, always_call=True)


def _where(event) -> str:
    """The innermost labelled scope an op ran in: an FSDP hook, or else the step phase."""
    while event is not None:
        if event.name.startswith("FSDP::"):
            return FSDP_BUCKET
        if event.name in LABELS:
            return LABELS[event.name]
        event = event.cpu_parent
    return "outside the labelled phases"


def summarize_profile(prof, top: int = 15) -> dict:
    """Top ops by self CPU time, self CPU time by where it was spent, and each phase's wall time (ms)."""
    averages = prof.key_averages()
    scopes = {e.key: e.cpu_time_total / 1e3 for e in averages if e.key in LABELS}
    forward = scopes.get("## forward ##", 0.0)
    fwd_bwd = scopes.get("## forward + backward ##", 0.0)
    phases = {
        "forward": forward,
        "loss + backward": fwd_bwd - forward,
        "rest of train_step": scopes.get("## train_step ##", 0.0) - fwd_bwd,
    }
    ops = sorted(
        (e for e in averages if e.key not in LABELS), key=lambda e: e.self_cpu_time_total, reverse=True
    )
    where: dict[str, float] = {}
    for event in prof.events():
        key = _where(event)
        where[key] = where.get(key, 0.0) + event.self_cpu_time_total / 1e3
    return {
        "phases_ms": phases,
        "step_ms": scopes.get("## train_step ##", 0.0),
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
