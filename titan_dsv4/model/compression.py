"""Compression windows into entries: softmax-gated pooling (CSA's overlapping, HCA's plain), by row, by
packed document or by a context-parallel rank's slots, and the entries' RoPE at their window's first position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .context import ForwardContext
from .documents import CompressionWindows
from .layers import apply_rope
from .sequence_shard import SequenceShard, SlotLayout


def gated_pool(
    kv: torch.Tensor, gate: torch.Tensor, ape: torch.Tensor, ratio: int, overlap: bool
) -> torch.Tensor:
    """Softmax-gated pooling of each complete window of ``ratio`` tokens into one entry.

    kv, gate: [B, S, c*d]; ape: [ratio, c*d]. With ``overlap`` (CSA, c = 2) entry w mixes the A halves
    of window w-1 with the B halves of window w (8 slots for ratio 4); window 0 has no predecessor, so
    its first slots get zero kv and -inf gate. Returns [B, S // ratio, d].
    """
    B, S, width = kv.shape
    n_windows = S // ratio
    kv = kv[:, : n_windows * ratio].view(B, n_windows, ratio, width)
    gate = gate[:, : n_windows * ratio].view(B, n_windows, ratio, width) + ape
    if overlap:
        d = width // 2
        prev_kv = F.pad(kv[:, :-1, :, :d], (0, 0, 0, 0, 1, 0), value=0.0)
        prev_gate = F.pad(gate[:, :-1, :, :d], (0, 0, 0, 0, 1, 0), value=float("-inf"))
        kv = torch.cat([prev_kv, kv[..., d:]], dim=2)
        gate = torch.cat([prev_gate, gate[..., d:]], dim=2)
    weights = gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)
    return (kv * weights).sum(dim=2)


def _rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t [B, S, w] rows at index [B, T, r] -> [B, T, r, w]."""
    B, T, r = index.shape
    return t.gather(1, index.reshape(B, T * r, 1).expand(-1, -1, t.shape[-1])).view(B, T, r, t.shape[-1])


def gated_pool_windows(
    kv: torch.Tensor, gate: torch.Tensor, ape: torch.Tensor, windows: CompressionWindows, overlap: bool
) -> torch.Tensor:
    """``gated_pool`` over the documents' windows (each aligned to its document's start) -> [B, T, d].

    CSA's first slots come from the previous window of the same document; a document's first window
    has none (zero kv, -inf gate), exactly as window 0 of a row of its own.
    """
    ratio = windows.ratio
    index = windows.start[:, :, None] + torch.arange(ratio, device=kv.device)
    kv_slots, gate_slots = _rows(kv, index), _rows(gate, index) + ape
    if overlap:
        d = kv.shape[-1] // 2
        prev = (index - ratio).clamp(min=0)
        has = windows.has_previous[:, :, None, None]
        prev_kv = torch.where(has, _rows(kv, prev)[..., :d], 0.0)
        prev_gate = torch.where(has, (_rows(gate, prev) + ape)[..., :d], float("-inf"))
        kv_slots = torch.cat([prev_kv, kv_slots[..., d:]], dim=2)
        gate_slots = torch.cat([prev_gate, gate_slots[..., d:]], dim=2)
    weights = gate_slots.softmax(dim=2, dtype=torch.float32).to(kv.dtype)
    return (kv_slots * weights).sum(dim=2)


def pool_slots(
    kv: torch.Tensor,
    gate: torch.Tensor,
    ape: torch.Tensor,
    slots: SlotLayout,
    shard: SequenceShard,
    overlap: bool,
) -> torch.Tensor:
    """Context parallelism: pool the windows that complete in this rank's chunks -> [B, local slots, d].

    A window (and CSA's previous window) may begin in the previous chunk: those rows come with the halo
    (``slots.halo_rows`` rows of the projections, exchanged with gradient). Slots holding no window pool
    rows of their chunk and stay masked, so every rank's compressor joins backward.
    """
    rows = slots.halo_rows
    return gated_pool_windows(shard.extend(kv, rows), shard.extend(gate, rows), ape, slots.local, overlap)


def entry_rope(entries: torch.Tensor, ctx: ForwardContext, ratio: int, windows: CompressionWindows | None):
    """Compress-table RoPE on entries at their window's first position (document-relative when packed)."""
    if windows is None:
        S = ctx.tokens.shape[1]
        cos, sin = ctx.rope.get("compress", S, entries.dtype)
        T = entries.shape[1]
        return apply_rope(entries, cos[::ratio][:T], sin[::ratio][:T])
    cos, sin = ctx.rope.get("compress", 0, entries.dtype, windows.index * ratio)
    return apply_rope(entries, cos, sin)
