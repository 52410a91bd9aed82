"""HCA parameter-sync group and graph alignment for ranks with unequal sequence lengths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.sharded import dims as _dims
from tests.helpers.sharded import full_grads, job, logged_messages, parallelized_copy, reference_model, sample


def _meta_model(**changes):
    from titan_dsv4.flavors import deepseek_v4_args
    from titan_dsv4.model import DeepSeekV4Model

    with torch.device("meta"):
        return DeepSeekV4Model(deepseek_v4_args["debugmodel"].replace(max_seq_len=512, **changes))


def _group_answers(rank, world_size, degrees):
    from titan_dsv4.infra.parallelize import parallelize_deepseek_v4

    records = logged_messages()
    model = _meta_model()
    try:
        parallelize_deepseek_v4(model, _dims(world_size, **degrees), job())
    except NotImplementedError as e:
        return {"refused": str(e)}
    answers = {}
    for name, m in model.named_modules():
        if type(m).__name__ == "Compressor":
            g = m.hca_param_sync_group
            answers[name] = None if g is None else torch.distributed.get_world_size(g)
    return {"groups": answers, "log": [r for r in records if "HCA graph alignment disabled" in r]}


@pytest.mark.slow
def test_pure_fsdp_binds_the_fsdp_group_to_hca_only(ranks):
    out = ranks.run(_group_answers, 2, {"dp_shard": 2})[0]
    assert out["groups"] == {
        "layers.1.self_attn.compressor": None,  # CSA
        "layers.2.self_attn.compressor": 2,  # HCA
        "layers.3.self_attn.compressor": None,  # CSA
    }


@pytest.mark.slow
def test_hsdp_disables_alignment_with_one_log_line(ranks):
    out = ranks.run(_group_answers, 4, {"dp_replicate": 2, "dp_shard": 2})[0]
    assert out["groups"]["layers.2.self_attn.compressor"] is None
    assert len(out["log"]) == 1 and "('dp_replicate', 'fsdp') is 2-D" in out["log"][0]


@pytest.mark.slow
def test_tensor_parallel_is_refused_before_any_change(ranks):
    out = ranks.run(_group_answers, 4, {"dp_shard": 2, "tp": 2})[0]
    assert "tensor_parallel_degree=2" in out["refused"]


def test_no_mesh_means_no_group():
    from titan_dsv4.infra.parallelize import hca_param_sync_group

    assert hca_param_sync_group(None) is None


# ---- alignment: every gradient equals the single-process gradient -------------------------------


def _aligned_step(rank, world_size, lengths):
    ref = reference_model(_meta_model().model_args)
    model = parallelized_copy(ref, _dims(world_size, dp_shard=world_size), job())
    total_tokens = sum(lengths)
    x, y = sample(rank, lengths[rank], seed=1000)
    loss = F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten(), reduction="sum") / total_tokens
    loss.backward()
    out = {"grads": full_grads(model)}
    if rank == 0:
        ref_loss = (
            sum(
                F.cross_entropy(ref(xr)[0].flatten(0, 1), yr.flatten(), reduction="sum")
                for xr, yr in (sample(r, n, seed=1000) for r, n in enumerate(lengths))
            )
            / total_tokens
        )
        ref_loss.backward()
        out["ref_grads"] = {n: p.grad for n, p in ref.named_parameters()}
    return out


def _assert_grads_match(out):
    hca = [n for n in out["grads"] if n.startswith("layers.2.self_attn.compressor.")]
    assert hca
    for name, g in out["grads"].items():
        ref = out["ref_grads"][name]
        if ref is None:
            assert g is None or not g.any(), name
            continue
        assert g is not None, name
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_short_and_long_rank_gradients_equal_single_process(ranks):
    out = ranks.run(_aligned_step, 2, (64, 256))[0]
    _assert_grads_match(out)
    assert out["grads"]["layers.2.self_attn.compressor.wkv.weight"].abs().sum() > 0


@pytest.mark.slow
def test_both_ranks_with_windows_match_single_process(ranks):
    _assert_grads_match(ranks.run(_aligned_step, 2, (200, 300))[0])


def _all_short(rank, world_size):
    out = _aligned_step(rank, world_size, (64, 100))
    return {n: g is None for n, g in out["grads"].items() if n.startswith("layers.2.self_attn.compressor.")}


@pytest.mark.slow
def test_all_ranks_short_skip_the_hca_path_everywhere(ranks):
    for per_rank in ranks.run(_all_short, 2):
        assert per_rank and all(per_rank.values())


# ---- cost: one all-reduce per forward ------------------------------------------------------------


def _count_all_reduces(rank, world_size, n_hca_layers):
    import torch.distributed as dist

    from titan_dsv4.model import DeepSeekV4Model

    ratios = [0, 4] + [128] * n_hca_layers
    model = DeepSeekV4Model(_meta_model().model_args.replace(n_layers=len(ratios), compress_ratios=ratios))
    model.init_weights()
    for c in model.hca_compressors():
        c.set_hca_param_sync_group(dist.group.WORLD)
    calls = []
    original = dist.all_reduce
    dist.all_reduce = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    try:
        model.train()
        model(torch.randint(0, 2048, (1, 64 if rank == 0 else 256)))
        model.eval()
        model(torch.randint(0, 2048, (1, 64)))
    finally:
        dist.all_reduce = original
    return len(calls)


@pytest.mark.slow
def test_agreement_costs_one_all_reduce_per_forward_whatever_the_hca_layer_count(ranks):
    assert ranks.run(_count_all_reduces, 2, 1) == [1, 1]
    assert ranks.run(_count_all_reduces, 2, 3) == [1, 1]


def test_synthetic_window_leaves_outputs_unchanged_and_zero_length_is_an_error():
    import pytest

    from titan_dsv4.model import DeepSeekV4Model
    from titan_dsv4.model.context import ForwardContext

    model = DeepSeekV4Model(_meta_model().model_args.replace())
    model.init_weights()
    x = torch.randint(0, 2048, (1, 64))
    attn = model.layers["2"].self_attn
    h = torch.randn(1, 64, 256)
    synthetic, plain = (ForwardContext(model.rope, x, hca_synthetic_window=flag) for flag in (True, False))
    # the synthetic entry gets probability exactly 0; only the matmul's summation order can change
    torch.testing.assert_close(attn(h, synthetic)[0], attn(h, plain)[0], rtol=0, atol=1e-6)
    compressed, _ = attn.compressor(h, attn.q_norm(attn.wq_a(h)), synthetic)
    assert compressed.entries.shape == (1, 1, 128) and compressed.hidden
    assert not compressed.visible(64).any()
    model.hca_compressors()[0].set_hca_param_sync_group(object())  # any bound group: checked before comms
    with pytest.raises(ValueError, match="zero-length local sequence"):
        model(x[:, :0])
