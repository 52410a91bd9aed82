"""The three namings a DeepSeek-V4 folder may use, each mapped onto transformers' in-memory layout.

* transformers in-memory: ``model.layers.i.self_attn.q_a_proj.weight``, stacked ``mlp.experts.gate_up_proj``;
* transformers 5's ``save_pretrained``: released-style names with a ``model.`` prefix and per-expert tensors
  (``model.layers.i.attn.wq_a.weight``, ``attn.norm.weight`` for the kv norm);
* DeepSeek's released layout: ``embed.weight``, ``layers.i.ffn.experts.j.w1.weight`` (FP8/FP4 storage),
``mtp.*``.

``disk_slot`` says where a stored tensor lands (``reader.Slot``); the reader assembles per-expert pieces.
"""

from __future__ import annotations

import re

from ..model.state_dict_adapter import is_transformers_key
from .reader import SKIP, Slot

# DeepSeek's released layout -> transformers names (the renames transformers applies when it loads one).
RELEASED_GLOBAL = {
    "embed.weight": "model.embed_tokens.weight",
    "head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}
RELEASED_BLOCK = {
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
    "attn.norm.weight": "self_attn.kv_norm.weight",  # transformers 5's save_pretrained name for it
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
# An MTP depth outside its block, released name -> the name map's (``mtp.{k}.`` + this).
RELEASED_MTP = {
    "e_proj.weight": "e_proj.weight",
    "h_proj.weight": "h_proj.weight",
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "norm.weight": "norm.weight",
    "hc_head_fn": "hc_head.hc_fn",
    "hc_head_base": "hc_head.hc_base",
    "hc_head_scale": "hc_head.hc_scale",
}
_RELEASED_EXPERT = re.compile(r"^ffn\.experts\.(\d+)\.(w[123])\.weight$")
_RELEASED_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
_MTP_KEY = re.compile(r"^mtp\.(\d+)\.(.+)$")
_SAVED_LAYER_KEY = re.compile(r"^model\.layers\.\d+\.(attn|ffn)[._]")
# w1 (gate) and w3 (up) are the two row halves of transformers' gate_up_proj; w2 is down_proj.
EXPERT_SLOTS = {"w1": ("gate_up_proj", 0, 2), "w3": ("gate_up_proj", 1, 2), "w2": ("down_proj", 0, 1)}
TRANSFORMERS, SAVE_PRETRAINED, RELEASED = "transformers", "transformers save_pretrained", "released"


def _block_slot(prefix: str, rest: str) -> Slot | None:
    """A block's released key (after its layer or depth prefix) -> its slot under ``prefix``."""
    if rest in RELEASED_BLOCK:
        return Slot(prefix + RELEASED_BLOCK[rest])
    m = _RELEASED_EXPERT.match(rest)
    if m is None:
        return None
    expert, w = m.groups()
    name, part, parts = EXPERT_SLOTS[w]
    return Slot(f"{prefix}mlp.experts.{name}", int(expert), part, parts)


def _released_slot(key: str) -> Slot | None:
    if key in RELEASED_GLOBAL:
        return Slot(RELEASED_GLOBAL[key])
    m = _RELEASED_LAYER_KEY.match(key)
    return None if m is None else _block_slot(f"model.layers.{m.group(1)}.", m.group(2))


def disk_slot(key: str, mtp_layers: int = 0) -> Slot | None:
    """Where a stored tensor lands in the transformers layout, in any of the three namings.

    transformers' in-memory names stay; save_pretrained and released names are renamed (per-expert
    tensors become slices of the stacked experts); MTP depths the model does not build are SKIP; None
    marks an unknown key.
    """
    key = key.removeprefix("model.") if key.startswith("model.mtp.") else key
    m = _MTP_KEY.match(key)
    if m is not None:
        depth, rest = int(m.group(1)), m.group(2)
        if depth >= mtp_layers:
            return SKIP
        if is_transformers_key(key):
            return Slot(key)
        prefix = f"mtp.{depth}."
        return Slot(prefix + RELEASED_MTP[rest]) if rest in RELEASED_MTP else _block_slot(prefix, rest)
    if is_transformers_key(key):
        return Slot(key)
    return _released_slot(key.removeprefix("model."))


def stored_mtp_depths(keys) -> int:
    """How many MTP depths a folder stores (0 when it has no ``mtp.*`` tensor)."""
    depths = {int(m.group(1)) for k in keys if (m := _MTP_KEY.match(k.removeprefix("model."))) is not None}
    return max(depths) + 1 if depths else 0


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


def index_in_transformers_names(mapping: dict[str, int], mtp_layers: int = 0) -> dict[str, int]:
    """An index's shard numbers keyed by transformers names (stacked experts go where their first piece
    is)."""
    out: dict[str, int] = {}
    for key, index in sorted(mapping.items(), key=lambda kv: kv[1]):
        slot = disk_slot(key, mtp_layers)
        if slot is not None and slot is not SKIP:
            out.setdefault(slot.key, index)
    return out
