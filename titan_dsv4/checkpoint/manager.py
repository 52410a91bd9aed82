"""TorchTitan's CheckpointManager with DeepSeek-V4's two additions, installed by ``titan_dsv4.trainer``.

1. An HF export (``checkpoint.last_save_in_hf``) is completed into a folder transformers loads: the int64
   hash tables leave Titan's save and are written with config.json and the tokenizer (``export.py``).
2. Before a DCP save, every trainable parameter gets an optimizer state entry (``complete_optimizer_state``),
   so that a resumed job finds every key its fresh optimizer asks for.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torchtitan.components.checkpoint import MODEL, OPTIMIZER, CheckpointManager

from .export import complete_hf_export, hash_tables


def complete_optimizer_state(optimizers) -> None:
    """Give every trainable parameter an optimizer state entry before a save.

    A parameter that never received a gradient (an HCA compressor whose layer never saw a complete
    window, say) has no AdamW state, while a resumed optimizer initialises state for every parameter and
    asks the checkpoint for all of it, so resume would fail on a missing key. One zero-gradient step at
    lr 0 over just those parameters creates their entries and changes no value; their step counter is
    then put back to 0, so the entry is exactly what the optimizer would create at a first gradient.
    Parameters that already have state are left out. A never-stepped optimizer is left to torch, which
    initialises all of its parameters itself.
    """
    for opt in getattr(optimizers, "optimizers", []):
        params = [p for group in opt.param_groups for p in group["params"]]
        missing = [p for p in params if p.requires_grad and p not in opt.state]
        if not opt.state or not missing:
            continue
        grads, lrs = [p.grad for p in params], [group["lr"] for group in opt.param_groups]
        try:
            for p in params:
                p.grad = None
            for p in missing:
                p.grad = torch.zeros_like(p)
            for group in opt.param_groups:
                group["lr"] = torch.zeros_like(group["lr"]) if isinstance(group["lr"], torch.Tensor) else 0.0
            opt.step()
            for p in missing:
                step = opt.state[p].get("step")
                if isinstance(step, torch.Tensor):
                    step.zero_()
                elif step is not None:
                    opt.state[p]["step"] = 0
        finally:
            for p, g in zip(params, grads):
                p.grad = g
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr


class DeepSeekV4CheckpointManager(CheckpointManager):
    """Titan's manager; ``dcp_save`` completes optimizer state and HF exports (see the module docstring)."""

    @classmethod
    def replacing(cls, manager: CheckpointManager, **init_kwargs) -> DeepSeekV4CheckpointManager:
        """This manager in place of Titan's (closed first: it may own a purge thread)."""
        manager.close()
        return cls(**init_kwargs)

    def dcp_save(self, state_dict, checkpoint_id, async_mode, enable_garbage_collection=False, to_hf=False):
        if OPTIMIZER in state_dict:
            complete_optimizer_state(state_dict[OPTIMIZER])
        if not to_hf:
            return super().dcp_save(state_dict, checkpoint_id, async_mode, enable_garbage_collection, to_hf)
        tables = hash_tables(self.states[MODEL].state_dict())  # uncast: export_dtype may not hold expert ids
        weights = {k: v for k, v in state_dict.items() if k not in tables}
        result = super().dcp_save(weights, checkpoint_id, async_mode, enable_garbage_collection, to_hf)
        if dist.is_initialized():
            dist.barrier()  # every rank's consolidated shard is on disk before rank 0 edits the folder
        if not dist.is_initialized() or dist.get_rank() == 0:
            complete_hf_export(checkpoint_id, self.sd_adapter, tables, self.export_dtype)
        return result
