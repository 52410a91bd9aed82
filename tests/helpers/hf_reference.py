"""A tiny random transformers DeepSeek-V4 and the same weights in our model, for parity tests."""

from __future__ import annotations

import contextlib
import functools

import torch


@contextlib.contextmanager
def topk_ties_by_index():
    """``Tensor.topk`` whose ties go to the lower index (a stable sort): our indexer's documented rule.

    torch promises no order among equal values, and ReLU makes exact-zero indexer scores common, so
    transformers' picks among ties are whatever CPU topk returns; its reference runs under this rule.
    """
    original = torch.Tensor.topk

    def topk(self, k, dim=-1, largest=True, sorted=True):
        values, indices = torch.sort(self, dim=dim, descending=largest, stable=True)
        return torch.return_types.topk((values.narrow(dim, 0, k), indices.narrow(dim, 0, k)))

    torch.Tensor.topk = topk
    try:
        yield
    finally:
        torch.Tensor.topk = original


def _indexer_ties_by_index() -> None:
    """transformers' Lightning Indexer forward under ``topk_ties_by_index`` (once per process)."""
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf

    forward = hf.DeepseekV4Indexer.forward
    if getattr(forward, "ties_by_index", False):
        return

    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        with topk_ties_by_index():
            return forward(*args, **kwargs)

    wrapped.ties_by_index = True
    hf.DeepseekV4Indexer.forward = wrapped


def build_hf_model(config: dict, seed: int = 0):
    """A transformers DeepseekV4ForCausalLM in fp32 with every parameter and buffer randomised."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    _indexer_ties_by_index()
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
