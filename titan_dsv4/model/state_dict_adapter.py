"""Maps transformers' DeepSeek-V4 parameter names to ours and back (round trip is the identity)."""

from __future__ import annotations

import re
from typing import Any

import torch

from torchtitan.protocols.state_dict_adapter import StateDictAdapter

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


class UnmappedKeyError(KeyError):
    """A checkpoint key this adapter does not know (wrong model type, or a missing rename)."""


class DeepSeekV4StateDictAdapter(StateDictAdapter):
    """Titan ``StateDictAdapter`` between our module names and transformers' ``DeepseekV4ForCausalLM``."""

    def __init__(self, model_args: DeepSeekV4ModelArgs, hf_assets_path: str | None):
        super().__init__(model_args, hf_assets_path)
        self.model_args = model_args

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
