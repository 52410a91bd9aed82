"""The model end to end with ``attn_impl triton`` equals ``dense`` (Triton's interpreter, fp32): logits, the
indexer's KL and every gradient, on one sequence and on packed documents; the Triton kernels really ran."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.sharded import sample

SEQ = 128  # 32 CSA entries at the end against index_topk 16: the indexer really selects; one HCA entry
EOS = 1


def _pair(debug_args, mask: str):
    from titan_dsv4.model import DeepSeekV4Model

    models = []
    for impl in ("dense", "triton"):
        torch.manual_seed(0)
        args = debug_args.replace(
            max_seq_len=SEQ,
            attn_impl=impl,
            attn_mask_type=mask,
            indexer_loss_weight=1.0,
            indexer_warmup_steps=0,
        )
        models.append(DeepSeekV4Model(args))
        models[-1].init_weights()
    models[1].load_state_dict(models[0].state_dict())
    return [m.train() for m in models]


@pytest.mark.slow
@pytest.mark.parametrize("mask", ["causal", "block_causal"])
def test_triton_model_equals_dense(debug_args, mask):
    from titan_dsv4.infra.loss import deepseek_v4_loss
    from titan_dsv4.model import triton_attention, triton_indexer

    x, y = sample(0, SEQ)
    if mask == "block_causal":
        x[0, [40, 90]] = EOS  # three documents
    before = sum(triton_attention.LAUNCHES.values()), sum(triton_indexer.LAUNCHES.values())
    results = []
    for model in _pair(debug_args, mask):
        outputs = model(x)
        deepseek_v4_loss(outputs, y).backward()
        model.step_metrics.close_step()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((outputs[0].detach(), dict(model.step_metrics.closed), grads))
    (logits, metrics, grads), (t_logits, t_metrics, t_grads) = results
    assert (
        sum(triton_attention.LAUNCHES.values()) > before[0]
        and sum(triton_indexer.LAUNCHES.values()) > before[1]
    )
    torch.testing.assert_close(t_logits, logits, rtol=1e-4, atol=1e-4)
    assert metrics["indexer_kl_queries"] > 0
    for name in ("indexer_kl_sum", "indexer_kl_queries"):
        torch.testing.assert_close(t_metrics[name], metrics[name], rtol=1e-4, atol=1e-5)
    assert t_grads.keys() == grads.keys() and any(".indexer." in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(t_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
