"""The released DeepSeek-V4 storage formats, dequantized to float32 one requested box at a time.

* FP8: e4m3 values, one power-of-two e8m0 scale per 128x128 block; the scale has shape
  ``[ceil(out/128), ceil(in/128)]`` (the last row and column blocks may be partial).
* FP4: e2m1 values packed two per byte (low nibble = even column, high nibble = odd column), one e8m0
  scale per row and 32 columns: weight ``[out, in/2]``, scale ``[out, in/32]``.

Leading dimensions (stacked experts) pass through. A box is one ``(start, stop)`` per dimension of the
dequantized tensor, so a rank reads only the rows and columns of its own shard, plus the scales that
cover them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_BLOCK = (128, 128)
FP4_GROUP = 32
# e2m1: sign bit, 2 exponent bits, 1 mantissa bit; codes 0-7 are these magnitudes, codes 8-15 their negatives.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E8M0_NAN = 255

Box = tuple[tuple[int, int], ...]


class QuantizationError(ValueError):
    """Quantized storage that cannot be decoded; the message names the tensor and the fix."""


@dataclass(frozen=True)
class Encoding:
    """How a stored tensor becomes its values: as is, or block-scaled (FP8 blocks, packed FP4 groups)."""

    kind: str = "plain"  # "plain" | "fp8" | "fp4"
    scale_key: str | None = None
    scale_path: str | None = None
    block: tuple[int, int] = (1, 1)  # rows x columns that share one scale

    @property
    def quantized(self) -> bool:
        return self.kind != "plain"


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def decode_e8m0(scale: torch.Tensor) -> torch.Tensor:
    """2^(e - 127) per byte, built from its float32 bit pattern so that every power of two is exact.

    Float scales (some exporters write float32 multipliers) are returned as they are.
    """
    if scale.is_floating_point() and scale.dtype != torch.float8_e8m0fnu:
        return scale.float()
    e = scale.view(torch.uint8).to(torch.int32)
    if bool((e == E8M0_NAN).any()):
        raise QuantizationError(
            "an e8m0 scale holds the NaN code 255; the checkpoint is corrupt: copy it again"
        )
    # e >= 1: a normal float32 with exponent field e; e == 0: 2^-127 is the subnormal with mantissa bit 22.
    bits = torch.where(e > 0, e << 23, torch.full_like(e, 1 << 22))
    return bits.view(torch.float32)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """``[..., n/2]`` bytes -> ``[..., n]`` float32: the low nibble is the even column, the high nibble the
    odd one."""
    b = packed.view(torch.uint8)
    codes = torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2).long()
    table = torch.tensor(E2M1_MAGNITUDES + tuple(-m for m in E2M1_MAGNITUDES), dtype=torch.float32)
    return table[codes]


def box_slices(box: Box) -> tuple[slice, ...]:
    """A box (one (start, stop) per dimension) as the slices that index it."""
    return tuple(slice(a, b) for a, b in box)


def _element_scales(scale, lead: Box, rows: tuple[int, int], cols: tuple[int, int], block: tuple[int, int]):
    """The scale of every element of the box: each block's scale repeated over its block, then cut to the
    box."""
    (r0, r1), (c0, c1), (br, bc) = rows, cols, block
    s = scale[(*box_slices(lead), slice(r0 // br, ceil_div(r1, br)), slice(c0 // bc, ceil_div(c1, bc)))]
    s = decode_e8m0(s).repeat_interleave(br, dim=-2).repeat_interleave(bc, dim=-1)
    return s[..., r0 % br : r0 % br + r1 - r0, c0 % bc : c0 % bc + c1 - c0]


def dequantize_box(weight, scale, box: Box, encoding: Encoding) -> torch.Tensor:
    """Float32 values of ``box`` of a block-scaled weight.

    ``weight`` and ``scale`` are anything indexable by a tuple of slices (a tensor, or a safetensors slice,
    which reads only the bytes asked for).
    """
    *lead, (r0, r1), (c0, c1) = box
    if encoding.kind == "fp8":
        values = weight[(*box_slices(lead), slice(r0, r1), slice(c0, c1))].float()
    elif encoding.kind == "fp4":
        p0 = c0 // 2
        values = unpack_e2m1(weight[(*box_slices(lead), slice(r0, r1), slice(p0, ceil_div(c1, 2)))])
        values = values[..., c0 - 2 * p0 : c0 - 2 * p0 + c1 - c0]
    else:
        raise QuantizationError(f"unknown encoding {encoding.kind!r}")
    return values * _element_scales(scale, tuple(lead), (r0, r1), (c0, c1), encoding.block)


def logical_shape(stored_shape: tuple[int, ...], encoding: Encoding) -> tuple[int, ...]:
    """Shape of the dequantized tensor: packed FP4 holds two columns per byte."""
    if encoding.kind == "fp4":
        return (*stored_shape[:-1], 2 * stored_shape[-1])
    return tuple(stored_shape)


def expected_scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """One scale per block of the dequantized shape (partial edge blocks included)."""
    *lead, rows, cols = shape
    return (*lead, ceil_div(rows, block[0]), ceil_div(cols, block[1]))
