"""Lightning Indexer distillation: the KL trains the indexer and nothing else; weight 0 freezes it."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.sharded import sample

SEQ = 256  # 64 CSA entries per query at the end, against index_topk 16: the indexer really selects


def _model(debug_args, weight: float, warmup: int = 0, seed: int = 0):
    from titan_dsv4.model import DeepSeekV4Model

    torch.manual_seed(seed)
    model = DeepSeekV4Model(
        debug_args.replace(max_seq_len=SEQ, indexer_loss_weight=weight, indexer_warmup_steps=warmup)
    )
    model.init_weights()
    return model.train()


def _is_indexer(name: str) -> bool:
    return ".indexer." in name


def test_kl_trains_only_the_indexer(debug_args, one_thread):
    """The LM-loss gradients of every non-indexer parameter are those of a frozen-indexer model."""
    from titan_dsv4.infra.loss import deepseek_v4_loss

    on, off = _model(debug_args, 1.0), _model(debug_args, 0.0)
    off.load_state_dict(on.state_dict())
    x, y = sample(0, SEQ)
    for model in (on, off):
        deepseek_v4_loss(model(x), y).backward()
    grads_off = dict(off.named_parameters())
    for name, p in on.named_parameters():
        if _is_indexer(name):
            assert p.grad is not None and p.grad.abs().sum() > 0, name  # the KL reaches every indexer part
            assert grads_off[name].grad is None and not grads_off[name].requires_grad, name
        else:
            assert torch.equal(p.grad, grads_off[name].grad), name


def _train(model, steps: int, warmup_steps: int = 0):
    from titan_dsv4.infra.loss import deepseek_v4_loss

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, steps + 1):
        model.set_training_step(step)
        opt.zero_grad()
        x, y = sample(step, SEQ)
        deepseek_v4_loss(model(x), y).backward()
        opt.step()
        model.step_metrics.close_step()


def test_indexer_moves_with_the_kl_and_is_bit_identical_without(debug_args):
    for weight in (1.0, 0.0):
        model = _model(debug_args, weight, warmup=1 if weight else 0)  # a frozen indexer has no warm-up
        before = {n: p.detach().clone() for n, p in model.named_parameters() if _is_indexer(n)}
        _train(model, 3)
        changed = [n for n, p in model.named_parameters() if _is_indexer(n) and not torch.equal(p, before[n])]
        if weight:
            assert sorted(changed) == sorted(before), sorted(set(before) - set(changed))
            assert "indexer_kl_sum" in model.step_metrics.closed
        else:
            assert not changed and "indexer_kl_sum" not in model.step_metrics.closed


def test_dense_warm_up_attends_every_visible_entry_then_the_picks(debug_args):
    from titan_dsv4.model.context import ForwardContext

    model = _model(debug_args, 1.0, warmup=2)
    attn = model.layers["1"].self_attn
    x = torch.randn(1, SEQ, 256)
    q_latent = attn.q_norm(attn.wq_a(x))
    tokens = torch.zeros(1, SEQ, dtype=torch.long)
    dense, scoring = attn.compressor(
        x, q_latent, ForwardContext(model.rope, tokens, indexer_dense=True, indexer_loss=True)
    )
    sparse, _ = attn.compressor(x, q_latent, ForwardContext(model.rope, tokens, indexer_loss=True))
    assert dense.picked is None and sparse.picked is not None and scoring.picked is not None
    assert dense.visible(SEQ).sum() > sparse.visible(SEQ).sum()  # all visible entries vs top-k picks
    model.set_training_step(2)
    _, extra = model(torch.randint(2, 2048, (1, SEQ)))
    assert extra.indexer_stats[0] > 0  # the dense-stage KL (over every visible entry)


def test_kl_memory_stays_at_one_query_chunk(debug_args):
    """The KL's saved activations hold no [S, heads, T] score tensor: chunks are recomputed in backward."""
    from titan_dsv4.model.context import ForwardContext

    model = _model(debug_args, 1.0)
    attn = model.layers["1"].self_attn
    indexer = attn.compressor.indexer
    indexer.score_budget = 4 * 8 * 64  # eight queries per chunk
    x = torch.randn(1, SEQ, 256)
    compressed, scoring = attn.compressor(
        x, attn.q_norm(attn.wq_a(x)), ForwardContext(model.rope, x.long(), indexer_loss=True)
    )
    target = torch.rand(1, SEQ, compressed.picked.shape[-1])
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kl, n = indexer.kl_sum(scoring, target, None, compressed.picked)
    kl.backward()
    T = SEQ // 4
    assert n > 0 and max(sizes) < SEQ * indexer.n_heads * T / 4  # one chunk's worth, never [S, nI, T]
    assert indexer.wq_b.weight.grad.abs().sum() > 0


def test_during_the_dense_warm_up_only_the_indexer_learns(debug_args):
    from titan_dsv4.infra.loss import deepseek_v4_loss

    model = _model(debug_args, 1.0, warmup=3)
    model.set_training_step(2)
    x, y = sample(0, SEQ)
    loss = deepseek_v4_loss(model(x), y)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(_is_indexer(n) for n in with_grad)
    model.set_training_step(4)  # past the warm-up: the LM loss trains the rest again
    model.zero_grad()
    deepseek_v4_loss(model(x), y).backward()
    assert model.tok_embeddings.weight.grad is not None


def _fsdp_kl_step(rank, world_size):
    from tests.helpers.sharded import dims, full_grads, job, parallelized_copy, reference_model
    from titan_dsv4.flavors import deepseek_v4_args
    from titan_dsv4.infra.loss import deepseek_v4_loss
    from titan_dsv4.infra.unit_plan import fsdp_units

    args = deepseek_v4_args["debugmodel"].replace(max_seq_len=SEQ, indexer_loss_weight=1.0)
    ref = reference_model(args)
    model = parallelized_copy(ref, dims(world_size, dp_shard=world_size), job(ac="full"))
    x, y = sample(rank, SEQ)
    (deepseek_v4_loss(model(x), y) / (SEQ * world_size)).backward()
    out = {"grads": full_grads(model)}
    with torch.device("meta"):
        bf16 = type(ref)(args.replace())
    from titan_dsv4.infra.parallelize import parallelize_deepseek_v4

    parallelize_deepseek_v4(bf16, dims(world_size, dp_shard=world_size), job("bfloat16"))
    out["units"] = fsdp_units(bf16)
    if rank == 0:
        xs, ys = zip(*(sample(r, SEQ) for r in range(world_size)))
        (deepseek_v4_loss(ref(torch.cat(xs)), torch.cat(ys)) / (SEQ * world_size)).backward()
        out["ref"] = {n: p.grad for n, p in ref.named_parameters()}
    return out


@pytest.mark.slow
def test_under_fsdp_the_indexer_islands_get_the_single_process_gradients(ranks):

    out = ranks.run(_fsdp_kl_step, 2)[0]
    for name in (
        "layers.1.self_attn.compressor.indexer.wkv.weight",
        "layers.1.self_attn.compressor.indexer.ape_param.weight",
        "layers.3.self_attn.compressor.indexer.wq_b.weight",
    ):
        assert out["grads"][name] is not None and out["grads"][name].abs().sum() > 0, name
    for name, g in out["grads"].items():
        ref = out["ref"][name]
        assert (g is None) == (ref is None), name
        if g is not None:
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6, msg=name)
    islands = [u for u in out["units"] if "layers.1.self_attn.compressor.indexer.wkv" in u.members]
    assert len(islands) == 1 and islands[0].compute_dtypes == {torch.float32}
