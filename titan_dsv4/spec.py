"""The ``deepseek_v4`` TrainSpec and its registration with TorchTitan."""

from __future__ import annotations

import torchtitan.protocols.train_spec as train_spec_module
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.tokenizer import build_hf_tokenizer
from torchtitan.components.validate import build_validator
from torchtitan.hf_datasets.text_datasets import build_text_dataloader
from torchtitan.protocols.train_spec import TrainSpec, register_train_spec

from . import data
from .checkpoint.adapter import DeepSeekV4CheckpointAdapter
from .flavors import deepseek_v4_args
from .infra.loss import build_deepseek_v4_loss
from .infra.metrics import build_deepseek_v4_metrics_processor
from .infra.optimizer import build_optimizers_with_v4_load_balancing
from .infra.parallelize import parallelize_deepseek_v4
from .job_config import check_job
from .model import DeepSeekV4Model

NAME = "deepseek_v4"


def build_tokenizer_after_job_checks(job_config):
    """Titan's HF tokenizer, built after ``check_job``: the first spec hook, so refusals come before any
    work."""
    check_job(job_config)
    return build_hf_tokenizer(job_config)


def get_train_spec() -> TrainSpec:
    return TrainSpec(
        model_cls=DeepSeekV4Model,
        model_args=deepseek_v4_args,
        parallelize_fn=parallelize_deepseek_v4,
        pipelining_fn=None,  # pipeline parallelism is refused in parallelize_deepseek_v4
        build_optimizers_fn=build_optimizers_with_v4_load_balancing,
        build_lr_schedulers_fn=build_lr_schedulers,
        build_dataloader_fn=build_text_dataloader,
        build_tokenizer_fn=build_tokenizer_after_job_checks,
        build_loss_fn=build_deepseek_v4_loss,
        build_validator_fn=build_validator,
        build_metrics_processor_fn=build_deepseek_v4_metrics_processor,
        state_dict_adapter=DeepSeekV4CheckpointAdapter,
    )


def register() -> None:
    """Register ``deepseek_v4`` once; re-imports and repeated calls are no-ops."""
    data.register_datasets()
    if NAME not in train_spec_module._extra_train_specs:
        register_train_spec(NAME, get_train_spec())
