"""The ``deepseek_v4`` TrainSpec and its registration with TorchTitan.

Every hook is TorchTitan's own builder or a thin layer over it; the layers are where DeepSeek-V4 differs:
the job checks before the tokenizer (the first hook), the packaged corpus registered by the data builders,
the expert-bias and optimizer-state hooks, the training clock on the LR schedulers, the extra losses and
their metrics. The parallelize and pipelining hooks are ``parallelize_deepseek_v4`` and
``pipeline_deepseek_v4`` themselves; at an entry point (``./run_train.sh``'s ranks, the stock entry through
``titan_dsv4.stock``) a refused job exits with one message from any hook (``refusals``).
"""

from __future__ import annotations

import dataclasses
import functools

from torchtitan.components.tokenizer import build_hf_tokenizer
from torchtitan.components.validate import build_validator
from torchtitan.hf_datasets.text_datasets import build_text_dataloader
from torchtitan.protocols.train_spec import TrainSpec, register_train_spec

from . import data
from .checkpoint.adapter import DeepSeekV4CheckpointAdapter
from .compat import titan_extra_train_specs
from .flavors import deepseek_v4_args
from .infra.loss import build_deepseek_v4_loss
from .infra.metrics import build_deepseek_v4_metrics_processor
from .infra.optimizer import build_lr_schedulers_with_training_clock, build_optimizers_with_v4_load_balancing
from .infra.parallelize import parallelize_deepseek_v4
from .infra.pipeline import pipeline_deepseek_v4
from .job_config import check_job, check_tokenizer_fits
from .model import DeepSeekV4Model
from .refusals import refusals_exit

NAME = "deepseek_v4"


def build_tokenizer_after_job_checks(job_config, trainer_completes_hf_export: bool = False):
    """Titan's HF tokenizer, after ``check_job``: the first spec hook, so refusals come before any work."""
    with refusals_exit():
        check_job(job_config, trainer_completes_hf_export)
        tokenizer = build_hf_tokenizer(job_config)
        check_tokenizer_fits(tokenizer, job_config)
    return tokenizer


def build_dataloader_with_corpus(dp_world_size, dp_rank, tokenizer, job_config, **kwargs):
    """Titan's text dataloader; the packaged corpus (``dsv4_corpus``) is registered with Titan first."""
    data.register_datasets()
    return build_text_dataloader(dp_world_size, dp_rank, tokenizer, job_config, **kwargs)


def build_validator_with_corpus(*args, **kwargs):
    """Titan's validator; its dataset may be the packaged ``dsv4_corpus_validation``."""
    data.register_datasets()
    return build_validator(*args, **kwargs)


def get_train_spec(trainer_completes_hf_export: bool = False) -> TrainSpec:
    """The spec; ``trainer_completes_hf_export`` is ``titan_dsv4.trainer``'s (it serves last_save_in_hf)."""
    return TrainSpec(
        model_cls=DeepSeekV4Model,
        model_args=deepseek_v4_args,
        parallelize_fn=parallelize_deepseek_v4,
        pipelining_fn=pipeline_deepseek_v4,
        build_optimizers_fn=build_optimizers_with_v4_load_balancing,
        build_lr_schedulers_fn=build_lr_schedulers_with_training_clock,
        build_dataloader_fn=build_dataloader_with_corpus,
        build_tokenizer_fn=functools.partial(
            build_tokenizer_after_job_checks, trainer_completes_hf_export=trainer_completes_hf_export
        ),
        build_loss_fn=build_deepseek_v4_loss,
        build_validator_fn=build_validator_with_corpus,
        build_metrics_processor_fn=build_deepseek_v4_metrics_processor,
        state_dict_adapter=DeepSeekV4CheckpointAdapter,
    )


def for_trainer(spec: TrainSpec) -> TrainSpec:
    """The registered spec as ``titan_dsv4.trainer`` runs it: its job checks accept last_save_in_hf."""
    return dataclasses.replace(spec, build_tokenizer_fn=get_train_spec(True).build_tokenizer_fn)


def register() -> None:
    """Register ``deepseek_v4`` once; re-imports and repeated calls are no-ops."""
    if NAME not in titan_extra_train_specs:
        register_train_spec(NAME, get_train_spec())
