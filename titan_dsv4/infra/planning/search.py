"""Which layouts fit a device: the smallest world size that fits, least traffic first, else what would.

Context parallelism is searched with the rest: a layout's cp must split seq_len into whole chunks
(``sequence_shard.check_cp_seq_len``); its activations shrink as seq_len / cp.
"""

from __future__ import annotations

from dataclasses import replace

from titan_dsv4.model.args import DeepSeekV4ModelArgs
from titan_dsv4.model.sequence_shard import cp_granularity

from .activations import activation_estimate
from .estimate import Estimate, estimate, fsdp_unsharded, usable_bytes
from .layout import GIB, Layout, Training, experts_shardable
from .units import analytic_units

GPUS_PER_NODE = 8
MAX_SEARCH_WORLD = 16384


def candidate_layouts(
    a: DeepSeekV4ModelArgs, world: int, hsdp: bool = True, cps: tuple[int, ...] = (1,)
) -> list[Layout]:
    """Every layout of ``world`` ranks that can be built: dp_replicate x dp_shard x cp, EP dividing the
    experts and dp_shard x cp (Titan's EP borrows from both), experts shardable by FSDP."""
    layouts = []
    for cp in (c for c in cps if world % c == 0):
        for replicate in _divisors(world // cp) if hsdp else [1]:
            shard = world // cp // replicate
            layouts += [
                Layout(replicate, shard, ep, cp)
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
) -> list[Estimate]:
    """The layouts that fit at the smallest world size (multiples of ``gpus_per_node``), least traffic first.

    Empty when none up to ``max_world`` fits (activations shrink with cp only, down to one chunk per rank).
    """
    usable = usable_bytes(device_bytes)
    cps = context_parallel_degrees(a, training, max_world)
    acts = {cp: activation_estimate(a, replace(training, cp=cp)) for cp in cps}
    whole = analytic_units(a, Layout(1, 1), training)
    state = 0 if training.cpu_offload else 4 * sum(u.local_numel * u.storage_bytes for u in whole)
    root = fsdp_unsharded([u for u in whole if u.name.startswith("<root")])[2]
    for world in range(gpus_per_node, max_world + 1, gpus_per_node):
        here = [cp for cp in cps if world % cp == 0]
        if min(acts[cp].peak for cp in here) + root + state / world > usable:  # nothing of this size fits
            continue
        layouts = [
            x
            for x in candidate_layouts(a, world, hsdp, tuple(here))
            if acts[x.cp].peak + root + state / x.fsdp <= usable
        ]
        estimates = [estimate(a, x, training, activations=acts[x.cp]) for x in layouts]
        fitting = [e for e in estimates if e.fits(device_bytes)]
        if fitting:
            return sorted(fitting, key=lambda e: (e.traffic, e.peak))
    return []


def fits(a: DeepSeekV4ModelArgs, layout: Layout, training: Training, device_gib: float) -> bool:
    """Whether one rank of this layout fits a device of ``device_gib`` GiB (less the reserve)."""
    return estimate(a, layout, training).fits(int(device_gib * GIB))


def fitting_layout(a: DeepSeekV4ModelArgs, training: Training, device_bytes: int) -> str:
    """The smallest layout that fits, else the local batch that makes one fit, else why none can."""
    best = smallest_layouts(a, training, device_bytes)
    if best:
        return best[0].layout.launch() + f" (peak {best[0].peak / GIB:.1f} GiB per rank)"
    batch = training.local_batch_size
    while batch > 1:
        batch //= 2
        best = smallest_layouts(a, replace(training, local_batch_size=batch), device_bytes)
        if best:
            return (
                f"none at local_batch_size {training.local_batch_size}; with --training.local_batch_size "
                f"{batch}: {best[0].layout.launch()} (peak {best[0].peak / GIB:.1f} GiB per rank)"
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
