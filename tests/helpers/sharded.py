"""Helpers for multi-rank tests: a seeded single-process reference and a parallelized copy of it."""

from __future__ import annotations

import logging

import torch


def logged_messages() -> list[str]:
    """The messages every logger logs at INFO and above from now on in this (rank's) process, as a list
    that grows."""
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    return messages


def dims(world_size: int, **degrees):
    """Titan's ParallelDims with its meshes built (dp_shard -1 takes the ranks left over)."""
    from torchtitan.distributed import ParallelDims

    d = dict(dp_replicate=1, dp_shard=-1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=world_size)
    d.update(degrees)
    parallel = ParallelDims(**d)
    parallel.build_mesh()
    return parallel


def titan_job(*flags: str):
    """Titan's default JobConfig with the [deepseek_v4] section (as a TOML naming our module parses)."""
    from torchtitan.config import ConfigManager

    return ConfigManager().parse_args(["--job.custom_config_module", "titan_dsv4.job_config", *flags])


def job(mixed: str = "float32", ac: str = "none", compile_model: bool = False):
    config = titan_job()
    config.training.mixed_precision_param = mixed
    config.activation_checkpoint.mode = ac
    config.compile.enable = compile_model
    return config


def reference_model(args, seed: int = 0):
    """The single-process model every sharded run is compared with (fp32, seeded init)."""
    from titan_dsv4.model import DeepSeekV4Model

    torch.manual_seed(seed)
    model = DeepSeekV4Model(args.replace())
    model.init_weights()
    return model


def parallelized_copy(ref, parallel_dims, job_config, buffers_from=None):
    """A meta model parallelized like the Trainer does, then given ``ref``'s weights and the buffers of
    ``buffers_from`` (default ``ref``)."""
    from titan_dsv4.infra.parallelize import parallelize_deepseek_v4
    from titan_dsv4.model import DeepSeekV4Model

    with torch.device("meta"):
        model = DeepSeekV4Model(ref.model_args.replace())
    parallelize_deepseek_v4(model, parallel_dims, job_config)
    copy_weights(ref, model, buffers_from)
    return model


def copy_weights(ref, part, buffers_from=None) -> None:
    """Materializes a parallelized meta ``part`` (a whole model or a pipeline stage) with ``ref``'s weights
    (each rank its shard) and the buffers of ``buffers_from`` (default ``ref``) that it holds."""
    from torch.distributed.tensor import distribute_tensor

    from titan_dsv4.infra.fsdp_units import canonical_name

    part.to_empty(device="cpu")
    part.init_weights()
    params, buffers = dict(ref.named_parameters()), dict((buffers_from or ref).named_buffers())
    with torch.no_grad():
        for name, p in part.named_parameters():
            full = params[canonical_name(name)].detach()
            p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements).to_local())
        for name, b in part.named_buffers():
            if canonical_name(name) in buffers:
                b.copy_(buffers[canonical_name(name)])


def sample(rank: int, length: int, seed: int = 100, vocab: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, vocab, (1, length + 1), generator=torch.Generator().manual_seed(seed + rank))
    return x[:, :-1], x[:, 1:]


def full_grads(model) -> dict:
    """Parameter name (without AC/compile/FSDP wrappers) -> the full gradient, or None."""
    from titan_dsv4.infra.fsdp_units import canonical_name

    return {
        canonical_name(n): (None if p.grad is None else p.grad.full_tensor())
        for n, p in model.named_parameters()
    }


def packed_global_batch(rows: int, seq: int, ends: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) [rows, seq]: random ids with an eos (1) at ``ends`` shifted by the row (documents)."""
    x = torch.randint(2, 2048, (rows, seq + 1), generator=torch.Generator().manual_seed(3))
    for row in range(rows):
        for p in ends:
            x[row, p + row] = 1
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()
