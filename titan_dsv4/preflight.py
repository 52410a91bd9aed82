"""``./run_train.sh``'s check before any rank starts: what every rank would refuse, checked once.

A refused job then prints one message and exits 2 before torchrun launches anything (no block per rank, no
launcher traceback). The ranks run the same checks again on every entry point (the train spec's hooks,
``titan_dsv4.trainer``), so this is a convenience of the launcher, not the only guard.
"""

from __future__ import annotations

import os

from torchtitan.components.tokenizer import build_hf_tokenizer
from torchtitan.config import ConfigManager

from .infra.parallelize import refuse_layout
from .infra.pipeline import refuse_pipeline_problems
from .job_config import check_job, check_tokenizer_fits, job_model_args, parallel_dims_of
from .refusals import refusals_exit


def preflight(job_config, world_size: int) -> None:
    """Degrees, the job, the tokenizer and the layout, as the ranks of ``titan_dsv4.train`` check."""
    parallel_dims_of(job_config, world_size)
    check_job(job_config, trainer_completes_hf_export=True)
    check_tokenizer_fits(build_hf_tokenizer(job_config), job_config)
    args = job_model_args(job_config)
    args.update_from_config(job_config)
    refuse_layout_of_job(args, job_config, world_size)


def refuse_layout_of_job(args, job_config, world_size: int) -> None:
    """What ``parallelize_deepseek_v4`` and the pipeline split would refuse on ``world_size`` ranks."""
    dims = parallel_dims_of(job_config, world_size)
    refuse_pipeline_problems(args.n_layers, job_config, dims.dp_replicate * dims.dp_shard)
    refuse_layout(args, dims, job_config)


def main() -> None:
    world_size = int(os.environ["NGPU"])
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(world_size))  # one node: the ranks share its memory
    os.environ.setdefault("WORLD_SIZE", str(world_size))  # as torchrun will set it (check_job reads it)
    with refusals_exit():
        preflight(ConfigManager().parse_args(), world_size)


if __name__ == "__main__":
    main()
