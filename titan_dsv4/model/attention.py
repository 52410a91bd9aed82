"""DeepSeek-V4 attention: shared-KV MQA over a sliding window plus compressed entries (CSA / HCA).

The kernels (``kernels.py``): the dense masked reference over [S window keys | T compressed entries]
and the sparse fast path that reproduces it without [S x S] tensors; ``attn_impl`` picks one.
Packed documents (``context.docs``) keep every window, entry and pick inside the query's document.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .args import CSA, HCA, SLIDING, DeepSeekV4ModelArgs
from .context import INDEXER_STATS, ForwardContext
from .documents import CompressionWindows
from .kernels import ATTENTION_KERNELS, CompressedKV
from .layers import ParamHolder, RMSNorm, apply_rope, unweighted_rms_norm
from .sequence_shard import SequenceShard, SlotLayout

RECALL_QUERIES = 32  # queries per row whose indexer recall is measured (training only, no gradient)


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


def _entry_rope(entries: torch.Tensor, ctx: ForwardContext, ratio: int, windows: CompressionWindows | None):
    """Compress-table RoPE on entries at their window's first position (document-relative when packed)."""
    if windows is None:
        S = ctx.tokens.shape[1]
        cos, sin = ctx.rope.get("compress", S, entries.dtype)
        T = entries.shape[1]
        return apply_rope(entries, cos[::ratio][:T], sin[::ratio][:T])
    cos, sin = ctx.rope.get("compress", 0, entries.dtype, windows.index * ratio)
    return apply_rope(entries, cos, sin)


@dataclass
class IndexerScoring:
    """The indexer's keys, queries and head weights of one forward (with gradient when it learns)."""

    keys: torch.Tensor  # [B, T, dI]
    q: torch.Tensor  # [B, S, nI, dI]
    head_w: torch.Tensor  # [B, S, nI]
    picked: torch.Tensor | None = None  # [B, S, k] its top-k picks (-1 = none)
    query_pos: torch.Tensor | None = None  # [S] global query positions under context parallelism


class Indexer(nn.Module):
    """Lightning Indexer of a CSA layer: its own overlapping compressor at index_head_dim, then top-k.

    Indices are not differentiable, so no LM-loss gradient reaches the indexer (as in transformers).
    With ``indexer_loss_weight > 0`` it learns from a KL distillation of the main attention instead
    (``kl_sum``), its inputs detached so that the KL trains only the indexer; otherwise it is frozen.
    """

    def __init__(self, args: DeepSeekV4ModelArgs):
        super().__init__()
        dI, nI = args.index_head_dim, args.index_n_heads
        self.ratio, self.head_dim, self.n_heads, self.topk = args.csa_ratio, dI, nI, args.index_topk
        self.wkv = nn.Linear(args.dim, 2 * dI, bias=False)
        self.wgate = nn.Linear(args.dim, 2 * dI, bias=False)
        self.ape_param = ParamHolder(args.csa_ratio, 2 * dI)
        self.norm = RMSNorm(dI, args.norm_eps)
        self.wq_b = nn.Linear(args.q_lora_rank, nI * dI, bias=False)
        self.weights_proj = nn.Linear(args.dim, nI, bias=False)
        self.score_budget = 1 << 24  # score elements per query chunk (64 MiB of fp32)
        self.learns = args.indexer_loss_weight > 0
        self.requires_grad_(self.learns)

    def scoring(
        self,
        x: torch.Tensor,
        q_latent: torch.Tensor,
        ctx: ForwardContext,
        windows: CompressionWindows | None,
        slots: SlotLayout | None = None,
    ) -> IndexerScoring:
        """Keys of the indexer's own compressed entries, its rope'd queries and head weights.

        Under context parallelism (``slots``) the keys are pooled where their window completes and
        all-gathered into the global slots, so local queries score every causally visible entry.
        """
        B, S, _ = x.shape
        ape = self.ape_param()
        if slots is not None:
            keys = pool_slots(self.wkv(x), self.wgate(x), ape, slots, ctx.shard, overlap=True)
            keys = ctx.shard.gather_chunks(_entry_rope(self.norm(keys), ctx, self.ratio, slots.local))
        elif windows is None:
            keys = gated_pool(self.wkv(x), self.wgate(x), ape, self.ratio, overlap=True)
            keys = _entry_rope(self.norm(keys), ctx, self.ratio, windows)
        else:
            keys = gated_pool_windows(self.wkv(x), self.wgate(x), ape, windows, overlap=True)
            keys = _entry_rope(self.norm(keys), ctx, self.ratio, windows)
        q = self.wq_b(q_latent).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        cos, sin = ctx.rope.get("compress", S, q.dtype, ctx.positions)
        q = apply_rope(q, cos, sin).transpose(1, 2)  # [B, S, nI, dI]
        head_w = self.weights_proj(x).float() * self.n_heads**-0.5  # [B, S, nI]
        query_pos = None if ctx.shard is None else ctx.shard.query_pos
        return IndexerScoring(keys, q, head_w, query_pos=query_pos)

    def _chunk(self, B: int, T: int) -> int:
        """Queries per chunk: only [chunk, nI, T] scores live at once, never [S, nI, T]."""
        return max(1, self.score_budget // max(1, B * self.n_heads * T))

    def _scores(self, q: torch.Tensor, keys: torch.Tensor, head_w: torch.Tensor) -> torch.Tensor:
        """[B, c, T] fp32: sum over heads of w_h * ReLU(q_h . k) / sqrt(dI)."""
        scores = torch.matmul(q.float(), keys.float().transpose(-1, -2).unsqueeze(1))  # [B, c, nI, T]
        scores = F.relu(scores) * self.head_dim**-0.5
        return (scores * head_w.unsqueeze(-1)).sum(dim=2)

    @torch.no_grad()
    def pick_per_document(
        self, s: IndexerScoring, ctx: ForwardContext, entry_docs: torch.Tensor
    ) -> torch.Tensor:
        """``pick`` for packed documents: each document's queries score exactly its own entries, as when the
        document is a row of its own (top-k breaks ReLU's exact-zero ties by the row it is given, so a
        packed document picks what it picks alone). ``entry_docs`` [B, T]: each entry's document (-1 for
        none); a document's entries are in order, and contiguous except under context parallelism, where
        empty slots may lie between them. Picks index the row's entries; -1 = none."""
        B, S = s.q.shape[:2]
        T = s.keys.shape[1]
        picks = torch.full((B, S, min(self.topk, T)), -1, dtype=torch.long, device=s.q.device)
        docs = ctx.docs
        for b in range(B):
            for d in torch.unique(docs.doc_ids[b]).tolist():
                entries = torch.nonzero(entry_docs[b] == d).flatten()
                if entries.numel() == 0:
                    continue
                n = entries.numel()
                e0 = int(entries[0])
                contiguous = int(entries[-1]) - e0 + 1 == n
                keys = s.keys[b : b + 1, e0 : e0 + n] if contiguous else s.keys[b : b + 1, entries]
                queries = torch.nonzero(docs.doc_ids[b] == d).flatten()
                q0, q1 = int(queries[0]), int(queries[-1]) + 1
                step = self._chunk(1, n)
                for i in range(q0, q1, step):
                    j = min(i + step, q1)
                    scores = self._scores(s.q[b : b + 1, i:j], keys, s.head_w[b : b + 1, i:j])
                    local = (docs.positions[b, i:j] + 1) // self.ratio
                    allowed = torch.arange(n, device=s.q.device)[None, :] < local[:, None]
                    picked = (
                        scores[0].masked_fill(~allowed, float("-inf")).topk(min(self.topk, n), dim=-1).indices
                    )
                    picks[b, i:j, : picked.shape[1]] = torch.where(
                        allowed.gather(-1, picked), entries[picked], -1
                    )
        return picks

    @torch.no_grad()
    def pick(self, s: IndexerScoring, seen: torch.Tensor | None) -> torch.Tensor:
        """Top-k compressed-entry indices per query [B, S, k]; -1 marks "select nothing".

        ``seen`` [B, S, T] is the visibility when not the causal rule; None means the causal rule.
        """
        B, S = s.q.shape[:2]
        T = s.keys.shape[1]
        picks = []
        for i in range(0, S, self._chunk(B, T)):
            q, head_w = s.q[:, i : i + self._chunk(B, T)], s.head_w[:, i : i + self._chunk(B, T)]
            scores = self._scores(q, s.keys, head_w)
            allowed = self._allowed(B, i, q.shape[1], T, seen, q.device, s.query_pos)
            picked = scores.masked_fill(~allowed, float("-inf")).topk(min(self.topk, T), dim=-1).indices
            picks.append(torch.where(allowed.gather(-1, picked), picked, torch.full_like(picked, -1)))
        return torch.cat(picks, dim=1)

    def _allowed(
        self, B: int, start: int, n: int, T: int, seen: torch.Tensor | None, device, query_pos=None
    ) -> torch.Tensor:
        """[B, n, T] bool: the entries queries start..start+n may see (by global position under CP)."""
        if seen is not None:
            return seen[:, start : start + n]
        if query_pos is None:
            positions = torch.arange(start, start + n, device=device)
        else:
            positions = query_pos[start : start + n]
        causal = torch.arange(T, device=device)[None, :] < ((positions + 1) // self.ratio)[:, None]
        return causal.expand(B, n, T)

    def kl_sum(
        self, s: IndexerScoring, target: torch.Tensor, seen: torch.Tensor | None, picked: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum over queries of KL(target || softmax(indexer scores)), number of queries) over ``picked``
        entries (sparse stage) or every visible entry (dense warm-up); chunked and recomputed in backward,
        so memory stays at one chunk's [c, nI, T] scores."""
        B, S = s.q.shape[:2]
        T = s.keys.shape[1]
        total = s.head_w.new_zeros(())
        count = s.head_w.new_zeros(())
        step = self._chunk(B, T)
        for i in range(0, S, step):
            if picked is not None:
                sel = picked[:, i : i + step]
            else:
                sel = self._allowed(B, i, min(step, S - i), T, seen, s.q.device, s.query_pos)
            kl, n = checkpoint(
                self._chunk_kl,
                s.q[:, i : i + step],
                s.keys,
                s.head_w[:, i : i + step],
                target[:, i : i + step],
                sel,
                use_reentrant=False,
            )
            total, count = total + kl, count + n
        return total, count

    def _chunk_kl(self, q, keys, head_w, target, sel):
        scores = self._scores(q, keys, head_w)
        if sel.dtype == torch.bool:  # dense warm-up: every visible entry
            valid = sel
        else:  # sparse stage: the picks, in pick order (the target comes in the same order)
            scores, valid = scores.gather(-1, sel.clamp(min=0)), sel >= 0
        mass = torch.where(valid, target, 0.0)
        has = mass.sum(-1) > 0
        p = mass / mass.sum(-1, keepdim=True).clamp_min(1e-30)
        logq = torch.where(has[..., None], scores, 0.0).masked_fill(~valid & has[..., None], float("-inf"))
        logq = logq.log_softmax(dim=-1)
        kl = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - logq), 0.0).sum(-1)
        return kl[has].sum(), has.sum().to(kl.dtype)


class Compressor(nn.Module):
    """Pools windows of ``ratio`` tokens into compressed KV entries (CSA: overlapping, with indexer)."""

    def __init__(self, args: DeepSeekV4ModelArgs, kind: str):
        super().__init__()
        self.kind = kind
        self.ratio = args.csa_ratio if kind == CSA else args.hca_ratio
        self.overlap = kind == CSA
        width = (2 if self.overlap else 1) * args.head_dim
        self.wkv = nn.Linear(args.dim, width, bias=False)
        self.wgate = nn.Linear(args.dim, width, bias=False)
        self.ape_param = ParamHolder(self.ratio, width)
        self.norm = RMSNorm(args.head_dim, args.norm_eps)
        self.indexer = Indexer(args) if kind == CSA else None
        # HCA only: the ranks that synchronise this compressor's sharded parameters (see
        # set_hca_param_sync_group); None means no graph alignment.
        self.hca_param_sync_group = None

    def set_hca_param_sync_group(self, group) -> None:
        """Bind the group whose ranks must agree each step on whether this HCA path joins backward."""
        if self.kind != HCA:
            raise ValueError(f"only HCA compressors take a parameter-sync group, this one is {self.kind}")
        self.hca_param_sync_group = group

    def forward(
        self, x: torch.Tensor, q_latent: torch.Tensor, ctx: ForwardContext
    ) -> tuple[CompressedKV | None, IndexerScoring | None]:
        """The compressed entries and who sees them (None when no window is complete), and the indexer's
        scoring inputs (CSA).

        HCA alignment (``ctx.hca_synthetic_window``, no window here but a peer has one): pool one
        zero-padded window whose entry no query sees, so outputs are unchanged and the parameters join
        backward with zero gradient.
        """
        if ctx.shard is not None:
            return self._forward_sharded(x, q_latent, ctx)
        B, S, _ = x.shape
        windows = ctx.windows(self.ratio) if ctx.docs is not None else None
        n_entries = S // self.ratio if windows is None else windows.start.shape[1]
        if n_entries == 0:
            if not (ctx.hca_synthetic_window and self.kind == HCA):
                return None, None
            padded = F.pad(x, (0, 0, 0, max(0, self.ratio - S)))[:, : self.ratio]
            entry = gated_pool(self.wkv(padded), self.wgate(padded), self.ape_param(), self.ratio, False)
            cos, sin = ctx.rope.get("compress", 1, entry.dtype)
            return CompressedKV(apply_rope(self.norm(entry), cos, sin), self.ratio, hidden=True), None
        ape = self.ape_param()
        if windows is None:
            entries = gated_pool(self.wkv(x), self.wgate(x), ape, self.ratio, self.overlap)
        else:
            entries = gated_pool_windows(self.wkv(x), self.wgate(x), ape, windows, self.overlap)
        entries = _entry_rope(self.norm(entries), ctx, self.ratio, windows)
        seen = None if windows is None else windows.visible(ctx.docs)
        if self.indexer is None:
            return CompressedKV(entries, self.ratio, seen=seen), None
        learns = self.indexer.learns and ctx.indexer_loss
        with torch.set_grad_enabled(learns and torch.is_grad_enabled()):
            scoring = self.indexer.scoring(x.detach(), q_latent.detach(), ctx, windows)
        if windows is None:
            scoring.picked = self.indexer.pick(scoring, None)
        else:
            scoring.picked = self.indexer.pick_per_document(scoring, ctx, windows.doc_ids)
        if ctx.indexer_dense:  # warm-up: the main attention sees every visible entry
            return CompressedKV(entries, self.ratio, seen=seen), scoring
        return CompressedKV(entries, self.ratio, scoring.picked, seen=seen), scoring

    def _forward_sharded(
        self, x: torch.Tensor, q_latent: torch.Tensor, ctx: ForwardContext
    ) -> tuple[CompressedKV, IndexerScoring | None]:
        """``forward`` under context parallelism: pool where each window completes, all-gather the entries
        into the global slots (``sequence_shard.py``). Every rank pools its slots, a window or not, so the
        HCA path joins backward everywhere and needs no synthetic window."""
        shard = ctx.shard
        slots = shard.slots(self.ratio, self.overlap)
        entries = pool_slots(self.wkv(x), self.wgate(x), self.ape_param(), slots, shard, self.overlap)
        entries = shard.gather_chunks(_entry_rope(self.norm(entries), ctx, self.ratio, slots.local))
        seen, query_pos = shard.seen(slots, ctx.docs), shard.query_pos
        if self.indexer is None:
            return CompressedKV(entries, self.ratio, seen=seen, query_pos=query_pos), None
        learns = self.indexer.learns and ctx.indexer_loss
        with torch.set_grad_enabled(learns and torch.is_grad_enabled()):
            scoring = self.indexer.scoring(x.detach(), q_latent.detach(), ctx, None, slots=slots)
        if ctx.docs is None:
            scoring.picked = self.indexer.pick(scoring, None)
        else:
            scoring.picked = self.indexer.pick_per_document(scoring, ctx, slots.doc_ids)
        picked = None if ctx.indexer_dense else scoring.picked  # warm-up: every visible entry
        return CompressedKV(entries, self.ratio, picked, seen=seen, query_pos=query_pos), scoring


class Attention(nn.Module):
    """Query low-rank path, one shared K=V head, sliding window + compressed entries, sinks, grouped
    output."""

    def __init__(self, args: DeepSeekV4ModelArgs, kind: str):
        super().__init__()
        self.kind = kind
        self.n_heads, self.head_dim, self.window = args.n_heads, args.head_dim, args.sliding_window
        self.o_groups, self.eps = args.o_groups, args.norm_eps
        self.rope_table = "main" if self.kind == SLIDING else "compress"
        self.wq_a = nn.Linear(args.dim, args.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(args.q_lora_rank, args.norm_eps)
        self.wq_b = nn.Linear(args.q_lora_rank, args.n_heads * args.head_dim, bias=False)
        self.wkv = nn.Linear(args.dim, args.head_dim, bias=False)
        self.kv_norm = RMSNorm(args.head_dim, args.norm_eps)
        # Grouped low-rank output: weight [g*o, H*d/g] acts as g independent [o, H*d/g] maps.
        self.wo_a = nn.Linear(
            args.n_heads * args.head_dim // args.o_groups, args.o_groups * args.o_lora_rank, bias=False
        )
        self.wo_b = nn.Linear(args.o_groups * args.o_lora_rank, args.dim, bias=False)
        self.sinks_param = ParamHolder(args.n_heads)
        self.compressor = Compressor(args, self.kind) if self.kind in (CSA, HCA) else None
        # The attention math, a plain function (no parameters, no FSDP units): what compile wraps.
        self.attention_kernel = ATTENTION_KERNELS[args.attn_impl]
        self.fp32_logits = "attention_logits" in args.fp32_compute

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(output [B, S, D], indexer statistics of a CSA layer in training, else None)."""
        B, S, _ = x.shape
        cos, sin = ctx.rope.get(self.rope_table, S, x.dtype, ctx.positions)
        q_latent = self.q_norm(self.wq_a(x))
        q = self.wq_b(q_latent).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(unweighted_rms_norm(q, self.eps), cos, sin)  # [B, H, S, d]
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)  # [B, S, d]

        compressed, scoring = (None, None) if self.compressor is None else self.compressor(x, q_latent, ctx)
        distil = scoring is not None and ctx.indexer_loss and self.compressor.indexer.learns
        doc_ids = None if ctx.docs is None else ctx.docs.doc_ids
        # Context parallelism: the chunks' first queries see the previous chunk's last W keys (a halo).
        halo = None if ctx.shard is None else ctx.shard.window_halo(kv, self.window, doc_ids)
        out = self.attention_kernel(
            q, kv, self.sinks_param(), self.window, compressed, doc_ids, self.fp32_logits, distil, halo
        )
        out, target = out if distil else (out, None)
        stats = None
        if self.kind == CSA and (
            ctx.indexer_loss or ctx.measure_indexer
        ):  # every rank reports the same fields
            stats = (
                self.indexer_stats(q, kv, compressed, scoring, target, ctx, halo)
                if scoring is not None
                else (q.new_zeros(len(INDEXER_STATS), dtype=torch.float32))
            )
        out = apply_rope(out, cos, -sin)  # undo the values' rotation at the query position
        out = out.transpose(1, 2).reshape(B, S, self.o_groups, -1)
        w = self.wo_a.weight.view(self.o_groups, -1, out.shape[-1])
        out = torch.einsum("bsgi,goi->bsgo", out, w).flatten(2)
        return self.wo_b(out), stats

    def indexer_stats(self, q, kv, compressed, scoring, target, ctx, halo=None) -> torch.Tensor:
        """[KL sum, KL queries, recall hits, recall total, recall chance] of this CSA layer (context.py)."""
        indexer = self.compressor.indexer
        kl, n = (scoring.head_w.new_zeros(()),) * 2
        if target is not None:
            kl, n = indexer.kl_sum(scoring, target, compressed.seen, compressed.picked)
        with torch.no_grad():
            recall = self.sampled_recall(q, kv, compressed, scoring, indexer, ctx, halo)
        return torch.cat([torch.stack([kl, n]).float(), recall])

    @torch.no_grad()
    def sampled_recall(self, q, kv, compressed, scoring, indexer, ctx, halo=None) -> torch.Tensor:
        """(hits, total, chance) over up to RECALL_QUERIES queries per row that see more than index_topk
        entries: of the main attention's top-k entries, computed densely, how many the indexer picks.
        Under context parallelism each rank samples its own queries (the halo keys join the normaliser)."""
        B, H, S, d = q.shape
        if halo is None:
            key_pos, key_ok = (
                torch.arange(S, device=q.device),
                torch.ones(S, dtype=torch.bool, device=q.device),
            )
            query_pos = key_pos
        else:
            key_pos = torch.cat([halo.key_pos.flatten(), halo.query_pos])
            halo_ok = (halo.key_pos >= 0) & ~halo.local_predecessor[:, None]
            key_ok = torch.cat([halo_ok.flatten(), torch.ones_like(halo.query_pos, dtype=torch.bool)])
            query_pos = halo.query_pos
        counts = compressed.visible_counts(S)  # [B, S], without a [S, T] mask under the causal rule
        stats = q.new_zeros(3, dtype=torch.float32)
        k = indexer.topk
        for b in range(B):
            rows = torch.nonzero(counts[b] > k).flatten()
            if rows.numel() == 0:
                continue
            rows = rows[torch.linspace(0, rows.numel() - 1, min(RECALL_QUERIES, rows.numel())).long()]
            logits = (
                torch.einsum("hqd,td->hqt", q[b, :, rows].float(), compressed.entries[b].float()) * d**-0.5
            )
            # the per-head softmax normaliser includes the query's window keys and the sink
            keys = kv[b].float() if halo is None else torch.cat([halo.kv[b].flatten(0, 1), kv[b]]).float()
            delta = query_pos[rows][:, None] - key_pos[None, :]
            band = (delta >= 0) & (delta < self.window) & key_ok[None, :]
            if ctx.docs is not None:
                key_docs = (
                    ctx.docs.doc_ids[b]
                    if halo is None
                    else torch.cat([halo.key_docs[b].flatten(), ctx.docs.doc_ids[b]])
                )
                band &= ctx.docs.doc_ids[b, rows][:, None] == key_docs[None, :]
            logits_w = torch.einsum("hqd,jd->hqj", q[b, :, rows].float(), keys) * d**-0.5
            logits_w = logits_w.masked_fill(~band, float("-inf"))
            logits = logits.masked_fill(~compressed.visible_rows(b, rows, S), float("-inf"))
            sinks = self.sinks_param().float().view(H, 1, 1).expand(H, rows.numel(), 1)
            K = keys.shape[0]
            probs = torch.cat([logits_w, logits, sinks], dim=-1).softmax(-1)[..., K : K + logits.shape[-1]]
            top = probs.sum(0).topk(k, dim=-1).indices  # [q, k]
            mine = scoring.picked[b, rows]
            hits = (top[:, :, None] == mine[:, None, :]).any(-1).sum()
            stats += torch.stack(
                [hits.float(), hits.new_tensor(float(top.numel())), (k * k / counts[b, rows]).sum()]
            )
        return stats

    def init_weights(self, init_std: float, out_std: float) -> None:
        for linear in (self.wq_a, self.wq_b, self.wkv, self.wo_a):
            nn.init.trunc_normal_(linear.weight, mean=0.0, std=init_std)
        nn.init.trunc_normal_(self.wo_b.weight, mean=0.0, std=out_std)
        for norm in (self.q_norm, self.kv_norm):
            norm.reset_parameters()
        nn.init.zeros_(self.sinks_param.weight)
        if self.compressor is not None:
            modules = [self.compressor] + ([self.compressor.indexer] if self.compressor.indexer else [])
            for m in modules:
                for _, sub in m.named_children():
                    if isinstance(sub, nn.Linear):
                        nn.init.trunc_normal_(sub.weight, mean=0.0, std=init_std)
                nn.init.zeros_(m.ape_param.weight)
                m.norm.reset_parameters()
