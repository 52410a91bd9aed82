"""Numerical parity with transformers' DeepseekV4ForCausalLM (fp32) and the state-dict adapter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_reference import TINY_HF_CONFIG, build_hf_model, build_ours_from_hf

SEQ = 300  # > 2 x 128: two complete HCA windows plus a partial one; 75 CSA entries > index_topk 8


@pytest.fixture(scope="module", params=["sparse", "dense"])
def pair(request):
    """(transformers model, ours with the fast or the reference attention kernel, ...)."""
    hf = build_hf_model()
    ours, args, adapter = build_ours_from_hf(hf, SEQ, attn_impl=request.param)
    tokens = torch.randint(0, TINY_HF_CONFIG["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(3))
    return hf, ours, args, adapter, tokens


def _loss(logits, tokens):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def test_schedule_covers_every_kind(pair):
    _, ours, args, _, _ = pair
    assert [args.layer_type(i) for i in range(args.n_layers)] == [
        "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention", "compressed_sparse_attention",
    ]
    assert [ours.layers[str(i)].moe.router.hash_routed for i in range(4)] == [True, True, False, False]


def test_indexer_really_selects(pair):
    _, ours, args, _, tokens = pair
    attn = ours.layers["1"].self_attn
    x = torch.randn(2, SEQ, args.dim)
    q_latent = attn.q_norm(attn.wq_a(x))
    picked = attn.compressor.indexer(x, q_latent, ours.rope)
    visible_counts = (torch.arange(SEQ) + 1) // args.csa_ratio
    # late queries see more entries than top-k, so the indexer drops some
    assert (visible_counts > args.index_topk).any()
    assert picked.shape[-1] == args.index_topk
    assert ((picked >= 0).sum(-1)[:, -1] == args.index_topk).all()


def test_logits_loss_and_gradients_match_transformers(pair):
    hf, ours, _, adapter, tokens = pair
    hf.zero_grad()
    ours.zero_grad()
    hf_logits = hf(input_ids=tokens).logits
    our_logits = ours(tokens)
    assert our_logits.shape == (2, SEQ, TINY_HF_CONFIG["vocab_size"])
    assert (hf_logits - our_logits).abs().max().item() <= 1e-4
    hf_loss, our_loss = _loss(hf_logits, tokens), _loss(our_logits, tokens)
    assert abs(hf_loss.item() - our_loss.item()) <= 1e-4
    hf_loss.backward()
    our_loss.backward()
    our_grads = adapter.to_hf({n: p.grad for n, p in ours.named_parameters() if p.grad is not None})
    hf_grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    assert set(our_grads) == set(hf_grads)
    kinds = [
        "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.hc_head.hc_fn",
        "model.layers.0.attn_hc.fn", "model.layers.3.ffn_hc.scale", "model.layers.0.self_attn.sinks",
        "model.layers.1.self_attn.q_b_proj.weight", "model.layers.1.self_attn.o_a_proj.weight",
        "model.layers.1.self_attn.compressor.kv_proj.weight", "model.layers.1.self_attn.compressor.position_bias",
        "model.layers.2.self_attn.compressor.gate_proj.weight", "model.layers.2.self_attn.compressor.position_bias",
        "model.layers.0.mlp.gate.weight", "model.layers.3.mlp.gate.weight", "model.layers.2.mlp.experts.gate_up_proj",
        "model.layers.2.mlp.experts.down_proj", "model.layers.1.mlp.shared_experts.up_proj.weight",
    ]
    for name in kinds:
        scale = hf_grads[name].abs().max().clamp_min(1e-6)
        assert (our_grads[name] - hf_grads[name]).abs().max() <= 1e-4 * scale + 1e-7, name
    # as in transformers, the indexer gets no gradient from the LM loss
    assert not any(".indexer." in n for n in our_grads)


def test_adapter_round_trip_is_identity(pair):
    hf, ours, _, adapter, _ = pair
    ours_sd = ours.state_dict()
    back = adapter.from_hf(adapter.to_hf(ours_sd))
    assert set(back) == set(ours_sd)
    assert all(torch.equal(back[k], ours_sd[k]) for k in ours_sd)
    hf_sd = hf.state_dict()
    assert set(adapter.to_hf(ours_sd)) == set(hf_sd)
    hf_back = adapter.to_hf(adapter.from_hf(hf_sd))
    assert all(torch.equal(hf_back[k], hf_sd[k]) for k in hf_sd)


def test_from_hf_config_legacy_and_modern_forms_agree(pair):
    from titan_dsv4.model import DeepSeekV4ModelArgs

    hf, _, args, _, _ = pair
    legacy = DeepSeekV4ModelArgs.from_hf_config(TINY_HF_CONFIG)
    modern = DeepSeekV4ModelArgs.from_hf_config(hf.config.to_dict())
    exported = DeepSeekV4ModelArgs.from_hf_config(args.to_hf_config())
    for other in (legacy, modern, exported):
        other.max_seq_len, other.attn_impl = args.max_seq_len, args.attn_impl
        assert other == args
    assert legacy.compress_ratios == [0, 4, 128, 4]  # the trailing MTP entry is dropped
    assert legacy.n_hash_layers == 2 and legacy.rope_head_dim == 16


def test_from_hf_config_rejects_other_models_and_missing_schedule():
    from titan_dsv4.model import ConfigError, DeepSeekV4ModelArgs

    with pytest.raises(ConfigError, match="model_type='llama'"):
        DeepSeekV4ModelArgs.from_hf_config({**TINY_HF_CONFIG, "model_type": "llama"})
    no_schedule = {k: v for k, v in TINY_HF_CONFIG.items() if k != "compress_ratios"}
    with pytest.raises(ConfigError, match="refusing to guess"):
        DeepSeekV4ModelArgs.from_hf_config(no_schedule)
