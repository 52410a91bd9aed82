"""The trainer's check: the device one rank may fill, and a refusal, before Titan allocates, of a layout that
cannot fit it."""

from __future__ import annotations

import os
from dataclasses import replace

import torch
from torchtitan.tools.logging import logger

from titan_dsv4.model.args import ConfigError, DeepSeekV4ModelArgs

from .estimate import RESERVED_FRACTION, Estimate, estimate, usable_bytes
from .layout import GIB, Layout, Training
from .report import format_memory
from .search import fitting_layout

# The dry run's device when [deepseek_v4] gpu_memory_gib is 0 (an 80 GB H100 / A100).
DRY_RUN_GPU_MEMORY_GIB = 80.0


def configured_gib(job_config) -> float:
    """``--deepseek_v4.gpu_memory_gib``: GiB per rank, 0 when unset (then the device is probed)."""
    return job_config.deepseek_v4.gpu_memory_gib


def host_memory_bytes() -> int:
    """The host's physical memory; 0 where the platform cannot say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def device_memory(job_config) -> tuple[int, str]:
    """Bytes one rank may use, and where that figure comes from (the message names it)."""
    gib = configured_gib(job_config)
    if gib > 0:
        return int(gib * GIB), f"--deepseek_v4.gpu_memory_gib {gib:g}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return props.total_memory, f"{props.name}"
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    ram = host_memory_bytes()
    return ram // ranks, f"no GPU: host RAM {ram / GIB:.1f} GiB / {ranks} local rank(s)"


def dry_run_device(job_config) -> tuple[int, str]:
    """The device a dry run's plan must fit: ``--deepseek_v4.gpu_memory_gib``, else an 80 GB GPU (no probe:
    the machine running the dry run is not the one that will train)."""
    gib = configured_gib(job_config)
    if gib > 0:
        return int(gib * GIB), "--deepseek_v4.gpu_memory_gib"
    return int(DRY_RUN_GPU_MEMORY_GIB * GIB), "the dry run's default; set --deepseek_v4.gpu_memory_gib"


def refuse_layout_that_cannot_fit(
    model_args: DeepSeekV4ModelArgs, parallel_dims, job_config, device_memory_bytes: int | None = None
) -> Estimate | None:
    """Refuse, before anything is allocated, a layout whose ranks cannot fit the device; name one that can.

    Checks real runs only (``comm.mode`` "default"): dry runs and simulated modes allocate nothing.
    Returns the estimate when the layout fits.
    """
    if job_config.comm.mode != "default":
        return None
    if device_memory_bytes is None:
        device_bytes, source = device_memory(job_config)
    else:
        device_bytes, source = device_memory_bytes, "as given"
    layout = Layout.of(parallel_dims)
    training = Training.of(job_config, layout)
    found = estimate(model_args, layout, training)
    if found.fits(device_bytes):
        logger.info(
            f"Memory plan: one rank peaks at about {found.peak / GIB:.1f} GiB of {device_bytes / GIB:.1f} "
            f"GiB ({source}); {layout.describe()}, {found.training.describe()}"
        )
        return found
    # The search's step: the job's rows per rank (a pipeline's local batch is pp ranks' worth of rows).
    per_rank = replace(training, local_batch_size=max(1, training.local_batch_size // layout.pp))
    raise ConfigError(_refusal(model_args, job_config.model.flavor, found, device_bytes, source, per_rank))


def _refusal(
    a: DeepSeekV4ModelArgs, flavor: str, found: Estimate, device_bytes: int, source: str, training: Training
) -> str:
    """The figures against the device, a layout that fits, and how to check one without allocating."""
    gib = device_bytes / GIB
    lines = [
        f"DeepSeek-V4 '{flavor}' cannot fit this layout: one rank needs {found.peak / GIB:,.1f} GiB at its "
        f"peak, the device has {gib:,.1f} GiB ({source}; {usable_bytes(device_bytes) / GIB:,.1f} GiB usable "
        f"after a {RESERVED_FRACTION:.0%} reserve).",
        format_memory(found.figures(), device_bytes),
        f"  A layout that fits {gib:,.1f} GiB: {fitting_layout(a, training, device_bytes)}.",
        "  Check a layout without allocating: COMM_MODE=fake_backend NGPU=<GPUs> ./run_train.sh --model "
        "deepseek_v4 --config <toml> [--parallelism.expert_parallel_degree <ep>] "
        f"--deepseek_v4.gpu_memory_gib {gib:.0f}",
        "  If the device memory is misread, set --deepseek_v4.gpu_memory_gib (GiB per rank).",
    ]
    if "no GPU" in source:
        lines.append("  Without a GPU, train the debug model: train_configs/debug_model.toml.")
    return "\n".join(lines)
