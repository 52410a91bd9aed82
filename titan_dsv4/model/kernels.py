"""Attention kernels for DeepSeek-V4: the dense masked reference and the sparse fast path.

Both compute, per query t and head h, a softmax over [window keys | compressed entries | sink]:
  * window keys: raw K=V rows j with t - W < j <= t;
  * compressed entries: HCA, every entry w < (t + 1) // ratio; CSA, the indexer's picks (-1 = none);
  * the sink: a per-head logit with no value vector.
The reference materialises [S x (S + T)] logits; the fast path never builds a [S x S] tensor: the
window runs block-locally ([S x 2W]) and CSA gathers its top-k entries per query ([S x k]), so memory
grows as S x (2W + S / ratio_HCA + k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class CompressedKV:
    """A layer's compressed entries and which of them each query may see."""

    entries: torch.Tensor  # [B, T, d]
    ratio: int
    picked: torch.Tensor | None = None  # CSA: [B, S, k] entry indices, -1 = select nothing
    hidden: bool = False  # HCA alignment's synthetic entry: no query sees it

    def visible(self, seq_len: int) -> torch.Tensor:
        """[B, S, T] bool visibility (materialised; the reference path only)."""
        B, T, _ = self.entries.shape
        device = self.entries.device
        if self.hidden:
            return torch.zeros(B, seq_len, T, dtype=torch.bool, device=device)
        if self.picked is None:
            return causal_entries(seq_len, T, self.ratio, device).expand(B, seq_len, T)
        # Scatter into a spare column T so that -1 ("nothing") never lands on a real entry.
        slots = torch.where(self.picked >= 0, self.picked, torch.full_like(self.picked, T))
        visible = torch.zeros(B, seq_len, T + 1, dtype=torch.bool, device=device)
        return visible.scatter_(-1, slots, True)[..., :T]


def causal_entries(seq_len: int, n_entries: int, ratio: int, device: torch.device) -> torch.Tensor:
    """[S, T] bool: query t sees entry w iff the window's last token is at or before t."""
    t = torch.arange(seq_len, device=device)
    w = torch.arange(n_entries, device=device)
    return w[None, :] < ((t + 1) // ratio)[:, None]


def window_mask(seq_len: int, window: int, device: torch.device) -> torch.Tensor:
    """[S, S] bool: key j is in query t's band iff t - window < j <= t."""
    t = torch.arange(seq_len, device=device)
    delta = t[:, None] - t[None, :]
    return (delta >= 0) & (delta < window)


def _softmax_with_sink(logits: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Softmax over [logits | sink] with the sink column dropped; fp32 sinks promote as in transformers."""
    B, H, S, _ = logits.shape
    combined = torch.cat([logits, sinks.reshape(1, H, 1, 1).expand(B, H, S, 1)], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    return F.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]


def dense_attention(
    q: torch.Tensor, kv: torch.Tensor, sinks: torch.Tensor, window: int, compressed: CompressedKV | None
) -> torch.Tensor:
    """Reference MQA over [S window keys | T entries]: q [B, H, S, d], kv [B, S, d] -> [B, H, S, d]."""
    B, H, S, d = q.shape
    visible = window_mask(S, window, q.device).expand(B, S, S)
    if compressed is not None:
        kv = torch.cat([kv, compressed.entries.to(kv.dtype)], dim=1)
        visible = torch.cat([visible, compressed.visible(S)], dim=-1)
    logits = torch.matmul(q, kv.unsqueeze(1).transpose(-1, -2)) * d**-0.5  # [B, H, S, S+T]
    logits = logits.masked_fill(~visible.unsqueeze(1), float("-inf"))
    probs = _softmax_with_sink(logits, sinks).to(kv.dtype)
    return torch.matmul(probs, kv.unsqueeze(1))


def sparse_attention(
    q: torch.Tensor, kv: torch.Tensor, sinks: torch.Tensor, window: int, compressed: CompressedKV | None
) -> torch.Tensor:
    """Same result as ``dense_attention`` without any [S x S] tensor (see the module docstring)."""
    B, H, S, d = q.shape
    W = window
    n_blocks = -(-S // W)
    pad = n_blocks * W - S
    # Window: query block n sees key blocks n-1 and n; keys padded with zeros where none exist.
    qb = F.pad(q, (0, 0, 0, pad)).view(B, H, n_blocks, W, d)
    kvb = F.pad(kv, (0, 0, 0, pad)).view(B, n_blocks, W, d)
    keys = torch.cat([F.pad(kvb[:, :-1], (0, 0, 0, 0, 1, 0)), kvb], dim=2)  # [B, n, 2W, d]
    logits_w = torch.einsum("bhnqd,bnkd->bhnqk", qb, keys) * d**-0.5  # [B, H, n, W, 2W]
    i = torch.arange(W, device=q.device)[:, None]
    j = torch.arange(2 * W, device=q.device)[None, :]
    band = (j > i) & (j <= i + W)  # key position n*W - W + j lies in (t - W, t] for t = n*W + i
    first_block = torch.zeros(n_blocks, 1, 1, dtype=torch.bool, device=q.device)
    first_block[0] = True
    allowed = band & ~(first_block & (j < W))  # block 0 has no previous block
    logits_w = logits_w.masked_fill(~allowed, float("-inf")).reshape(B, H, n_blocks * W, 2 * W)[:, :, :S]

    gathered = None
    if compressed is None:
        logits = logits_w
    else:
        entries = compressed.entries.to(kv.dtype)
        T = entries.shape[1]
        if compressed.picked is None:  # HCA: every causally visible entry
            logits_c = torch.matmul(q, entries.unsqueeze(1).transpose(-1, -2)) * d**-0.5  # [B, H, S, T]
            seen = causal_entries(S, T, compressed.ratio, q.device)
            if compressed.hidden:
                seen = torch.zeros_like(seen)
            logits_c = logits_c.masked_fill(~seen, float("-inf"))
        else:  # CSA: gather the indexer's picks per query
            picked = compressed.picked
            # Row lookup into [B*T, d] (its backward accumulates into [B*T, d], never [B, S, T, d]).
            flat = picked.clamp(min=0) + (torch.arange(B, device=q.device) * T).view(B, 1, 1)
            gathered = entries.reshape(B * T, d)[flat]  # [B, S, k, d]
            logits_c = torch.einsum("bhsd,bskd->bhsk", q, gathered) * d**-0.5
            logits_c = logits_c.masked_fill(~(picked >= 0).unsqueeze(1), float("-inf"))
        logits = torch.cat([logits_w, logits_c], dim=-1)
    probs = _softmax_with_sink(logits, sinks).to(kv.dtype)

    p_w = F.pad(probs[..., : 2 * W], (0, 0, 0, pad)).view(B, H, n_blocks, W, 2 * W)
    out = torch.einsum("bhnqk,bnkd->bhnqd", p_w, keys).reshape(B, H, n_blocks * W, d)[:, :, :S]
    if compressed is not None:
        p_c = probs[..., 2 * W :]
        if gathered is None:
            out = out + torch.matmul(p_c, compressed.entries.to(kv.dtype).unsqueeze(1))
        else:
            out = out + torch.einsum("bhsk,bskd->bhsd", p_c, gathered)
    return out


ATTENTION_KERNELS = {"dense": dense_attention, "sparse": sparse_attention}
