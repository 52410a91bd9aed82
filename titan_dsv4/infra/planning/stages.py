"""Pipeline parallelism's terms: which stages a rank holds, how many microbatches each keeps in flight, the
bubble, and what crosses a stage boundary.

The stage split is ``infra.pipeline``'s (Titan's ``generate_llm_fqn_per_model_part`` renamed for V4: the
first stage holds tok_embeddings, the last hc_head, norm, lm_head and every MTP depth, rope is on every
stage); a rank holds stages r, r + pp, ... (loop schedules) or r and n_stages - 1 - r (V schedules), as
Titan's ``pipeline_module_split`` places them.

Microbatches in flight (forward done, backward not yet) per local stage, from torch 2.13's
``torch/distributed/pipelining/schedules.py`` (n microbatches, pp ranks, v stages per rank, rank r,
mpr = n // max(1, n // pp), the microbatches per round of the looped schedules):
  * GPipe: n (``ScheduleGPipe``: every forward, then every backward);
  * 1F1B: min(n, pp - r) (``Schedule1F1B._step_microbatches``: ``warmup_chunks = min(n_microbatches,
    num_stages - stage_index)`` forwards, then one backward before each further forward);
  * Interleaved1F1B: local stage j holds at most min(n, (v - 1 - j) mpr + min(mpr, 2 (pp - 1 - r) + 1)), and
    the rank at most min(n v, w + 1) of all its stages together, w = min((v - 1) mpr + 2 (pp - 1 - r), n v)
    (``_get_warmup_ops`` with multiply_factor 2 forwards of warm-up, then a forward before each backward in
    ``_get_1f1b_rank_ops``);
  * LoopedBFS: n per stage (``ScheduleLoopedBFS``: every stage's forwards, then the backwards);
  * InterleavedZeroBubble: min(n, (v - j) mpr) per local stage, min(n v, v mpr) in all (an activation
    lives until its weight gradient W, which ZB1P delays);
  * ZBVZeroBubble (stages r and 2 pp - 1 - r): min(n, 2 pp - r) and min(n, r + 1), at most 2 pp in all.
``tests/unit/test_planning.py`` checks these against torch's own action lists (``pipeline_order``) for
pp 2-8, 1-4 pp microbatches and 2-4 stages per rank: never below, Interleaved1F1B's total exact.

Bubble (idle fraction of a step; F, B and W of equal time for the zero-bubble schedules):
  * 1F1B, GPipe: (pp - 1) / (n + pp - 1): Narayanan et al. 2021, "Efficient Large-Scale Language Model
    Training on GPU Clusters Using Megatron-LM" (arXiv 2104.04473) section 2.2.1, a bubble of (pp - 1)
    microbatch times against n of work;
  * Interleaved1F1B, LoopedBFS (v stages per rank): (pp - 1) / (v n + pp - 1): the same paper, section 2.2.2
    (the bubble shrinks by v); Lamy-Poirier 2022 (arXiv 2211.05953) for the breadth-first order;
  * InterleavedZeroBubble (ZB1P): (pp - 1) / (3 v n + pp - 1): Qi et al. 2024, "Zero Bubble Pipeline
    Parallelism" (arXiv 2401.10241), ZB1P's bubble is a third of 1F1B's when F, B and W take equal time;
  * ZBVZeroBubble: 0 from 2 pp - 1 microbatches on (the same paper's ZB-V); below that torch pads the
    schedule to 2 pp - 1 microbatches and the missing ones idle: (2 pp - 1 - n) / (2 pp - 1).

Between stages, per microbatch of b rows of S tokens: forward the mHC streams [b, S, hc_mult, dim] in the
compute dtype and the token ids [b, S] (int64), and, when MTP trains, the embeddings [b, S + mtp, dim];
backward the gradients of the streams and embeddings (``infra/pipeline_stage.py``). Adjacent stages on the
same rank (V schedules) exchange nothing over the network (torch's ``is_next_stage_on_this_rank``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from titan_dsv4.model.args import ConfigError, DeepSeekV4ModelArgs

from .activations import running_mtp_layers
from .layout import Pipeline, Training

SINGLE_STAGE_SCHEDULES = ("1F1B", "GPipe")
V_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")
SEARCHED_SCHEDULES = ("1F1B", "Interleaved1F1B")  # what the layout search tries


@functools.lru_cache(maxsize=256)
def stage_modules(n_layers: int, pp: int, pipeline: Pipeline) -> tuple[tuple[str, ...], ...]:
    """Module names of every (virtual) stage, as ``infra.pipeline.stage_module_names`` splits the model."""
    from titan_dsv4.infra.pipeline import stage_module_names

    return tuple(tuple(names) for names in stage_module_names(n_layers, pipeline.job_config(pp)))


def stage_split_error(n_layers: int, pp: int, pipeline: Pipeline) -> str | None:
    """Why ``infra.pipeline`` refuses this split (None when it builds it)."""
    try:
        stage_modules(n_layers, pp, pipeline)
    except ConfigError as e:
        return str(e)
    return None


def rank_stages(rank: int, pp: int, n_stages: int, schedule: str) -> tuple[int, ...]:
    """The stages pipeline rank ``rank`` holds (Titan's ``pipeline_module_split``: loop or V style)."""
    if schedule in V_SCHEDULES:
        return (rank, n_stages - 1 - rank)
    return tuple(range(rank, n_stages, pp))


def in_flight(schedule: str, pp: int, microbatches: int, rank: int, v: int) -> tuple[tuple[int, ...], int]:
    """(per local stage, all local stages together): the most microbatches whose activations a rank keeps
    at once (the module docstring gives each formula and its source)."""
    n, r = microbatches, rank
    mpr = n // max(1, n // pp)
    if schedule == "GPipe":
        return (n,), n
    if schedule == "1F1B":
        return (min(n, pp - r),), min(n, pp - r)
    if schedule == "Interleaved1F1B":
        last = min(mpr, 2 * (pp - 1 - r) + 1)
        per = tuple(min(n, (v - 1 - j) * mpr + last) for j in range(v))
        warmup = min((v - 1) * mpr + 2 * (pp - 1 - r), n * v)
        return per, min(n * v, warmup + 1)
    if schedule == "LoopedBFS":
        return (n,) * v, n * v
    if schedule == "InterleavedZeroBubble":
        return tuple(min(n, (v - j) * mpr) for j in range(v)), min(n * v, v * mpr)
    if schedule == "ZBVZeroBubble":
        per = (min(n, 2 * pp - r), min(n, r + 1))
        return per, min(2 * pp, sum(per))
    raise ConfigError(f"the planner has no in-flight model for the pipeline schedule {schedule!r}")


def bubble_fraction(schedule: str, pp: int, microbatches: int, v: int) -> float:
    """The idle fraction of a pipelined step (the module docstring gives each formula and its source)."""
    n = microbatches
    if pp <= 1:
        return 0.0
    if schedule in ("1F1B", "GPipe"):
        return (pp - 1) / (n + pp - 1)
    if schedule in ("Interleaved1F1B", "LoopedBFS"):
        return (pp - 1) / (v * n + pp - 1)
    if schedule == "InterleavedZeroBubble":
        return (pp - 1) / (3 * v * n + pp - 1)
    if schedule == "ZBVZeroBubble":
        return max(0, 2 * pp - 1 - n) / (2 * pp - 1)
    raise ConfigError(f"the planner has no bubble model for the pipeline schedule {schedule!r}")


def boundary_bytes(a: DeepSeekV4ModelArgs, training: Training, mtp_layers: int) -> tuple[int, int]:
    """(forward, backward) bytes crossing one stage boundary for one microbatch (``training``'s local batch
    is the microbatch): the streams and token ids ahead, their gradients back (not the ids'); with MTP
    training, the embeddings of the tokens and the ``mtp_layers`` ahead both ways."""
    B, S, c = training.local_batch_size, training.seq_len, training.compute_bytes
    streams = B * S * a.hc_mult * a.dim * c
    embeddings = B * (S + mtp_layers) * a.dim * c if running_mtp_layers(a, mtp_layers) else 0
    return streams + B * S * 8 + embeddings, streams + embeddings


def boundary_kept_bytes(
    a: DeepSeekV4ModelArgs, training: Training, mtp_layers: int, first: bool, last: bool
) -> int:
    """What a stage keeps per microbatch in flight beyond its blocks' saved activations: its output streams
    (held for the backward of the stage's output) and, with MTP training, the carried embeddings (the first
    stage's output, a later stage's received input); the first block's input streams are that block's."""
    if last:
        return 0
    B, S, c = training.local_batch_size, training.seq_len, training.compute_bytes
    embeddings = B * (S + mtp_layers) * a.dim * c if running_mtp_layers(a, mtp_layers) else 0
    return B * S * a.hc_mult * a.dim * c + embeddings


@dataclass(frozen=True)
class PipelinePlan:
    """One pipelined layout's stage split and schedule, rank by rank."""

    schedule: str
    pp: int
    microbatches: int
    microbatch_size: int
    stages: tuple[tuple[str, ...], ...]  # module names of every stage

    @classmethod
    def of(cls, a: DeepSeekV4ModelArgs, pp: int, training: Training) -> PipelinePlan:
        p = training.pipeline
        names = stage_modules(a.n_layers, pp, p)
        return cls(p.schedule, pp, training.pipeline_microbatches, p.microbatch_size, names)

    @property
    def n_stages(self) -> int:
        return len(self.stages)

    @property
    def stages_per_rank(self) -> int:
        return self.n_stages // self.pp

    def rank_stages(self, rank: int) -> tuple[int, ...]:
        return rank_stages(rank, self.pp, self.n_stages, self.schedule)

    def in_flight(self, rank: int) -> tuple[tuple[int, ...], int]:
        return in_flight(self.schedule, self.pp, self.microbatches, rank, self.stages_per_rank)

    @property
    def bubble(self) -> float:
        return bubble_fraction(self.schedule, self.pp, self.microbatches, self.stages_per_rank)

    def layers(self, stage: int) -> list[int]:
        """The backbone layers of a stage, by index."""
        return [int(m.split(".")[1]) for m in self.stages[stage] if m.startswith("layers.")]

    def p2p_sent(self, rank: int, forward: int, backward: int) -> int:
        """Bytes a rank sends per step: each of its stages' outputs ahead (not the last stage's) and input
        gradients back (not the first stage's), per microbatch; nothing to a stage on the same rank."""
        mine, total = set(self.rank_stages(rank)), 0
        for s in mine:
            if s + 1 < self.n_stages and s + 1 not in mine:
                total += forward
            if s > 0 and s - 1 not in mine:
                total += backward
        return total * self.microbatches

    def describe(self, rank: int) -> str:
        stages = ", ".join(_stage_span(self, s) for s in self.rank_stages(rank))
        return (
            f"{self.schedule}, {self.n_stages} stages, {self.microbatches} microbatches of "
            f"{self.microbatch_size}; rank {rank} holds {stages}"
        )


def _stage_span(plan: PipelinePlan, stage: int) -> str:
    layers = plan.layers(stage)
    span = f"layers {layers[0]}-{layers[-1]}" if layers else "no layers"
    extras = [m for m in plan.stages[stage] if m in ("tok_embeddings", "lm_head", "mtp")]
    return f"stage {stage} ({span}" + "".join(f", {m}" for m in extras) + ")"
