"""The Lightning Indexer of a CSA layer: its own compressed keys, per-query top-k picks, and the KL
distillation that trains it (spec section 4; the main attention's probabilities are the target)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .args import DeepSeekV4ModelArgs
from .compression import entry_rope, gated_pool, gated_pool_windows, pool_slots
from .context import ForwardContext
from .documents import CompressionWindows
from .errors import ConfigError
from .layers import ParamHolder, RMSNorm, apply_rope
from .sequence_shard import SlotLayout

TRITON_NEEDS_RANGES = (
    "deepseek_v4.attn_impl='triton' with packed documents (block_causal) under context parallelism: the "
    "Triton indexer takes each query's visible entries as one range, and a document's slots on a CP shard "
    "may be empty; use --deepseek_v4.attn_impl sparse for this layout"
)


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
        # attn_impl "triton": picks and the sparse stage's KL scores by the Triton kernels (triton_indexer.py)
        self.triton = args.attn_impl == "triton"

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
            keys = ctx.shard.gather_chunks(entry_rope(self.norm(keys), ctx, self.ratio, slots.local))
        elif windows is None:
            keys = gated_pool(self.wkv(x), self.wgate(x), ape, self.ratio, overlap=True)
            keys = entry_rope(self.norm(keys), ctx, self.ratio, windows)
        else:
            keys = gated_pool_windows(self.wkv(x), self.wgate(x), ape, windows, overlap=True)
            keys = entry_rope(self.norm(keys), ctx, self.ratio, windows)
        q = self.wq_b(q_latent).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        cos, sin = ctx.rope.get("compress", S, q.dtype, ctx.positions)
        q = apply_rope(q, cos, sin).transpose(1, 2)  # [B, S, nI, dI]
        head_w = self.weights_proj(x).float() * self.n_heads**-0.5  # [B, S, nI]
        query_pos = None if ctx.shard is None else ctx.shard.query_pos
        return IndexerScoring(keys, q, head_w, query_pos=query_pos)

    def _chunk(self, B: int, T: int) -> int:
        """Queries per chunk when a chunk holds [chunk, nI, T] scores at once (the KL), never [S, nI, T]."""
        return max(1, self.score_budget // max(1, B * self.n_heads * T))

    def _scores(self, q: torch.Tensor, keys: torch.Tensor, head_w: torch.Tensor) -> torch.Tensor:
        """[B, c, T] fp32: sum over heads of w_h * ReLU(q_h . k) / sqrt(dI)."""
        scores = torch.matmul(q.float(), keys.float().transpose(-1, -2).unsqueeze(1))  # [B, c, nI, T]
        scores = F.relu(scores) * self.head_dim**-0.5
        return (scores * head_w.unsqueeze(-1)).sum(dim=2)

    def _pick_tiles(self, B: int, S: int, T: int, k: int) -> tuple[int, int, int]:
        """(queries per chunk c, entries per span, entries per tile) for ``pick``.

        A tile's [B, c, nI, tile] per-head scores stay within ``score_budget``, a span's [B, c, span] summed
        scores (and its selection's few temporaries of that shape) within a quarter of it. A chunk holds as
        many queries as a span of all T entries allows, not ``budget / (nI T)`` (about one query at long
        context); a span shorter than T (only when one query's T scores exceed that quarter) merges its
        top-k into the running candidates. The number of tiles scored, S T B nI / budget, is the same.
        """
        budget = self.score_budget
        summed = max(1, budget // 4)  # the span's selection keeps a few [B, c, span] temporaries
        c = max(1, min(S, summed // max(1, B * T), budget // max(1, B * self.n_heads)))
        span = min(T, max(k, summed // (B * c)))
        tile = min(span, max(1, budget // (B * self.n_heads * c)))
        return c, span, tile

    def _top_k_rows(
        self, q: torch.Tensor, keys: torch.Tensor, head_w: torch.Tensor, allowed: torch.Tensor, k: int
    ) -> torch.Tensor:
        """[B, c, k] picks (ascending, -1 last) of queries q [B, c, nI, dI] among keys [B, T, dI] (fp32)
        that ``allowed`` [B, c, T] lets them see, under ``pick``'s rule; scored a tile at a time."""
        B, c = q.shape[:2]
        T = keys.shape[1]
        _, span, tile = self._pick_tiles(B, c, T, k)
        best_s = best_i = None
        for s0 in range(0, T, span):
            s1 = min(s0 + span, T)
            parts = [self._scores(q, keys[:, t0 : min(t0 + tile, s1)], head_w) for t0 in range(s0, s1, tile)]
            scores = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
            scores = scores.masked_fill(~allowed[..., s0:s1], float("-inf"))
            index = torch.arange(s0, s1, device=q.device).expand(B, c, s1 - s0)
            if best_s is not None:  # candidates so far have lower indices than this span: order holds
                scores, index = torch.cat([best_s, scores], dim=-1), torch.cat([best_i, index], dim=-1)
            best_s, best_i = _top_k_low_ties(scores, index, k)
        return best_i

    def _triton_document_picks(self, s: IndexerScoring, docs, entry_docs: torch.Tensor) -> torch.Tensor:
        """``pick`` for packed documents by the Triton kernel: a query's visible entries are one range, its
        document's first entry on (a row's entries are grouped by document, in order; -1 pads the end)."""
        if s.query_pos is not None:  # under context parallelism empty slots may lie inside a document
            raise ConfigError(TRITON_NEEDS_RANGES)
        from .triton_indexer import topk_picks

        ordered = torch.where(entry_docs >= 0, entry_docs, torch.iinfo(entry_docs.dtype).max).contiguous()
        first = torch.searchsorted(ordered, docs.doc_ids.contiguous())
        end = torch.searchsorted(ordered, docs.doc_ids.contiguous(), right=True)
        hi = torch.minimum(end, first + (docs.positions + 1) // self.ratio)
        q, keys = _same_dtype(s.q, s.keys)
        return topk_picks(q, keys, s.head_w, self.topk, first, hi, budget=self.score_budget)

    @torch.no_grad()
    def pick(self, s: IndexerScoring, seen: torch.Tensor | None, documents=None) -> torch.Tensor:
        """Top-k compressed-entry indices per query [B, S, k], k = min(index_topk, T); -1 = "select nothing".

        The rule (exact, whatever order ``topk`` gives equal scores): a query picks the k highest scores
        among the entries it may see, equal scores broken toward the lower entry index; it never picks an
        entry it may not see, and seeing fewer than k, it fills the rest with -1. Picks are in ascending
        entry order, -1s last. ``seen`` [B, S, T] is the visibility when not the causal rule; None means the
        causal rule (by ``s.query_pos`` under context parallelism). Packed documents (``seen`` then holds
        each query's own document's entries; ``documents`` = (the ``Documents``, each entry's document
        [B, T])): the rule ranks a document's entries in their row order, so each document picks what it
        picks alone, without a loop over documents.

        Queries go in chunks and entries in tiles (``_pick_tiles``), each tile's [B, c, nI, tile] scores
        within ``score_budget``; no host synchronisation.
        """
        B, S = s.q.shape[:2]
        T = s.keys.shape[1]
        if self.triton and documents is not None:
            return self._triton_document_picks(s, *documents)
        if self.triton:
            from .triton_indexer import causal_ranges, topk_picks

            if seen is not None:
                raise ConfigError(TRITON_NEEDS_RANGES)
            lo, hi = causal_ranges(B, S, T, self.ratio, s.q.device, s.query_pos)
            return topk_picks(
                *_same_dtype(s.q, s.keys), s.head_w, self.topk, lo, hi, budget=self.score_budget
            )
        k = min(self.topk, T)
        keys = s.keys.float()
        step = self._pick_tiles(B, S, T, k)[0]
        picks = []
        for i in range(0, S, step):
            q, head_w = s.q[:, i : i + step], s.head_w[:, i : i + step]
            allowed = self._allowed(B, i, q.shape[1], T, seen, q.device, s.query_pos)
            picks.append(self._top_k_rows(q, keys, head_w, allowed, k))
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
        if self.triton and picked is not None:  # [B, S, k] scores at the picks, never [c, nI, T]
            from .triton_indexer import picked_scores

            scores = picked_scores(*_same_dtype(s.q, s.keys), s.head_w, picked)
            return self._kl_of_scores(scores, target, picked)
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
        if sel.dtype != torch.bool:  # sparse stage: the picks, in pick order (as the target)
            scores = scores.gather(-1, sel.clamp(min=0))
        return self._kl_of_scores(scores, target, sel)

    @staticmethod
    def _kl_of_scores(scores, target, sel):
        """(KL sum, queries) of indexer ``scores`` against ``target`` over ``sel``: a visibility mask, or
        picks (-1 = none; the scores and the target in pick order)."""
        valid = sel if sel.dtype == torch.bool else sel >= 0
        mass = torch.where(valid, target, 0.0)
        has = mass.sum(-1) > 0
        p = mass / mass.sum(-1, keepdim=True).clamp_min(1e-30)
        logq = torch.where(has[..., None], scores, 0.0).masked_fill(~valid & has[..., None], float("-inf"))
        logq = logq.log_softmax(dim=-1)
        kl = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - logq), 0.0).sum(-1)
        return kl[has].sum(), has.sum().to(kl.dtype)


def _same_dtype(q: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton indexer's inputs in one dtype: under FSDP's bf16 policy the keys come from an fp32 island
    (the indexer's compressor) and q from bf16 weights; both are then scored in fp32, as the torch path."""
    dtype = torch.promote_types(q.dtype, keys.dtype)
    return q.to(dtype), keys.to(dtype)


def _top_k_low_ties(scores: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of ``scores`` [..., L] (-inf = not a candidate) by (higher score, then lower ``index``),
    where ``index`` [..., L] ascends along L over the candidates: their (scores, indices) [..., k] in
    ascending index order, (-inf, -1) where fewer than k candidates. Exact and independent of the order
    ``topk`` returns equal values in (only its values and distinct keys are used); no sort over L."""
    L = scores.shape[-1]
    kth = scores.topk(k, dim=-1).values[..., -1:]  # -inf when fewer than k candidates
    above = scores > kth
    tied = (scores == kth) & (scores > float("-inf"))
    room = k - above.sum(-1, keepdim=True)  # how many of the ties at the k-th score make it, lowest first
    chosen = above | (tied & (tied.cumsum(-1, dtype=torch.int32) <= room))
    # Chosen positions, earliest first: distinct keys L - position; the rest share key 0 and become -1.
    key = torch.where(chosen, L - torch.arange(L, device=scores.device, dtype=torch.int32), 0)
    at = key.topk(k, dim=-1).indices
    ok = chosen.gather(-1, at)
    return (
        scores.gather(-1, at).masked_fill(~ok, float("-inf")),
        torch.where(ok, index.gather(-1, at), -1),
    )
