"""What FSDP built: one record per unit (dtypes, resharding, sizes, mesh), for tests, dry runs, the planner.

FSDP2's private state is read through ``titan_dsv4.compat`` (``fsdp_param_group``, ``fsdp_state_key``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..compat import FSDPModule, fsdp_param_group, fsdp_state_key
from .fsdp_units import canonical_name


@dataclass(frozen=True)
class UnitInfo:
    name: str  # the first module's qualified name
    members: tuple[str, ...]  # every module of the unit (several for a grouped unit)
    kind: str  # "island", "holder", "experts" (under EP), "block", "mtp" (a depth) or "root"
    storage_dtypes: frozenset
    compute_dtypes: frozenset
    reduce_dtype: torch.dtype | None
    output_dtype: torch.dtype | None
    reshard_after_forward: bool
    numel: int  # global parameter elements
    local_numel: int  # this rank's shard
    local_bytes: int
    padded_local_numel: int  # this rank's shard as FSDP2 stores it: the sharded dim padded to the ranks
    shard_ranks: int  # the mesh the unit is sharded over
    replicate_ranks: int  # HSDP replicas


def _kind(name: str, module: nn.Module, is_root: bool) -> str:
    from titan_dsv4.model.layers import ParamHolder
    from titan_dsv4.model.model import MTPDepth, TransformerBlock
    from titan_dsv4.model.moe import ClampedGroupedExperts

    inner = getattr(module, "_checkpoint_wrapped_module", getattr(module, "_orig_mod", module))
    if is_root:
        return "root"
    if isinstance(inner, TransformerBlock):
        return "block"
    if isinstance(inner, MTPDepth):
        return "mtp"
    if isinstance(inner, ClampedGroupedExperts):
        return "experts"
    return "holder" if isinstance(inner, ParamHolder) else "island"


def fsdp_units(model: nn.Module) -> list[UnitInfo]:
    """One record per FSDP unit, in module order; a grouped unit is listed once with all its members."""
    members: dict[int, list[str]] = {}
    first: dict[int, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            key = fsdp_state_key(module)
            if canonical_name(name) not in members.setdefault(key, []):
                members[key].append(canonical_name(name) or "<root>")
            first.setdefault(key, (name, module))
    units = []
    for key, (name, module) in first.items():
        group = fsdp_param_group(module)
        if group is None:
            continue
        storage, compute, numel, local, local_bytes, padded = set(), set(), 0, 0, 0, 0
        for fp in group.fsdp_params:
            sharded = fp.sharded_param
            storage.add(sharded.dtype)
            compute.add(group.mp_policy.param_dtype or sharded.dtype)
            numel += sharded.numel()
            loc = sharded.to_local() if hasattr(sharded, "to_local") else sharded
            local += loc.numel()
            local_bytes += loc.numel() * loc.element_size()
            padded += math.prod(fp.padded_sharded_param_size)
        mesh = group.fsdp_params[0].mesh_info
        units.append(
            UnitInfo(
                name=canonical_name(name) or "<root>",
                members=tuple(members[key]),
                kind=_kind(name, module, module is model),
                storage_dtypes=frozenset(storage),
                compute_dtypes=frozenset(compute),
                reduce_dtype=group.mp_policy.reduce_dtype,
                output_dtype=group.mp_policy.output_dtype,
                reshard_after_forward=group.post_forward_mesh_info is not None,
                numel=numel,
                local_numel=local,
                local_bytes=local_bytes,
                padded_local_numel=padded,
                shard_ranks=getattr(mesh, "shard_mesh_size", 1),
                replicate_ranks=getattr(mesh, "replicate_mesh_size", 1),
            )
        )
    return units
