"""Completing a TorchTitan HF export into a folder transformers loads: hash tables, config.json, tokenizer,
and the MTP depths under DeepSeek's released names (transformers builds no MTP; inference engines read them).

torch 2.13's safetensors consolidation sizes dtypes with ``torch.finfo`` and fails on integer tensors, and
Titan casts every exported tensor to ``export_dtype`` (bf16 cannot hold expert ids above 256); so the int64
``tid2eid`` tables leave Titan's export and are written here, from the model's own (uncast) state, into a
shard of their own listed in the index.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch
from safetensors.torch import save_file

from ..model.hf_config import hf_config_from_args
from ..model.state_dict_adapter import DeepSeekV4StateDictAdapter

HASH_TABLE_FILE = "model-hash-tables.safetensors"
HASH_TABLE_OURS = "moe.router.tid2eid"  # our name (suffix) of the int64 token -> experts tables
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def hash_tables(state: dict[str, Any]) -> dict[str, Any]:
    """The int64 hash tables of a model state dict (our names)."""
    return {k: v for k, v in state.items() if k.endswith(HASH_TABLE_OURS)}


def complete_hf_export(
    folder: str, adapter: DeepSeekV4StateDictAdapter, tables: dict[str, Any], dtype: torch.dtype
) -> None:
    """Write the hash tables (listed in the index), config.json and the tokenizer files into an export, and
    rename its MTP depths to the released checkpoints' names."""
    if adapter.model_args.mtp_layers:
        rename_mtp_to_released(folder)
    hf_tables = {key: value.detach().cpu().contiguous() for key, value in adapter.to_hf(tables).items()}
    if hf_tables:
        save_file(hf_tables, os.path.join(folder, HASH_TABLE_FILE), metadata={"format": "pt"})
        index_path = os.path.join(folder, "model.safetensors.index.json")
        with open(index_path) as f:
            index = json.load(f)
        index["weight_map"].update({key: HASH_TABLE_FILE for key in hf_tables})
        index.setdefault("metadata", {})["total_size"] = index["metadata"].get("total_size", 0) + sum(
            t.numel() * t.element_size() for t in hf_tables.values()
        )
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2)
    config = hf_config_from_args(adapter.model_args)
    config["dtype"] = str(dtype).removeprefix("torch.")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in TOKENIZER_FILES:
        src = os.path.join(adapter.hf_assets_path or "", name)
        if adapter.hf_assets_path and os.path.isfile(src):
            shutil.copyfile(src, os.path.join(folder, name))


# ---- MTP depths in the released naming --------------------------------------------------------------
def _released_names() -> tuple[dict[str, str], dict[str, str]]:
    """The name map's MTP suffixes -> the released ones (block, and depth-level)."""
    from .layouts import RELEASED_BLOCK, RELEASED_MTP

    block = {v: k for k, v in RELEASED_BLOCK.items() if k != "attn.norm.weight"}  # save_pretrained's alias
    return block, {v: k for k, v in RELEASED_MTP.items()}


def released_mtp_tensors(key: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], tuple]]:
    """(released name, shape, index into the exported tensor) for one exported ``mtp.{k}.*`` tensor;
    the stacked experts become per-expert w1 / w3 / w2 as in DeepSeek's release."""
    block, outside = _released_names()
    _, depth, rest = key.split(".", 2)
    prefix = f"mtp.{depth}."
    if rest == "mlp.experts.gate_up_proj":
        E, two_i, D = shape
        i = two_i // 2
        return [
            (f"{prefix}ffn.experts.{j}.{w}.weight", (i, D), (j, slice(h * i, (h + 1) * i)))
            for j in range(E)
            for h, w in enumerate(("w1", "w3"))
        ]
    if rest == "mlp.experts.down_proj":
        return [(f"{prefix}ffn.experts.{j}.w2.weight", tuple(shape[1:]), (j,)) for j in range(shape[0])]
    return [(prefix + (outside.get(rest) or block[rest]), tuple(shape), ())]


def write_safetensors(path: str, entries: list[tuple[str, torch.dtype, tuple[int, ...], Any]]) -> None:
    """A safetensors file written one tensor at a time: ``entries`` are (name, dtype, shape, producer);
    memory stays at one tensor, not the file (torch's writer needs every tensor at once)."""
    from .files import DTYPES

    codes = {v: k for k, v in DTYPES.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, _ in entries:
        size = dtype.itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": codes[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for _, dtype, shape, produce in entries:
            tensor = produce().to(dtype).contiguous()
            assert tuple(tensor.shape) == tuple(shape)
            f.write(tensor.view(torch.uint8).numpy().tobytes())


def rename_mtp_to_released(folder: str) -> int:
    """Rewrite an export's ``mtp.{k}.*`` tensors under the released checkpoints' names (per-expert experts),
    shard by shard, updating the index; returns how many tensors were written."""
    from safetensors import safe_open

    index_path = os.path.join(folder, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    weight_map = index["weight_map"]
    files = sorted({f for k, f in weight_map.items() if k.startswith("mtp.")})
    written = 0
    for name in files:
        path, tmp = os.path.join(folder, name), os.path.join(folder, name + ".tmp")
        with safe_open(path, framework="pt") as src:
            entries = []
            for key in src.keys():
                view = src.get_slice(key)
                shape, dtype = tuple(view.get_shape()), _slice_dtype(view)
                if not key.startswith("mtp."):
                    entries.append((key, dtype, shape, lambda v=view: v[:]))
                    continue
                for new, new_shape, at in released_mtp_tensors(key, shape):
                    entries.append((new, dtype, new_shape, lambda v=view, at=at: v[at] if at else v[:]))
                    weight_map[new] = name
                del weight_map[key]
            write_safetensors(tmp, entries)
            written += len(entries)
        os.replace(tmp, path)
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2)
    return written


def _slice_dtype(view) -> torch.dtype:
    from .files import DTYPES

    return DTYPES[view.get_dtype()]
