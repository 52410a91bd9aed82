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
            n_layers=2,  # one CSA and one HCA layer: the kernels' paths
            compress_ratios=[4, 128],
            n_hash_layers=1,
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


def test_triton_indexer_takes_bf16_queries_and_fp32_island_keys(debug_args):
    """Under FSDP's bf16 policy the indexer's keys come from an fp32 island and its queries from bf16
    weights: the Triton picks and KL scores run on them (in fp32) and equal the torch path's."""
    from titan_dsv4.model.indexer import Indexer, IndexerScoring

    args = debug_args.replace(attn_impl="triton", indexer_loss_weight=1.0)
    g = torch.Generator().manual_seed(0)
    S, T, nI, dI = 32, 8, args.index_n_heads, args.index_head_dim
    q = torch.randint(-3, 4, (1, S, nI, dI), generator=g).to(torch.bfloat16)  # exact in bf16: exact scores
    keys = torch.randint(-3, 4, (1, T, dI), generator=g).float()
    head_w = torch.randint(1, 4, (1, S, nI), generator=g).float()
    scoring = IndexerScoring(keys, q, head_w)
    indexer = Indexer(args)
    picked = indexer.pick(scoring, None)
    indexer.triton = False
    assert torch.equal(picked, indexer.pick(scoring, None))
    target = torch.rand(1, S, picked.shape[-1], generator=g)
    reference = indexer.kl_sum(scoring, target, None, picked)
    indexer.triton = True
    for got, expected in zip(indexer.kl_sum(scoring, target, None, picked), reference):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
