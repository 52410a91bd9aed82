"""Packed documents (``attn_mask_type = "block_causal"``): where each document lies in a row of tokens.

TorchTitan packs documents, each ending with the end-of-sequence token, into fixed-length rows. Under
``block_causal`` every position-dependent part of DeepSeek-V4 stays inside the query's document:
RoPE positions restart at each document, the sliding window and the compressed entries a query sees
are its document's, and compression windows are aligned to the document's start (a document's trailing
partial window produces no entry, exactly as when the document is a row of its own).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Documents:
    """Per token: which document of its row it belongs to, and its position inside that document."""

    doc_ids: torch.Tensor  # [B, S] int64, 0 for the row's first document
    positions: torch.Tensor  # [B, S] int64, 0 at each document's first token
    lengths: torch.Tensor  # [B, S] int64, the length of the token's document (within the row)

    @classmethod
    def from_tokens(cls, tokens: torch.Tensor, eos_id: int) -> Documents:
        """A document ends with ``eos_id``; the token after it starts the next one."""
        B, S = tokens.shape
        ends = tokens == eos_id
        doc_ids = torch.cumsum(ends.long(), dim=1) - ends.long()  # the eos belongs to the document it ends
        index = torch.arange(S, device=tokens.device).expand(B, S)
        starts = torch.zeros_like(doc_ids).scatter_reduce(
            1, doc_ids, index, reduce="amin", include_self=False
        )
        start = starts.gather(1, doc_ids)
        counts = torch.zeros_like(doc_ids).scatter_add_(1, doc_ids, torch.ones_like(doc_ids))
        return cls(doc_ids, index - start, counts.gather(1, doc_ids))

    def windows(self, ratio: int) -> CompressionWindows:
        """The complete ``ratio``-token windows of every document, aligned to each document's start.

        The table has S // ratio slots, the most a row can hold, whatever the documents: its shape never
        depends on the data (no host synchronisation); the slots past a row's windows are padding.
        """
        starts_here = (self.positions % ratio == 0) & (self.positions + ratio <= self.lengths)
        counts = starts_here.sum(dim=1)
        T = self.doc_ids.shape[1] // ratio
        order = torch.argsort((~starts_here).to(torch.int8), dim=1, stable=True)[:, :T]  # window starts first
        valid = torch.arange(T, device=counts.device)[None, :] < counts[:, None]
        start = torch.where(valid, order, torch.zeros_like(order))
        return CompressionWindows(
            start=start,
            valid=valid,
            doc_ids=torch.where(valid, self.doc_ids.gather(1, start), torch.full_like(start, -1)),
            index=torch.where(valid, self.positions.gather(1, start) // ratio, torch.zeros_like(start)),
            ratio=ratio,
        )


@dataclass(frozen=True)
class CompressionWindows:
    """The complete compression windows of a row of packed documents, padded to the longest row."""

    start: torch.Tensor  # [B, T] first token of each window (0 where padding)
    valid: torch.Tensor  # [B, T] bool
    doc_ids: torch.Tensor  # [B, T] the window's document (-1 where padding)
    index: (
        torch.Tensor
    )  # [B, T] the window's index inside its document (its entry's position is index * ratio)
    ratio: int

    @property
    def has_previous(self) -> torch.Tensor:
        """[B, T] bool: the window has a predecessor in its document (CSA's overlapping slots)."""
        return self.valid & (self.index > 0)

    def visible(self, docs: Documents) -> torch.Tensor:
        """[B, S, T] bool: query t sees entry w iff same document and the window ended at or before t."""
        last = self.start + self.ratio - 1
        S = docs.doc_ids.shape[1]
        t = torch.arange(S, device=last.device)
        same_doc = docs.doc_ids[:, :, None] == self.doc_ids[:, None, :]
        return same_doc & (last[:, None, :] <= t[None, :, None]) & self.valid[:, None, :]
