"""A DCP storage reader that serves any DeepSeek-V4 folder as transformers-layout tensors.

Titan's HF load runs ``to_hf(model state dict)`` -> ``dcp.load`` through the adapter's storage reader ->
``from_hf``. The adapter's ``to_hf`` always speaks transformers' in-memory layout; this reader makes any
folder look like one:
  * save_pretrained and released names are renamed, and per-expert tensors
    (``layers.i.ffn.experts.j.w1.weight``) become pieces of the stacked ``gate_up_proj`` / ``down_proj``;
  * FP8 / FP4 tensors are dequantized to float32 (the copy into the model casts to the training dtype).

A *virtual tensor* is one transformers-layout tensor made of one or more *pieces* (stored tensors). DCP
asks each rank for the boxes its shards cover; the reader reads only the stored bytes under those boxes
(safetensors slices), one shard file at a time and in bounded parts, straight into ``to_hf``'s tensors
(views of the model's parameters, except the fused ``gate_up_proj``, which ``to_hf`` concatenates).
"""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from math import prod

import torch
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.futures import Future
from torchtitan.tools.logging import logger

from .files import CheckpointError, StoredTensor
from .quantization import (
    FP8_BLOCK,
    Box,
    Encoding,
    box_slices,
    dequantize_box,
    expected_scale_shape,
    logical_shape,
)

SCALE_SUFFIX = ".scale"
_PART_ELEMENTS = 8 * 2**20  # values read (and dequantized) at once: 32 MiB in fp32
_REMAP_BYTES = 64 * 2**20  # stored bytes read through one mapping of a shard before it is closed


@dataclass(frozen=True)
class Slot:
    """Where a stored tensor lands in the transformers layout.

    Per-expert tensors are stacked along a new leading dimension (``expert``) and, for the fused
    ``gate_up_proj``, concatenated along their rows (``part`` of ``parts``: gate, then up).
    """

    key: str
    expert: int | None = None
    part: int = 0
    parts: int = 1


# Stored on purpose but not part of the model trained here (the released checkpoint's MTP block).
SKIP = Slot("")

SlotOf = Callable[[str], "Slot | None"]  # None: a key the layout does not know


@dataclass(frozen=True)
class Piece:
    """One stored tensor and the box its (dequantized) values fill in a virtual tensor."""

    stored: StoredTensor
    encoding: Encoding
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    stacked: bool  # the stored tensor lacks the virtual tensor's leading expert dimension


@dataclass
class VirtualTensor:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: list[Piece]


@dataclass
class CheckpointPlan:
    """The folder seen as transformers-layout tensors, with what could not be placed."""

    folder: str
    layout: str
    tensors: dict[str, VirtualTensor]
    unexpected: list[str] = field(default_factory=list)  # on-disk keys that map to no model tensor
    skipped: list[str] = field(default_factory=list)  # on-disk keys of MTP depths the model does not build
    kept: list[str] = field(default_factory=list)  # model tensors the folder lacks, kept as initialised (MTP)

    def keep(self, key: str, shape: tuple[int, ...]) -> None:
        """Serve ``key`` as "already loaded": no piece is read, the model keeps its initial values."""
        self.tensors[key] = VirtualTensor(key, tuple(shape), torch.float32, [])
        self.kept.append(key)

    @property
    def quantized(self) -> bool:
        return any(p.encoding.quantized for t in self.tensors.values() for p in t.pieces)

    def disk_names(self, key: str) -> list[str]:
        return [p.stored.key for p in self.tensors[key].pieces] if key in self.tensors else []


# ---- planning -------------------------------------------------------------------------------------
_QUANTIZED_DTYPES = ("F8_E4M3", "F8_E5M2", "I8", "U8")


def _scale_owner(key: str, stored: dict[str, StoredTensor]) -> str | None:
    """The quantized tensor ``key`` scales (``X.scale`` -> ``X.weight`` or ``X``), or None: then it is a
    tensor of its own, like the mHC's ``attn_hc.scale``."""
    if not key.endswith(SCALE_SUFFIX):
        return None
    base = key[: -len(SCALE_SUFFIX)]
    for owner in (base + ".weight", base):
        if owner in stored and stored[owner].dtype in _QUANTIZED_DTYPES:
            return owner
    return None


def _encoding(weight: StoredTensor, scale: StoredTensor | None, fp8_block: tuple[int, int]) -> Encoding:
    """FP8 when e4m3 with a scale, packed FP4 when int8/uint8 with a scale; a quantized tensor must have its
    scale."""
    if scale is None:
        if weight.dtype in _QUANTIZED_DTYPES:
            raise CheckpointError(
                f"{weight.path}: {weight.key!r} is stored as {weight.dtype} but has no {SCALE_SUFFIX!r} "
                f"companion, "
                "so it cannot be dequantized; the shard holding its scale is missing or from another "
                "checkpoint"
            )
        return Encoding()
    if weight.dtype == "F8_E4M3":
        enc = Encoding("fp8", scale.key, scale.path, fp8_block)
    elif (
        weight.dtype in ("I8", "U8") and scale.shape[-1] > 0 and (2 * weight.shape[-1]) % scale.shape[-1] == 0
    ):
        enc = Encoding("fp4", scale.key, scale.path, (1, 2 * weight.shape[-1] // scale.shape[-1]))
    else:
        raise CheckpointError(
            f"{weight.path}: {weight.key!r} ({weight.dtype}, {list(weight.shape)}) has a scale {scale.key!r} "
            f"{list(scale.shape)} but is neither FP8 e4m3 nor packed FP4 (int8, [out, in/2] with [out, "
            f"in/32] scales)"
        )
    want = expected_scale_shape(logical_shape(weight.shape, enc), enc.block)
    if tuple(scale.shape) != want:
        raise CheckpointError(
            f"{weight.path}: scale {scale.key!r} has shape {list(scale.shape)}, but {weight.key!r} "
            f"{list(weight.shape)} ({enc.kind}, blocks {enc.block[0]}x{enc.block[1]}) needs {list(want)}; "
            "the checkpoint's quantization_config.weight_block_size does not describe its tensors"
        )
    return enc


def _assemble(key: str, members: list[tuple[Slot, StoredTensor, Encoding]]) -> VirtualTensor:
    """One virtual tensor from its pieces; stacked experts must be complete and alike."""
    dtype = torch.float32 if any(e.quantized for _, _, e in members) else members[0][1].torch_dtype
    if members[0][0].expert is None:
        if len(members) != 1:
            raise CheckpointError(f"{members[0][1].key!r} and {members[1][1].key!r} both map to {key!r}")
        _, t, enc = members[0]
        shape = logical_shape(t.shape, enc)
        return VirtualTensor(key, shape, dtype, [Piece(t, enc, (0,) * len(shape), shape, stacked=False)])
    parts = members[0][0].parts
    at = {(s.expert, s.part): (t, e) for s, t, e in members}
    n = 1 + max(s.expert for s, _, _ in members)
    absent = [(j, p) for j in range(n) for p in range(parts) if (j, p) not in at]
    if absent or len(at) != len(members):
        j, p = absent[0] if absent else (None, None)
        raise CheckpointError(
            f"{key}: the stored experts are incomplete or repeated (first gap: expert {j}, part {p} of "
            f"{parts}; "
            f"{len(members)} tensors for {n} experts x {parts} parts). The checkpoint is damaged: copy it "
            f"again."
        )
    shapes = {logical_shape(t.shape, e) for t, e in at.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise CheckpointError(f"{key}: the per-expert tensors disagree in shape: {sorted(shapes)}")
    rows, cols = next(iter(shapes))
    pieces = [
        Piece(t, e, (j, p * rows, 0), (1, rows, cols), stacked=True) for (j, p), (t, e) in sorted(at.items())
    ]
    return VirtualTensor(key, (n, parts * rows, cols), dtype, pieces)


def plan_checkpoint(
    folder: str,
    layout: str,
    stored: dict[str, StoredTensor],
    slot_of: SlotOf,
    fp8_block: tuple[int, int] = FP8_BLOCK,
) -> CheckpointPlan:
    """Group the folder's tensors into transformers-layout tensors, pairing each quantized tensor with its
    scale."""
    owners = {key: _scale_owner(key, stored) for key in stored}
    scales = {owner: stored[key] for key, owner in owners.items() if owner is not None}
    groups: dict[str, list[tuple[Slot, StoredTensor, Encoding]]] = defaultdict(list)
    unexpected, skipped = [], []
    for key, t in stored.items():
        if owners[key] is not None:
            continue  # a scale, read with its tensor
        slot = slot_of(key)
        if slot is None:
            unexpected.append(key)
        elif slot is SKIP:
            skipped.append(key)
        else:
            groups[slot.key].append((slot, t, _encoding(t, scales.get(key), fp8_block)))
    tensors = {key: _assemble(key, members) for key, members in groups.items()}
    return CheckpointPlan(folder, layout, tensors, sorted(set(unexpected)), skipped)


# ---- reading ---------------------------------------------------------------------------------------
def _overlap(a: Box, b: Box) -> Box | None:
    box = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(a, b))
    return box if all(lo < hi for lo, hi in box) else None


def _shift(box: Box, by: tuple[int, ...]) -> Box:
    return tuple((lo - d, hi - d) for (lo, hi), d in zip(box, by))


def read_piece(open_slice, piece: Piece, box: Box) -> torch.Tensor:
    """The values of ``box`` (piece coordinates) of one piece, dequantized when stored quantized."""
    if piece.stacked:
        box = box[1:]  # the stored per-expert tensor has no expert dimension
    weight = open_slice(piece.stored.path, piece.stored.key)
    if not piece.encoding.quantized:
        return weight[box_slices(box)]
    scale = open_slice(piece.encoding.scale_path, piece.encoding.scale_key)
    return dequantize_box(weight, scale, box, piece.encoding)


def _stored_bytes(piece: Piece, box: Box) -> int:
    n = prod(hi - lo for lo, hi in box) * piece.stored.torch_dtype.itemsize
    return n // 2 if piece.encoding.kind == "fp4" else n


def split_box(box: Box, max_elements: int) -> list[Box]:
    """``box`` cut along its first dimension longer than 1, so no part holds more than ``max_elements``."""
    dim = next((d for d, (lo, hi) in enumerate(box) if hi - lo > 1), None)
    total = prod(hi - lo for lo, hi in box)
    if dim is None or total <= max_elements:
        return [box]
    lo, hi = box[dim]
    step = max(1, max_elements // (total // (hi - lo)))
    return [box[:dim] + ((a, min(a + step, hi)),) + box[dim + 1 :] for a in range(lo, hi, step)]


class _OpenFiles:
    """safetensors handles opened on first use and closed together, which unmaps the pages they touched."""

    def __init__(self):
        self._stack = contextlib.ExitStack()
        self._handles: dict[str, object] = {}

    def slice(self, path: str, key: str):
        if path not in self._handles:
            from safetensors import safe_open

            self._handles[path] = self._stack.enter_context(safe_open(path, framework="pt"))
        return self._handles[path].get_slice(key)

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()


class DeepSeekV4StorageReader(HuggingFaceStorageReader):
    """Reads a planned DeepSeek-V4 folder as transformers-layout tensors; each rank reads only its boxes."""

    def __init__(self, plan: CheckpointPlan):
        super().__init__(plan.folder)
        self.plan = plan
        self.bytes_read = 0

    def read_metadata(self) -> Metadata:
        state, storage = {}, {}
        for key, t in self.plan.tensors.items():
            size, origin = torch.Size(t.shape), torch.Size([0] * len(t.shape))
            state[key] = TensorStorageMetadata(
                TensorProperties(dtype=t.dtype), size, [ChunkStorageMetadata(origin, size)]
            )
            storage[MetadataIndex(key, list(origin))] = key
        metadata = Metadata(state_dict_metadata=state, storage_data=storage)
        metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        work: dict[str, list[tuple[Piece, Box, torch.Tensor]]] = defaultdict(list)
        targets = []
        for req in plan.items:
            target = planner.resolve_tensor(req).detach()
            want = tuple((o, o + n) for o, n in zip(req.storage_offsets, req.lengths))
            origin = tuple(req.storage_offsets)
            for piece in self.plan.tensors[req.storage_index.fqn].pieces:
                hit = _overlap(want, tuple((o, o + n) for o, n in zip(piece.offset, piece.shape)))
                if hit is not None:
                    view = target[box_slices(_shift(hit, origin))]
                    work[piece.stored.path].append((piece, _shift(hit, piece.offset), view))
            targets.append((req, target))
        # One shard at a time, in parts of at most _PART_ELEMENTS, remapping every _REMAP_BYTES: a rank's
        # memory grows by one part and a bounded window of mapped file pages, not by what it reads.
        for path in sorted(work):
            files, since_open = _OpenFiles(), 0
            try:
                for piece, box, view in work[path]:
                    origin = tuple(lo for lo, _ in box)
                    for part in split_box(box, _PART_ELEMENTS):
                        values = read_piece(files.slice, piece, part)
                        sub = view[box_slices(_shift(part, origin))]
                        sub.copy_(values.reshape(sub.shape))
                        n = _stored_bytes(piece, part)
                        self.bytes_read += n
                        since_open += n
                        if since_open >= _REMAP_BYTES:
                            files.close()
                            since_open = 0
            finally:
                files.close()
        for req, target in targets:
            planner.commit_tensor(req, target)
        total = sum(
            os.path.getsize(p)
            for p in {pc.stored.path for t in self.plan.tensors.values() for pc in t.pieces}
        )
        logger.info(
            f"Read {self.bytes_read / 2**20:.1f} MiB of the checkpoint's {total / 2**20:.1f} MiB on this "
            f"rank "
            f"({self.plan.layout} layout{', dequantized' if self.plan.quantized else ''})"
        )
        done: Future[None] = Future()
        done.set_result(None)
        return done
