"""Manifold-constrained hyper-connections (mHC) and the HyperHead that collapses the streams."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .args import DeepSeekV4ModelArgs
from .layers import unweighted_rms_norm


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Column step first, then (row, column) iters-1 times; eps in every denominator (kept exactly)."""
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


class HyperConnection(nn.Module):
    """One mHC site: from n streams, the collapsed block input plus the post / comb mixing weights."""

    def __init__(self, args: DeepSeekV4ModelArgs):
        super().__init__()
        n = args.hc_mult
        self.n, self.iters, self.hc_eps, self.norm_eps = n, args.hc_sinkhorn_iters, args.hc_eps, args.norm_eps
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * args.dim))
        self.base = nn.Parameter(torch.zeros((2 + n) * n))
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [B, S, n, D] -> (post [B, S, n], comb [B, S, n, n], collapsed [B, S, D]); math in fp32."""
        B, S, n, _ = streams.shape
        z = unweighted_rms_norm(streams.reshape(B, S, -1).float(), self.norm_eps)
        m = F.linear(z, self.fn.float())
        m_pre, m_post, m_comb = m.split([n, n, n * n], dim=-1)
        b_pre, b_post, b_comb = self.base.float().split([n, n, n * n])
        s_pre, s_post, s_comb = self.scale.float().unbind(0)
        pre = torch.sigmoid(m_pre * s_pre + b_pre) + self.hc_eps
        post = 2 * torch.sigmoid(m_post * s_post + b_post)
        comb = torch.softmax(m_comb.view(B, S, n, n) * s_comb + b_comb.view(n, n), dim=-1) + self.hc_eps
        comb = sinkhorn(comb, self.iters, self.hc_eps)
        collapsed = (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)
        return post, comb, collapsed

    def init_weights(self, init_std: float) -> None:
        nn.init.normal_(self.fn, mean=0.0, std=init_std)
        nn.init.zeros_(self.base)
        nn.init.ones_(self.scale)


def hyper_residual(
    streams: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, fp32: bool = False
) -> torch.Tensor:
    """X'[k] = post[k] * out + sum_j comb[j, k] X[j] (comb is not symmetric).

    In the stream dtype as transformers computes it, or with ``fp32`` in fp32, cast to the stream dtype once.
    """
    dtype = torch.float32 if fp32 else streams.dtype
    mixed = torch.matmul(comb.to(dtype).transpose(-1, -2), streams.to(dtype))
    return (post.to(dtype).unsqueeze(-1) * out.to(dtype).unsqueeze(-2) + mixed).to(streams.dtype)


class HyperHead(nn.Module):
    """Final learned collapse of the n streams into one hidden state, before the last norm."""

    def __init__(self, args: DeepSeekV4ModelArgs):
        super().__init__()
        n = args.hc_mult
        self.hc_eps, self.norm_eps = args.hc_eps, args.norm_eps
        self.hc_fn = nn.Parameter(torch.empty(n, n * args.dim))
        self.hc_base = nn.Parameter(torch.zeros(n))
        self.hc_scale = nn.Parameter(torch.ones(1))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        z = unweighted_rms_norm(streams.flatten(2).float(), self.norm_eps)
        mix = F.linear(z, self.hc_fn.float())
        pre = torch.sigmoid(mix * self.hc_scale.float() + self.hc_base.float()) + self.hc_eps
        return (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)

    def init_weights(self, init_std: float) -> None:
        nn.init.normal_(self.hc_fn, mean=0.0, std=init_std)
        nn.init.zeros_(self.hc_base)
        nn.init.ones_(self.hc_scale)
