"""What every block of one forward shares: rotary tables, token ids, documents, and the step's mode."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .documents import CompressionWindows, Documents
from .layers import RotaryTables
from .sequence_shard import SequenceShard

# A CSA layer's indexer statistics, one fp32 vector per layer (summed over layers by the model): the KL
# sum (with gradient into the indexer) and the queries it covers; of the sampled recall, the hits, the
# picks compared, and the picks a uniformly random choice would hit (summed over the sampled queries).
INDEXER_STATS = ("kl_sum", "kl_queries", "recall_hits", "recall_total", "recall_chance")


@dataclass
class ForwardContext:
    """Per-forward inputs of every block, built once by the model."""

    rope: RotaryTables
    tokens: torch.Tensor  # [B, S] ids (hash-routed MoE layers route by them)
    docs: Documents | None = None  # packed documents (attn_mask_type "block_causal"), else one per row
    hca_synthetic_window: bool = False  # HCA alignment: pool a masked window (this rank has none)
    indexer_dense: bool = False  # the indexer's dense warm-up: CSA attends every visible entry
    indexer_loss: bool = False  # distil the main attention into the indexer (KL, with gradient)
    measure_indexer: bool = False  # sample the indexer's recall of the main attention's top entries
    shard: SequenceShard | None = None  # context parallelism: this rank's chunks of the global sequence
    _windows: dict = field(default_factory=dict)

    @property
    def positions(self) -> torch.Tensor | None:
        """RoPE positions: [B, S] restarting at each document, else the global positions [S] under context
        parallelism, else None for 0..S-1."""
        if self.docs is not None:
            return self.docs.positions
        return None if self.shard is None else self.shard.query_pos

    def windows(self, ratio: int) -> CompressionWindows:
        """The documents' complete windows of ``ratio`` tokens, computed once per forward and ratio."""
        if ratio not in self._windows:
            self._windows[ratio] = self.docs.windows(ratio)
        return self._windows[ratio]
