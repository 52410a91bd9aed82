"""DeepSeek-V4 attention: shared-KV MQA over a sliding window plus compressed entries (CSA / HCA).

The kernels (``kernels.py``): the dense masked reference over [S window keys | T compressed entries]
and the sparse fast path that reproduces it without [S x S] tensors; ``attn_impl`` picks one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .args import CSA, HCA, SLIDING, DeepSeekV4ModelArgs
from .kernels import ATTENTION_KERNELS, CompressedKV
from .layers import ParamHolder, RMSNorm, RotaryTables, apply_rope, unweighted_rms_norm


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


class Indexer(nn.Module):
    """Lightning Indexer of a CSA layer: its own overlapping compressor at index_head_dim, then top-k.

    Indices are not differentiable, so (as in transformers) no LM-loss gradient reaches the indexer;
    its scores are computed without autograd to save the [B, S, heads, T] graph.
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

    def forward(self, x: torch.Tensor, q_latent: torch.Tensor, rope: RotaryTables) -> torch.Tensor:
        """Top-k compressed-entry indices per query [B, S, k]; -1 marks "select nothing"."""
        B, S, _ = x.shape
        with torch.no_grad():
            keys = gated_pool(self.wkv(x), self.wgate(x), self.ape_param(), self.ratio, overlap=True)
            keys = self.norm(keys)
            T = keys.shape[1]
            cos, sin = rope.get("compress", S, keys.dtype)
            keys = apply_rope(keys, cos[:: self.ratio][:T], sin[:: self.ratio][:T])
            q = self.wq_b(q_latent).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
            q = apply_rope(q, *rope.get("compress", S, q.dtype)).transpose(1, 2)  # [B, S, nI, dI]
            head_w = self.weights_proj(x).float() * self.n_heads**-0.5  # [B, S, nI]
            # Score in query chunks: only [chunk, nI, T] lives at once, never [S, nI, T].
            chunk = max(1, self.score_budget // max(1, B * self.n_heads * T))
            picks = [
                self._top_k(q[:, i : i + chunk], keys, head_w[:, i : i + chunk], i, T)
                for i in range(0, S, chunk)
            ]
            return torch.cat(picks, dim=1)

    def _top_k(
        self, q: torch.Tensor, keys: torch.Tensor, head_w: torch.Tensor, start: int, T: int
    ) -> torch.Tensor:
        """Picks for queries start .. start + len(q): ReLU scores weighted per head, causal, top-k."""
        scores = torch.matmul(q.float(), keys.float().transpose(-1, -2).unsqueeze(1))  # [B, c, nI, T]
        scores = F.relu(scores) * self.head_dim**-0.5
        scores = (scores * head_w.unsqueeze(-1)).sum(dim=2)  # [B, c, T]
        positions = torch.arange(start, start + q.shape[1], device=q.device)
        limit = ((positions + 1) // self.ratio)[:, None]  # entries w < limit are causally visible
        scores = scores.masked_fill(torch.arange(T, device=q.device)[None, :] >= limit, float("-inf"))
        picked = scores.topk(min(self.topk, T), dim=-1).indices
        return torch.where(picked < limit, picked, torch.full_like(picked, -1))


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
        self, x: torch.Tensor, q_latent: torch.Tensor, rope: RotaryTables, synthetic_window: bool = False
    ) -> CompressedKV | None:
        """The compressed entries and who sees them, or None when no window is complete.

        ``synthetic_window`` (HCA alignment, S < ratio): pool one zero-padded window whose entry no
        query sees, so outputs are unchanged and the parameters join backward with zero gradient.
        """
        B, S, _ = x.shape
        if S < self.ratio:
            if not synthetic_window:
                return None
            padded = F.pad(x, (0, 0, 0, self.ratio - S))
            entry = self.norm(
                gated_pool(self.wkv(padded), self.wgate(padded), self.ape_param(), self.ratio, False)
            )
            cos, sin = rope.get("compress", 1, entry.dtype)
            return CompressedKV(apply_rope(entry, cos, sin), self.ratio, hidden=True)
        entries = gated_pool(self.wkv(x), self.wgate(x), self.ape_param(), self.ratio, self.overlap)
        entries = self.norm(entries)
        T = entries.shape[1]
        cos, sin = rope.get("compress", S, entries.dtype)
        entries = apply_rope(entries, cos[:: self.ratio][:T], sin[:: self.ratio][:T])
        picked = None if self.indexer is None else self.indexer(x, q_latent, rope)
        return CompressedKV(entries, self.ratio, picked)


class Attention(nn.Module):
    """Query low-rank path, one shared K=V head, sliding window + compressed entries, sinks, grouped output."""

    def __init__(self, args: DeepSeekV4ModelArgs, layer_id: int):
        super().__init__()
        self.kind = args.layer_type(layer_id)
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

    def forward(
        self, x: torch.Tensor, rope: RotaryTables, hca_synthetic_window: bool = False
    ) -> torch.Tensor:
        B, S, _ = x.shape
        cos, sin = rope.get(self.rope_table, S, x.dtype)
        q_latent = self.q_norm(self.wq_a(x))
        q = self.wq_b(q_latent).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(unweighted_rms_norm(q, self.eps), cos, sin)  # [B, H, S, d]
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)  # [B, S, d]

        compressed = None
        if self.compressor is not None:
            compressed = self.compressor(x, q_latent, rope, hca_synthetic_window and self.kind == HCA)
        out = self.attention_kernel(q, kv, self.sinks_param(), self.window, compressed)
        out = apply_rope(out, cos, -sin)  # undo the values' rotation at the query position
        out = out.transpose(1, 2).reshape(B, S, self.o_groups, -1)
        w = self.wo_a.weight.view(self.o_groups, -1, out.shape[-1])
        out = torch.einsum("bsgi,goi->bsgo", out, w).flatten(2)
        return self.wo_b(out)

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
                for name, sub in m.named_children():
                    if isinstance(sub, nn.Linear):
                        nn.init.trunc_normal_(sub.weight, mean=0.0, std=init_std)
                nn.init.zeros_(m.ape_param.weight)
                m.norm.reset_parameters()
