"""DeepSeek-V4 MoE built from TorchTitan's MoE parts.

Reused from Titan unchanged: the ``GroupedExperts`` weight layout ``w1/w2/w3 [E, ...]`` (so Titan's
expert-parallel styles and FSDP rules apply), ``MoE``'s buffers (``expert_bias``, ``tokens_per_expert``)
and its score-after-experts combine. What V4 changes:
  * router: sqrt(softplus) scores, selection bias only on selection, or a fixed token-id hash table;
  * experts and shared expert: SwiGLU clamped by ``swiglu_limit``;
  * the MoE forward takes the token ids (hash layers route by them);
  * tokens are sorted by expert with ``bincount`` + a stable ``argsort`` (Titan's ``TokenReorderer`` counts
    with ``torch.histc``, which has no CPU kernel for integer ids).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torchtitan.models.moe.moe import FeedForward, GroupedExperts, MoE, TokenChoiceTopKRouter
from torchtitan.models.moe.utils import indices_padding_wrapper

from ..compat import grouped_mm
from .args import DeepSeekV4ModelArgs
from .layers import clamped_swiglu


class ClampedFeedForward(FeedForward):
    """Titan's shared-expert FFN with V4's clamped SwiGLU."""

    def __init__(self, dim: int, hidden_dim: int, limit: float):
        super().__init__(dim, hidden_dim)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(clamped_swiglu(self.w1(x), self.w3(x), self.limit))


def _swiglu_rows(
    xs: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, limit: float, weight: torch.Tensor | None
):
    """Clamped SwiGLU of rows xs; with per-row routing weights, in fp32 and weighted before W2 (as
    DeepSeek's inference kernels), cast back to the rows' dtype."""
    gate, up = xs @ w1.transpose(-2, -1), xs @ w3.transpose(-2, -1)
    if weight is None:
        return clamped_swiglu(gate, up, limit)
    return (clamped_swiglu(gate.float(), up.float(), limit) * weight[:, None]).to(xs.dtype)


def split_weight_columns(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows [N, dim + 2] carry their fp32 routing weight as two columns (hi + lo in the rows' dtype, which
    travel with the rows through EP's all-to-all); [N, dim] rows carry none."""
    if x.shape[-1] == dim:
        return x, None
    return x[:, :dim], x[:, dim].float() + x[:, dim + 1].float()


def weight_columns(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N] fp32 weights -> [N, 2] hi/lo columns in ``dtype`` whose sum in fp32 recovers w to ~2^-16."""
    hi = w.to(dtype)
    return torch.stack([hi, (w - hi.float()).to(dtype)], dim=1)


def _experts_for_loop(w1, w2, w3, x, num_tokens_per_expert, limit, row_groups=None):
    """Each expert's rows through its clamped SwiGLU; rows past ``sum(num_tokens_per_expert)`` output zeros.

    ``row_groups`` [E, g] (expert parallelism): an expert's rows are g consecutive groups, one per source
    rank, followed by padding; each group is its own matmul, so a weight's gradient is the sum of the
    per-rank products exactly as FSDP sums them without EP, and padding rows output zeros.
    """
    x, weight = split_weight_columns(x, w1.shape[-1])
    counts = num_tokens_per_expert.tolist()
    groups = [[c] for c in counts] if row_groups is None else row_groups.tolist()
    outs, start = [], 0
    for e, sizes in enumerate(groups):
        for size in sizes:
            rows = slice(start, start + size)
            h = _swiglu_rows(x[rows], w1[e], w3[e], limit, None if weight is None else weight[rows])
            outs.append(h @ w2[e].transpose(-2, -1))
            start += size
        outs.append(x.new_zeros(counts[e] - sum(sizes), w2.shape[1]))
        start += counts[e] - sum(sizes)
    out = torch.cat(outs, dim=0)
    return torch.vstack((out, out.new_zeros((x.shape[0] - out.shape[0], out.shape[-1]))))


def _experts_grouped_mm(w1, w2, w3, x, num_tokens_per_expert, limit):
    x, weight = split_weight_columns(x, w1.shape[-1])
    offsets = torch.cumsum(num_tokens_per_expert, dim=0, dtype=torch.int32)
    xb = x.bfloat16()
    gate = grouped_mm(xb, w1.bfloat16().transpose(-2, -1), offs=offsets)
    up = grouped_mm(xb, w3.bfloat16().transpose(-2, -1), offs=offsets)
    if weight is None:
        h = clamped_swiglu(gate, up, limit)
    else:
        h = (clamped_swiglu(gate.float(), up.float(), limit) * weight[:, None]).bfloat16()
    return grouped_mm(h, w2.bfloat16().transpose(-2, -1), offs=offsets).type_as(x)


class ClampedGroupedExperts(GroupedExperts):
    """Titan's grouped experts (same parameters, EP/FSDP compatible) with the clamped SwiGLU."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, use_grouped_mm: bool, limit: float):
        super().__init__(dim, hidden_dim, num_experts, use_grouped_mm)
        self.limit = limit
        self.row_groups = None  # [local experts, EP ranks] rows per source rank, set by the EP dispatch

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = (w.to_local() if isinstance(w, DTensor) else w for w in (self.w1, self.w2, self.w3))
        if not self.use_grouped_mm or x.device.type != "cuda":  # grouped mm is a CUDA (SM90+) kernel
            return _experts_for_loop(w1, w2, w3, x, num_tokens_per_expert, self.limit, self.row_groups)
        fn = lambda *a: _experts_grouped_mm(*a, self.limit)
        ep_sharded = isinstance(self.w1, DTensor) and "ep" in self.w1.device_mesh.mesh_dim_names
        if not ep_sharded:
            fn = indices_padding_wrapper(fn)
        return fn(w1, w2, w3, x, num_tokens_per_expert)


class DeepSeekV4Router(TokenChoiceTopKRouter):
    """sqrtsoftplus (or sigmoid) router; ``hash_routed`` layers select experts by ``tid2eid[token_id]``
    instead of top-k.

    Scores are evaluated in fp32 (as Titan's routers and NeMo do; transformers uses the model dtype,
    which is the same in fp32). Weights are the unbiased scores of the chosen experts, renormalised
    and scaled by ``route_scale``.
    """

    def __init__(self, args: DeepSeekV4ModelArgs, hash_routed: bool):
        m = args.moe_args
        super().__init__(
            dim=args.dim,
            num_experts=m.num_experts,
            num_expert_groups=None,
            num_limited_groups=None,
            top_k=m.top_k,
            score_func="sigmoid",
            route_norm=True,
            route_scale=m.route_scale,
            gate_bias=False,
            _debug_force_load_balance=m._debug_force_load_balance,
        )
        self.score_func = m.score_func  # "sqrtsoftplus" (the released models) or "sigmoid"
        self.fp32_logits = "router" in args.fp32_compute  # the gate's matmul in fp32 (no-op for fp32 inputs)
        self.hash_routed = hash_routed
        if hash_routed:
            self.register_buffer(
                "tid2eid", torch.zeros(args.vocab_size, m.top_k, dtype=torch.long), persistent=True
            )

    def forward(
        self, x: torch.Tensor, expert_bias: torch.Tensor | None = None, token_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.fp32_logits:
            logits = F.linear(x.float(), self.gate.weight.float())
        else:
            logits = self.gate(x).float()
        scores = F.softplus(logits).sqrt() if self.score_func == "sqrtsoftplus" else torch.sigmoid(logits)
        if self.hash_routed:
            if token_ids is None:
                raise ValueError(
                    "a hash-routed MoE layer needs the token ids (pass tokens to the model forward)"
                )
            selected = self.tid2eid[token_ids.reshape(-1)].long()
        else:
            choice = scores if expert_bias is None else scores + expert_bias
            selected = torch.topk(choice, k=self.top_k, dim=-1, sorted=False).indices
        if self._debug_force_load_balance:
            selected, _ = self._debug_force_load_balance_routing(scores)
        top = scores.gather(dim=1, index=selected)
        top = top / (top.sum(dim=-1, keepdim=True) + 1e-20) * self.route_scale
        counts = torch.bincount(selected.reshape(-1), minlength=self.num_experts)
        return top, selected, counts


class DeepSeekV4MoE(MoE):
    """Titan's MoE with V4's router and clamped experts; routed outputs weighted after W2."""

    def __init__(self, args: DeepSeekV4ModelArgs, hash_routed: bool):
        m = args.moe_args
        nn.Module.__init__(self)
        self.experts = ClampedGroupedExperts(
            args.dim, args.moe_inter_dim, m.num_experts, m.use_grouped_mm, args.swiglu_limit
        )
        self.router = DeepSeekV4Router(args, hash_routed)
        self.shared_experts = ClampedFeedForward(args.dim, args.moe_inter_dim, args.swiglu_limit)
        self.score_before_experts = False
        # Hash layers have no selection bias, so nothing for the load-balancing update to steer.
        self.load_balance_coeff = None if hash_routed else m.load_balance_coeff
        if self.load_balance_coeff is not None:
            self.register_buffer(
                "expert_bias", torch.zeros(m.num_experts, dtype=torch.float32), persistent=True
            )
        else:
            self.expert_bias = None
        self.register_buffer(
            "tokens_per_expert", torch.zeros(m.num_experts, dtype=torch.float32), persistent=False
        )
        self.uses_deepep = False  # set by infra.expert_parallel when DeepEP dispatches the tokens
        self.fp32_experts = "experts" in args.fp32_compute  # bf16 steps: SwiGLU in fp32, weights before W2

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        bs, slen, dim = x.shape
        x = x.view(-1, dim)
        top_scores, selected, num_tokens_per_expert = self.router(x, self.expert_bias, token_ids)
        with torch.no_grad():
            self.tokens_per_expert.add_(num_tokens_per_expert)
        if self.uses_deepep:
            return self._forward_deepep(x, top_scores, selected, num_tokens_per_expert).reshape(bs, slen, dim)
        sorted_slots = torch.argsort(selected.reshape(-1), stable=True)  # (token, k) slots grouped by expert
        k = self.router.top_k
        rows = x[sorted_slots // k]
        weighted = self.fp32_experts and x.dtype != torch.float32
        if weighted:  # the routing weights travel with their rows (see split_weight_columns)
            rows = torch.cat([rows, weight_columns(top_scores.reshape(-1)[sorted_slots], x.dtype)], dim=1)
        routed_output = self.experts(rows, num_tokens_per_expert)
        unsorted = torch.zeros((bs * slen * k, dim), dtype=routed_output.dtype, device=routed_output.device)
        unsorted[sorted_slots] = routed_output
        if weighted:
            routed = unsorted.view(-1, k, dim).float().sum(dim=1)
        else:
            routed = torch.bmm(top_scores.reshape(-1, 1, k), unsorted.reshape(-1, k, dim).float()).squeeze(1)
        return (self.shared_experts(x) + routed.to(x.dtype)).reshape(bs, slen, dim)

    def _forward_deepep(self, x, top_scores, selected, num_tokens_per_expert) -> torch.Tensor:
        """Titan's DeepEP MoE order: DeepEP dispatches, the combine (weights applied after W2) overlaps the
        shared expert. Not exercised here (DeepEP is CUDA-only); mirrors
        ``torchtitan.models.moe.DeepEPMoE``."""
        from torchtitan.distributed.deepep import sync_combine

        routed = self.experts(x, num_tokens_per_expert, selected, top_scores, self.experts.num_experts)
        shared = self.shared_experts(x)
        sync_combine()
        return shared + routed.to(x.dtype)

    def init_weights(self, init_std: float, buffer_device: torch.device | None) -> None:
        self.experts.init_weights(init_std)
        self.router.init_weights(init_std)
        self.shared_experts.init_weights(init_std)
        with torch.device(buffer_device or self.tokens_per_expert.device):
            self.tokens_per_expert = torch.zeros(self.experts.num_experts, dtype=torch.float32)
            if self.load_balance_coeff is not None:
                self.expert_bias = torch.zeros(self.experts.num_experts, dtype=torch.float32)
        if self.router.hash_routed:
            self.router.tid2eid = default_hash_table(
                self.router.tid2eid.shape[0], self.experts.num_experts, self.router.top_k
            ).to(self.tokens_per_expert.device)


def default_hash_table(vocab_size: int, num_experts: int, top_k: int) -> torch.Tensor:
    """Deterministic token -> k distinct experts table for training from scratch (checkpoints bring their
    own)."""
    g = torch.Generator().manual_seed(0x5EED)
    keys = torch.rand(vocab_size, num_experts, generator=g)
    return keys.topk(top_k, dim=-1).indices.sort(dim=-1).values
