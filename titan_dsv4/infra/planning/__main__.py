"""``python -m titan_dsv4.infra.planning --job.config_file train_configs/deepseek_v4_flash.toml``: the layouts
to recommend for a config (``search.recommended_layouts``: fits, then least communication per token, then
fewest GPUs) and the smallest that fits (``search.smallest_layouts``), for ``--deepseek_v4.gpu_memory_gib``
GiB devices (80 when unset). Any ``--section.key value`` of the job applies (seq_len, AC, local batch, ...).
"""

from __future__ import annotations

from dataclasses import replace

from torchtitan.config import ConfigManager

from titan_dsv4.job_config import job_model_args

from .estimate import Estimate
from .layout import GIB, Layout, Training
from .refusal import dry_run_device
from .search import recommended_layouts, smallest_layouts

TOP = 5


def describe(e: Estimate) -> str:
    """One line: the launch, the peak, the traffic per step by collective, per token, and the bubble."""
    traffic = " / ".join(f"{name} {b / GIB:.1f}" for name, b in e.collectives.items() if b)
    bubble = f", bubble {e.pipeline.bubble:.1%}" if e.pipeline is not None else ""
    return (
        f"{e.launch()}: peak {e.peak / GIB:.1f} GiB; GiB per step {traffic}; "
        f"{e.traffic_per_token / 2**20:.2f} MiB per token{bubble}"
    )


def main() -> None:
    job = ConfigManager().parse_args()
    args = job_model_args(job)
    args.update_from_config(job)
    # The rows per GPU: a pipelined job's local batch is pp GPUs' worth (the search pipelines it again).
    rows = max(1, job.training.local_batch_size // job.parallelism.pipeline_parallel_degree)
    training = replace(Training.of(job, Layout(1, 1)), local_batch_size=rows)
    device, _ = dry_run_device(job)
    print(f"DeepSeek-V4 '{job.model.flavor}', {training.describe()}, {device / GIB:g} GiB devices")
    print("  recommended (fits, then least communication per token, then fewest GPUs):")
    for e in recommended_layouts(args, training, device)[:TOP]:
        print(f"    {describe(e)}")
    print("  smallest that fits (fewest GPUs, then least traffic):")
    for e in smallest_layouts(args, training, device)[:1]:
        print(f"    {describe(e)}")


if __name__ == "__main__":
    main()
