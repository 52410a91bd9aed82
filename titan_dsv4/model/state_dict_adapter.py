"""Our parameter names <-> transformers' in-memory ``DeepseekV4ForCausalLM`` names (a name map, as Titan's
are).

``to_hf`` / ``from_hf`` are inverses. The one reshape: transformers fuses the routed experts' gate and up
projections, ``gate_up_proj [E, 2I, D] = cat(w1, w3)``. Reading other namings (save_pretrained, DeepSeek's
released layout, FP8/FP4 storage), checking a folder against the model and completing exports live in
``titan_dsv4.checkpoint``.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torchtitan.protocols.state_dict_adapter import StateDictAdapter

from .args import DeepSeekV4ModelArgs

# Per-block renames, ours -> transformers (suffix after "layers.{i}." / "model.layers.{i}.").
BLOCK_RENAMES = {
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
    "self_attn.compressor.indexer.weights_proj.weight": (
        "self_attn.compressor.indexer.scorer.weights_proj.weight"
    ),
    "moe.router.gate.weight": "mlp.gate.weight",
    "moe.expert_bias": "mlp.gate.e_score_correction_bias",
    "moe.router.tid2eid": "mlp.gate.tid2eid",
    "moe.experts.w2": "mlp.experts.down_proj",
    "moe.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "moe.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "moe.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
}
GLOBAL_RENAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "hc_head.hc_fn": "model.hc_head.hc_fn",
    "hc_head.hc_base": "model.hc_head.hc_base",
    "hc_head.hc_scale": "model.hc_head.hc_scale",
}
# Per MTP depth, outside its block: ours (after "mtp.layers.{k}.") -> after "mtp.{k}." (the released
# checkpoints' names, which transformers does not build: its loader drops mtp.* keys).
MTP_RENAMES = {
    "e_proj.weight": "e_proj.weight",
    "h_proj.weight": "h_proj.weight",
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "norm.weight": "norm.weight",
    "hc_head.hc_fn": "hc_head.hc_fn",
    "hc_head.hc_base": "hc_head.hc_base",
    "hc_head.hc_scale": "hc_head.hc_scale",
}
# The routed experts' gate (w1) and up (w3) projections become the two row halves of gate_up_proj.
W1, W3, GATE_UP = "moe.experts.w1", "moe.experts.w3", "mlp.experts.gate_up_proj"
HASH_TABLE = "mlp.gate.tid2eid"  # transformers' name (suffix) of the int64 token -> experts table

_FROM_HF_BLOCK = {v: k for k, v in BLOCK_RENAMES.items()}
_FROM_HF_GLOBAL = {v: k for k, v in GLOBAL_RENAMES.items()}
_FROM_HF_MTP = {v: k for k, v in MTP_RENAMES.items()}
# (our prefix pattern, transformers-layout prefix, the renames outside a block, our block prefix)
_OURS = (
    (re.compile(r"^layers\.(\d+)\.(.+)$"), "model.layers.{}.", {}, ""),
    (re.compile(r"^mtp\.layers\.(\d+)\.(.+)$"), "mtp.{}.", MTP_RENAMES, "block."),
)
_THEIRS = (
    (re.compile(r"^model\.layers\.(\d+)\.(.+)$"), "layers.{}.", {}, ""),
    (re.compile(r"^mtp\.(\d+)\.(.+)$"), "mtp.layers.{}.", _FROM_HF_MTP, "block."),
)


def _match(key: str, table):
    """((index, rest), prefix, renames outside the block, block prefix) of the first pattern matching key."""
    for pattern, prefix, outside, block in table:
        m = pattern.match(key)
        if m is not None:
            return m.groups(), prefix, outside, block
    return None


class UnmappedKeyError(KeyError):
    """A key this name map does not know (wrong model type, or a missing rename)."""


def is_transformers_key(key: str) -> bool:
    """True for transformers' DeepseekV4ForCausalLM names (and this map's ``mtp.{k}.`` names for MTP)."""
    if key in _FROM_HF_GLOBAL:
        return True
    found = _match(key, _THEIRS)
    if found is None:
        return False
    (_, rest), _, outside, _ = found
    return rest in outside or rest in _FROM_HF_BLOCK or rest == GATE_UP


class DeepSeekV4StateDictAdapter(StateDictAdapter):
    """Titan ``StateDictAdapter``: our module names <-> transformers' ``DeepseekV4ForCausalLM`` names.

    MTP depths (which transformers does not build) map to ``mtp.{k}.`` plus the same block names.
    """

    def __init__(self, model_args: DeepSeekV4ModelArgs, hf_assets_path: str | None):
        super().__init__(model_args, hf_assets_path)
        self.model_args = model_args

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        hf: dict[str, Any] = {}
        for key, value in state_dict.items():
            if key in GLOBAL_RENAMES:
                hf[GLOBAL_RENAMES[key]] = value
                continue
            found = _match(key, _OURS)
            if found is None:
                raise UnmappedKeyError(f"no transformers name for parameter {key!r}")
            (index, rest), prefix, outside, block = found
            theirs, ours = prefix.format(index), key[: len(key) - len(rest)]
            if rest in outside:
                hf[theirs + outside[rest]] = value
            elif rest == block + W1:
                hf[theirs + GATE_UP] = torch.cat([value, state_dict[ours + block + W3]], dim=1)
            elif rest == block + W3:
                continue  # folded into gate_up_proj with w1
            elif rest.startswith(block) and rest[len(block) :] in BLOCK_RENAMES:
                hf[theirs + BLOCK_RENAMES[rest[len(block) :]]] = value
            else:
                raise UnmappedKeyError(f"no transformers name for parameter {key!r}")
        return hf

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        ours: dict[str, Any] = {}
        for key, value in hf_state_dict.items():
            if key in _FROM_HF_GLOBAL:
                ours[_FROM_HF_GLOBAL[key]] = value
                continue
            found = _match(key, _THEIRS)
            if found is None:
                raise UnmappedKeyError(
                    f"checkpoint key {key!r} is not a DeepSeek-V4 (transformers layout) key"
                )
            (index, rest), prefix, outside, block = found
            mine = prefix.format(index)
            if rest in outside:
                ours[mine + outside[rest]] = value
            elif rest == GATE_UP:
                ours[mine + block + W1], ours[mine + block + W3] = value.chunk(2, dim=1)
            elif rest in _FROM_HF_BLOCK:
                ours[mine + block + _FROM_HF_BLOCK[rest]] = value
            else:
                raise UnmappedKeyError(
                    f"checkpoint key {key!r} is not a DeepSeek-V4 (transformers layout) key"
                )
        return ours
