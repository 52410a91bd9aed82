"""The private torch and TorchTitan names this package relies on, in one place, checked when imported.

A name that a newer release renamed or removed fails here, loudly and naming the versions, instead of
silently turning one of our overrides off somewhere else.
"""

from __future__ import annotations

import importlib

import torch


def _private(module: str, name: str):
    """``module.name``, or an ImportError naming it and the torch version that lacks it."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ImportError(
            f"titan_dsv4 needs the private name {module}.{name}, which torch {torch.__version__} does not "
            "have: use a torch this package is tested on (pyproject.toml), or update titan_dsv4/compat.py"
        ) from error


# Selective activation checkpointing (infra/activation_checkpoint.py): the wrapper Titan's apply_ac puts
# around a block, the dispatch-mode base class, and SAC's recompute mode (reset on entering).
CheckpointWrapper = _private(
    "torch.distributed.algorithms._checkpoint.checkpoint_wrapper", "CheckpointWrapper"
)
TorchDispatchMode = _private("torch.utils._python_dispatch", "TorchDispatchMode")
_CachedTorchDispatchMode = _private("torch.utils.checkpoint", "_CachedTorchDispatchMode")
if not hasattr(_CachedTorchDispatchMode(None, {}), "func_counter"):
    raise ImportError(
        f"torch {torch.__version__}'s _CachedTorchDispatchMode has no func_counter: update "
        "titan_dsv4/compat.py"
    )


def _require_attributes(owner, names: tuple[str, ...], used_by: str) -> None:
    """Each of ``names`` exists on ``owner`` (a class's method or annotated attribute), else ImportError."""
    missing = [n for n in names if not hasattr(owner, n) and n not in getattr(owner, "__annotations__", {})]
    if missing:
        raise ImportError(
            f"titan_dsv4 ({used_by}) needs {owner.__module__}.{owner.__name__}.{', '.join(missing)}, which "
            f"torch {torch.__version__} does not have: use a torch this package is tested on (pyproject.toml)"
        )


# CPU mode (cpu.py): Titan asks torch._utils for the device type and module.
torch_utils = importlib.import_module("torch._utils")
_require_attributes(torch_utils, ("_get_device_module", "_get_available_device_type"), "cpu.py")
# Process-group release at exit (refusals.py): every DeviceMesh keeps its groups here.
DeviceMesh = _private("torch.distributed.device_mesh", "DeviceMesh")
_require_attributes(DeviceMesh, ("_pg_registry",), "refusals.py")
# FSDP2's unit records (infra/unit_plan.py).
FSDPModule = _private("torch.distributed.fsdp", "FSDPModule")
_require_attributes(FSDPModule, ("_get_fsdp_state",), "infra/unit_plan.py")
# The pipeline stage's metadata inference, which infra/pipeline.py overrides (a rename would skip it).
PipelineStage = _private("torch.distributed.pipelining", "PipelineStage")
_require_attributes(
    PipelineStage, ("_to_tensor", "_forward_metadata_inference", "_backward_metadata_inference"), "pipeline"
)
# Expert parallelism's token exchange (infra/expert_parallel.py) and grouped experts (model/moe.py).
all_to_all_single = _private("torch.distributed._functional_collectives", "all_to_all_single")
all_to_all_single_autograd = _private(
    "torch.distributed._functional_collectives", "all_to_all_single_autograd"
)
grouped_mm = _private("torch", "_grouped_mm")
# TorchTitan's registry of train specs added by other packages (spec.py registers deepseek_v4 once).
titan_extra_train_specs = _private("torchtitan.protocols.train_spec", "_extra_train_specs")


def fsdp_param_group(module):
    """FSDP2's parameter group of one unit (None for a unit without parameters)."""
    state = module._get_fsdp_state()
    if not hasattr(state, "_fsdp_param_group"):
        raise ImportError(
            f"torch {torch.__version__}'s FSDP state has no _fsdp_param_group: update titan_dsv4/compat.py"
        )
    return state._fsdp_param_group


def fsdp_state_key(module) -> int:
    """One key per FSDP unit (a grouped unit's modules share their state)."""
    return id(module._get_fsdp_state())


def device_mesh_groups(mesh) -> dict:
    """The process groups a DeviceMesh keeps (``_pg_registry``)."""
    return mesh._pg_registry


def sac_mode_enter(mode) -> None:
    """What SAC's recompute mode does on entering (reset its per-op counters), without pushing it."""
    if isinstance(mode, _CachedTorchDispatchMode):
        mode.func_counter.clear()
