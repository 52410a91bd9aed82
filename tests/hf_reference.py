"""A tiny random transformers DeepSeek-V4 and the same weights in our model, for parity tests."""

from __future__ import annotations

import torch

TINY_HF_CONFIG = dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=32,
    qk_rope_head_dim=16,
    q_lora_rank=32,
    o_groups=2,
    o_lora_rank=16,
    sliding_window=16,
    # sliding, CSA, HCA, CSA (+ the trailing MTP entry of the released legacy format)
    compress_ratios=[0, 4, 128, 4, 0],
    num_hash_layers=2,
    index_n_heads=8,
    index_head_dim=16,
    index_topk=8,
    hc_mult=4,
    hc_sinkhorn_iters=20,
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    routed_scaling_factor=1.5,
    swiglu_limit=10.0,
    rope_theta=10000.0,
    compress_rope_theta=160000.0,
    rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1},
    max_position_embeddings=4096,
    model_type="deepseek_v4",
)


def build_hf_model(config: dict | None = None, seed: int = 0):
    """A transformers DeepseekV4ForCausalLM in fp32 with every parameter and buffer randomised."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = dict(config or TINY_HF_CONFIG)
    cfg.pop("model_type", None)
    hf_config = DeepseekV4Config(**cfg)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(hf_config).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("sinks", "position_bias", "base")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.endswith(("scale", "hc_scale")) and p.numel() <= 3:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                keys = torch.rand(b.shape[0], hf_config.n_routed_experts, generator=g)
                b.copy_(keys.topk(b.shape[1], dim=-1).indices)
            elif name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model


def hf_config_dict(model) -> dict:
    return model.config.to_dict()


def build_ours_from_hf(hf_model, seq_len: int, attn_impl: str = "sparse"):
    """Our model with the converted weights of ``hf_model``, fp32."""
    from titan_dsv4.model import DeepSeekV4Model, DeepSeekV4ModelArgs
    from titan_dsv4.model.state_dict_adapter import DeepSeekV4StateDictAdapter

    args = DeepSeekV4ModelArgs.from_hf_config(hf_model.config.to_dict())
    args.max_seq_len = seq_len
    args.attn_impl = attn_impl
    model = DeepSeekV4Model(args)
    model.init_weights()
    adapter = DeepSeekV4StateDictAdapter(args, None)
    hf_sd = {k: v for k, v in hf_model.state_dict().items()}
    missing, unexpected = model.load_state_dict(adapter.from_hf(hf_sd), strict=True)
    return model, args, adapter
