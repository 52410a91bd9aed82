"""Parameter and FLOP accounting for DeepSeek-V4 (the spec's section 10), MTP depths included."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:  # args imports this module for Titan's get_nparams_and_flops
    from .args import DeepSeekV4ModelArgs

MTP_PREFIX = "mtp."


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of a built model; "active" counts routed experts at top_k / num_experts of their size."""

    total: int
    active: int
    mtp_total: int  # part of total: the multi-token-prediction depths
    mtp_active: int

    @property
    def backbone_total(self) -> int:
        return self.total - self.mtp_total

    @property
    def backbone_active(self) -> int:
        return self.active - self.mtp_active


def count_param_groups(args: DeepSeekV4ModelArgs, model: nn.Module) -> ParamCounts:
    """Counts by walking the model's parameters (a meta-device model allocates nothing)."""
    sums = {"total": 0, "routed": 0, "mtp_total": 0, "mtp_routed": 0}
    for name, p in model.named_parameters():
        name = ".".join(s for s in name.split(".") if s not in ("_checkpoint_wrapped_module", "_orig_mod"))
        routed = ".moe.experts." in name
        sums["total"] += p.numel()
        sums["routed"] += p.numel() if routed else 0
        if name.startswith(MTP_PREFIX):
            sums["mtp_total"] += p.numel()
            sums["mtp_routed"] += p.numel() if routed else 0

    def active(total: int, routed: int) -> int:
        return total - routed + routed * args.moe_args.top_k // args.moe_args.num_experts

    return ParamCounts(
        total=sums["total"],
        active=active(sums["total"], sums["routed"]),
        mtp_total=sums["mtp_total"],
        mtp_active=active(sums["mtp_total"], sums["mtp_routed"]),
    )


def count_params(args: DeepSeekV4ModelArgs, model: nn.Module) -> tuple[int, int]:
    """(total, active per token) of everything built, MTP included.

    The embedding is a lookup, not a matmul: not an active parameter for FLOPs, but it is counted in the
    published "active" figures, so it stays in.
    """
    counts = count_param_groups(args, model)
    return counts.total, counts.active


Shape = tuple[int, ...]


def block_param_shapes(a: DeepSeekV4ModelArgs, ratio: int) -> dict[str, list[Shape]]:
    """One block's parameter shapes, grouped as FSDP's unit rules split them (the planner shards these):
    fp32 islands, fp32 holders, routed experts, and the rest of the block."""
    D, H, d, q, n = a.dim, a.n_heads, a.head_dim, a.q_lora_rank, a.hc_mult
    E, inter = a.moe_args.num_experts, a.moe_inter_dim
    mhc = [((2 + n) * n, n * D), ((2 + n) * n,), (3,)]  # fn, base, scale
    go = a.o_groups * a.o_lora_rank
    rest = [(D,), (D,), (q, D), (q,), (H * d, q), (d, D), (d,), (go, H * d // a.o_groups), (D, go)]
    rest += [(E, D), (inter, D), (D, inter), (inter, D)]  # router gate, shared expert
    island, holder = mhc + mhc, [(H,)]  # attn_hc and ffn_hc; sinks
    if ratio == a.hca_ratio:
        island += [(d, D), (d, D)]
        holder += [(ratio, d)]
        rest += [(d,)]
    elif ratio == a.csa_ratio:
        dI, nI = a.index_head_dim, a.index_n_heads
        island += [(2 * d, D), (2 * d, D), (2 * dI, D), (2 * dI, D)]  # compressor and indexer wkv / wgate
        holder += [(ratio, 2 * d), (ratio, 2 * dI)]
        rest += [(d,), (dI,), (nI * dI, q), (nI, D)]  # their norms, the indexer's wq_b and weights_proj
    experts = [(E, inter, D), (E, D, inter), (E, inter, D)]  # w1, w2, w3
    return {"island": island, "holder": holder, "experts": experts, "block": rest}


def mtp_depth_param_shapes(a: DeepSeekV4ModelArgs) -> dict[str, list[Shape]]:
    """One MTP depth: a sliding block, enorm / hnorm / norm, e_proj / h_proj and its own HyperHead."""
    D = a.dim
    parts = block_param_shapes(a, 0)
    parts["island"] = parts["island"] + hyper_head_shapes(a)
    parts["block"] = parts["block"] + [(D,), (D,), (D,), (D, D), (D, D)]
    return parts


def root_param_shapes(a: DeepSeekV4ModelArgs) -> dict[str, list[Shape]]:
    """Outside the blocks: hc_head and lm_head (fp32 islands), tok_embeddings and the final norm."""
    V, D = a.vocab_size, a.dim
    return {"island": hyper_head_shapes(a) + [(V, D)], "block": [(V, D), (D,)]}


def hyper_head_shapes(a: DeepSeekV4ModelArgs) -> list[Shape]:
    """The HyperHead's mixer: fn [n, n*D], base [n], scale [1]."""
    n = a.hc_mult
    return [(n, n * a.dim), (n,), (1,)]


def _numel(parts: dict[str, list[Shape]]) -> int:
    return sum(math.prod(shape) for shapes in parts.values() for shape in shapes)


def block_params(a: DeepSeekV4ModelArgs, ratio: int) -> int:
    """Closed-form parameter count of one transformer block with compression ``ratio``."""
    return _numel(block_param_shapes(a, ratio))


def mtp_depth_params(a: DeepSeekV4ModelArgs) -> int:
    """One MTP depth: a sliding block, e_proj/h_proj, enorm/hnorm/norm and its own HyperHead."""
    return _numel(mtp_depth_param_shapes(a))


def analytic_nparams(a: DeepSeekV4ModelArgs) -> int:
    """Closed-form parameter count (no model built), MTP depths included; cross-checks the meta model."""
    total = _numel(root_param_shapes(a))
    total += sum(block_params(a, a.compress_ratios[i]) for i in range(a.n_layers))
    return total + a.mtp_layers * mtp_depth_params(a)


def _avg(f, seq_len: int) -> float:
    return sum(f(t) for t in range(seq_len)) / seq_len


def _block_forward_flops(a: DeepSeekV4ModelArgs, ratio: int, seq_len: int) -> float:
    """Forward FLOPs per token of one block, averaged over positions of one seq_len document."""
    D, H, d, q = a.dim, a.n_heads, a.head_dim, a.q_lora_rank
    g, o, n = a.o_groups, a.o_lora_rank, a.hc_mult
    nI, dI = a.index_n_heads, a.index_head_dim
    E, k, inter = a.moe_args.num_experts, a.moe_args.top_k, a.moe_inter_dim
    fwd = 2 * (D * q + q * H * d + D * d + H * d * o + g * o * D)
    fwd += 2 * 2 * (2 + n) * n * (n * D)
    fwd += 2 * E * D + 6 * D * inter * (k + 1)
    cmp_keys = 0.0
    if ratio == a.hca_ratio:
        cmp_keys = _avg(lambda t: (t + 1) // a.hca_ratio, seq_len)
        fwd += 2 * 2 * D * d
    elif ratio == a.csa_ratio:
        cmp_keys = _avg(lambda t: min(a.index_topk, (t + 1) // a.csa_ratio), seq_len)
        fwd += 2 * 2 * D * 2 * d
        fwd += 2 * 2 * D * 2 * dI + 2 * q * nI * dI + 2 * D * nI
        fwd += 2 * nI * dI * _avg(lambda t: (t + 1) // a.csa_ratio, seq_len)
    window = _avg(lambda t: min(t + 1, a.sliding_window), seq_len)
    return fwd + 4 * H * d * (window + cmp_keys)


def train_flops_per_token(a: DeepSeekV4ModelArgs, seq_len: int) -> float:
    """Model FLOPs of the sparse computation per token (fwd+bwd = 3x fwd), averaged over positions.

    Each MTP depth adds a sliding block, e_proj (once) and h_proj (per stream), its HyperHead and lm_head.
    """
    D, n, V = a.dim, a.hc_mult, a.vocab_size
    fwd = 2 * V * D + 2 * n * n * D
    fwd += sum(_block_forward_flops(a, a.compress_ratios[i], seq_len) for i in range(a.n_layers))
    mtp = _block_forward_flops(a, 0, seq_len) + 2 * D * D + n * 2 * D * D + 2 * n * n * D + 2 * V * D
    return 3 * (fwd + a.mtp_layers * mtp)
