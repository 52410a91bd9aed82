"""Pipeline parallelism in one step: pp 2 x dp_shard 2 (and x EP 2) on 4 ranks, driven by Titan's schedule as
its trainer drives it, gives every parameter the single process's gradient (fp32), and each stage's FSDP
units keep the fp32 unit rules (bf16)."""

from __future__ import annotations

import pytest
import torch

from titan_dsv4.multiprocess import run_on_ranks

pytestmark = pytest.mark.slow
LOCAL_BATCH, SEQ = 2, 256
ENDS = (40, 150, 151, 200)  # packed documents (eos) in every row


def _args():
    """The debug flavor (hash and learned-router MoE layers, CSA, HCA) with MTP 1 and the indexer's KL on."""
    from titan_dsv4.flavors import deepseek_v4_args

    return deepseek_v4_args["debugmodel"].replace(
        max_seq_len=SEQ,
        mtp_layers=1,
        attn_mask_type="block_causal",
        indexer_loss_weight=0.5,
        indexer_warmup_steps=0,
    )


def _global_batch(dp: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(2, 2048, (dp * LOCAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(3))
    for row in range(x.shape[0]):
        for p in ENDS:
            x[row, p + row] = 1
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def _reference(dp: int):
    """One step of the whole model on the whole global batch: {parameter: gradient}."""
    from tests.helpers.sharded import reference_model
    from titan_dsv4.infra.loss import deepseek_v4_loss

    model = reference_model(_args())
    model.train()
    inputs, labels = _global_batch(dp)
    (deepseek_v4_loss(model(inputs), labels) / labels.numel()).backward()
    return model, {n: p.grad for n, p in model.named_parameters()}


def _pipelined(rank: int, world: int, ep: int, mixed: str):
    """This rank's stage(s), built as Titan's trainer builds them; after one schedule step in fp32 its
    parameters' full gradients, in bf16 its units."""
    from torch.distributed.tensor import distribute_tensor

    from tests.helpers.sharded import dims, full_grads, titan_job
    from titan_dsv4.infra.fsdp_units import canonical_name
    from titan_dsv4.infra.loss import deepseek_v4_loss
    from titan_dsv4.infra.parallelize import parallelize_deepseek_v4
    from titan_dsv4.infra.pipeline import pipeline_deepseek_v4
    from titan_dsv4.infra.unit_plan import fsdp_units
    from titan_dsv4.model import DeepSeekV4Model

    parallel = dims(world, pp=2, dp_shard=2, ep=ep)
    job = titan_job(
        "--parallelism.pipeline_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "2",
        "--parallelism.expert_parallel_degree", str(ep), "--training.local_batch_size", str(LOCAL_BATCH),
        "--training.seq_len", str(SEQ), "--training.mixed_precision_param", mixed,
    )  # fmt: skip
    with torch.device("meta"):
        model = DeepSeekV4Model(_args())
    schedule, parts, first, last = pipeline_deepseek_v4(
        model, parallel, job, torch.device("cpu"), model.model_args, parallelize_deepseek_v4, deepseek_v4_loss
    )
    if mixed != "float32":
        return {"units": [fsdp_units(p) for p in parts], "has_last": last}
    ref, _ = _reference(2)
    params, buffers = dict(ref.named_parameters()), dict(ref.named_buffers())
    for part in parts:
        part.to_empty(device="cpu")
        part.init_weights()
        part.train()
        with torch.no_grad():
            for name, p in part.named_parameters():
                full = params[canonical_name(name)].detach()
                p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements).to_local())
            for name, b in part.named_buffers():
                if canonical_name(name) in buffers:
                    b.copy_(buffers[canonical_name(name)])
    inputs, labels = _global_batch(2)
    dp_rank = parallel.get_mesh("fsdp").get_local_rank()
    rows = slice(dp_rank * LOCAL_BATCH, (dp_rank + 1) * LOCAL_BATCH)
    losses = [] if last else None
    if first:
        schedule.step(inputs[rows], target=labels[rows] if last else None, losses=losses, return_outputs=False)
    else:
        schedule.step(target=labels[rows] if last else None, losses=losses, return_outputs=False)
    grads = {}
    for part in parts:
        grads.update(full_grads(part))
    return {"grads": grads, "losses": [float(x) for x in losses or []]}


@pytest.mark.parametrize("ep", [1, 2], ids=["pp2-dp2", "pp2-dp2-ep2"])
def test_pipeline_step_gives_single_process_gradients(ep):
    reports = run_on_ranks(_pipelined, 4, ep, "float32", timeout=300)
    _, expected = _reference(2)
    got = {}
    for report in reports:
        for name, grad in report["grads"].items():
            if name in got:  # the dp ranks of a stage hold the same full gradient
                torch.testing.assert_close(grad, got[name], rtol=0, atol=0)
            got[name] = grad
    assert set(got) == set(expected)
    for name, grad in expected.items():
        assert (got[name] is None) == (grad is None), name
        if grad is not None:
            torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    # the logged losses are sums again (Titan divides them by the global token count)
    assert sum(x for r in reports for x in r["losses"]) > 0


def test_pipeline_stages_keep_the_fp32_unit_rules():
    reports = run_on_ranks(_pipelined, 4, 2, "bfloat16", timeout=300)
    kinds = {}
    for report in reports:
        for units in report["units"]:
            for u in units:
                assert len(u.storage_dtypes) == 1 and len(u.compute_dtypes) == 1, u
                kinds.setdefault(u.kind, []).append(u)
    assert {u.compute_dtypes for u in kinds["block"]} == {frozenset({torch.bfloat16})}
    for u in kinds["island"] + kinds["holder"]:
        assert u.compute_dtypes == frozenset({torch.float32}), u
    # every block and MTP depth is a unit on the stage that holds it
    block_names = {u.name for u in kinds["block"] + kinds["mtp"]}
    assert {"layers.0", "layers.1", "layers.2", "layers.3", "mtp.layers.0"} <= block_names, block_names
    assert any(m.startswith("lm_head") for u in kinds["island"] for m in u.members)
