"""Small building blocks of DeepSeek-V4: norms, parameter holders, interleaved partial RoPE."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .args import DeepSeekV4ModelArgs, RopeTable


class RMSNorm(nn.Module):
    """Weighted RMSNorm computed in fp32 and cast once to the input dtype (as transformers does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * h).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Statistic in fp32, rsqrt cast back to x's dtype before the multiply (q head norm, mHC input)."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


class ParamHolder(nn.Module):
    """Owns one fp32 parameter and returns it raw, so FSDP can shard it as its own fp32 unit."""

    def __init__(self, *shape: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(*shape))

    def forward(self) -> torch.Tensor:
        return self.weight


class RotaryTables(nn.Module):
    """cos/sin of the "main" and "compress" tables (``args.main_rope``, ``args.compress_rope``), one row per
    position."""

    def __init__(self, args: DeepSeekV4ModelArgs):
        super().__init__()
        self.args = args
        self._fill(device=None)

    def _fill(self, device: torch.device | None) -> None:
        args = self.args
        for name, table in (("main", args.main_rope), ("compress", args.compress_rope)):
            positions = torch.arange(args.max_seq_len, dtype=torch.float32, device=device)
            # fp32 elementwise product, never a (TF32) matmul.
            angles = positions[:, None] * inv_freq(table, args.rope_head_dim).to(device)[None, :]
            self.register_buffer(f"{name}_cos", angles.cos(), persistent=False)
            self.register_buffer(f"{name}_sin", angles.sin(), persistent=False)

    def reset(self, device: torch.device | None) -> None:
        """Recompute the non-persistent tables (to_empty leaves them uninitialised)."""
        self._fill(device)

    def get(
        self, name: str, length: int, dtype: torch.dtype, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [length, r/2] for positions 0..length-1, or [B, S, r/2] at the given ``positions`` [B,
        S]."""
        limit = self.main_cos.shape[0]
        if length > limit:
            raise ValueError(
                f"sequence length {length} exceeds the rotary tables ({limit} positions); "
                "raise training.seq_len (the model's max_seq_len follows it)"
            )
        cos, sin = getattr(self, f"{name}_cos"), getattr(self, f"{name}_sin")
        if positions is None:
            cos, sin = cos[:length], sin[:length]
        else:
            cos, sin = cos[positions], sin[positions]
        # transformers hands cos/sin to the rotation in the activation dtype.
        return cos.to(dtype), sin.to(dtype)


def inv_freq(table: RopeTable, r: int) -> torch.Tensor:
    """Inverse frequencies of one table over ``r`` rotary channels, computed as transformers computes them.

    YaRN: the ramp between extrapolated and interpolated frequencies only; the attention factor is 1
    (no mscale on cos/sin; config.json translation refuses any other).
    """
    pos_freqs = table.theta ** (torch.arange(0, r, 2, dtype=torch.float32) / r)
    if table.rope_type == "default":
        return 1.0 / pos_freqs

    def corr(rotations: float) -> float:
        return (
            r
            * math.log(table.original_max_position_embeddings / (rotations * 2 * math.pi))
            / (2 * math.log(table.theta))
        )

    low = max(math.floor(corr(table.beta_fast)), 0)
    high = min(math.ceil(corr(table.beta_slow)), r - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(r // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    return (1.0 / (table.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the trailing rope channels of x [..., S, dim] in interleaved pairs (2i, 2i+1).

    cos/sin are [S, r/2], or [B, S, r/2] per row (packed documents); x is [B, S, dim] or [B, H, S, dim].
    """
    r = cos.shape[-1] * 2
    if cos.dim() == 3 and x.dim() == 4:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    cos = cos.repeat_interleave(2, dim=-1)
    sin = sin.repeat_interleave(2, dim=-1)
    nope, rope = x[..., :-r], x[..., -r:]
    pairs = rope.unflatten(-1, (-1, 2))
    rotated_half = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    rotated = (rope.float() * cos + rotated_half.float() * sin).to(x.dtype)
    return torch.cat([nope, rotated], dim=-1)


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """SwiGLU with the gate clamped from above and the up projection clamped on both sides."""
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)
