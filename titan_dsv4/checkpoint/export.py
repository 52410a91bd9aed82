"""Completing a TorchTitan HF export into a folder transformers loads: hash tables, config.json, tokenizer.

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
    """Write the hash tables (listed in the index), config.json and the tokenizer files into an export."""
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
    config = adapter.model_args.to_hf_config()
    config["dtype"] = str(dtype).removeprefix("torch.")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in TOKENIZER_FILES:
        src = os.path.join(adapter.hf_assets_path or "", name)
        if adapter.hf_assets_path and os.path.isfile(src):
            shutil.copyfile(src, os.path.join(folder, name))
