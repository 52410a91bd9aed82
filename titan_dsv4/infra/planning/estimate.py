"""One rank's peak memory and per-step traffic for a layout: a sum of named terms over its units."""
# Over 400 lines: the unpipelined and the per-pipeline-rank estimate share their private terms (one module).

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from titan_dsv4.model.accounting import MTP_PREFIX
from titan_dsv4.model.args import ConfigError, DeepSeekV4ModelArgs

from .activations import (
    Activations,
    activation_estimate,
    cp_halo_bytes,
    gathered_entry_bytes,
    recomputed_units,
    running_mtp_layers,
)
from .layout import FP32, GIB, Layout, Training
from .stages import SINGLE_STAGE_SCHEDULES, PipelinePlan, boundary_bytes, boundary_kept_bytes
from .units import Unit, analytic_units

# Kept free on every device: CUDA context, NCCL buffers and the caching allocator's fragmentation.
RESERVED_FRACTION = 0.10
_DTYPE_NAMES = {4: "float32", 2: "bfloat16"}


def usable_bytes(device_bytes: int) -> int:
    return int(device_bytes * (1 - RESERVED_FRACTION))


@dataclass(frozen=True)
class Estimate:
    """One rank's memory at the peak of a step and its traffic per step, by part (bytes)."""

    layout: Layout
    training: Training
    parameters: int
    gradients: int
    optimizer: int
    buffers: int
    kept_unsharded: int  # units not resharded after forward (the root, holders) stay gathered
    fsdp_forward: int  # kept + the largest unit and the prefetched next one
    fsdp_backward: int  # + the largest unit's unsharded gradient and reduce-scatter buffer
    largest_unit: str
    largest_unit_bytes: int
    activations: Activations
    collectives: dict[str, float]  # bytes per step by collective, in the order the tables print them
    mtp_layers: int  # MTP depths included
    mtp_from_shapes: bool  # MTP units counted from shapes (the built model has none yet)
    pipeline: PipelineFigures | None = None  # pp > 1: the schedule, the rank reported, its stages

    @property
    def tokens_per_rank(self) -> float:
        """Tokens per step per rank: the step's tokens (every batch rank's local batch) over the world."""
        t = self.training
        return t.seq_len * t.local_batch_size * self.layout.batch_ranks / self.layout.world

    @property
    def traffic_per_token(self) -> float:
        """Bytes per rank per step over the tokens per rank per step (every collective, p2p included)."""
        return self.traffic / self.tokens_per_rank

    def launch(self) -> str:
        """How to ask for this layout (``Layout.launch``, with a pipeline's schedule and local batch)."""
        more = ""
        if self.layout.pp > 1:
            more = (
                f" --parallelism.pipeline_parallel_schedule {self.training.pipeline.schedule} "
                f"--training.local_batch_size {self.training.local_batch_size}"
            )
        return self.layout.launch() + more

    @property
    def memory_terms(self) -> dict[str, int]:
        """The parts whose sum is the peak: every one at its own maximum at once (conservative)."""
        return {
            "parameters": self.parameters,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "buffers": self.buffers,
            "fsdp unsharded": self.fsdp_backward,
            "activations": self.activations.peak,
        }

    @property
    def state(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.buffers

    @property
    def peak(self) -> int:
        return sum(self.memory_terms.values())

    @property
    def traffic(self) -> float:
        return sum(self.collectives.values())

    def fits(self, device_bytes: int) -> bool:
        return self.peak <= usable_bytes(device_bytes)

    def figures(self) -> dict:
        """The estimate as JSON (GiB), what ``format_memory`` and ``format_traffic`` print."""
        gib = lambda b: round(b / GIB, 3)
        pipeline = {} if self.pipeline is None else {"pipeline": asdict(self.pipeline)}
        return {
            **pipeline,
            "layout": {**asdict(self.layout), "world": self.layout.world, "describe": self.layout.describe()},
            "training": {**asdict(self.training), "describe": self.training.describe()},
            "mtp_layers": self.mtp_layers,
            "mtp_from_shapes": self.mtp_from_shapes,
            "memory_gib": {
                "parameters": gib(self.parameters),
                "gradients": gib(self.gradients),
                "adamw_state": gib(self.optimizer),
                "buffers": gib(self.buffers),
                "largest_unit": gib(self.largest_unit_bytes),
                "largest_unit_name": self.largest_unit,
                "fsdp_kept_unsharded": gib(self.kept_unsharded),
                "fsdp_forward": gib(self.fsdp_forward),
                "fsdp_backward": gib(self.fsdp_backward),
                "activations_saved": gib(self.activations.saved),
                "activations_transient": gib(self.activations.transient),
                "peak": gib(self.peak),
            },
            "communication_gib_per_step": {name: gib(b) for name, b in self.collectives.items()},
        }


def estimate(
    a: DeepSeekV4ModelArgs,
    layout: Layout,
    training: Training,
    units: list[Unit] | None = None,
    mtp_layers: int | None = None,
    activations: Activations | None = None,
    pp_rank: int | None = None,
    cache: dict | None = None,
) -> Estimate:
    """One rank's peak memory and per-step traffic; ``units`` from ``built_units`` replace the analytic ones.

    Built units without MTP get the MTP depths' units from the shapes, so figures always include MTP.
    Under pipeline parallelism: the pipeline rank with the highest peak (or ``pp_rank``, whose stages
    ``units`` then are), each collective at its busiest pipeline rank (``pipeline_estimate``).
    """
    refuse_unmodelled_parallelism(layout)
    training = training.on(layout)  # the layout's cp, FSDP's resharding, a pipeline's compute dtype
    mtp_layers = a.mtp_layers if mtp_layers is None else mtp_layers
    if layout.pp > 1:
        return pipeline_estimate(a, layout, training, units, mtp_layers, pp_rank, cache)
    units, from_shapes = _with_mtp_units(a, layout, training, units, mtp_layers)
    return _from_units(
        layout,
        training,
        units,
        buffers=buffer_bytes(a, training.seq_len),
        activations=activations or activation_estimate(a, training, mtp_layers),
        collectives={
            **fsdp_traffic(units, training),
            "all_to_all": all_to_all_bytes(a, layout, training, mtp_layers),
            **({"cp_exchange": cp_exchange_bytes(a, training, mtp_layers)} if layout.cp > 1 else {}),
        },
        mtp_layers=mtp_layers,
        from_shapes=from_shapes,
    )


def _from_units(
    layout: Layout,
    training: Training,
    units: list[Unit],
    *,
    buffers: int,
    activations: Activations,
    collectives: dict[str, float],
    mtp_layers: int,
    from_shapes: bool,
    accumulated: int = 0,
    pipeline: PipelineFigures | None = None,
) -> Estimate:
    """What every estimate reads off its FSDP units (sharded state, the largest unit, FSDP's gathers, plus
    ``accumulated``: a pipeline's unsharded gradients); the caller gives the terms that differ."""
    local = 0 if training.cpu_offload else sum(u.local_numel * u.storage_bytes for u in units)
    largest = max(units, key=lambda u: u.unsharded_bytes)
    kept, forward, backward = fsdp_unsharded(units) if layout.data_parallel else (0, 0, 0)
    return Estimate(
        layout=layout,
        training=training,
        parameters=local,
        gradients=local,
        optimizer=2 * local,
        buffers=buffers,
        kept_unsharded=kept,
        fsdp_forward=forward,
        fsdp_backward=backward + accumulated,
        largest_unit=f"{largest.name}, {_DTYPE_NAMES.get(largest.compute_bytes, '?')}",
        largest_unit_bytes=largest.unsharded_bytes,
        activations=activations,
        collectives=collectives,
        mtp_layers=mtp_layers,
        mtp_from_shapes=from_shapes,
        pipeline=pipeline,
    )


def refuse_unmodelled_parallelism(layout: Layout) -> None:
    """What the trainer does not build has no figure: pipeline with context parallelism (``infra.pipeline``
    refuses it in this version)."""
    if layout.pp > 1 and layout.cp > 1:
        raise ConfigError(
            f"pipeline parallelism with context parallelism is not implemented ({layout.describe()}): plan "
            "with --parallelism.context_parallel_degree 1 or --parallelism.pipeline_parallel_degree 1"
        )


@dataclass(frozen=True)
class PipelineFigures:
    """A pipelined estimate's schedule, and the pipeline rank whose memory it reports."""

    schedule: str
    stages: int
    stages_per_rank: int
    microbatches: int
    microbatch_size: int
    bubble: float
    rank: int  # the pipeline rank reported (the highest peak)
    rank_stages: str  # its stages, described
    in_flight: tuple[int, ...]  # microbatches kept per local stage (at most ``in_flight_total`` together)
    in_flight_total: int
    fsdp_accumulated_gradients: int  # bytes: unsharded gradients held from a unit's first backward to the
    # step's reduce-scatter


def pipeline_estimate(
    a: DeepSeekV4ModelArgs,
    layout: Layout,
    training: Training,
    units: list[Unit] | None,
    mtp_layers: int,
    pp_rank: int | None = None,
    cache: dict | None = None,
) -> Estimate:
    """The worst pipeline rank's memory, and each collective at its busiest rank, as sums over the stages a
    rank holds.

    Per rank: the parameters, gradients and AdamW state of its stages' units (sharded over its dp_shard x cp
    ranks); the activations of the microbatches it keeps in flight (``stages.in_flight``) stage by stage
    (each stage's saved bytes per microbatch, and what crosses its boundary), the worst moment on top once;
    FSDP: units left gathered across the microbatches (Titan does not reshard after forward under PP), and
    every unit's unsharded gradient in the reduce dtype from its first microbatch's backward to the step's
    end (torch's pipeline stage backpropagates with ``set_requires_gradient_sync(False)`` and
    reduce-scatters once, in ``perform_reduce_grad``); traffic: one all-gather per unit per step for units
    kept gathered (resharded ones: ``fsdp_traffic``), one reduce-scatter per unit per step, the all-to-all
    of its MoE layers for every microbatch, and the stage-boundary sends.
    """
    if units is not None and pp_rank is None:
        raise ValueError("built units are one pipeline rank's: name it (pp_rank)")
    plan = PipelinePlan.of(a, layout.pp, training)
    micro = replace(training, local_batch_size=plan.microbatch_size)
    # One microbatch's activations per stage index: the same for every dp_shard and ep (``cache``: shared by
    # a search's estimates of one model).
    acts = ({} if cache is None else cache).setdefault((micro, mtp_layers, plan.stages), {})
    ranks = range(layout.pp) if pp_rank is None else [pp_rank]
    per_rank = [_pipeline_rank(a, layout, training, micro, plan, r, units, mtp_layers, acts) for r in ranks]
    worst = max(per_rank, key=lambda e: e.peak)
    busiest = {name: max(e.collectives[name] for e in per_rank) for name in worst.collectives}
    return replace(worst, collectives=busiest)


def _pipeline_rank(
    a: DeepSeekV4ModelArgs,
    layout: Layout,
    training: Training,
    micro: Training,
    plan: PipelinePlan,
    rank: int,
    built: list[Unit] | None,
    mtp_layers: int,
    acts: dict[int, Activations],
) -> Estimate:
    stages = plan.rank_stages(rank)
    last = plan.n_stages - 1
    holds_last = last in stages
    if built is None:
        units = [u for s in stages for u in analytic_units(a, layout, training, mtp_layers, plan.stages[s])]
        from_shapes = False
    else:
        units, from_shapes = _with_mtp_units(a, layout, training, built, mtp_layers if holds_last else 0)
    for s in stages:
        if s not in acts:
            acts[s] = activation_estimate(a, micro, mtp_layers, plan.stages[s])
    kept_per_microbatch = [
        acts[s].saved + boundary_kept_bytes(a, micro, mtp_layers, first=s == 0, last=s == last)
        for s in stages
    ]
    per_stage, total = plan.in_flight(rank)
    saved = min(total * max(kept_per_microbatch), sum(n * k for n, k in zip(per_stage, kept_per_microbatch)))
    activations = Activations(
        saved=saved,
        transient=max(acts[s].transient for s in stages),
        blocks=tuple(b for s in stages for b in acts[s].blocks),
        outside=sum(acts[s].outside for s in stages),
    )
    # FSDP keeps a stage's gradients unsharded across its microbatches (reduced once at the end)
    accumulated = sum(u.gathered_numel * u.reduce_bytes for u in units) if layout.data_parallel else 0
    layers = [i for s in stages for i in plan.layers(s)]
    moe_units = len(layers) + (running_mtp_layers(a, mtp_layers) if holds_last else 0)
    return _from_units(
        layout,
        training,
        units,
        buffers=stage_buffer_bytes(a, training.seq_len, layers, mtp_layers if holds_last else 0, len(stages)),
        activations=activations,
        collectives={
            **fsdp_traffic(units, training, pipelined=True),
            "all_to_all": all_to_all_bytes(a, layout, training, mtp_layers, moe_units),
            "p2p": float(plan.p2p_sent(rank, *boundary_bytes(a, micro, mtp_layers))),
        },
        mtp_layers=mtp_layers,
        from_shapes=from_shapes,
        accumulated=accumulated,
        pipeline=PipelineFigures(
            schedule=plan.schedule,
            stages=plan.n_stages,
            stages_per_rank=plan.stages_per_rank,
            microbatches=plan.microbatches,
            microbatch_size=plan.microbatch_size,
            bubble=plan.bubble,
            rank=rank,
            rank_stages=plan.describe(rank),
            in_flight=per_stage,
            in_flight_total=total,
            fsdp_accumulated_gradients=accumulated,
        ),
    )


def _with_mtp_units(
    a: DeepSeekV4ModelArgs, layout: Layout, training: Training, units: list[Unit] | None, mtp_layers: int
) -> tuple[list[Unit], bool]:
    """The units to count, MTP depths included; True when those came from the shapes, not the model."""
    if units is None:
        return analytic_units(a, layout, training, mtp_layers), False
    if not mtp_layers or any(u.name.startswith(MTP_PREFIX) for u in units):
        return units, False
    no_blocks = replace(a, compress_ratios=[], n_layers=0)
    mtp = [
        u for u in analytic_units(no_blocks, layout, training, mtp_layers) if u.name.startswith(MTP_PREFIX)
    ]
    return units + mtp, True


def fsdp_unsharded(units: list[Unit]) -> tuple[int, int, int]:
    """(kept gathered, forward peak, backward peak) of FSDP's unsharded parameters and gradients on one rank.

    Units not resharded after forward stay gathered; on top, the largest resharded unit and the next one
    (prefetch); in backward also the largest unsharded gradient (compute dtype) and reduce-scatter buffer.
    """
    kept = sum(u.unsharded_bytes for u in units if not u.resharded)
    pair = 2 * max((u.unsharded_bytes for u in units if u.resharded), default=0)
    grad_and_buffer = max(u.gathered_numel * (u.compute_bytes + u.reduce_bytes) for u in units)
    return kept, kept + pair, kept + pair + grad_and_buffer


def fsdp_traffic(units: list[Unit], training: Training, pipelined: bool = False) -> dict[str, float]:
    """Per rank per step: bytes all-gathered, reduce-scattered, and all-reduced across HSDP replicas.

    A resharded unit is gathered in forward and again in backward. ``pipelined`` (torch's stage keeps units
    gathered after each microbatch's backward): a unit kept gathered once per step; a resharded one before
    every forward that follows a forward and every backward that follows a forward: n + 1 times for n
    microbatches under 1F1B and GPipe (one stage per rank), at most 2 n under the looped schedules.
    """
    gathers = 2
    if pipelined:
        n = training.pipeline_microbatches
        gathers = n + 1 if training.pipeline.schedule in SINGLE_STAGE_SCHEDULES else 2 * n
    ag = rs = ar = 0.0
    for u in units:
        if u.shard_ranks * u.replicate_ranks == 1:
            continue
        others = u.local_numel * (u.shard_ranks - 1)  # padded shards from (or to) the other ranks
        ag += others * u.compute_bytes * (gathers if u.resharded else 1)
        rs += others * u.reduce_bytes
        ar += u.local_numel * u.reduce_bytes * 2 * (u.replicate_ranks - 1) / u.replicate_ranks
    m = training.microbatches
    return {"all_gather": ag * m, "reduce_scatter": rs * m, "all_reduce": ar * m}


def all_to_all_bytes(
    a: DeepSeekV4ModelArgs, layout: Layout, training: Training, mtp_layers: int, moe_units: int | None = None
) -> float:
    """Per rank per step under EP: each MoE layer's dispatch and combine of top_k copies of every token.

    Uniform routing sends (ep-1)/ep of the copies off the rank; forward, backward, and again for the units
    AC recomputes (op-level SAC does not save all-to-all outputs). ``moe_units``: the MoE layers and MTP
    depths a rank runs (a pipeline rank's stages; default: all of them).
    """
    if layout.ep <= 1:
        return 0.0
    copies = (
        training.local_tokens
        * a.moe_args.top_k
        * a.dim
        * training.compute_bytes
        * (layout.ep - 1)
        / layout.ep
    )
    units = len(a.compress_ratios) + running_mtp_layers(a, mtp_layers) if moe_units is None else moe_units
    # Forward and backward of every MoE layer, and forward again for each unit AC recomputes.
    passes = 2 * units + recomputed_units(training, units)
    return 2 * copies * passes * training.microbatches


def cp_exchange_bytes(a: DeepSeekV4ModelArgs, training: Training, mtp_layers: int) -> float:
    """Per rank per step under CP: each compressed layer's all-gather of the entries (the others' (cp-1)/cp
    of them) in forward and again for the units AC recomputes, and its reduce-scatter in backward (in fp32,
    ``cp_collectives.py``); every layer's halo in forward, backward and recompute."""
    cp, S, c, B = training.cp, training.seq_len, training.compute_bytes, training.local_batch_size
    ratios = list(a.compress_ratios) + [0] * running_mtp_layers(a, mtp_layers)
    share = (cp - 1) / cp
    gathers = sum(gathered_entry_bytes(a, r, S, c) for r in ratios) * share
    reduced = sum(gathered_entry_bytes(a, r, S, FP32) for r in ratios) * share
    halos = sum(cp_halo_bytes(a, r, training) for r in ratios)
    recompute = recomputed_units(training, len(ratios)) / max(1, len(ratios))
    return B * (gathers * (1 + recompute) + reduced + halos * (2 + recompute)) * training.microbatches


def stage_buffer_bytes(
    a: DeepSeekV4ModelArgs, seq_len: int, layers: list[int], mtp_layers: int, parts: int
) -> int:
    """``buffer_bytes`` of a pipeline rank: the hash tables of its hash layers, expert bias and loads of its
    MoE layers, and rotary tables on each of its ``parts`` (every stage holds them)."""
    E, hash_layers = a.moe_args.num_experts, sum(1 for i in layers if i < a.n_hash_layers)
    hash_tables = hash_layers * a.vocab_size * a.moe_args.top_k * 8
    return hash_tables + (len(layers) + mtp_layers) * 2 * E * 4 + parts * 4 * seq_len * a.rope_head_dim * 2


def buffer_bytes(a: DeepSeekV4ModelArgs, seq_len: int) -> int:
    """Buffers every rank holds whole: hash tables, expert bias and load counts, rotary tables."""
    E, layers = a.moe_args.num_experts, a.n_layers + a.mtp_layers
    hash_tables = a.n_hash_layers * a.vocab_size * a.moe_args.top_k * 8
    return hash_tables + layers * 2 * E * 4 + 4 * seq_len * a.rope_head_dim * 2
