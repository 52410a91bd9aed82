"""A tiny random transformers DeepSeek-V4 and the same weights in our model, for parity tests."""

from __future__ import annotations

import torch


def build_hf_model(config: dict, seed: int = 0):
    """A transformers DeepseekV4ForCausalLM in fp32 with every parameter and buffer randomised."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = dict(config)
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


def build_ours(args, hf_model, seq_len: int, attn_impl: str = "sparse"):
    """Our model built from ``args`` with the converted weights of ``hf_model`` (fp32, eval)."""
    from titan_dsv4.model import DeepSeekV4Model
    from titan_dsv4.model.state_dict_adapter import DeepSeekV4StateDictAdapter

    args = args.replace(max_seq_len=seq_len, attn_impl=attn_impl, mtp_layers=0)  # transformers builds no MTP
    model = DeepSeekV4Model(args)
    model.init_weights()
    model.load_state_dict(DeepSeekV4StateDictAdapter(args, None).from_hf(hf_model.state_dict()), strict=True)
    return model.eval()
