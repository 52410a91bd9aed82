"""Context parallelism: cp ranks on Titan's sharded inputs give the single-process logits, losses and
gradients (fp32), with V4's attention exchanged across shards (``titan_dsv4/model/sequence_shard.py``)."""

from __future__ import annotations

import copy

import pytest
import torch

TOL = dict(rtol=0, atol=1e-5)
EOS = 1


def _args(seq_len: int, mask: str, kernel: str, warmup: bool):
    """The debug flavor with one MTP depth and the indexer's KL on (dense warm-up or sparse stage)."""
    from titan_dsv4.flavors import deepseek_v4_args

    return deepseek_v4_args["debugmodel"].replace(
        max_seq_len=seq_len,
        mtp_layers=1,
        attn_mask_type=mask,
        attn_impl=kernel,
        indexer_loss_weight=0.5,
        indexer_warmup_steps=10 if warmup else 0,  # a model without a training clock is at step 1
    )


def _batch(
    seq_len: int, batch: int, packed: bool, seed: int = 7, ends=(37, 100, 101, 300, 333, 700, 701, 905)
):
    """Random tokens; packed: documents ending (eos) inside chunks, so that documents, compression
    windows and MTP targets cross every shard boundary."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, 2048, (batch, seq_len + 1), generator=g)
    if packed:
        for b in range(batch):
            for i, p in enumerate(ends):
                p = p + 11 * b if i == 0 else p - b if i == 3 else p  # rows differ
                if p < seq_len:
                    x[b, p] = EOS
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


# Documents after the first shorter than hca_ratio: with cp 2 (chunks 0-3 of 128 tokens) the only HCA
# window completes in chunk 1, so the cp rank holding chunks 1 and 2 completes one and the other none.
SHORT_DOCS = (20, 30, 160, *range(220, 512, 60))


def _step(model, inputs, labels, n_tokens, **kwargs):
    """One forward/backward with the train spec's loss (LM + MTP + indexer KL); (logits, loss, metrics)."""
    from titan_dsv4.infra.loss import deepseek_v4_loss

    model.train()
    pred = model(inputs, **kwargs)
    loss = deepseek_v4_loss(pred, labels) / n_tokens
    loss.backward()
    metrics = {k: v.clone() for k, v in model.step_metrics._open.items()}
    model.step_metrics.close_step()
    return pred[0].detach(), loss.detach(), metrics


def _reference(args, inputs, labels):
    from titan_dsv4.model import DeepSeekV4Model

    torch.manual_seed(0)
    model = DeepSeekV4Model(args)
    model.init_weights()
    initial = copy.deepcopy(model)
    logits, loss, metrics = _step(model, inputs, labels, labels.numel())
    counts = {n: b.clone() for n, b in model.named_buffers() if n.endswith("tokens_per_expert")}
    return initial, model, logits, loss, metrics, counts


def _compare_case(rank, cp_mesh, args, inputs, labels, balancer="headtail"):
    """One case: the reference on the whole batch, then cp ranks on Titan's shards of it."""
    import torch.distributed as dist
    from torchtitan.distributed.context_parallel import prepare_context_parallel_input

    from titan_dsv4.model.sequence_shard import chunks_per_rank

    initial, ref, ref_logits, ref_loss, ref_metrics, ref_counts = _reference(args, inputs, labels)
    group = cp_mesh.get_group()
    model = initial
    model.set_context_parallel(group, chunks_per_rank(balancer))
    x, y, extra = prepare_context_parallel_input(inputs, labels, {}, cp_mesh, torch.device("cpu"), balancer)
    logits, loss, metrics = _step(model, x, y, labels.numel(), positions=extra["positions"])
    positions = extra["positions"][0].long()
    out = {"logits": (logits - ref_logits[:, positions]).abs().max().item()}
    total = loss.clone()
    dist.all_reduce(total, group=group)
    out["loss"] = (total - ref_loss).abs().item()
    out.update(_metric_errors(metrics, ref_metrics, group))
    grads = dict(model.named_parameters())
    worst, n = 0.0, 0
    for name, p in ref.named_parameters():
        g = grads[name].grad
        if p.grad is None:
            assert g is None or not g.any(), name
            continue
        g = g.clone()
        dist.all_reduce(g, group=group)  # what FSDP's reduce-scatter over the fsdp (dp_shard x cp) mesh sums
        worst, n = max(worst, (g - p.grad).abs().max().item()), n + 1
    out["grads"], out["n_grads"] = worst, n
    for name, count in ref_counts.items():
        mine = dict(model.named_buffers())[name].clone()
        dist.all_reduce(mine, group=group)
        out[f"count {name}"] = (mine - count).abs().max().item()
    return out


def _cp_cases(rank, world_size, cases, seq_len, batch):
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(0)
    cp_mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    results = {}
    for case in cases:
        mask, kernel, warmup, balancer = (*case, "headtail")[:4]
        inputs, labels = _batch(seq_len, batch, mask == "block_causal")
        args = _args(seq_len, mask, kernel, warmup)
        results[case] = _compare_case(rank, cp_mesh, args, inputs, labels, balancer)
    return results


def _assert_all_close(results):
    for case, out in results.items():
        warmup = case[2] is True
        # in the dense warm-up only the indexer learns (its 3 CSA indexers' 4 parameters)
        assert out["n_grads"] == 12 if warmup else out["n_grads"] > 100, (case, out["n_grads"])
        for name, err in out.items():
            if name != "n_grads" and not name.startswith("ref "):
                assert err <= 1e-5, (case, name, err)
        assert out["ref metric mtp_targets/1"] > 0 and out["ref metric indexer_kl_queries"] > 0, case


CP2_CASES = [
    (mask, kernel, warmup)
    for mask in ("causal", "block_causal")
    for kernel in ("sparse", "dense")
    for warmup in (False, True)
] + [("block_causal", "sparse", False, None)]  # no load balancer: contiguous shards


@pytest.mark.slow
def test_cp2_matches_single_process(ranks):
    """cp 2, head-tail (and contiguous): causal and packed documents, both kernels, the indexer's sparse
    stage (it selects: up to 128 visible entries, top-16) and dense warm-up, MTP 1, hash and learned MoE."""
    results = ranks.run(_cp_cases, 2, CP2_CASES, 512, 2, timeout=600)
    _assert_all_close(results[0])
    _assert_all_close(results[1])


@pytest.mark.slow
def test_cp4_matches_single_process(ranks):
    cases = [("block_causal", "sparse", False), ("causal", "dense", False)]
    results = ranks.run(_cp_cases, 4, cases, 1024, 1, timeout=600)
    for r in results:
        _assert_all_close(r)


def _metric_errors(metrics: dict, ref_metrics: dict, group) -> dict:
    """Each step metric summed over ``group`` against the single process's (relative error, and its value)."""
    import torch.distributed as dist

    out = {}
    for name in sorted(ref_metrics):
        if name.startswith("indexer_recall"):  # sampled: each rank samples its own queries
            continue
        value = metrics[name].clone()
        dist.all_reduce(value, group=group)
        out[f"metric {name}"] = (value - ref_metrics[name]).abs().item() / max(
            1.0, ref_metrics[name].abs().item()
        )
        out[f"ref metric {name}"] = ref_metrics[name].item()
    return out


def _fsdp_ep_cp(rank, world_size, seq_len, degrees):
    """cp 2 with two batch ranks (``degrees``: dp_shard 2 x EP 2, or HSDP's dp_replicate 2) through Titan's
    ParallelDims and parallelize_deepseek_v4 (fp32 FSDP)."""
    import torch.distributed as dist
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed.context_parallel import prepare_context_parallel_input

    from tests.helpers.sharded import parallelized_copy
    from titan_dsv4.infra.fsdp_units import canonical_name

    dims = ParallelDims(**{"cp": 2, "tp": 1, "pp": 1, "etp": 1, **degrees}, world_size=world_size)
    dims.build_mesh()
    job = _titan_job("--training.mixed_precision_param", "float32")
    args = _args(seq_len, "block_causal", "sparse", False)
    batch_rank = dims.get_mesh("batch").get_local_rank()
    # batch rank 1: only one cp rank completes an HCA window (the HCA path still joins backward on both)
    xs, ys = zip(_batch(seq_len, 1, True, seed=7), _batch(seq_len, 1, True, seed=8, ends=SHORT_DOCS))
    inputs, labels = xs[batch_rank], ys[batch_rank]
    initial, ref, _, ref_loss, ref_metrics, _ = _reference(args, torch.cat(xs), torch.cat(ys))

    model = parallelized_copy(ref, dims, job, buffers_from=initial)
    params = dict(ref.named_parameters())
    x, y, extra = prepare_context_parallel_input(
        inputs, labels, {}, dims.get_mesh("cp"), torch.device("cpu"), "headtail"
    )
    _, loss, metrics = _step(model, x, y, 2 * labels.numel(), positions=extra["positions"])
    loss_group = dims.get_mesh("loss").get_group()
    dist.all_reduce(loss, group=loss_group)
    out = {"loss": (loss - ref_loss).abs().item()}
    out.update(_metric_errors(metrics, ref_metrics, loss_group))
    worst, n = 0.0, 0
    for name, p in model.named_parameters():
        ref_grad = params[canonical_name(name)].grad
        if p.grad is None:
            continue
        worst, n = max(worst, (p.grad.full_tensor() - ref_grad).abs().max().item()), n + 1
    out["grads"], out["n_grads"] = worst, n
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, degrees",
    [
        ("cp2 x dp2 x ep2", dict(dp_replicate=1, dp_shard=2, ep=2)),
        ("cp2 x hsdp2", dict(dp_replicate=2, dp_shard=1, ep=1)),  # 2-D FSDP mesh: HCA alignment off
    ],
)
def test_cp2_with_two_batch_ranks_matches_single_process(ranks, name, degrees):
    results = ranks.run(_fsdp_ep_cp, 4, 512, degrees, timeout=600)
    for r in results:
        _assert_all_close({(name, "block_causal", "sparse", False): r})


def test_bad_seq_len_and_load_balancer_refused_before_work():
    from titan_dsv4.model.args import ConfigError
    from titan_dsv4.model.sequence_shard import check_cp_seq_len

    args = _args(512, "causal", "sparse", False)
    check_cp_seq_len(512, 2, args)  # 4 chunks of 128
    with pytest.raises(ConfigError, match="--training.seq_len 512 or 1024"):
        check_cp_seq_len(640, 2, args)
    with pytest.raises(ConfigError, match="--training.seq_len 256"):
        check_cp_seq_len(200, 2, args, None)
    with pytest.raises(ConfigError, match="ptrr"):
        check_cp_seq_len(512, 2, args, "ptrr")


def _titan_job(*flags: str):
    """Titan's JobConfig with the [deepseek_v4] section, as the command line parses it."""
    import os

    from torchtitan.config import ConfigManager

    import titan_dsv4

    tokenizer = os.path.join(os.path.dirname(titan_dsv4.__file__), "assets", "tokenizer")
    model = (
        "--model.name",
        "deepseek_v4",
        "--model.flavor",
        "debugmodel",
        "--model.hf_assets_path",
        tokenizer,
    )
    return ConfigManager().parse_args(["--job.custom_config_module", "titan_dsv4.job_config", *model, *flags])


def test_job_with_cp_checked_before_work():
    """The job checks refuse a non-dividing seq_len, 'ptrr' and validation under CP, naming the fix."""
    from titan_dsv4.job_config import check_job
    from titan_dsv4.model.args import ConfigError

    cp2 = ("--parallelism.context_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "1")
    with pytest.raises(ConfigError, match="--training.seq_len 512 or 1024"):
        check_job(_titan_job(*cp2, "--training.seq_len", "768"))
    with pytest.raises(ConfigError, match="ptrr"):
        check_job(_titan_job(*cp2, "--parallelism.context_parallel_load_balancer", "ptrr"))
    with pytest.raises(ConfigError, match="--validation.enable false"):
        check_job(_titan_job(*cp2, "--training.seq_len", "1024", "--validation.enable"))
    check_job(_titan_job(*cp2, "--training.seq_len", "1024"))


def test_positions_and_cp_group_must_come_together():
    """Sharded positions without a bound cp group (or a bound group without positions) fail clearly."""
    from titan_dsv4.model import DeepSeekV4Model

    model = DeepSeekV4Model(_args(256, "causal", "sparse", False))
    tokens = torch.randint(2, 2048, (1, 128))
    with pytest.raises(ValueError, match="need a context-parallel group"):
        model(tokens, positions=torch.arange(128, 256)[None])
    model.cp_group = object()  # bound (the group is not reached before the check)
    with pytest.raises(ValueError, match="got no positions"):
        model(tokens)
