"""One rank's peak memory and per-step traffic for a layout: a sum of named terms over its units."""

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
from .layout import GIB, Layout, Training
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
        return {
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
) -> Estimate:
    """One rank's peak memory and per-step traffic; ``units`` from ``built_units`` replace the analytic ones.

    Built units without MTP get the MTP depths' units from the shapes, so figures always include MTP.
    """
    refuse_unmodelled_parallelism(layout)
    training = replace(training, cp=layout.cp)  # the layout's cp decides how much of a row a rank holds
    mtp_layers = a.mtp_layers if mtp_layers is None else mtp_layers
    units, from_shapes = _with_mtp_units(a, layout, training, units, mtp_layers)
    acts = activations or activation_estimate(a, training, mtp_layers)
    local = 0 if training.cpu_offload else sum(u.local_numel * u.storage_bytes for u in units)
    largest = max(units, key=lambda u: u.unsharded_bytes)
    kept, forward, backward = fsdp_unsharded(units) if layout.world > 1 else (0, 0, 0)
    return Estimate(
        layout=layout,
        training=training,
        parameters=local,
        gradients=local,
        optimizer=2 * local,
        buffers=buffer_bytes(a, training.seq_len),
        kept_unsharded=kept,
        fsdp_forward=forward,
        fsdp_backward=backward,
        largest_unit=f"{largest.name}, {_DTYPE_NAMES.get(largest.compute_bytes, '?')}",
        largest_unit_bytes=largest.unsharded_bytes,
        activations=acts,
        collectives={
            **fsdp_traffic(units, training),
            "all_to_all": all_to_all_bytes(a, layout, training, mtp_layers),
            **({"cp_exchange": cp_exchange_bytes(a, training, mtp_layers)} if layout.cp > 1 else {}),
        },
        mtp_layers=mtp_layers,
        mtp_from_shapes=from_shapes,
    )


def refuse_unmodelled_parallelism(layout: Layout) -> None:
    """No figure for pipeline parallelism until its terms exist (the package docstring)."""
    if layout.pp > 1 and False:  # TODO(pp): the planner's pipeline terms
        raise ConfigError(
            f"the memory planner does not model pipeline parallelism yet ({layout.describe()}); "
            "plan with --parallelism.pipeline_parallel_degree 1"
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


def fsdp_traffic(units: list[Unit], training: Training) -> dict[str, float]:
    """Per rank per step: bytes all-gathered, reduce-scattered, and all-reduced across HSDP replicas."""
    ag = rs = ar = 0.0
    for u in units:
        if u.shard_ranks * u.replicate_ranks == 1:
            continue
        others = u.local_numel * (u.shard_ranks - 1)  # padded shards from (or to) the other ranks
        ag += others * u.compute_bytes * (2 if u.resharded else 1)
        rs += others * u.reduce_bytes
        ar += u.local_numel * u.reduce_bytes * 2 * (u.replicate_ranks - 1) / u.replicate_ranks
    m = training.microbatches
    return {"all_gather": ag * m, "reduce_scatter": rs * m, "all_reduce": ar * m}


def all_to_all_bytes(a: DeepSeekV4ModelArgs, layout: Layout, training: Training, mtp_layers: int) -> float:
    """Per rank per step under EP: each MoE layer's dispatch and combine of top_k copies of every token.

    Uniform routing sends (ep-1)/ep of the copies off the rank; forward, backward, and again for the units
    AC recomputes (op-level SAC does not save all-to-all outputs).
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
    units = len(a.compress_ratios) + running_mtp_layers(a, mtp_layers)
    # Forward and backward of every MoE layer, and forward again for each unit AC recomputes.
    passes = 2 * units + recomputed_units(training, units)
    return 2 * copies * passes * training.microbatches


def cp_exchange_bytes(a: DeepSeekV4ModelArgs, training: Training, mtp_layers: int) -> float:
    """Per rank per step under CP: each compressed layer's all-gather of the entries (the others' (cp-1)/cp
    of them) and its reduce-scatter in backward, and every layer's halo, in forward, backward and again for
    the units AC recomputes."""
    cp, S, c, B = training.cp, training.seq_len, training.compute_bytes, training.local_batch_size
    ratios = list(a.compress_ratios) + [0] * running_mtp_layers(a, mtp_layers)
    gathers = sum(gathered_entry_bytes(a, r, S, c) for r in ratios) * (cp - 1) / cp
    halos = sum(cp_halo_bytes(a, r, training) for r in ratios)
    passes = 2 + recomputed_units(training, len(ratios)) / max(1, len(ratios))
    return B * (gathers + halos) * passes * training.microbatches


def buffer_bytes(a: DeepSeekV4ModelArgs, seq_len: int) -> int:
    """Buffers every rank holds whole: hash tables, expert bias and load counts, rotary tables."""
    E, layers = a.moe_args.num_experts, a.n_layers + a.mtp_layers
    hash_tables = a.n_hash_layers * a.vocab_size * a.moe_args.top_k * 8
    return hash_tables + layers * 2 * E * 4 + 4 * seq_len * a.rope_head_dim * 2
