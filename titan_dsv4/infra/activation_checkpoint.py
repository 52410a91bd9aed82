"""Titan's activation checkpointing, with FSDP's own hooks kept out of per-op selective AC's bookkeeping.

Where V4 differs from Titan's models: its blocks hold nested FSDP units (the fp32 islands of the unit rules,
the routed experts under EP), whose pre-forward hooks run inside the checkpointed block. Per-op SAC caches
outputs by (op, invocation index) and fails when recomputation runs an op more often than the forward did.
Under pipeline parallelism FSDP keeps units gathered between microbatches (no reshard after forward), so a
nested unit all-gathers in one microbatch's forward but not the next one's, and its recompute may
all-gather when its forward did not: ``profiler._record_function_enter_new ... not found in storage``.
FSDP's hooks are bookkeeping, not the block's computation; here the ops they dispatch (inside FSDP's
``FSDP::`` record-function windows) bypass SAC's two dispatch modes, so SAC caches and indexes only the
block's own ops, the same ones in forward and recompute. Every other op goes to Titan's SAC unchanged.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torchtitan.distributed.activation_checkpoint import apply_ac

from ..compat import CheckpointWrapper, TorchDispatchMode, sac_mode_enter

# Ops whose outputs selective (op) AC keeps instead of recomputing (as Titan's deepseek_v3 does).
OP_SAC_SAVE_LIST = {
    torch.ops.aten.mm.default,
    torch.ops.aten.max.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
}
_ENTER = torch.ops.profiler._record_function_enter_new.default
_EXIT = torch.ops.profiler._record_function_exit._RecordFunction


def apply_activation_checkpointing(stack: nn.Module, ac_config, compiled: bool, dump_folder: str) -> None:
    """Titan's ``apply_ac`` on ``stack``'s layers; per-op SAC then leaves FSDP's hooks out of its cache."""
    apply_ac(
        stack, ac_config, model_compile_enabled=compiled, op_sac_save_list=OP_SAC_SAVE_LIST,
        base_folder=dump_folder,
    )  # fmt: skip
    if ac_config.mode == "selective" and ac_config.selective_ac_option == "op":
        for module in stack.modules():
            if isinstance(module, CheckpointWrapper):
                keep_fsdp_hooks_out_of_sac(module)


def keep_fsdp_hooks_out_of_sac(wrapper: CheckpointWrapper) -> None:
    """Wrap the SAC context of one checkpointed block so that FSDP's hook ops bypass both modes."""
    fn = wrapper.checkpoint_fn
    context_fn = fn.keywords.get("context_fn")
    if context_fn is None or getattr(context_fn, "fsdp_hooks_bypass", False):
        return

    def bypassing_context_fn():
        caching, cached = context_fn()
        return FsdpHooksBypass(caching), FsdpHooksBypass(cached)

    bypassing_context_fn.fsdp_hooks_bypass = True
    wrapper.checkpoint_fn = partial(fn.func, *fn.args, **{**fn.keywords, "context_fn": bypassing_context_fn})


class FsdpHooksBypass(TorchDispatchMode):
    """One of SAC's dispatch modes, except for the ops inside FSDP's ``FSDP::`` record-function windows."""

    def __init__(self, inner: TorchDispatchMode):
        super().__init__()
        self.inner = inner
        self.windows: list = []  # the FSDP record-function handles currently open

    @classmethod
    def ignore_compile_internals(cls):
        return True  # as SAC's own modes

    def __enter__(self):
        sac_mode_enter(self.inner)  # SAC's own per-entry reset (the recompute mode's counters)
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _ENTER and str(args[0]).startswith("FSDP::"):
            handle = func(*args, **kwargs)
            self.windows.append(handle)
            return handle
        if self.windows:
            if func is _EXIT and args[0] is self.windows[-1]:
                self.windows.pop()
            return func(*args, **kwargs)
        return self.inner.__torch_dispatch__(func, types, args, kwargs)
