"""Which layouts fit a device: the smallest world size that fits, least traffic first, else what would; and
the layout to recommend: least communication per token among those that fit, then fewest GPUs.

Context parallelism is searched with the rest: a layout's cp must split seq_len into whole chunks
(``sequence_shard.check_cp_seq_len``); its activations shrink as seq_len / cp.

Pipeline parallelism too (``pipeline_degrees``): pp from 2 to ``MAX_SEARCH_PP`` where ``infra.pipeline``
splits the layers into stages of at least ``MIN_LAYERS_PER_STAGE`` layers each, with the schedules 1F1B and
Interleaved1F1B, microbatch size 1, never with cp (refused in this version). A pipelined layout runs
pp x the caller's local batch as pp x local_batch_size microbatches (``pipeline_training``), so that each
rank handles as many tokens per step as a layout without PP: the same global batch on the same GPU count.
"""

from __future__ import annotations

from dataclasses import replace

from titan_dsv4.model.args import DeepSeekV4ModelArgs
from titan_dsv4.model.sequence_shard import cp_granularity

from .activations import activation_estimate
from .estimate import Estimate, estimate, fsdp_unsharded, usable_bytes
from .layout import GIB, Layout, Training, experts_shardable
from .stages import SEARCHED_SCHEDULES, PipelinePlan, stage_modules, stage_split_error
from .units import analytic_units

GPUS_PER_NODE = 8
MAX_SEARCH_WORLD = 16384
MAX_SEARCH_PP = 16
MIN_LAYERS_PER_STAGE = 2
# The recommendation's tie: layouts whose traffic per token is within this of the least count as equal,
# and the one with the fewest GPUs wins among them.
TRAFFIC_TIE = 0.05


def pipeline_training(training: Training, pp: int, schedule: str) -> Training:
    """The step a pipelined layout of the search runs: pp x the local batch, as microbatches of 1 row."""
    if pp <= 1:
        return training
    return replace(
        training,
        local_batch_size=pp * training.local_batch_size,
        pipeline=replace(training.pipeline, schedule=schedule, microbatch_size=1),
    )


def pipeline_degrees(a: DeepSeekV4ModelArgs, training: Training, max_pp: int = MAX_SEARCH_PP) -> tuple:
    """(pp, schedule) pairs the search tries: the stage split builds and gives every stage at least
    ``MIN_LAYERS_PER_STAGE`` layers."""
    found = []
    for schedule in SEARCHED_SCHEDULES:
        for pp in range(2, max_pp + 1):
            p = pipeline_training(training, pp, schedule).pipeline
            if stage_split_error(a.n_layers, pp, p) is not None:
                continue
            stages = stage_modules(a.n_layers, pp, p)
            if min(sum(m.startswith("layers.") for m in names) for names in stages) >= MIN_LAYERS_PER_STAGE:
                found.append((pp, schedule))
    return tuple(found)


def candidate_layouts(
    a: DeepSeekV4ModelArgs,
    world: int,
    hsdp: bool = True,
    cps: tuple[int, ...] = (1,),
    pps: tuple[int, ...] = (1,),
) -> list[Layout]:
    """Every layout of ``world`` ranks that can be built: dp_replicate x dp_shard x cp x pp (cp or pp), EP
    dividing the experts and dp_shard x cp (Titan's EP borrows from both), experts shardable by FSDP."""
    layouts = []
    for pp in (p for p in pps if world % p == 0):
        for cp in (c for c in cps if world % (c * pp) == 0 and (c == 1 or pp == 1)):
            for replicate in _divisors(world // cp // pp) if hsdp else [1]:
                shard = world // cp // pp // replicate
                layouts += [
                    Layout(replicate, shard, ep, cp, pp)
                    for ep in _divisors(shard * cp)
                    if a.moe_args.num_experts % ep == 0
                ]
    return [layout for layout in layouts if experts_shardable(a, layout)]


def context_parallel_degrees(a: DeepSeekV4ModelArgs, training: Training, max_world: int) -> tuple[int, ...]:
    """The cp degrees that split the sequence into whole chunks (1 always)."""
    unit = training.cp_chunks_per_rank * cp_granularity(a)
    return tuple(c for c in range(1, max_world + 1) if c == 1 or training.seq_len % (c * unit) == 0)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def smallest_layouts(
    a: DeepSeekV4ModelArgs,
    training: Training,
    device_bytes: int,
    *,
    gpus_per_node: int = GPUS_PER_NODE,
    max_world: int = MAX_SEARCH_WORLD,
    hsdp: bool = True,
    pipeline: bool = True,
) -> list[Estimate]:
    """The layouts that fit at the smallest world size (multiples of ``gpus_per_node``), least traffic first.

    Empty when none up to ``max_world`` fits (activations shrink with cp only, down to one chunk per rank).
    ``pipeline``: pipelined layouts too (``pipeline_degrees``).
    """
    usable = usable_bytes(device_bytes)
    cps = context_parallel_degrees(a, training, max_world)
    acts = {cp: activation_estimate(a, replace(training, cp=cp)) for cp in cps}
    whole = analytic_units(a, Layout(1, 1), training)
    state = 0 if training.cpu_offload else 4 * sum(u.local_numel * u.storage_bytes for u in whole)
    root = fsdp_unsharded([u for u in whole if u.name.startswith("<root")])[2]
    # Per pp: each schedule's step and a floor of its peak activations (the worst stage's one microbatch).
    pipelined: dict[int, list[tuple[Training, int]]] = {}
    cache: dict = {}  # the stages' activations, for every estimate of this search
    for pp, schedule in pipeline_degrees(a, training) if pipeline else ():
        step = pipeline_training(training, pp, schedule)
        pipelined.setdefault(pp, []).append((step, pipeline_activation_floor(a, step, pp)))
    for world in range(gpus_per_node, max_world + 1, gpus_per_node):
        here = [cp for cp in cps if world % cp == 0]
        pps = tuple(pp for pp in pipelined if world % pp == 0)
        # Nothing of this size fits when, without PP, a rank's activations, the root's gathered units and
        # its share of the state exceed the device; with PP, the worst stage's activations or the average
        # share of the state (the worst rank holds at least either).
        floors = [acts[cp].peak + root + state / world for cp in here]
        floors += [max(f, state / world) for pp in pps for _, f in pipelined[pp]]
        if min(floors) > usable:
            continue
        estimates = []
        for x in candidate_layouts(a, world, hsdp, tuple(here), (1, *pps)):
            if x.pp == 1:
                if acts[x.cp].peak + root + state / x.fsdp <= usable:
                    estimates.append(estimate(a, x, training, activations=acts[x.cp]))
                continue
            share = state / (x.fsdp * x.pp)
            estimates += [
                estimate(a, x, step, cache=cache)
                for step, floor in pipelined[x.pp]
                if max(floor, share) <= usable
            ]
        fitting = [e for e in estimates if e.fits(device_bytes)]
        if fitting:
            return sorted(fitting, key=lambda e: (e.traffic, e.peak))
    return []


def pipeline_activation_floor(a: DeepSeekV4ModelArgs, training: Training, pp: int) -> int:
    """A floor of a pipelined layout's peak per rank: the worst stage's activations of one microbatch."""
    plan = PipelinePlan.of(a, pp, training)
    micro = replace(training, local_batch_size=plan.microbatch_size)
    return max(activation_estimate(a, micro, modules=names).peak for names in plan.stages)


def recommended_layouts(
    a: DeepSeekV4ModelArgs,
    training: Training,
    device_bytes: int,
    *,
    gpus_per_node: int = GPUS_PER_NODE,
    max_world: int = MAX_SEARCH_WORLD,
    pipeline: bool = True,
) -> list[Estimate]:
    """The layouts that fit, best first: the least communication per token (every collective a rank takes
    part in per step, ``Estimate.collectives``: all-gather, reduce-scatter, all-to-all, CP exchange,
    pipeline sends; over the tokens a rank handles per step), layouts within ``TRAFFIC_TIE`` of it ordered
    by the fewest GPUs; then the rest by traffic per token.

    One candidate per (pp and schedule, cp, ep): its smallest dp_shard that fits (memory only falls as
    dp_shard grows, traffic per token only rises); without HSDP (replicas all-reduce on top of the same
    gathers). Empty when nothing up to ``max_world`` fits.
    """
    cps = context_parallel_degrees(a, training, max_world)
    pipelines = [(1, training.pipeline.schedule)] + list(pipeline_degrees(a, training) if pipeline else ())
    combos = []  # (a lower bound of the traffic per token, pp, schedule, cp, ep, dp_shard options)
    cache: dict = {}  # the stages' activations, for every estimate of this search
    for pp, schedule in pipelines:
        step = pipeline_training(training, pp, schedule)
        for cp in cps if pp == 1 else (1,):
            for ep in _divisors(a.moe_args.num_experts):
                shards = [
                    shard
                    for shard in range(1, max_world // (cp * pp) + 1)
                    if (shard * cp) % ep == 0
                    and (shard * cp * pp) % gpus_per_node == 0
                    and experts_shardable(a, Layout(1, shard, ep, cp, pp))
                ]
                if shards:
                    first = estimate(a, Layout(1, shards[0], ep, cp, pp), step, cache=cache)
                    combos.append((first.traffic_per_token, step, cp, ep, pp, shards))
    combos.sort(key=lambda c: c[0])
    found: list[Estimate] = []
    for bound, step, cp, ep, pp, shards in combos:
        if found and bound > (1 + TRAFFIC_TIE) * min(e.traffic_per_token for e in found):
            break
        layouts = [Layout(1, s, ep, cp, pp) for s in shards]
        fitting = _smallest_fitting(a, step, device_bytes, layouts, cache)
        if fitting is not None:
            found.append(fitting)
    if not found:
        return []
    least = min(e.traffic_per_token for e in found)
    tied = sorted(
        (e for e in found if e.traffic_per_token <= (1 + TRAFFIC_TIE) * least),
        key=lambda e: (e.layout.world, e.traffic_per_token),
    )
    rest = sorted((e for e in found if e not in tied), key=lambda e: e.traffic_per_token)
    return tied + rest


def _smallest_fitting(
    a: DeepSeekV4ModelArgs, training: Training, device_bytes: int, layouts: list[Layout], cache: dict
) -> Estimate | None:
    """The first of ``layouts`` (dp_shard ascending) that fits, by bisection (memory falls with dp_shard)."""
    lo, hi, best = 0, len(layouts) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        found = estimate(a, layouts[mid], training, cache=cache)
        if found.fits(device_bytes):
            best, hi = found, mid - 1
        else:
            lo = mid + 1
    return best


def fits(a: DeepSeekV4ModelArgs, layout: Layout, training: Training, device_gib: float) -> bool:
    """Whether one rank of this layout fits a device of ``device_gib`` GiB (less the reserve)."""
    return estimate(a, layout, training).fits(int(device_gib * GIB))


def fitting_layout(a: DeepSeekV4ModelArgs, training: Training, device_bytes: int) -> str:
    """The smallest layout that fits, else the local batch that makes one fit, else why none can."""
    best = smallest_layouts(a, training, device_bytes)
    if best:
        return best[0].launch() + f" (peak {best[0].peak / GIB:.1f} GiB per rank)"
    batch = training.local_batch_size
    while batch > 1:
        batch //= 2
        best = smallest_layouts(a, replace(training, local_batch_size=batch), device_bytes)
        if best:
            return (
                f"none at local_batch_size {training.local_batch_size}; with --training.local_batch_size "
                f"{batch}: {best[0].launch()} (peak {best[0].peak / GIB:.1f} GiB per rank)"
            )
    one = replace(training, local_batch_size=1)
    cp = max(context_parallel_degrees(a, one, MAX_SEARCH_WORLD))
    acts = activation_estimate(a, replace(one, cp=cp)).peak
    return (
        f"none, even at local_batch_size 1 on up to {MAX_SEARCH_WORLD} GPUs: activations alone need "
        f"{acts / GIB:.1f} GiB per rank at seq_len {training.seq_len}"
        + (f" with context_parallel_degree {cp}" if cp > 1 else " (no context parallel degree splits it)")
        + "; use devices with more memory or a shorter --training.seq_len"
    )
