"""Attention kernels for DeepSeek-V4: the dense masked reference and the sparse fast path.

Both compute, per query t and head h, a softmax over [window keys | compressed entries | sink]:
  * window keys: raw K=V rows j with t - W < j <= t (and, for packed documents, j in t's document);
  * compressed entries: HCA, every entry whose window ended at or before t; CSA, the indexer's picks
    (-1 = none), or every such entry during the indexer's dense warm-up;
  * the sink: a per-head logit with no value vector.
The reference materialises [S x (S + T)] logits; the fast path never builds a [S x S] tensor: the
window runs block-locally ([S x 2W]) and CSA gathers its top-k entries per query ([S x k]), so memory
grows as S x (2W + S / ratio_HCA + k).

Options shared by both kernels: ``fp32_logits`` computes q.k in fp32 (a no-op for fp32 inputs), and
``entry_probs`` also returns the probability each query gives the compressed entries it sees, summed over
heads ([B, S, k] for picks, [B, S, T] otherwise; detached): the Lightning Indexer's distillation target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .sequence_shard import WindowHalo

CSA_GATHER_BUDGET = 1 << 24  # gathered elements ([B, c, k, d]) per query chunk of CSA's sparse path


@dataclass
class CompressedKV:
    """A layer's compressed entries and which of them each query may see."""

    entries: torch.Tensor  # [B, T, d]
    ratio: int
    picked: torch.Tensor | None = None  # CSA: [B, S, k] entry indices, -1 = select nothing
    hidden: bool = False  # HCA alignment's synthetic entry: no query sees it
    seen: torch.Tensor | None = None  # [B, S, T] visibility when not the causal rule (packed documents)
    # Context parallelism: the queries' global positions [S] (the causal rule is by global position)
    query_pos: torch.Tensor | None = None

    def visible_all(self, seq_len: int) -> torch.Tensor:
        """[B, S, T] bool: every entry a query may attend when all visible entries count (picks ignored)."""
        B, T, _ = self.entries.shape
        if self.hidden:
            return torch.zeros(B, seq_len, T, dtype=torch.bool, device=self.entries.device)
        if self.seen is not None:
            return self.seen
        return causal_entries(seq_len, T, self.ratio, self.entries.device, self.query_pos).expand(
            B, seq_len, T
        )

    def visible_counts(self, seq_len: int) -> torch.Tensor:
        """[B, S]: how many entries each query may see (``visible_all(S).sum(-1)``, no [S, T] mask when
        causal)."""
        B, T, _ = self.entries.shape
        if self.hidden or self.seen is not None:
            return self.visible_all(seq_len).sum(-1)
        t = torch.arange(seq_len, device=self.entries.device) if self.query_pos is None else self.query_pos
        return ((t + 1) // self.ratio).clamp(max=T).expand(B, seq_len)

    def visible_rows(self, b: int, rows: torch.Tensor, seq_len: int) -> torch.Tensor:
        """[r, T] bool: ``visible_all(S)[b, rows]``, built for those rows only under the causal rule."""
        T = self.entries.shape[1]
        if self.hidden or self.seen is not None:
            return self.visible_all(seq_len)[b, rows]
        t = rows if self.query_pos is None else self.query_pos[rows]
        return torch.arange(T, device=rows.device)[None, :] < ((t + 1) // self.ratio)[:, None]

    def visible(self, seq_len: int) -> torch.Tensor:
        """[B, S, T] bool visibility of what attention uses (materialised; the reference path only)."""
        if self.picked is None:
            return self.visible_all(seq_len)
        B, T, _ = self.entries.shape
        # Scatter into a spare column T so that -1 ("nothing") never lands on a real entry.
        slots = torch.where(self.picked >= 0, self.picked, torch.full_like(self.picked, T))
        visible = torch.zeros(B, seq_len, T + 1, dtype=torch.bool, device=self.entries.device)
        return visible.scatter_(-1, slots, True)[..., :T]


def causal_entries(
    seq_len: int, n_entries: int, ratio: int, device: torch.device, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """[S, T] bool: query t (at ``positions[t]`` under context parallelism) sees entry w iff the window's
    last token is at or before it."""
    t = torch.arange(seq_len, device=device) if positions is None else positions
    w = torch.arange(n_entries, device=device)
    return w[None, :] < ((t + 1) // ratio)[:, None]


def window_mask(seq_len: int, window: int, device: torch.device, doc_ids: torch.Tensor | None = None):
    """[S, S] (or [B, S, S] with documents) bool: key j is in query t's band iff t - window < j <= t."""
    t = torch.arange(seq_len, device=device)
    delta = t[:, None] - t[None, :]
    band = (delta >= 0) & (delta < window)
    if doc_ids is None:
        return band
    return band & (doc_ids[:, :, None] == doc_ids[:, None, :])


def _logits(q: torch.Tensor, k: torch.Tensor, equation: str, fp32: bool) -> torch.Tensor:
    """Scaled q.k by an einsum; in fp32 when asked (the inputs are then upcast before the product)."""
    if fp32 and (q.dtype != torch.float32 or k.dtype != torch.float32):
        return _Fp32Einsum.apply(equation, q, k) * q.shape[-1] ** -0.5
    return torch.einsum(equation, q, k) * q.shape[-1] ** -0.5


class _Fp32Einsum(torch.autograd.Function):
    """einsum of the fp32 upcasts that saves the low-precision inputs, not fp32 copies of the gathered keys.

    Autograd on ``einsum(q.float(), k.float())`` would keep both upcasts for backward: for CSA's gathered
    picks ([S x k x d] per row) that doubles the kernel's largest saved tensor. Backward re-casts instead;
    the values are the same (a bf16 -> fp32 cast is exact). Every index of either operand appears in the
    other operand or the output (true of the kernels' equations), so each gradient is one einsum.
    """

    @staticmethod
    def forward(ctx, equation: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.equation = equation
        ctx.save_for_backward(a, b)
        # fp32 also under autocast (single-process bf16 runs autocast), which would recast the product
        with torch.autocast(a.device.type, enabled=False):
            return torch.einsum(equation, a.float(), b.float())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        operands, out = ctx.equation.split("->")
        a_idx, b_idx = operands.split(",")
        grad = grad.float()
        grad_a = torch.einsum(f"{out},{b_idx}->{a_idx}", grad, b.float()).to(a.dtype)
        grad_b = torch.einsum(f"{out},{a_idx}->{b_idx}", grad, a.float()).to(b.dtype)
        return None, grad_a, grad_b


def _softmax_with_sink(logits: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Softmax over [logits | sink] with the sink column dropped; fp32 sinks promote as in transformers."""
    B, H, S, _ = logits.shape
    combined = torch.cat([logits, sinks.reshape(1, H, 1, 1).expand(B, H, S, 1)], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    return F.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]


def _entry_probs(probs: torch.Tensor) -> torch.Tensor:
    """[B, H, S, n] entry probabilities -> [B, S, n] summed over heads, in fp32 and without gradient."""
    return probs.detach().float().sum(dim=1)


def dense_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    sinks: torch.Tensor,
    window: int,
    compressed: CompressedKV | None,
    doc_ids: torch.Tensor | None = None,
    fp32_logits: bool = False,
    entry_probs: bool = False,
    halo: WindowHalo | None = None,
):
    """Reference MQA over [S window keys | T entries]: q [B, H, S, d], kv [B, S, d] -> [B, H, S, d].

    Under context parallelism (``halo``) the window keys are [the chunks' halos | the local keys], masked
    by global position and global document.
    """
    B, H, S, d = q.shape
    if halo is None:
        visible = window_mask(S, window, q.device, doc_ids).expand(B, S, S)
    else:
        kv, visible = _keys_with_halo(kv, window, doc_ids, halo)
    n_keys = kv.shape[1]
    T = 0
    if compressed is not None:
        T = compressed.entries.shape[1]
        kv = torch.cat([kv, compressed.entries.to(kv.dtype)], dim=1)
        visible = torch.cat([visible, compressed.visible(S)], dim=-1)
    if fp32_logits:
        logits = torch.matmul(q.float(), kv.float().unsqueeze(1).transpose(-1, -2)) * d**-0.5
    else:
        logits = torch.matmul(q, kv.unsqueeze(1).transpose(-1, -2)) * d**-0.5  # [B, H, S, S+T]
    logits = logits.masked_fill(~visible.unsqueeze(1), float("-inf"))
    probs = _softmax_with_sink(logits, sinks).to(kv.dtype)
    out = torch.matmul(probs, kv.unsqueeze(1))
    if not entry_probs:
        return out
    p = _entry_probs(probs[..., n_keys : n_keys + T])
    if compressed is not None and compressed.picked is not None:  # the picks' order, as the sparse path
        p = p.gather(-1, compressed.picked.clamp(min=0)).masked_fill(compressed.picked < 0, 0.0)
    return out, p


def _keys_with_halo(kv: torch.Tensor, window: int, doc_ids: torch.Tensor | None, halo: WindowHalo):
    """The dense reference's window keys under context parallelism and their [B, S, n_keys] band.

    A halo row that is also a local key (the rank holds the predecessor chunk too) is masked, so that no
    key counts twice.
    """
    B = kv.shape[0]
    keys = torch.cat([halo.kv.flatten(1, 2).to(kv.dtype), kv], dim=1)
    halo_ok = (halo.key_pos >= 0) & ~halo.local_predecessor[:, None]
    key_pos = torch.cat([halo.key_pos.flatten(), halo.query_pos])
    key_ok = torch.cat([halo_ok.flatten(), torch.ones_like(halo.query_pos, dtype=torch.bool)])
    delta = halo.query_pos[:, None] - key_pos[None, :]
    band = ((delta >= 0) & (delta < window) & key_ok[None, :]).expand(B, -1, -1)
    if doc_ids is None:
        return keys, band
    key_docs = torch.cat([halo.key_docs.flatten(1), doc_ids], dim=1)
    return keys, band & (doc_ids[:, :, None] == key_docs[:, None, :])


def _halo_blocks(blocks: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Per query block, the block before it: the local one, or for a chunk's first block ``first``.

    blocks [B, n, W, ...] (n = n_local_chunks x blocks per chunk), first [B, n_local_chunks, W, ...].
    """
    B, n = blocks.shape[:2]
    n_local = first.shape[1]
    per_chunk = blocks.view(B, n_local, n // n_local, *blocks.shape[2:])
    return torch.cat([first.unsqueeze(2), per_chunk[:, :, :-1]], dim=2).view(blocks.shape)


def _window_allowed_halo(n_blocks: int, W: int, doc_ids: torch.Tensor | None, halo: WindowHalo):
    """``_window_allowed`` under context parallelism: a chunk's first block looks back into its halo,
    which exists unless the chunk starts the sequence."""
    device = halo.kv.device
    i = torch.arange(W, device=device)[:, None]
    j = torch.arange(2 * W, device=device)[None, :]
    band = (j > i) & (j <= i + W)
    n_local = halo.key_pos.shape[0]
    has_prev = torch.ones(n_local, n_blocks // n_local, dtype=torch.bool, device=device)
    has_prev[:, 0] = halo.key_pos[:, -1] >= 0
    allowed = band & ~(~has_prev.view(n_blocks, 1, 1) & (j < W))
    if doc_ids is None:
        return allowed
    B = doc_ids.shape[0]
    docs = doc_ids.view(B, n_blocks, W)
    key_docs = torch.cat([_halo_blocks(docs, halo.key_docs), docs], dim=2)  # [B, n, 2W]
    return allowed & (docs[..., :, None] == key_docs[..., None, :])


def _window_allowed(n_blocks: int, W: int, device, doc_ids: torch.Tensor | None, pad: int):
    """[n, W, 2W] (or [B, n, W, 2W]) bool: which of a query block's 2W candidate keys are in its window."""
    i = torch.arange(W, device=device)[:, None]
    j = torch.arange(2 * W, device=device)[None, :]
    band = (j > i) & (j <= i + W)  # key position n*W - W + j lies in (t - W, t] for t = n*W + i
    first_block = torch.zeros(n_blocks, 1, 1, dtype=torch.bool, device=device)
    first_block[0] = True
    allowed = band & ~(first_block & (j < W))  # block 0 has no previous block
    if doc_ids is None:
        return allowed
    B = doc_ids.shape[0]
    docs = F.pad(doc_ids, (0, pad), value=-1).view(B, n_blocks, W)
    key_docs = torch.cat([F.pad(docs[:, :-1], (0, 0, 1, 0), value=-2), docs], dim=2)  # [B, n, 2W]
    return allowed & (docs[..., :, None] == key_docs[..., None, :])


def sparse_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    sinks: torch.Tensor,
    window: int,
    compressed: CompressedKV | None,
    doc_ids: torch.Tensor | None = None,
    fp32_logits: bool = False,
    entry_probs: bool = False,
    halo: WindowHalo | None = None,
):
    """Same result as ``dense_attention`` without any [S x S] tensor (see the module docstring).

    Under context parallelism (``halo``; chunks are whole multiples of W) a chunk's first query block
    looks back into the previous chunk's last W keys instead of a local block.
    """
    B, H, S, d = q.shape
    W = window
    n_blocks = -(-S // W)
    pad = n_blocks * W - S
    # Window: query block n sees key blocks n-1 and n; keys padded with zeros where none exist.
    qb = F.pad(q, (0, 0, 0, pad)).view(B, H, n_blocks, W, d)
    kvb = F.pad(kv, (0, 0, 0, pad)).view(B, n_blocks, W, d)
    if halo is None:
        previous = F.pad(kvb[:, :-1], (0, 0, 0, 0, 1, 0))
        allowed = _window_allowed(n_blocks, W, q.device, doc_ids, pad)
    else:
        previous = _halo_blocks(kvb, halo.kv.to(kv.dtype))
        allowed = _window_allowed_halo(n_blocks, W, doc_ids, halo)
    keys = torch.cat([previous, kvb], dim=2)  # [B, n, 2W, d]
    logits_w = _logits(qb, keys, "bhnqd,bnkd->bhnqk", fp32_logits)  # [B, H, n, W, 2W]
    if allowed.dim() == 4:
        allowed = allowed.unsqueeze(1)
    logits_w = logits_w.masked_fill(~allowed, float("-inf")).reshape(B, H, n_blocks * W, 2 * W)[:, :, :S]
    if compressed is None:
        probs = _softmax_with_sink(logits_w, sinks).to(kv.dtype)
        out = _window_out(probs, keys, pad)
        return (out, None) if entry_probs else out
    entries = compressed.entries.to(kv.dtype)
    if compressed.picked is not None:  # CSA: gather the indexer's picks, a query chunk at a time
        return _sparse_picks(
            q, logits_w, keys, sinks, entries, compressed.picked, pad, fp32_logits, entry_probs
        )
    # HCA (or CSA's dense warm-up): every visible entry
    logits_c = _logits(q, entries, "bhsd,btd->bhst", fp32_logits)  # [B, H, S, T]
    logits_c = logits_c.masked_fill(~compressed.visible_all(S).unsqueeze(1), float("-inf"))
    logits = torch.cat([logits_w, logits_c.to(logits_w.dtype)], dim=-1)
    probs = _softmax_with_sink(logits, sinks).to(kv.dtype)
    out = _window_out(probs[..., : 2 * W], keys, pad) + torch.matmul(
        probs[..., 2 * W :], entries.unsqueeze(1)
    )
    return (out, _entry_probs(probs[..., 2 * W :])) if entry_probs else out


def _window_out(p_w: torch.Tensor, keys: torch.Tensor, pad: int) -> torch.Tensor:
    """[B, H, S, 2W] window probabilities x the blocks' [B, n, 2W, d] keys -> [B, H, S, d]."""
    B, H, S, W2 = p_w.shape
    n_blocks = keys.shape[1]
    p_w = F.pad(p_w, (0, 0, 0, pad)).view(B, H, n_blocks, W2 // 2, W2)
    return torch.einsum("bhnqk,bnkd->bhnqd", p_w, keys).reshape(B, H, -1, keys.shape[-1])[:, :, :S]


def _sparse_picks(q, logits_w, keys, sinks, entries, picked, pad, fp32_logits, entry_probs):
    """CSA's sparse path: one joint softmax over [window | picked entries | sink] per query.

    The picks are looked up in the flattened entries [B*T, d] plus one all-zero spare row (index B*T) that
    every -1 pick reads, so an empty pick's (zero) gradient lands on the spare row, never on a real entry.
    Queries go in chunks of ``_csa_chunk_size`` (the [B, c, k, d] gather bounded by ``CSA_GATHER_BUDGET``),
    each recomputed in backward (activation checkpointing), so no [B, S, k, d] gather is kept for it.
    """
    B, H, S, d = q.shape
    T = entries.shape[1]
    table = torch.cat([entries.reshape(B * T, d), entries.new_zeros(1, d)])
    offsets = (torch.arange(B, device=q.device) * T).view(B, 1, 1)
    rows = torch.where(picked >= 0, picked + offsets, B * T)  # [B, S, k]
    step = _csa_chunk_size(B, H, picked.shape[-1], d)
    p_w, out_c, p_c = [], [], []
    for i in range(0, S, step):
        args = (q[:, :, i : i + step], logits_w[:, :, i : i + step], table, rows[:, i : i + step], sinks)
        if torch.is_grad_enabled():
            part = checkpoint(_csa_chunk, *args, fp32_logits, entry_probs, use_reentrant=False)
        else:
            part = _csa_chunk(*args, fp32_logits, entry_probs)
        p_w.append(part[0])
        out_c.append(part[1])
        p_c.append(part[2])
    out = _window_out(torch.cat(p_w, dim=2), keys, pad) + torch.cat(out_c, dim=2)
    return (out, torch.cat(p_c, dim=1)) if entry_probs else out


def _csa_chunk_size(B: int, H: int, k: int, d: int) -> int:
    """Queries per CSA chunk: the [B, c, k, d] gather (and the [B, H, c, k] logits) within the budget."""
    return max(1, CSA_GATHER_BUDGET // (B * k * max(d, H)))


def _csa_chunk(q, logits_w, table, rows, sinks, fp32_logits: bool, entry_probs: bool):
    """One query chunk of ``_sparse_picks``: (window probabilities [B, H, c, 2W], the picks' share of the
    output [B, H, c, d], the picks' probabilities summed over heads [B, c, k] or None)."""
    gathered = table[rows]  # [B, c, k, d]; backward accumulates into [B*T + 1, d]
    logits_c = _logits(q, gathered, "bhsd,bskd->bhsk", fp32_logits)
    logits_c = logits_c.masked_fill((rows == table.shape[0] - 1).unsqueeze(1), float("-inf"))
    probs = _softmax_with_sink(torch.cat([logits_w, logits_c.to(logits_w.dtype)], dim=-1), sinks)
    probs = probs.to(table.dtype)
    W2 = logits_w.shape[-1]
    out_c = torch.einsum("bhsk,bskd->bhsd", probs[..., W2:], gathered)
    return probs[..., :W2], out_c, (_entry_probs(probs[..., W2:]) if entry_probs else None)


ATTENTION_KERNELS = {"dense": dense_attention, "sparse": sparse_attention}
