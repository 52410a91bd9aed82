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
from .layers import ParamHolder, RMSNorm, apply_rope
from .sequence_shard import SlotLayout


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
