"""The [deepseek_v4] options are declared once and checked once; the model's step comes from the LR
schedulers; every trainable parameter has optimizer state from the start."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from torchtitan.config import ConfigManager
from torchtitan.distributed import ParallelDims

from titan_dsv4.job_config import DeepSeekV4, check_job
from titan_dsv4.model import DeepSeekV4Model
from titan_dsv4.model.args import DeepSeekV4ModelArgs
from titan_dsv4.model.options import ConfigError, TrainingOptions

ROOT = Path(__file__).resolve().parents[2]


def _job(*flags: str):
    cwd = os.getcwd()
    os.chdir(ROOT)  # the debug config names repository-relative assets
    try:
        return ConfigManager().parse_args(["--job.config_file", "train_configs/debug_model.toml", *flags])
    finally:
        os.chdir(cwd)


def test_options_are_declared_once():
    options = {f.name: f for f in dataclasses.fields(TrainingOptions)}
    section = {f.name for f in dataclasses.fields(DeepSeekV4)}
    assert section == set(options) | {"mtp_layers", "gpu_memory_gib"}  # the job-level keys, nothing else
    args = DeepSeekV4ModelArgs()
    for name, f in options.items():  # the model args inherit each option, default included
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        assert getattr(args, name) == default


def test_section_reaches_the_model_args_and_empty_list_means_none():
    job = _job(
        "--deepseek_v4.attn_impl", "dense", "--deepseek_v4.fp32_compute", "", "--deepseek_v4.mtp_layers", "1"
    )
    args = DeepSeekV4ModelArgs(compress_ratios=[0] * 43)
    args.update_from_config(job)
    assert (args.attn_impl, args.fp32_compute, args.mtp_layers) == ("dense", [], 1)


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--deepseek_v4.attn_mask_type", "sliding"], "deepseek_v4.attn_mask_type='sliding'"),
        (["--deepseek_v4.mtp_loss_weight", "-1"], "deepseek_v4.mtp_loss_weight=-1.0"),
        (["--deepseek_v4.fp32_compute", "logits"], "deepseek_v4.fp32_compute names unknown parts ['logits']"),
        (
            ["--deepseek_v4.indexer_loss_weight", "0"],
            "deepseek_v4.indexer_warmup_steps=2 trains only the indexer",
        ),
        (["--deepseek_v4.gpu_memory_gib", "-2"], "deepseek_v4.gpu_memory_gib=-2.0 must be >= 0"),
        (["--model.flavor", "flassh"], "unknown DeepSeek-V4 flavor 'flassh'"),
        (["--parallelism.expert_parallel_degree", "3"], "expert_parallel_degree=3 must divide the 8 routed"),
        (["--model.hf_assets_path", "/nonexistent"], "holds no tokenizer.json"),
        (["--training.seq_len", "64"], "training.seq_len=64 is shorter than the HCA compression ratio 128"),
    ],
)
def test_check_job_refuses_with_the_key_named(flags, named):
    with pytest.raises(ConfigError, match=None) as refused:
        check_job(_job(*flags))
    assert named in str(refused.value)


PP2 = ["--parallelism.pipeline_parallel_degree", "2"]


@pytest.mark.parametrize(
    "world, flags, named",
    [
        (2, [*PP2, "--parallelism.pipeline_parallel_layers_per_stage", "1"], "makes 6 stages"),
        (8, ["--parallelism.pipeline_parallel_degree", "8"], "4 layers do not split into 8 pipeline stages"),
        (2, [*PP2, "--parallelism.pipeline_parallel_microbatch_size", "3"], "does not divide"),
        (2, [*PP2, "--parallelism.pipeline_parallel_schedule", "Foo"], "is not a schedule TorchTitan has"),
        (2, [*PP2, "--parallelism.pipeline_parallel_schedule", "DualPipeV"], "not run by DeepSeek-V4"),
        (4, [*PP2, "--parallelism.context_parallel_degree", "2"], "with context parallelism is not"),
        (2, [*PP2, "--training.global_batch_size", "4"], "asks for gradient accumulation"),
    ],
)
def test_check_job_refuses_pipelines_it_cannot_run(monkeypatch, world, flags, named):
    """Layers that do not split, microbatches that do not divide, unknown schedules: refused before any work
    (``check_job`` runs in run_train.sh's preflight and in the train spec's first hook)."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ConfigError) as refused:
        check_job(_job(*flags))
    assert named in str(refused.value)
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_job(_job(*PP2))  # the default pipeline is accepted


def test_triton_kernels_are_refused_where_they_cannot_run(monkeypatch):
    """attn_impl triton: on a CPU job without Triton's interpreter, and for packed documents under CP (the
    Triton indexer's per-query ranges); accepted where they run (the suite's interpreter)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_job(_job("--deepseek_v4.attn_impl", "triton"))
    cp = ["--parallelism.context_parallel_degree", "2", "--deepseek_v4.attn_mask_type", "block_causal"]
    with pytest.raises(ConfigError, match="block_causal.*context parallelism.*attn_impl sparse"):
        check_job(_job("--deepseek_v4.attn_impl", "triton", *cp))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="deepseek_v4.attn_impl='triton' runs its kernels on CUDA"):
        check_job(_job("--deepseek_v4.attn_impl", "triton"))


def test_hf_export_is_refused_only_where_the_trainer_cannot_complete_it():
    job = _job("--checkpoint.enable", "--checkpoint.last_save_in_hf", "--checkpoint.last_save_model_only")
    with pytest.raises(ConfigError, match="checkpoint.last_save_in_hf needs titan_dsv4's trainer"):
        check_job(job)
    check_job(job, trainer_completes_hf_export=True)


def _tiny_model(warmup: int) -> DeepSeekV4Model:
    from titan_dsv4.flavors import deepseek_v4_args

    args = deepseek_v4_args["debugmodel"].replace(indexer_loss_weight=1.0, indexer_warmup_steps=warmup)
    torch.manual_seed(0)
    model = DeepSeekV4Model(args)
    model.init_weights()
    return model


@pytest.fixture
def one_rank():
    """A one-rank gloo group: Titan's optimizer hooks ask ParallelDims for its meshes."""
    import torch.distributed as dist

    from titan_dsv4.refusals import shut_down_process_groups

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield
    shut_down_process_groups()


def test_training_clock_follows_the_lr_schedulers_and_resumes(one_rank):
    from titan_dsv4.infra.optimizer import (
        build_lr_schedulers_with_training_clock,
        build_optimizers_with_v4_load_balancing,
    )

    model = _tiny_model(warmup=2)
    job = _job()
    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    optimizers = build_optimizers_with_v4_load_balancing([model], job.optimizer, dims)
    schedulers = build_lr_schedulers_with_training_clock(optimizers, job.lr_scheduler, job.training.steps)
    tokens = torch.randint(0, 2048, (1, 256))
    warmups = []
    for _ in range(3):  # what Titan's train_step does: forward, optimizer step, LR scheduler step
        warmups.append(model(tokens)[1].indexer_warmup)
        optimizers.step()
        schedulers.step()
    assert warmups == [True, True, False] and model.current_step() == 4
    # a resumed job: fresh schedulers loaded from the checkpoint's state continue the count
    resumed = _tiny_model(warmup=2)
    fresh = build_lr_schedulers_with_training_clock(
        build_optimizers_with_v4_load_balancing([resumed], job.optimizer, dims), job.lr_scheduler, 30
    )
    assert resumed.current_step() == 1
    fresh.load_state_dict(schedulers.state_dict())
    assert resumed.current_step() == 4


def test_every_trainable_parameter_has_optimizer_state_from_the_start_and_nothing_moves():
    from titan_dsv4.infra.optimizer import build_optimizers_with_v4_load_balancing

    model = _tiny_model(warmup=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    optimizers = build_optimizers_with_v4_load_balancing([model], _job().optimizer, dims)
    (opt,) = optimizers.optimizers
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p in opt.state for p in trainable)
    for p in trainable:  # exactly what AdamW creates at a first gradient
        state = opt.state[p]
        assert float(state["step"]) == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
