"""Dequantization of the released formats against hand-made tensors whose values are worked out by hand.

e4m3 (bias 7): 0x38 = 1.0, 0x40 = 2.0, 0x3C = 1.5, 0xB8 = -1.0, 0x30 = 0.5, 0x7E = 448 (the largest),
0x01 = 2^-9 (the smallest subnormal), 0x00 = 0.
e8m0: byte e is 2^(e - 127); 0 is 2^-127, 255 is NaN.
e2m1 nibbles: 0..7 = 0, 0.5, 1, 1.5, 2, 3, 4, 6 and 8..15 the same negated; the low nibble is the even column.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from titan_dsv4.checkpoint.files import CheckpointError, scan_folder
from titan_dsv4.checkpoint.quantization import (
    Encoding,
    QuantizationError,
    decode_e8m0,
    dequantize_box,
    unpack_e2m1,
)
from titan_dsv4.checkpoint.reader import DeepSeekV4StorageReader, plan_checkpoint, split_box


def _bytes(rows, dtype):
    return torch.tensor(rows, dtype=torch.uint8).view(dtype)


def _e4m3(rows):
    return _bytes(rows, torch.float8_e4m3fn)


def _e8m0(rows):
    return _bytes(rows, torch.float8_e8m0fnu)


def _full(shape) -> tuple[tuple[int, int], ...]:
    return tuple((0, n) for n in shape)


def test_e8m0_scales_are_exact_powers_of_two():
    got = decode_e8m0(_e8m0([0, 1, 126, 127, 128, 254]))
    want = torch.tensor([2.0**-127, 2.0**-126, 0.5, 1.0, 2.0, 2.0**127], dtype=torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    with pytest.raises(QuantizationError, match="NaN code 255"):
        decode_e8m0(_e8m0([127, 255]))


def test_fp8_blocks_by_hand():
    weight = _e4m3([[0x38, 0x40, 0x3C], [0xB8, 0x30, 0x38], [0x7E, 0x01, 0x00]])
    scale = _e8m0(
        [[127, 128], [126, 125]]
    )  # blocks of 2x2: [[1, 2], [0.5, 0.25]]; the last row/column partial
    enc = Encoding("fp8", block=(2, 2))
    want = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0], [224.0, 2.0**-10, 0.0]])
    assert torch.equal(dequantize_box(weight, scale, _full((3, 3)), enc), want)
    assert torch.equal(
        dequantize_box(weight, scale, ((1, 3), (1, 3)), enc), torch.tensor([[0.5, 2.0], [2.0**-10, 0.0]])
    )


def test_fp8_128_blocks_with_partial_edge_blocks():
    weight = _e4m3([[0x38] * 260] * 130)  # every value 1.0: what comes out is the block scale
    scale = _e8m0(
        [[127, 128, 129], [126, 125, 124]]
    )  # [[1, 2, 4], [0.5, 0.25, 0.125]], shape [ceil(130/128), ceil(260/128)]
    enc = Encoding("fp8", block=(128, 128))
    out = dequantize_box(weight, scale, _full((130, 260)), enc)
    for (r, c), v in {
        (0, 0): 1.0,
        (127, 255): 2.0,
        (0, 256): 4.0,
        (128, 0): 0.5,
        (129, 200): 0.25,
        (129, 259): 0.125,
    }.items():
        assert out[r, c].item() == v, (r, c)
    box = dequantize_box(weight, scale, ((120, 130), (250, 260)), enc)
    assert torch.equal(box, out[120:130, 250:260])


def test_fp4_nibbles_and_group_scales_by_hand():
    packed = _bytes([[0x21, 0x9F, 0x70, 0xF8] + [0x00] * 12, [0x44] * 16], torch.int8)
    scale = _e8m0([[128], [126]])  # one scale per 32 columns: 2 and 0.5
    enc = Encoding("fp4", block=(1, 32))
    want_row0 = [1.0, 2.0, -12.0, -1.0, 0.0, 12.0, -0.0, -12.0] + [0.0] * 24
    out = dequantize_box(packed, scale, _full((2, 32)), enc)
    assert torch.equal(out, torch.tensor([want_row0, [1.0] * 32]))
    # an odd first column starts in the middle of a byte
    assert torch.equal(dequantize_box(packed, scale, ((0, 1), (1, 7)), enc), torch.tensor([want_row0[1:7]]))
    assert torch.equal(unpack_e2m1(_bytes([0x21, 0x9F], torch.int8)), torch.tensor([0.5, 1.0, -6.0, -0.5]))


def test_fp4_box_across_two_scale_groups():
    packed = _bytes([[0x22] * 32], torch.int8)  # 64 columns of 1.0
    scale = _e8m0([[127, 129]])  # columns 0-31 x1, 32-63 x4
    out = dequantize_box(packed, scale, ((0, 1), (30, 34)), Encoding("fp4", block=(1, 32)))
    assert torch.equal(out, torch.tensor([[1.0, 1.0, 4.0, 4.0]]))


@pytest.mark.parametrize("part_elements, remap_bytes", [(8 * 2**20, 64 * 2**20), (3, 1)])
def test_reader_serves_released_quantized_tensors_as_transformers_tensors(
    tmp_path, monkeypatch, part_elements, remap_bytes
):
    """Through DCP, as Titan loads: an FP8 weight whose scale sits in another shard, and FP4 experts stacked.

    The second run reads in parts of 3 values and reopens the shard after every part: same result.
    """
    import titan_dsv4.checkpoint.reader as reader

    monkeypatch.setattr(reader, "_PART_ELEMENTS", part_elements)
    monkeypatch.setattr(reader, "_REMAP_BYTES", remap_bytes)
    from titan_dsv4.checkpoint.layouts import disk_slot

    w = _e4m3([[0x38, 0x40], [0xB8, 0x30]])
    experts = {
        f"layers.0.ffn.experts.{j}.{n}.weight": _bytes([[0x22 * (j + 1)] * 16] * 2, torch.int8)
        for j in range(2)
        for n in ("w1", "w3")
    }
    expert_scales = {
        k.replace(".weight", ".scale"): _e8m0([[127 + i]] * 2) for i, k in enumerate(sorted(experts))
    }
    save_file({"layers.0.attn.wq_a.weight": w, **experts}, str(tmp_path / "a.safetensors"))
    save_file({"layers.0.attn.wq_a.scale": _e8m0([[128]]), **expert_scales}, str(tmp_path / "b.safetensors"))
    plan = plan_checkpoint(str(tmp_path), "released", scan_folder(str(tmp_path)), disk_slot)
    q_a, gate_up = "model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.mlp.experts.gate_up_proj"
    assert plan.tensors[q_a].shape == (2, 2) and plan.tensors[gate_up].shape == (2, 4, 32)
    target = {q_a: torch.zeros(2, 2), gate_up: torch.zeros(2, 4, 32)}
    dcp.load(target, storage_reader=DeepSeekV4StorageReader(plan), no_dist=True)
    assert torch.equal(target[q_a], torch.tensor([[2.0, 4.0], [-2.0, 1.0]]))  # block scale 2
    # expert j: code 2 (1.0) or 4 (2.0) everywhere, x the scale of w1 (rows 0-1) and w3 (rows 2-3)
    sorted_keys = sorted(experts)
    for j in range(2):
        for half, name in enumerate(("w1", "w3")):
            value = (1.0 if j == 0 else 2.0) * 2.0 ** sorted_keys.index(
                f"layers.0.ffn.experts.{j}.{name}.weight"
            )
            assert torch.all(target[gate_up][j, 2 * half : 2 * half + 2] == value), (j, name)


def test_quantized_storage_without_a_matching_scale_is_refused(tmp_path):
    from titan_dsv4.checkpoint.layouts import disk_slot

    save_file({"layers.0.attn.wq_a.weight": _e4m3([[0x38] * 4] * 4)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(CheckpointError, match=r"stored as F8_E4M3 but has no '\.scale' companion"):
        plan_checkpoint(str(tmp_path), "released", scan_folder(str(tmp_path)), disk_slot)
    save_file(
        {
            "layers.0.attn.wq_a.weight": _e4m3([[0x38] * 4] * 4),
            "layers.0.attn.wq_a.scale": _e8m0([[127, 127]]),
        },
        str(tmp_path / "a.safetensors"),
    )
    with pytest.raises(
        CheckpointError, match=r"scale 'layers.0.attn.wq_a.scale' has shape \[1, 2\].*needs \[1, 1\]"
    ):
        plan_checkpoint(str(tmp_path), "released", scan_folder(str(tmp_path)), disk_slot)


def test_split_box_covers_the_box_in_bounded_parts():
    box = ((3, 4), (0, 10), (5, 9))  # a stacked piece: the leading dimension has length 1
    parts = split_box(box, 12)
    assert parts == [
        ((3, 4), (0, 3), (5, 9)),
        ((3, 4), (3, 6), (5, 9)),
        ((3, 4), (6, 9), (5, 9)),
        ((3, 4), (9, 10), (5, 9)),
    ]
    assert split_box(box, 40) == [box]
