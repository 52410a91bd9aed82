"""The three namings a DeepSeek-V4 folder may use, each mapped onto transformers' in-memory layout.

* transformers in-memory: ``model.layers.i.self_attn.q_a_proj.weight``, stacked ``mlp.experts.gate_up_proj``;
* transformers 5's ``save_pretrained``: released-style names with a ``model.`` prefix and per-expert tensors
  (``model.layers.i.attn.wq_a.weight``, ``attn.norm.weight`` for the kv norm);
* DeepSeek's released layout: ``embed.weight``, ``layers.i.ffn.experts.j.w1.weight`` (FP8/FP4 storage), ``mtp.*``.

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
EXPERT_SLOTS = {"w1": ("gate_up_proj", 0, 2), "w3": ("gate_up_proj", 1, 2), "w2": ("down_proj", 0, 1)}
TRANSFORMERS, SAVE_PRETRAINED, RELEASED = "transformers", "transformers save_pretrained", "released"


def _released_slot(key: str) -> Slot | None:
    if key in RELEASED_GLOBAL:
        return Slot(RELEASED_GLOBAL[key])
    m = _RELEASED_EXPERT.match(key)
    if m is not None:
        layer, expert, w = m.groups()
        name, part, parts = EXPERT_SLOTS[w]
        return Slot(f"model.layers.{layer}.mlp.experts.{name}", int(expert), part, parts)
    m = _RELEASED_LAYER_KEY.match(key)
    if m is not None and m.group(2) in RELEASED_BLOCK:
        return Slot(f"model.layers.{m.group(1)}.{RELEASED_BLOCK[m.group(2)]}")
    return None


def disk_slot(key: str) -> Slot | None:
    """Where a stored tensor lands in the transformers layout, in any of the three namings.

    transformers' in-memory names stay; save_pretrained and released names are renamed (per-expert
    tensors become slices of the stacked experts); MTP tensors are SKIP; None marks an unknown key.
    """
    if key.startswith(("mtp.", "model.mtp.")):
        return SKIP
    if is_transformers_key(key):
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


def index_in_transformers_names(mapping: dict[str, int]) -> dict[str, int]:
    """An index's shard numbers keyed by transformers names (stacked experts go where their first piece is)."""
    out: dict[str, int] = {}
    for key, index in sorted(mapping.items(), key=lambda kv: kv[1]):
        slot = disk_slot(key)
        if slot is not None and slot is not SKIP:
            out.setdefault(slot.key, index)
    return out
