"""What a checkpoint folder holds, read from the safetensors headers alone (no tensor data)."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch

SUFFIX = ".safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"

# safetensors dtype codes -> torch dtypes (F8_E8M0 holds the released scales; I8/U8 the packed FP4 pairs).
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}


class CheckpointError(ValueError):
    """A checkpoint this package cannot load as the model built; the message names the fix."""


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as a safetensors header describes it."""

    key: str
    path: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor {self.key!r} has dtype {self.dtype}, which no DeepSeek-V4 "
                f"weight uses (known: {', '.join(DTYPES)}); the file is not a DeepSeek-V4 checkpoint"
            )
        return DTYPES[self.dtype]


def _truncated(path: str, needed: int, size: int) -> CheckpointError:
    return CheckpointError(
        f"{path} is truncated: its safetensors header describes {needed:,} bytes but the file holds "
        f"{size:,}. "
        "The download or copy was cut short; copy that file again (or re-run save_pretrained)."
    )


def read_header(path: str) -> dict[str, StoredTensor]:
    """One file's tensors, after checking that the file really holds every byte its header promises."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _truncated(path, 8, size)
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise _truncated(path, 8 + header_len, size)
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(
            f"{path} has no readable safetensors header; the file is corrupt: copy it again"
        ) from None
    header.pop("__metadata__", None)
    tensors, data_end = {}, 0
    for key, info in header.items():
        data_end = max(data_end, int(info["data_offsets"][1]))
        tensors[key] = StoredTensor(key, path, info["dtype"], tuple(int(n) for n in info["shape"]))
    if 8 + header_len + data_end > size:
        raise _truncated(path, 8 + header_len + data_end, size)
    return tensors


def safetensors_files(folder: str) -> list[str]:
    """The folder's shards (not recursive, as transformers and DCP read it); refuses a folder without any."""
    if not os.path.isdir(folder):
        raise CheckpointError(
            f"checkpoint folder {folder} does not exist; check --checkpoint.initial_load_path"
        )
    files = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(SUFFIX))
    if not files:
        raise CheckpointError(
            f"{folder} holds no *{SUFFIX} files; point --checkpoint.initial_load_path at a Hugging Face "
            f"checkpoint "
            "folder (config.json + model*.safetensors)"
        )
    return files


def _index_weight_map(folder: str) -> dict[str, str] | None:
    path = os.path.join(folder, INDEX_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return dict(json.load(f).get("weight_map", {}))


def scan_folder(folder: str) -> dict[str, StoredTensor]:
    """Every tensor of the folder by key; a shard named by the index but absent, or a key in two shards, is
    refused."""
    weight_map = _index_weight_map(folder)
    if weight_map is not None:
        missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(folder, f))})
        if missing:
            raise CheckpointError(
                f"{folder}/{INDEX_FILE} names shard(s) that are not in the folder: {', '.join(missing[:3])}. "
                "The download is incomplete; fetch the missing files."
            )
    tensors: dict[str, StoredTensor] = {}
    for path in safetensors_files(folder):
        for key, t in read_header(path).items():
            if key in tensors:
                raise CheckpointError(
                    f"tensor {key!r} is stored twice, in {tensors[key].path} and {path}; "
                    "remove the stale shard"
                )
            tensors[key] = t
    if weight_map is not None:
        absent = [
            k for k, f in weight_map.items() if k not in tensors or os.path.basename(tensors[k].path) != f
        ]
        if absent:
            raise CheckpointError(
                f"{folder}/{INDEX_FILE} places {absent[0]!r} in {weight_map[absent[0]]}, but that shard does "
                f"not hold "
                f"it ({len(absent)} such keys). The index and the shards come from different checkpoints."
            )
    return tensors


def read_config(folder: str) -> dict | None:
    """The folder's config.json, or None when it has none."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); copy it again") from None
