"""TorchTitan's CheckpointManager completing HF exports, installed by ``titan_dsv4.trainer``.

An HF export (``checkpoint.last_save_in_hf``) is completed into a folder transformers loads: the int64 hash
tables leave Titan's save and are written with config.json and the tokenizer (``export.py``). Titan has no
extension point after its HF save, hence this subclass. (Every trainable parameter has optimizer state from
the start, ``infra/optimizer.py``, so DCP saves need nothing here.)
"""

from __future__ import annotations

import torch.distributed as dist
from torchtitan.components.checkpoint import MODEL, CheckpointManager

from .export import complete_hf_export, hash_tables


class DeepSeekV4CheckpointManager(CheckpointManager):
    """Titan's manager; ``dcp_save`` completes HF exports (see the module docstring)."""

    @classmethod
    def replacing(cls, manager: CheckpointManager, **init_kwargs) -> DeepSeekV4CheckpointManager:
        """This manager in place of Titan's (closed first: it may own a purge thread)."""
        manager.close()
        return cls(**init_kwargs)

    def dcp_save(self, state_dict, checkpoint_id, async_mode, enable_garbage_collection=False, to_hf=False):
        if not to_hf:
            return super().dcp_save(state_dict, checkpoint_id, async_mode, enable_garbage_collection, to_hf)
        tables = hash_tables(self.states[MODEL].state_dict())  # uncast: export_dtype may not hold expert ids
        weights = {k: v for k, v in state_dict.items() if k not in tables}
        tables = tables_of_every_stage(tables)
        result = super().dcp_save(weights, checkpoint_id, async_mode, enable_garbage_collection, to_hf)
        if dist.is_initialized():
            dist.barrier()  # every rank's consolidated shard is on disk before rank 0 edits the folder
        if not dist.is_initialized() or dist.get_rank() == 0:
            complete_hf_export(checkpoint_id, self.sd_adapter, tables, self.export_dtype)
        return result


def tables_of_every_stage(tables: dict) -> dict:
    """On rank 0, the hash tables of every rank (pipeline stages hold different layers; data-parallel ranks
    hold the same, unsharded buffers); elsewhere this rank's own."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tables
    mine = {k: v.detach().cpu() for k, v in tables.items()}
    every = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, every, dst=0)
    if dist.get_rank() != 0:
        return tables
    return {k: v for rank_tables in every for k, v in rank_tables.items()}
