"""DeepSeek-V4 attention: shared-KV MQA over a sliding window plus compressed entries (CSA / HCA).

The kernels (``kernels.py``): the dense masked reference over [S window keys | T compressed entries]
and the sparse fast path that reproduces it without [S x S] tensors; the fused Triton kernels
(``triton_attention.py``, ``triton_indexer.py``); ``attn_impl`` picks one.
Packed documents (``context.docs``) keep every window, entry and pick inside the query's document.
The compressors pool with ``compression.py``; CSA's Lightning Indexer is ``indexer.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .args import CSA, HCA, SLIDING, DeepSeekV4ModelArgs
from .compression import entry_rope, gated_pool, gated_pool_windows, pool_slots
from .context import INDEXER_STATS, ForwardContext
from .indexer import Indexer, IndexerScoring
from .kernels import ATTENTION_KERNELS, CompressedKV
from .layers import ParamHolder, RMSNorm, apply_rope, unweighted_rms_norm

RECALL_QUERIES = 32  # queries per row whose indexer recall is measured (training only, no gradient)


def _evenly_spaced(eligible: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``n`` evenly spaced positions where ``eligible`` [S] holds, without reading it on the host:
    (positions [n], which of them are samples [n]); fewer eligible than n leaves the rest unsampled."""
    rank = eligible.long().cumsum(0)  # eligible positions so far
    count = rank[-1]
    m = torch.clamp(count, max=n)
    j = torch.arange(n, device=eligible.device)
    want = torch.div(j * (count - 1).clamp(min=0), (m - 1).clamp(min=1), rounding_mode="floor")
    rows = torch.searchsorted(rank, want + 1).clamp(max=eligible.numel() - 1)
    return rows, j < m


def triton_attention(*args, **kwargs):
    """``triton_attention.triton_attention`` (Triton is imported at the first call, not with the model)."""
    from .triton_attention import triton_attention as kernel

    return kernel(*args, **kwargs)


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
        entries = entry_rope(self.norm(entries), ctx, self.ratio, windows)
        seen = None if windows is None else windows.visible(ctx.docs)
        if self.indexer is None:
            return CompressedKV(entries, self.ratio, seen=seen), None
        learns = self.indexer.learns and ctx.indexer_loss
        with torch.set_grad_enabled(learns and torch.is_grad_enabled()):
            scoring = self.indexer.scoring(x.detach(), q_latent.detach(), ctx, windows)
        documents = None if windows is None else (ctx.docs, windows.doc_ids)
        scoring.picked = self.indexer.pick(scoring, seen, documents)
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
        entries = shard.gather_chunks(entry_rope(self.norm(entries), ctx, self.ratio, slots.local))
        seen, query_pos = shard.seen(slots, ctx.docs), shard.query_pos
        if self.indexer is None:
            return CompressedKV(entries, self.ratio, seen=seen, query_pos=query_pos), None
        learns = self.indexer.learns and ctx.indexer_loss
        with torch.set_grad_enabled(learns and torch.is_grad_enabled()):
            scoring = self.indexer.scoring(x.detach(), q_latent.detach(), ctx, None, slots=slots)
        documents = None if ctx.docs is None else (ctx.docs, slots.doc_ids)
        scoring.picked = self.indexer.pick(scoring, seen, documents)
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
        self.attention_kernel = {**ATTENTION_KERNELS, "triton": triton_attention}[args.attn_impl]
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
            rows, sampled = _evenly_spaced(counts[b] > k, RECALL_QUERIES)
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
            hits = ((top[:, :, None] == mine[:, None, :]).any(-1).sum(-1) * sampled).sum()
            chance = torch.where(sampled, k * k / counts[b, rows].clamp(min=1), 0.0).sum()
            stats += torch.stack([hits.float(), sampled.sum().float() * k, chance.float()])
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
