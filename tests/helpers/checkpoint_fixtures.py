"""Tiny DeepSeek-V4 checkpoint folders for the checkpoint tests, written without the package's adapter.

* ``save_pretrained``: transformers' own writer (transformers 5 saves
``model.layers.i.attn.wq_a.weight``-style
  names and per-expert tensors);
* released: DeepSeek's names (``embed.weight``, ``layers.i.ffn.experts.j.w1.weight``, ``mtp.0.*``), renamed
here
  in the transformers -> released direction from the published naming, and checked by loading the folder
  back with transformers itself;
* quantized: the released folder stored as released: FP8 e4m3 128x128-block weights, FP4 e2m1 routed
  experts (e8m0 scales), BF16 embeddings/norms/router; the tests hand its float values to transformers as
  the reference.
"""

from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import save_file

from tests.helpers.hf_reference import build_hf_model
from titan_dsv4.model.hf_config import hf_config_from_args

_GLOBAL = {
    "model.embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "model.norm.weight": "norm.weight",
    "model.hc_head.hc_fn": "hc_head_fn",
    "model.hc_head.hc_base": "hc_head_base",
    "model.hc_head.hc_scale": "hc_head_scale",
}
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "attn_hc.fn": "hc_attn_fn",
    "attn_hc.base": "hc_attn_base",
    "attn_hc.scale": "hc_attn_scale",
    "ffn_hc.fn": "hc_ffn_fn",
    "ffn_hc.base": "hc_ffn_base",
    "ffn_hc.scale": "hc_ffn_scale",
    "self_attn.q_a_proj.weight": "attn.wq_a.weight",
    "self_attn.q_a_norm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight",
    "self_attn.kv_proj.weight": "attn.wkv.weight",
    "self_attn.kv_norm.weight": "attn.kv_norm.weight",
    "self_attn.o_a_proj.weight": "attn.wo_a.weight",
    "self_attn.o_b_proj.weight": "attn.wo_b.weight",
    "self_attn.sinks": "attn.attn_sink",
    "self_attn.compressor.kv_proj.weight": "attn.compressor.wkv.weight",
    "self_attn.compressor.gate_proj.weight": "attn.compressor.wgate.weight",
    "self_attn.compressor.kv_norm.weight": "attn.compressor.norm.weight",
    "self_attn.compressor.position_bias": "attn.compressor.ape",
    "self_attn.compressor.indexer.kv_proj.weight": "attn.indexer.compressor.wkv.weight",
    "self_attn.compressor.indexer.gate_proj.weight": "attn.indexer.compressor.wgate.weight",
    "self_attn.compressor.indexer.kv_norm.weight": "attn.indexer.compressor.norm.weight",
    "self_attn.compressor.indexer.position_bias": "attn.indexer.compressor.ape",
    "self_attn.compressor.indexer.q_b_proj.weight": "attn.indexer.wq_b.weight",
    "self_attn.compressor.indexer.scorer.weights_proj.weight": "attn.indexer.weights_proj.weight",
    "mlp.gate.weight": "ffn.gate.weight",
    "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.gate.tid2eid": "ffn.gate.tid2eid",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w1.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.w3.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2.weight",
}
# Stored FP8 in the released instruct checkpoints (V4 architecture spec, section 7.3); routed experts: FP4.
_FP8 = (
    "e_proj.weight",
    "h_proj.weight",
    "attn.wq_a.weight",
    "attn.wq_b.weight",
    "attn.wkv.weight",
    "attn.wo_a.weight",
    "attn.wo_b.weight",
    "attn.indexer.wq_b.weight",
    "ffn.shared_experts.w1.weight",
    "ffn.shared_experts.w2.weight",
    "ffn.shared_experts.w3.weight",
)
# Stored BF16 in those checkpoints; the mHC, HyperHead, sinks, ape and gate bias stay FP32.
_BF16 = (
    "enorm.weight",
    "hnorm.weight",
    "embed.weight",
    "head.weight",
    "norm.weight",
    "attn_norm.weight",
    "ffn_norm.weight",
    "attn.q_norm.weight",
    "attn.kv_norm.weight",
    "attn.compressor.norm.weight",
    "attn.indexer.compressor.norm.weight",
    "ffn.gate.weight",
    "attn.compressor.wkv.weight",
    "attn.compressor.wgate.weight",
    "attn.indexer.compressor.wkv.weight",
    "attn.indexer.compressor.wgate.weight",
    "attn.indexer.weights_proj.weight",
)
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def debug_args():
    from titan_dsv4.flavors import deepseek_v4_args

    return deepseek_v4_args["debugmodel"].replace()


def debug_hf_model(seed: int = 0):
    """A random transformers DeepseekV4ForCausalLM with exactly the debugmodel flavor's shapes (fp32)."""
    return build_hf_model(hf_config_from_args(debug_args()), seed=seed)


def released_tensors(hf_state: dict[str, torch.Tensor], n_experts: int) -> dict[str, torch.Tensor]:
    """transformers' in-memory state dict under DeepSeek's released names (experts split per expert)."""
    out = {}
    for key, value in hf_state.items():
        if key in _GLOBAL:
            out[_GLOBAL[key]] = value
            continue
        _, _, layer, rest = key.split(".", 3)
        if rest == "mlp.experts.gate_up_proj":
            w1, w3 = value.chunk(2, dim=1)
            for j in range(n_experts):
                out[f"layers.{layer}.ffn.experts.{j}.w1.weight"] = w1[j]
                out[f"layers.{layer}.ffn.experts.{j}.w3.weight"] = w3[j]
        elif rest == "mlp.experts.down_proj":
            for j in range(n_experts):
                out[f"layers.{layer}.ffn.experts.{j}.w2.weight"] = value[j]
        else:
            out[f"layers.{layer}.{_LAYER[rest]}"] = value
    return out


def legacy_config(args) -> dict:
    """The config.json in the released checkpoints' (legacy) keys, with the trailing MTP schedule entry."""
    c = hf_config_from_args(args)
    for key in ("layer_types", "mlp_layer_types", "partial_rotary_factor", "compress_rates"):
        c.pop(key)
    c.update(
        compress_ratios=list(args.compress_ratios) + [0],
        num_hash_layers=args.n_hash_layers,
        qk_rope_head_dim=args.rope_head_dim,
        compress_rate_csa=args.csa_ratio,
        compress_rate_hca=args.hca_ratio,
        num_nextn_predict_layers=1,
    )
    return c


def e8m0(exponent: torch.Tensor) -> torch.Tensor:
    """Power-of-two scales 2^exponent stored as e8m0 bytes (biased by 127)."""
    return (exponent + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def quantize_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e4m3 values, e8m0 block scales, the float values they stand for)."""
    rows, cols = w.shape
    br, bc = math.ceil(rows / block), math.ceil(cols / block)
    padded = torch.zeros(br * block, bc * block)
    padded[:rows, :cols] = w
    amax = padded.view(br, block, bc, block).abs().amax(dim=(1, 3)).clamp_min(1e-12)
    exponent = torch.ceil(torch.log2(amax / 448.0)).to(torch.int32)
    scale = (
        torch.pow(2.0, exponent.float()).repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
    )
    q = (w / scale).to(torch.float8_e4m3fn)
    return q, e8m0(exponent), q.float() * scale


def random_fp4(rows: int, cols: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed e2m1 bytes [rows, cols/2] as int8, e8m0 scales [rows, cols/32], their float values)."""
    codes = torch.randint(0, 16, (rows, cols), generator=g)
    exponent = torch.randint(-6, -2, (rows, cols // 32), generator=g).to(torch.int32)
    sign = torch.where(codes >= 8, -1.0, 1.0)
    values = sign * E2M1[codes % 8] * torch.pow(2.0, exponent.float()).repeat_interleave(32, dim=1)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    return packed, e8m0(exponent), values


def quantize_released(tensors: dict[str, torch.Tensor], seed: int = 0) -> tuple[dict, dict]:
    """(stored tensors as released: FP8/FP4 with .scale companions, BF16, FP32; the float value of each by
    name)."""
    g = torch.Generator().manual_seed(seed)
    stored, values = {}, {}
    for key, w in tensors.items():
        suffix = key.split(".", 2)[-1] if key.startswith(("layers.", "mtp.")) else key
        if ".ffn.experts." in key:
            stored[key], stored[key[: -len(".weight")] + ".scale"], values[key] = random_fp4(*w.shape, g)
        elif suffix in _FP8:
            stored[key], stored[key[: -len(".weight")] + ".scale"], values[key] = quantize_fp8(w)
        elif suffix in _BF16:
            stored[key] = w.bfloat16()
            values[key] = stored[key].float()
        else:
            stored[key] = w
    return stored, values


def write_shards(folder: str, tensors: dict[str, torch.Tensor], config: dict, n_shards: int = 2) -> None:
    """Round-robin shards (a weight and its scale, or one layer's experts, land in different files) +
    index."""
    os.makedirs(folder, exist_ok=True)
    names = sorted(tensors)
    files = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    weight_map = {k: files[i % n_shards] for i, k in enumerate(names)}
    for f in files:
        save_file(
            {k: tensors[k].contiguous() for k in names if weight_map[k] == f},
            os.path.join(folder, f),
            metadata={"format": "pt"},
        )
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)


def released_mtp_depth(args, g: torch.Generator, depth: int = 0) -> dict[str, torch.Tensor]:
    """A whole MTP depth under DeepSeek's released names (spec section 6 / 7.2), random fp32 values: the
    block is a sliding-window block (no compressor) with a learned router, plus e_proj / h_proj, three
    norms and its own HyperHead."""
    D, n, H, d, q = args.dim, args.hc_mult, args.n_heads, args.head_dim, args.q_lora_rank
    E, inter, g_o = args.moe_args.num_experts, args.moe_inter_dim, args.o_groups * args.o_lora_rank
    shapes = {
        "e_proj.weight": (D, D),
        "h_proj.weight": (D, D),
        "enorm.weight": (D,),
        "hnorm.weight": (D,),
        "norm.weight": (D,),
        "hc_head_fn": (n, n * D),
        "hc_head_base": (n,),
        "hc_head_scale": (1,),
        "attn_norm.weight": (D,),
        "ffn_norm.weight": (D,),
        "hc_attn_fn": ((2 + n) * n, n * D),
        "hc_attn_base": ((2 + n) * n,),
        "hc_attn_scale": (3,),
        "hc_ffn_fn": ((2 + n) * n, n * D),
        "hc_ffn_base": ((2 + n) * n,),
        "hc_ffn_scale": (3,),
        "attn.wq_a.weight": (q, D),
        "attn.q_norm.weight": (q,),
        "attn.wq_b.weight": (H * d, q),
        "attn.wkv.weight": (d, D),
        "attn.kv_norm.weight": (d,),
        "attn.wo_a.weight": (g_o, H * d // args.o_groups),
        "attn.wo_b.weight": (D, g_o),
        "attn.attn_sink": (H,),
        "ffn.gate.weight": (E, D),
        "ffn.gate.bias": (E,),
        "ffn.shared_experts.w1.weight": (inter, D),
        "ffn.shared_experts.w3.weight": (inter, D),
        "ffn.shared_experts.w2.weight": (D, inter),
    }
    for j in range(E):
        shapes.update(
            {
                f"ffn.experts.{j}.w1.weight": (inter, D),
                f"ffn.experts.{j}.w3.weight": (inter, D),
                f"ffn.experts.{j}.w2.weight": (D, inter),
            }
        )
    out = {}
    for name, shape in shapes.items():
        if name.endswith(("norm.weight", "scale")):
            out[f"mtp.{depth}.{name}"] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[f"mtp.{depth}.{name}"] = 0.05 * torch.randn(shape, generator=g)
    return out


def mtp_tensors(args) -> dict[str, torch.Tensor]:
    """A few of the released MTP block's tensors (not trained here; the loader must skip them)."""
    return {
        "mtp.0.e_proj.weight": torch.zeros(args.dim, args.dim),
        "mtp.0.enorm.weight": torch.ones(args.dim),
        "mtp.0.attn.wq_a.weight": torch.zeros(args.q_lora_rank, args.dim),
    }


def reference_with(hf_model, values: dict[str, torch.Tensor], n_experts: int):
    """A copy of ``hf_model`` whose weights are the values the released storage holds."""
    import copy

    ref = copy.deepcopy(hf_model)
    state = ref.state_dict()
    inverse_layer = {v: k for k, v in _LAYER.items()}
    inverse_global = {v: k for k, v in _GLOBAL.items()}
    with torch.no_grad():
        for key, value in values.items():
            if key in inverse_global:
                state[inverse_global[key]].copy_(value)
                continue
            _, layer, rest = key.split(".", 2)
            if rest.startswith("ffn.experts."):
                _, _, j, w, _ = rest.split(".")
                if w == "w2":
                    state[f"model.layers.{layer}.mlp.experts.down_proj"][int(j)].copy_(value)
                else:
                    half = state[f"model.layers.{layer}.mlp.experts.gate_up_proj"][int(j)].chunk(2, dim=0)
                    half[0 if w == "w1" else 1].copy_(value)
            else:
                state[f"model.layers.{layer}.{inverse_layer[rest]}"].copy_(value)
    return ref


def make_checkpoints(root: str, seed: int = 0) -> dict:
    """save_pretrained, released and quantized folders of one random debugmodel-shaped model, plus
    references."""
    args = debug_args()
    hf = debug_hf_model(seed)
    n_experts = args.moe_args.num_experts
    folders = {name: os.path.join(root, name) for name in ("save_pretrained", "released", "quantized")}
    hf.save_pretrained(folders["save_pretrained"])
    released = released_tensors(hf.state_dict(), n_experts)
    write_shards(folders["released"], {**released, **mtp_tensors(args)}, legacy_config(args))
    stored, values = quantize_released(released, seed)
    config = {
        **legacy_config(args),
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "scale_fmt": "ue8m0",
            "weight_block_size": [128, 128],
        },
    }
    write_shards(folders["quantized"], {**stored, **mtp_tensors(args)}, config, n_shards=3)
    return {
        "folders": folders,
        "hf": hf,
        "quantized_reference": reference_with(hf, values, n_experts),
        "values": values,
    }


def load_through_adapter(folder: str, args=None):
    """Our model loaded through the adapter exactly as Titan's HF load does: to_hf -> reader -> from_hf."""
    import torch.distributed.checkpoint as dcp

    from titan_dsv4.checkpoint.adapter import DeepSeekV4CheckpointAdapter
    from titan_dsv4.model import DeepSeekV4Model

    args = args or debug_args().replace(max_seq_len=256)
    model = DeepSeekV4Model(args)
    model.init_weights()
    adapter = DeepSeekV4CheckpointAdapter(args, None)
    hf_state = adapter.to_hf(model.state_dict())
    dcp.load(hf_state, storage_reader=adapter.get_hf_storage_reader(folder), no_dist=True)
    model.load_state_dict(adapter.from_hf(hf_state))
    return model.eval()
