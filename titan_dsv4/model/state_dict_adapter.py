"""Maps transformers' DeepSeek-V4 parameter names to ours and back (round trip is the identity).

``to_hf`` / ``from_hf`` speak transformers' in-memory names (``model.layers.i.self_attn.q_a_proj.weight``).
Loading reads three namings through the storage reader (``titan_dsv4.checkpoint.reader``): those, the names
transformers 5 writes with save_pretrained (``model.layers.i.attn.wq_a.weight``, per-expert tensors), and
DeepSeek's released layout (``embed.weight``, ``layers.i.ffn.experts.j.w1.weight``, FP8/FP4 storage, MTP).
A folder is checked against the model built before any tensor is read. Exports are transformers folders
with a config.json.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

import torch
from safetensors.torch import save_file

from torchtitan.protocols.state_dict_adapter import StateDictAdapter
from torchtitan.tools.logging import logger

from ..checkpoint.files import read_config, scan_folder
from ..checkpoint.quantization import FP8_BLOCK
from ..checkpoint.reader import SKIP, CheckpointPlan, DeepSeekV4StorageReader, Slot, plan_checkpoint
from ..checkpoint.validation import CheckpointMismatchError, check_config, check_tensors
from .args import DeepSeekV4ModelArgs

# Per-layer renames, ours -> transformers (suffix after "layers.{i}." / "model.layers.{i}.").
_LAYER_RENAMES = {
    "attn_hc.fn": "attn_hc.fn",
    "attn_hc.base": "attn_hc.base",
    "attn_hc.scale": "attn_hc.scale",
    "ffn_hc.fn": "ffn_hc.fn",
    "ffn_hc.base": "ffn_hc.base",
    "ffn_hc.scale": "ffn_hc.scale",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "self_attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "self_attn.q_norm.weight": "self_attn.q_a_norm.weight",
    "self_attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "self_attn.wkv.weight": "self_attn.kv_proj.weight",
    "self_attn.kv_norm.weight": "self_attn.kv_norm.weight",
    "self_attn.wo_a.weight": "self_attn.o_a_proj.weight",
    "self_attn.wo_b.weight": "self_attn.o_b_proj.weight",
    "self_attn.sinks_param.weight": "self_attn.sinks",
    "self_attn.compressor.wkv.weight": "self_attn.compressor.kv_proj.weight",
    "self_attn.compressor.wgate.weight": "self_attn.compressor.gate_proj.weight",
    "self_attn.compressor.ape_param.weight": "self_attn.compressor.position_bias",
    "self_attn.compressor.norm.weight": "self_attn.compressor.kv_norm.weight",
    "self_attn.compressor.indexer.wkv.weight": "self_attn.compressor.indexer.kv_proj.weight",
    "self_attn.compressor.indexer.wgate.weight": "self_attn.compressor.indexer.gate_proj.weight",
    "self_attn.compressor.indexer.ape_param.weight": "self_attn.compressor.indexer.position_bias",
    "self_attn.compressor.indexer.norm.weight": "self_attn.compressor.indexer.kv_norm.weight",
    "self_attn.compressor.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "self_attn.compressor.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    "moe.router.gate.weight": "mlp.gate.weight",
    "moe.expert_bias": "mlp.gate.e_score_correction_bias",
    "moe.router.tid2eid": "mlp.gate.tid2eid",
    "moe.experts.w2": "mlp.experts.down_proj",
    "moe.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "moe.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "moe.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
}
_GLOBAL_RENAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "hc_head.hc_fn": "model.hc_head.hc_fn",
    "hc_head.hc_base": "model.hc_head.hc_base",
    "hc_head.hc_scale": "model.hc_head.hc_scale",
}
_TO_HF_LAYER = _LAYER_RENAMES
_FROM_HF_LAYER = {v: k for k, v in _LAYER_RENAMES.items()}
_FROM_HF_GLOBAL = {v: k for k, v in _GLOBAL_RENAMES.items()}
_OURS_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# transformers fuses the routed experts' gate and up projections: gate_up_proj [E, 2I, D] = cat(w1, w3).
_W1, _W3, _GATE_UP = "moe.experts.w1", "moe.experts.w3", "mlp.experts.gate_up_proj"
_TID2EID, _TID2EID_OURS = "mlp.gate.tid2eid", "moe.router.tid2eid"
_HASH_TABLE_FILE = "model-hash-tables.safetensors"


# DeepSeek's released layout -> transformers names (the renames transformers applies when it loads one).
# transformers 5 also *saves* in these names, with a ``model.`` prefix (``model.layers.i.attn.wq_a.weight``)
# and ``attn.norm.weight`` for the kv_norm, so the same table reads save_pretrained folders.
_RELEASED_GLOBAL = {
    "embed.weight": "model.embed_tokens.weight",
    "head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}
_RELEASED_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "hc_attn_fn": "attn_hc.fn",
    "hc_attn_base": "attn_hc.base",
    "hc_attn_scale": "attn_hc.scale",
    "hc_ffn_fn": "ffn_hc.fn",
    "hc_ffn_base": "ffn_hc.base",
    "hc_ffn_scale": "ffn_hc.scale",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_norm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv.weight": "self_attn.kv_proj.weight",
    "attn.kv_norm.weight": "self_attn.kv_norm.weight",
    "attn.norm.weight": "self_attn.kv_norm.weight",  # transformers 5's save_pretrained name for the same tensor
    "attn.wo_a.weight": "self_attn.o_a_proj.weight",
    "attn.wo_b.weight": "self_attn.o_b_proj.weight",
    "attn.attn_sink": "self_attn.sinks",
    "attn.compressor.wkv.weight": "self_attn.compressor.kv_proj.weight",
    "attn.compressor.wgate.weight": "self_attn.compressor.gate_proj.weight",
    "attn.compressor.norm.weight": "self_attn.compressor.kv_norm.weight",
    "attn.compressor.ape": "self_attn.compressor.position_bias",
    # on disk the indexer is the compressor's sibling; transformers nests it under the compressor
    "attn.indexer.compressor.wkv.weight": "self_attn.compressor.indexer.kv_proj.weight",
    "attn.indexer.compressor.wgate.weight": "self_attn.compressor.indexer.gate_proj.weight",
    "attn.indexer.compressor.norm.weight": "self_attn.compressor.indexer.kv_norm.weight",
    "attn.indexer.compressor.ape": "self_attn.compressor.indexer.position_bias",
    "attn.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "attn.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
}
_RELEASED_EXPERT = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.weight$")
_RELEASED_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
_SAVED_LAYER_KEY = re.compile(r"^model\.layers\.\d+\.(attn|ffn)[._]")
# w1 (gate) and w3 (up) are the two row halves of transformers' gate_up_proj; w2 is down_proj.
_EXPERT_SLOTS = {"w1": ("gate_up_proj", 0, 2), "w3": ("gate_up_proj", 1, 2), "w2": ("down_proj", 0, 1)}
TRANSFORMERS, SAVE_PRETRAINED, RELEASED = "transformers", "transformers save_pretrained", "released"


def _released_slot(key: str) -> Slot | None:
    if key in _RELEASED_GLOBAL:
        return Slot(_RELEASED_GLOBAL[key])
    m = _RELEASED_EXPERT.match(key)
    if m is not None:
        layer, expert, w = m.groups()
        name, part, parts = _EXPERT_SLOTS[w]
        return Slot(f"model.layers.{layer}.mlp.experts.{name}", int(expert), part, parts)
    m = _RELEASED_LAYER_KEY.match(key)
    if m is not None and m.group(2) in _RELEASED_LAYER:
        return Slot(f"model.layers.{m.group(1)}.{_RELEASED_LAYER[m.group(2)]}")
    return None


def disk_slot(key: str) -> Slot | None:
    """Where a stored tensor lands in the transformers layout, in any of the three namings.

    transformers' in-memory names stay; save_pretrained and released names are renamed (per-expert
    tensors become slices of the stacked experts); MTP tensors are SKIP; None marks an unknown key.
    """
    if key.startswith(("mtp.", "model.mtp.")):
        return SKIP
    if key in _FROM_HF_GLOBAL:
        return Slot(key)
    m = _HF_LAYER.match(key)
    if m is not None and (m.group(2) in _FROM_HF_LAYER or m.group(2) == _GATE_UP):
        return Slot(key)
    return _released_slot(key.removeprefix("model."))


def detect_layout(keys) -> str | None:
    """Which naming a folder uses (for messages and index translation); None when no key is DeepSeek-V4's."""
    known = [k for k in keys if disk_slot(k) not in (None, SKIP)]
    if not known:
        return None
    if any(k.startswith("layers.") or k == "embed.weight" for k in known):
        return RELEASED
    if any(_SAVED_LAYER_KEY.match(k) for k in known):
        return SAVE_PRETRAINED
    return TRANSFORMERS


def _fp8_block(config: dict | None) -> tuple[int, int]:
    block = ((config or {}).get("quantization_config") or {}).get("weight_block_size") or FP8_BLOCK
    return int(block[0]), int(block[1])


class UnmappedKeyError(KeyError):
    """A checkpoint key this adapter does not know (wrong model type, or a missing rename)."""


class DeepSeekV4StateDictAdapter(StateDictAdapter):
    """Titan ``StateDictAdapter`` between our module names and transformers' ``DeepseekV4ForCausalLM``."""

    def __init__(self, model_args: DeepSeekV4ModelArgs, hf_assets_path: str | None):
        super().__init__(model_args, hf_assets_path)
        self.model_args = model_args
        self.exporting = False
        if self.fqn_to_index_mapping:
            self.fqn_to_index_mapping = self._export_index(self.fqn_to_index_mapping)

    def _export_index(self, mapping: dict[str, int]) -> dict[str, int] | None:
        """The shard of every tensor an export writes, keyed by transformers names, or None (one file).

        The hf_assets_path index may use another naming and lists the hash tables, which ``finish_export``
        writes itself; torch's consolidation writes a broken header for a listed tensor that is not saved.
        """
        if detect_layout(mapping) not in (None, TRANSFORMERS):
            mapping = index_in_transformers_names(mapping)
        exported = [k for k in self.expected_hf_shapes() if not k.endswith(_TID2EID)]
        unplaced = [k for k in exported if k not in mapping]
        if unplaced:
            logger.warning(f"the index at {self.hf_assets_path} places no shard for {unplaced[:3]}: an HF export "
                           "will be written as a single file")
            return None
        return {k: mapping[k] for k in exported}

    # ---- loading -------------------------------------------------------------------------------
    def expected_hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Transformers-layout key -> shape of the model built (from a meta-device model: nothing allocated)."""
        from .model import DeepSeekV4Model

        with torch.device("meta"):
            model = DeepSeekV4Model(self.model_args)
        return {k: tuple(v.shape) for k, v in self.to_hf(model.state_dict()).items()}

    def checked_plan(self, folder: str) -> CheckpointPlan:
        """The folder planned and compared with the model built; raises before any tensor data is read."""
        config = read_config(folder)
        if config is not None:
            check_config(config, self.model_args, folder)
        else:
            logger.warning(f"{folder} has no config.json: only the tensors' names and shapes can be checked")
        stored = scan_folder(folder)
        layout = detect_layout(stored)
        if layout is None:
            raise CheckpointMismatchError(
                f"{folder} is not a DeepSeek-V4 checkpoint: none of its tensors (e.g. {sorted(stored)[:3]}) has a "
                "DeepSeek-V4 name, in the transformers layout (model.embed_tokens.weight, ...) or DeepSeek's released "
                "layout (embed.weight, ...). Point --checkpoint.initial_load_path at a DeepSeek-V4 checkpoint."
            )
        plan = plan_checkpoint(folder, layout, stored, disk_slot, _fp8_block(config))
        check_tensors(plan, self.expected_hf_shapes())
        return plan

    def get_hf_storage_reader(self, path: str, from_quantized: bool = False) -> DeepSeekV4StorageReader:
        """Either layout, quantized or not (detected from the headers, so ``from_quantized`` is not needed)."""
        plan = self.checked_plan(path)
        if from_quantized and not plan.quantized:
            logger.info(f"initial_load_in_hf_quantized is set but {path} holds no quantized tensor; reading as is")
        logger.info(f"Loading {path}: {plan.layout} layout, {len(plan.tensors)} tensors"
                    + (f", {len(plan.skipped)} MTP tensors not trained here" if plan.skipped else "")
                    + (", FP8/FP4 dequantized on read" if plan.quantized else ""))
        return DeepSeekV4StorageReader(plan)

    # ---- export --------------------------------------------------------------------------------
    def finish_export(self, folder: str, model_state: dict[str, Any], dtype: torch.dtype) -> None:
        """Complete an HF export into a folder transformers loads: hash tables, config.json, tokenizer.

        torch 2.13's safetensors consolidation sizes dtypes with ``torch.finfo`` and fails on integer
        tensors, and Titan casts every exported tensor to ``export_dtype`` (bf16 cannot hold expert ids
        above 256), so ``to_hf`` leaves the int64 ``tid2eid`` tables out of an export (``exporting``) and
        they are written here, from the model's own (uncast) state, into their own shard listed in the index.
        """
        ours = {k: v for k, v in model_state.items() if k.endswith(_TID2EID_OURS)}
        tables = {key: value.detach().cpu().contiguous() for key, value in self.to_hf(ours).items()}
        if tables:
            save_file(tables, os.path.join(folder, _HASH_TABLE_FILE), metadata={"format": "pt"})
            index_path = os.path.join(folder, "model.safetensors.index.json")
            with open(index_path) as f:
                index = json.load(f)
            index["weight_map"].update({key: _HASH_TABLE_FILE for key in tables})
            index.setdefault("metadata", {})["total_size"] = index["metadata"].get("total_size", 0) + sum(
                t.numel() * t.element_size() for t in tables.values())
            with open(index_path, "w") as f:
                json.dump(index, f, indent=2)
        config = self.model_args.to_hf_config()
        config["dtype"] = str(dtype).removeprefix("torch.")
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            src = os.path.join(self.hf_assets_path or "", name)
            if self.hf_assets_path and os.path.isfile(src):
                shutil.copyfile(src, os.path.join(folder, name))

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        hf: dict[str, Any] = {}
        for key, value in state_dict.items():
            if key in _GLOBAL_RENAMES:
                hf[_GLOBAL_RENAMES[key]] = value
                continue
            m = _OURS_LAYER.match(key)
            if m is None:
                raise UnmappedKeyError(f"no transformers name for parameter {key!r}")
            layer, rest = m.groups()
            if rest == _W3:
                continue  # folded into gate_up_proj with w1
            if rest == _W1:
                w3 = state_dict[f"layers.{layer}.{_W3}"]
                hf[f"model.layers.{layer}.{_GATE_UP}"] = torch.cat([value, w3], dim=1)
                continue
            if rest not in _TO_HF_LAYER:
                raise UnmappedKeyError(f"no transformers name for parameter {key!r}")
            if self.exporting and _TO_HF_LAYER[rest] == _TID2EID:
                continue  # written by finish_export (see there)
            hf[f"model.layers.{layer}.{_TO_HF_LAYER[rest]}"] = value
        return hf

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        ours: dict[str, Any] = {}
        for key, value in hf_state_dict.items():
            if key in _FROM_HF_GLOBAL:
                ours[_FROM_HF_GLOBAL[key]] = value
                continue
            m = _HF_LAYER.match(key)
            if m is None:
                raise UnmappedKeyError(f"checkpoint key {key!r} is not a DeepSeek-V4 (transformers layout) key")
            layer, rest = m.groups()
            if rest == _GATE_UP:
                w1, w3 = value.chunk(2, dim=1)
                ours[f"layers.{layer}.{_W1}"] = w1
                ours[f"layers.{layer}.{_W3}"] = w3
                continue
            if rest not in _FROM_HF_LAYER:
                raise UnmappedKeyError(f"checkpoint key {key!r} is not a DeepSeek-V4 (transformers layout) key")
            ours[f"layers.{layer}.{_FROM_HF_LAYER[rest]}"] = value
        return ours


def index_in_transformers_names(mapping: dict[str, int]) -> dict[str, int]:
    """An index's shard numbers keyed by transformers names (stacked experts go where their first piece is)."""
    out: dict[str, int] = {}
    for key, index in sorted(mapping.items(), key=lambda kv: kv[1]):
        slot = disk_slot(key)
        if slot is not None and slot is not SKIP:
            out.setdefault(slot.key, index)
    return out
