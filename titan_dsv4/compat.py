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


def sac_mode_enter(mode) -> None:
    """What SAC's recompute mode does on entering (reset its per-op counters), without pushing it."""
    if isinstance(mode, _CachedTorchDispatchMode):
        mode.func_counter.clear()
