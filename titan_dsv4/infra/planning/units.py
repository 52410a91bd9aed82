"""FSDP units from the shapes (the trainer's check) or from the built model, as one rank holds them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from titan_dsv4.infra.unit_plan import UnitInfo, fsdp_units
from titan_dsv4.model.accounting import (
    MTP_PREFIX,
    Shape,
    block_param_shapes,
    hyper_head_shapes,
    mtp_depth_param_shapes,
    root_param_shapes,
)
from titan_dsv4.model.args import DeepSeekV4ModelArgs

from .layout import DTYPE_BYTES, FP32, Layout, Training, experts_shard_dim


@dataclass(frozen=True)
class Unit:
    """One FSDP unit as one rank holds it: its shard, what it all-gathers, and in which dtypes."""

    name: str
    local_numel: int  # this rank's shard, FSDP2's padding included
    storage_bytes: int  # per element: the sharded parameter, its gradient and AdamW state
    compute_bytes: int  # per element, all-gathered (param_dtype)
    reduce_bytes: int  # per element, reduce-scattered (reduce_dtype)
    shard_ranks: int
    replicate_ranks: int  # HSDP replicas whose gradients are all-reduced
    resharded: bool  # freed after forward and all-gathered again in backward

    @property
    def gathered_numel(self) -> int:
        """The all-gather buffer: the unit unsharded on this rank (an EP rank's experts only), padded."""
        return self.local_numel * self.shard_ranks

    @property
    def unsharded_bytes(self) -> int:
        return self.gathered_numel * self.compute_bytes

    @classmethod
    def built(cls, info: UnitInfo) -> Unit:
        """The unit FSDP built (``fsdp_units``); a unit holds one storage dtype and one compute dtype."""
        storage = max(d.itemsize for d in info.storage_dtypes)
        compute = max(d.itemsize for d in info.compute_dtypes)
        return cls(
            name=info.name,
            local_numel=info.padded_local_numel,
            storage_bytes=storage,
            compute_bytes=compute,
            reduce_bytes=info.reduce_dtype.itemsize if info.reduce_dtype is not None else compute,
            shard_ranks=info.shard_ranks,
            replicate_ranks=info.replicate_ranks,
            # FSDP2 never reshards the root after forward when left to choose (apply_fsdp passes None).
            resharded=info.kind != "root" and info.reshard_after_forward,
        )


def padded_shard(shape: Shape, ranks: int, dim: int = 0) -> int:
    """Elements of one parameter's shard as FSDP2 stores it: the sharded dim padded to a multiple of ranks."""
    size = list(shape)
    size[dim] = -(-size[dim] // ranks)
    return math.prod(size)


def analytic_units(
    a: DeepSeekV4ModelArgs,
    layout: Layout,
    training: Training,
    mtp_layers: int | None = None,
    modules: tuple[str, ...] | None = None,
) -> list[Unit]:
    """The FSDP units ``apply_fsdp`` builds for this layout, from the shapes alone (in its order).

    ``modules``: a pipeline stage's module names (``stages.stage_modules``): its layers, its MTP depths (the
    last stage) and its root (tok_embeddings on the first stage; hc_head, norm, lm_head on the last).
    """
    training = training.on(layout)
    mtp_layers = a.mtp_layers if mtp_layers is None else mtp_layers
    if modules is not None and "mtp" not in modules:
        mtp_layers = 0
    c, r = training.compute_bytes, DTYPE_BYTES[training.reduce_dtype]
    s = DTYPE_BYTES[training.storage_dtype]
    islands = s == FP32 and c != FP32  # fp32 units are split off only when the blocks compute lower
    shard, replicate = layout.fsdp_mesh_shape
    reshard = training.reshard_after_forward

    def unit(name: str, shapes: list[Shape], compute: int, reduce: int, resharded: bool) -> Unit:
        local = sum(padded_shard(shape, shard) for shape in shapes)
        return Unit(name, local, s, compute, reduce, shard, replicate, resharded)

    def expert_unit(name: str, shapes: list[Shape]) -> Unit:
        """EP slices the experts (dim 0) over ep; FSDP shards the slice over efsdp (``experts_shard_dim``)."""
        local_experts = [(e // layout.ep, *rest) for e, *rest in shapes]
        dim = experts_shard_dim(a.moe_args.num_experts, layout.efsdp, layout.ep)
        local = sum(padded_shard(shape, layout.efsdp, dim) for shape in local_experts)
        return Unit(name, local, s, c, r, layout.efsdp, replicate, reshard)

    def block_units(prefix: str, parts: dict[str, list[Shape]]) -> list[Unit]:
        parts = {k: list(v) for k, v in parts.items()}
        units = []
        if layout.ep > 1:
            units.append(expert_unit(f"{prefix}.moe.experts", parts.pop("experts")))
        else:
            parts["block"] += parts.pop("experts")
        if not islands:
            parts["block"] += parts.pop("island", []) + parts.pop("holder", [])
        elif "island" in parts:
            units.append(unit(f"{prefix}.<fp32 islands>", parts["island"], FP32, FP32, reshard))
        if islands and "holder" in parts:
            units.append(unit(f"{prefix}.<fp32 holders>", parts["holder"], FP32, FP32, False))
        return units + [unit(prefix, parts["block"], c, r, reshard)]

    kinds: dict[int | str, list[Unit]] = {}  # one set of units per kind of block, renamed per layer

    def units_of(prefix: str, kind: int | str) -> list[Unit]:
        if kind not in kinds:
            shapes = mtp_depth_param_shapes(a) if kind == "mtp" else block_param_shapes(a, kind)
            kinds[kind] = block_units("", shapes)
        return [Unit(prefix + u.name, *astuple_after_name(u)) for u in kinds[kind]]

    units = []
    for i, ratio in enumerate(a.compress_ratios):
        if modules is None or f"layers.{i}" in modules:
            units += units_of(f"layers.{i}", ratio)
    for i in range(mtp_layers):
        units += units_of(f"{MTP_PREFIX}{i}", "mtp")
    root = root_param_shapes(a) if modules is None else stage_root_shapes(a, modules)
    if modules is not None:  # a stage's root: its units only when it holds parameters
        if islands and root["island"]:
            units.append(unit("<root fp32 islands>", root["island"], FP32, FP32, reshard))
        block = root["block"] + ([] if islands else root["island"])
        return units + ([unit("<root>", block, c, r, False)] if block else [])
    if islands:  # hc_head and lm_head: one fp32 unit, resharded as the blocks (apply_fsdp)
        return units + [
            unit("<root fp32 islands>", root["island"], FP32, FP32, reshard),
            unit("<root>", root["block"], c, r, False),
        ]
    return units + [unit("<root>", root["island"] + root["block"], c, r, False)]


def astuple_after_name(u: Unit) -> tuple:
    """A unit's fields after its name (``dataclasses.replace`` is slow for the search's thousands)."""
    return (
        u.local_numel,
        u.storage_bytes,
        u.compute_bytes,
        u.reduce_bytes,
        u.shard_ranks,
        u.replicate_ranks,
        u.resharded,
    )


def stage_root_shapes(a: DeepSeekV4ModelArgs, modules: tuple[str, ...]) -> dict[str, list[Shape]]:
    """``root_param_shapes`` for a pipeline stage: the embedding on the first stage, the heads on the last."""
    V, D = a.vocab_size, a.dim
    island = hyper_head_shapes(a) if "hc_head" in modules else []
    island += [(V, D)] if "lm_head" in modules else []
    block = ([(V, D)] if "tok_embeddings" in modules else []) + ([(D,)] if "norm" in modules else [])
    return {"island": island, "block": block}


def built_units(model: nn.Module) -> list[Unit]:
    """The FSDP units ``fully_shard`` built on ``model`` (meta device is fine), as one rank holds them."""
    return [Unit.built(info) for info in fsdp_units(model)]


def built_mtp_layers(model: nn.Module, a: DeepSeekV4ModelArgs) -> int:
    """The MTP depths the built model really has (none until the model builds its ``mtp`` module)."""
    has_mtp = any(name.startswith(MTP_PREFIX) for name, _ in model.named_parameters())
    return a.mtp_layers if has_mtp else 0
