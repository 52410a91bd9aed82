"""FSDP2 fp32 unit rules for DeepSeek-V4.

A few reference-sensitive tensors (mHC mixers, HyperHead, lm_head, sinks, compressor and indexer
wkv / wgate / ape) stay in fp32 while the rest of a block computes in bf16. FSDP2 casts a whole unit to
one ``param_dtype``, so each of these "islands" becomes its own fp32 unit, sharded before its parent:
  * an island is a module whose qualified name equals or ends with ``.<suffix>`` of ``FP32_ISLAND_SUFFIXES``
    and whose floating parameters are all fp32;
  * its policy computes, reduces and outputs in fp32 (``cast_forward_inputs`` as the caller set it);
  * a block's islands share one unit and its holders another (a list-of-modules FSDP2 unit: one
    all-gather each), or get one unit per island with ``group_islands=False``;
  * a holder that returns its raw parameter to its parent is not resharded after its own forward
    (the parent still reads the unsharded tensor);
  * no unit ever holds parameters of two storage dtypes or two compute dtypes;
  * a module that already has FSDP state is not wrapped again; ``ignored_params`` reach each unit
    filtered to that unit's own parameters;
  * when the policy already computes in fp32 there is nothing to isolate: one unit.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

FP32_ISLAND_SUFFIXES = (
    "attn_hc",
    "ffn_hc",
    "hc_head",
    "lm_head",
    "self_attn.sinks_param",
    "self_attn.compressor.wkv",
    "self_attn.compressor.wgate",
    "self_attn.compressor.ape_param",
    "self_attn.compressor.indexer.wkv",
    "self_attn.compressor.indexer.wgate",
    "self_attn.compressor.indexer.ape_param",
)
# Wrapper segments that Titan's AC and torch.compile insert into qualified names.
_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")


def canonical_name(name: str) -> str:
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_SEGMENTS)


def _floating_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.is_floating_point()]


def is_fp32_island(name: str, module: nn.Module) -> bool:
    """Named like a reference-sensitive tensor's module, and stored entirely in fp32."""
    name = canonical_name(name)
    named = any(name == s or name.endswith("." + s) for s in FP32_ISLAND_SUFFIXES)
    params = _floating_params(module)
    return named and bool(params) and all(p.dtype == torch.float32 for p in params)


def returns_raw_parameter(module: nn.Module) -> bool:
    """Holders (sinks_param, ape_param) hand their parameter itself to the parent module."""
    from titan_dsv4.model.layers import ParamHolder

    inner = getattr(module, "_orig_mod", module)
    return isinstance(inner, ParamHolder)


def fp32_policy(policy: MixedPrecisionPolicy) -> MixedPrecisionPolicy:
    return MixedPrecisionPolicy(
        param_dtype=torch.float32,
        reduce_dtype=torch.float32,
        output_dtype=torch.float32,
        cast_forward_inputs=policy.cast_forward_inputs,
    )


def computes_in_fp32(module: nn.Module, policy: MixedPrecisionPolicy) -> bool:
    """True when the unit would compute in fp32 anyway, so no island needs splitting off."""
    if policy.param_dtype is not None:
        return policy.param_dtype == torch.float32
    return all(p.dtype == torch.float32 for p in _floating_params(module))


def is_deepseek_v4(module: nn.Module) -> bool:
    from titan_dsv4.model.model import DeepSeekV4Model, MTPDepth, TransformerBlock

    inner = getattr(module, "_checkpoint_wrapped_module", getattr(module, "_orig_mod", module))
    return isinstance(inner, (DeepSeekV4Model, TransformerBlock, MTPDepth))


def shard_unit(
    modules: nn.Module | list[nn.Module],
    *,
    mesh: DeviceMesh,
    mp_policy: MixedPrecisionPolicy,
    reshard_after_forward: bool | None,
    ignored_params: set[nn.Parameter] | None = None,
    offload_policy: OffloadPolicy | None = None,
    shard_placement_fn=None,
) -> None:
    """``fully_shard`` one unit (a module or a group of modules) once: never rewrap, and pass only
    the unit's own ignored parameters."""
    group = [modules] if isinstance(modules, nn.Module) else list(modules)
    if not group or all(isinstance(m, FSDPModule) for m in group):
        return
    own = {p for m in group for p in m.parameters()}
    managed = own - set().union(*(_params_of_nested_units(m) for m in group)) - set(ignored_params or ())
    dtypes = {p.dtype for p in managed if p.is_floating_point()}
    if len(dtypes) > 1:
        raise ValueError(
            f"an FSDP unit for {type(group[0]).__name__} would hold parameters of {len(dtypes)} storage "
            f"dtypes "
            f"{sorted(map(str, dtypes))}; build the model in one dtype (training.dtype) so that fp32 islands "
            "can be split off by name"
        )
    kwargs = {"offload_policy": offload_policy} if offload_policy is not None else {}
    if shard_placement_fn is not None:
        kwargs["shard_placement_fn"] = shard_placement_fn
    fully_shard(
        group[0] if len(group) == 1 else group,
        mesh=mesh,
        mp_policy=mp_policy,
        reshard_after_forward=reshard_after_forward,
        ignored_params={p for p in (ignored_params or ()) if p in own} or None,
        **kwargs,
    )


def _params_of_nested_units(module: nn.Module) -> set[nn.Parameter]:
    return {
        p for m in module.modules() if m is not module and isinstance(m, FSDPModule) for p in m.parameters()
    }


def fp32_islands(module: nn.Module) -> list[nn.Module]:
    """The islands under ``module`` not sharded yet, once each (a compiled island is listed as its
    wrapper)."""
    found, seen = [], set()
    for name, sub in module.named_modules():
        if name and canonical_name(name) not in seen and is_fp32_island(name, sub):
            seen.add(canonical_name(name))
            if not isinstance(sub, FSDPModule):
                found.append(sub)
    return found


def shard_with_fp32_units(
    module: nn.Module,
    *,
    mesh: DeviceMesh,
    mp_policy: MixedPrecisionPolicy,
    reshard_after_forward: bool | None,
    ignored_params: set[nn.Parameter] | None = None,
    offload_policy: OffloadPolicy | None = None,
    group_islands: bool = True,
    islands_reshard_after_forward: bool | None = None,
) -> None:
    """Shard ``module``'s fp32 islands as fp32 units, then ``module`` itself with ``mp_policy``.

    ``group_islands``: one unit for the islands that reshard after forward and one for the holders
    (two fp32 all-gathers per block) instead of one unit per island (up to nine).
    ``islands_reshard_after_forward``: the islands' policy where it differs from ``module``'s (the root's
    islands follow the blocks', not the root's).
    """
    common = dict(mesh=mesh, ignored_params=ignored_params, offload_policy=offload_policy)
    if is_deepseek_v4(module) and not computes_in_fp32(module, mp_policy):
        islands = fp32_islands(module)
        holders = [m for m in islands if returns_raw_parameter(m)]
        resharded = [m for m in islands if not returns_raw_parameter(m)]
        policy = fp32_policy(mp_policy)
        island_policy = reshard_after_forward
        if islands_reshard_after_forward is not None:
            island_policy = islands_reshard_after_forward
        units = [(resharded, island_policy), (holders, False)]
        for group, reshard in units:
            for unit in [group] if group_islands else [[m] for m in group]:
                shard_unit(unit, mp_policy=policy, reshard_after_forward=reshard, **common)
    elif is_deepseek_v4(module) and mp_policy.param_dtype is None:
        mp_policy = fp32_policy(mp_policy)  # all-fp32 module, no low-precision policy: one fp32 unit
    shard_unit(module, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward, **common)
