"""``fp32_compute``: every part is a no-op on fp32 activations and changes a bf16 forward; "experts" is fp32
SwiGLU with the routing weight applied before W2, exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from titan_dsv4.model import DeepSeekV4Model
from titan_dsv4.model.args import FP32_COMPUTE_PARTS, v4_moe_args
from titan_dsv4.model.attention import Attention
from titan_dsv4.model.model import TransformerBlock
from titan_dsv4.model.moe import DeepSeekV4MoE, DeepSeekV4Router

SEQ = 64  # 16 CSA entries (more than index_topk = 4, so the indexer selects) and 4 complete HCA windows
KERNELS = ["sparse", "dense"]
SINGLE_AND_ALL = [(p,) for p in FP32_COMPUTE_PARTS] + [FP32_COMPUTE_PARTS]


def tiny_args(debug_args, parts=(), attn_impl="sparse"):
    """Every layer kind (sliding, CSA, HCA, CSA) and both MoE kinds, at widths that run in milliseconds."""
    return debug_args.replace(
        vocab_size=128, dim=64, n_heads=2, head_dim=32, rope_head_dim=16, q_lora_rank=32, o_lora_rank=16,
        sliding_window=16, hca_ratio=16, compress_ratios=[0, 4, 16, 4], index_n_heads=2, index_head_dim=16,
        index_topk=4, moe_inter_dim=32, max_seq_len=SEQ, attn_impl=attn_impl, fp32_compute=tuple(parts),
    )  # fmt: skip


def seeded_model(args) -> DeepSeekV4Model:
    torch.manual_seed(0)
    model = DeepSeekV4Model(args)
    model.init_weights()
    return model


def same_weights(model: DeepSeekV4Model, args) -> DeepSeekV4Model:
    """A model built from ``args`` (other fp32_compute parts) holding ``model``'s weights and buffers."""
    twin = DeepSeekV4Model(args)
    twin.load_state_dict(model.state_dict())
    return twin


def tokens(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 128, (batch, SEQ), generator=torch.Generator().manual_seed(1))


def logits_and_grads(model: DeepSeekV4Model, x: torch.Tensor):
    logits, _ = model(x)
    F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten()).backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn_impl", KERNELS)
@pytest.mark.parametrize("parts", SINGLE_AND_ALL, ids=lambda p: "+".join(p))
def test_fp32_activations_make_every_part_a_no_op(debug_args, one_thread, parts, attn_impl):
    """An fp32 run is the reference the parts approximate: switching them on must not move a bit."""
    base = seeded_model(tiny_args(debug_args, (), attn_impl))
    with_parts = same_weights(base, tiny_args(debug_args, parts, attn_impl))
    x = tokens()
    ref_logits, ref_grads = logits_and_grads(base, x)
    logits, grads = logits_and_grads(with_parts, x)
    assert torch.equal(logits, ref_logits)
    assert grads.keys() == ref_grads.keys()
    assert all(torch.equal(grads[n], ref_grads[n]) for n in grads)


def site_outputs(model: DeepSeekV4Model, site: type, x: torch.Tensor) -> list[torch.Tensor]:
    """The first output tensor of every ``site`` module in one no-grad forward."""
    outputs = []

    def hook(module, inputs, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, site)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return outputs


# Where each part acts: the router's output is its routing weights, a block's its streams.
PART_SITES = {
    "attention_logits": Attention,
    "router": DeepSeekV4Router,
    "experts": DeepSeekV4MoE,
    "hc_mixing": TransformerBlock,
}


@pytest.mark.parametrize("attn_impl", KERNELS)
@pytest.mark.parametrize("part", FP32_COMPUTE_PARTS)
def test_each_part_changes_a_bf16_forward(debug_args, part, attn_impl):
    """A part that left its bf16 computation unchanged would be switched on for nothing (or not wired)."""
    base = seeded_model(tiny_args(debug_args, (), attn_impl)).to(torch.bfloat16).eval()
    with_part = same_weights(base, tiny_args(debug_args, (part,), attn_impl)).to(torch.bfloat16).eval()
    x = tokens()
    off, on = site_outputs(base, PART_SITES[part], x), site_outputs(with_part, PART_SITES[part], x)
    assert len(on) == len(off) > 0
    assert any(not torch.equal(a, b) for a, b in zip(on, off))


# ---- "experts": a hand-checkable MoE --------------------------------------------------------------------
# Two tokens of width 4, two experts of width 2, both experts chosen by both tokens. Every matmul input is
# a small dyadic number, so the projections are exact in bf16 and the only roundings are the ones the
# definition names. Token 0's gate (12) exceeds swiglu_limit (10). The routing weights are exact in bf16
# but not powers of two, so weighting before or after W2 rounds differently.
X = [[1.0, 0.0, 2.0, -1.0], [0.5, 1.0, 0.0, 3.0]]
W1 = [[[4, 0, 4, 0], [0, 1, 0, 0]], [[1, 1, 1, 1], [-1, 0, 0, 1]]]  # [expert, hidden, dim]
W3 = [[[1, 0, 0, 0], [0, 0, 1, 1]], [[0, 2, 0, 0], [1, 0, 0, -1]]]
W2 = [[[1, 0], [0, 1], [1, -1], [0.5, 2]], [[1, 1], [0, -1], [2, 0], [-0.5, 0.25]]]  # [expert, dim, hidden]
SELECTED = [[1, 0], [0, 1]]
WEIGHTS = [[0.375, 1.125], [1.25, 0.25]]  # renormalised and scaled by route_scale 1.5 (each row sums to 1.5)
LIMIT = 10.0


def hand_checkable_moe(debug_args, parts) -> DeepSeekV4MoE:
    """The MoE above in bf16, its shared expert silenced and its router replaced by SELECTED / WEIGHTS."""
    args = debug_args.replace(dim=4, moe_inter_dim=2, swiglu_limit=LIMIT, fp32_compute=tuple(parts))
    args.moe_args = v4_moe_args(num_experts=2, top_k=2)
    moe = DeepSeekV4MoE(args, hash_routed=False)
    with torch.no_grad():
        moe.init_weights(0.02, None)
        moe.experts.w1.copy_(torch.tensor(W1))
        moe.experts.w3.copy_(torch.tensor(W3))
        moe.experts.w2.copy_(torch.tensor(W2))
        moe.shared_experts.w2.weight.zero_()
    selected = torch.tensor(SELECTED)
    routing = (torch.tensor(WEIGHTS), selected, torch.bincount(selected.flatten(), minlength=2))
    moe.router.register_forward_hook(lambda module, inputs, output: routing)
    return moe.to(torch.bfloat16)


def fp32_swiglu_rows(x: torch.Tensor, weight_before_w2: bool = True) -> torch.Tensor:
    """The definition, token by token: h = w * SwiGLU(x W1, x W3) in fp32, rounded once to bf16, then h W2
    (rounded to bf16 as a bf16 matmul does), the k rows summed in fp32 and cast to bf16. With
    ``weight_before_w2=False``, w multiplies h W2 instead (in fp32, as the bf16 path without the part)."""
    out = torch.zeros(x.shape[0], x.shape[1])
    for t in range(x.shape[0]):
        for e, w in zip(SELECTED[t], WEIGHTS[t]):
            gate = x[t].float() @ torch.tensor(W1[e], dtype=torch.float32).T
            up = x[t].float() @ torch.tensor(W3[e], dtype=torch.float32).T
            h = F.silu(gate.clamp(max=LIMIT)) * up.clamp(min=-LIMIT, max=LIMIT)
            h = (h * w).bfloat16() if weight_before_w2 else h.bfloat16()
            y = (h.float() @ torch.tensor(W2[e], dtype=torch.float32).T).bfloat16().float()
            out[t] += y if weight_before_w2 else w * y
    return out.bfloat16()


def test_experts_part_is_fp32_swiglu_weighted_before_w2(debug_args):
    x = torch.tensor(X, dtype=torch.bfloat16)
    expected = fp32_swiglu_rows(x)
    with torch.no_grad():
        on = hand_checkable_moe(debug_args, ("experts",))(x.view(1, 2, 4)).view(2, 4)
        off = hand_checkable_moe(debug_args, ())(x.view(1, 2, 4)).view(2, 4)
    assert on.dtype == torch.bfloat16
    assert torch.equal(on, expected)
    # the case tells the orders apart: weighting after W2, or a bf16 SwiGLU (the part off), rounds otherwise
    assert not torch.equal(fp32_swiglu_rows(x, weight_before_w2=False), expected)
    assert not torch.equal(off, expected)
    torch.testing.assert_close(off, expected, rtol=2e-2, atol=0)  # the same function otherwise


def _section(*flags: str):
    """The [deepseek_v4] section Titan parses from the debug config and ``flags``."""
    from pathlib import Path

    from torchtitan.config import ConfigManager

    config = Path(__file__).parents[2] / "train_configs" / "debug_model.toml"
    return ConfigManager().parse_args(["--job.config_file", str(config), *flags]).deepseek_v4


@pytest.mark.parametrize(
    "flag, expected",
    [
        ([], ("attention_logits", "hc_mixing")),  # the default the numerics report chose
        (["--deepseek_v4.fp32_compute", ""], ()),
        (["--deepseek_v4.fp32_compute", "router,experts"], ("router", "experts")),
    ],
)
def test_fp32_compute_from_the_command_line(debug_args, flag, expected):
    debug_args.apply_section(_section(*flag))
    assert debug_args.fp32_compute == list(expected)


def test_an_unknown_part_is_refused(debug_args):
    from titan_dsv4.model import ConfigError

    debug_args.apply_section(_section("--deepseek_v4.fp32_compute", "none"))
    with pytest.raises(ConfigError, match=r"fp32_compute names unknown parts \['none'\]"):
        debug_args.validate()


@pytest.mark.parametrize(
    "equation, a_shape, b_shape",
    [
        ("bhnqd,bnkd->bhnqk", (2, 3, 4, 5, 8), (2, 4, 10, 8)),  # window blocks
        ("bhsd,btd->bhst", (2, 3, 7, 8), (2, 6, 8)),  # HCA entries
        ("bhsd,bskd->bhsk", (2, 3, 7, 8), (2, 7, 5, 8)),  # CSA's gathered picks
    ],
)
def test_fp32_logits_save_the_bf16_inputs_and_match_autograd(equation, a_shape, b_shape):
    from titan_dsv4.model.kernels import _Fp32Einsum

    torch.manual_seed(0)
    a = torch.randn(a_shape, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(b_shape, dtype=torch.bfloat16, requires_grad=True)
    reference = torch.einsum(equation, a.float(), b.float())
    grad = torch.randn(reference.shape)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        out = _Fp32Einsum.apply(equation, a, b)
    assert saved == [torch.bfloat16, torch.bfloat16]  # no fp32 copy of the keys kept for backward
    assert torch.equal(out, reference)
    for mine, theirs in zip(
        torch.autograd.grad(out, (a, b), grad), torch.autograd.grad(reference, (a, b), grad)
    ):
        assert mine.dtype == torch.bfloat16
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
