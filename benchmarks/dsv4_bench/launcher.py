"""Trainer entry of every benchmark training run: ``TRAIN_FILE=dsv4_bench.launcher ./run_train.sh ...``
(PYTHONPATH=benchmarks).

Same as ``titan_dsv4.train`` (``main(DeepSeekV4Trainer)``) plus benchmark-only registrations, so that
every run goes through the very same entry module, Trainer and config:
  * the benchmark shapes become ``--model.flavor`` names (run_train.sh takes flavors by name);
  * ``deepseek_v4_per_island`` (section b's baseline layout): the deepseek_v4 spec with a parallelize_fn
    that builds one fp32 FSDP unit per island (``apply_fsdp(group_islands=False)``) instead of the
    grouped units; everything else about the spec is the shipped one;
  * ``deepseek_v3`` gets gloo's reduction op: its parallelize sets FSDP's gradient divide factor,
    which FSDP2 turns into PREMUL_SUM, an op gloo lacks. The wrapper applies the same fix ours applies
    on gloo (``force_sum_reduction``: SUM with a divide factor of 1.0 is the same math);
  * and, in deepseek_v3's process only, ``torch.histc`` counts integers on CPU: Titan's MoE router counts
    tokens per expert with it, and it has no CPU kernel for integer input (our MoE counts with
    ``bincount``). Nothing else about deepseek_v3 changes.
With ``DSV4_BENCH_OUT`` set the Trainer is ``MeasuredTrainer`` (the same Trainer, its steps measured).
"""

from __future__ import annotations

import dataclasses
import os

import torchtitan.protocols.train_spec as train_spec_module
from torchtitan.train import main

import titan_dsv4  # noqa: F401  (registers the deepseek_v4 spec)
from titan_dsv4.cpu import apply_cpu_support
from titan_dsv4.data import register_datasets
from titan_dsv4.trainer import DeepSeekV4Trainer

from .shapes import register_bench_flavors
from .trainer_runs import OUT_ENV

PER_ISLAND = "deepseek_v4_per_island"


def parallelize_per_island(model, parallel_dims, job_config):
    """FSDP2 as ``parallelize_deepseek_v4`` applies it, but one fp32 unit per island (no grouping).

    Only the layout section b compares is reproduced: no activation checkpointing, compile or expert
    parallelism (refused rather than silently left out).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torchtitan.config import TORCH_DTYPE_MAP

    from titan_dsv4.infra.parallelize import (
        apply_fsdp,
        bind_hca_param_sync_group,
        data_parallel_mesh,
        hca_param_sync_group,
        refuse_unimplemented_parallelism,
        reshard_after_forward,
    )

    refuse_unimplemented_parallelism(parallel_dims, job_config)
    extras = {
        "activation_checkpoint.mode": job_config.activation_checkpoint.mode != "none",
        "compile.enable": job_config.compile.enable,
        "parallelism.expert_parallel_degree": parallel_dims.ep_enabled,
    }
    if any(extras.values()):
        raise ValueError(f"{PER_ISLAND} builds FSDP only; turn off {[k for k, on in extras.items() if on]}")
    mesh = data_parallel_mesh(parallel_dims)
    if mesh is not None:
        policy = MixedPrecisionPolicy(
            param_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_reduce],
        )
        apply_fsdp(
            model,
            mesh,
            mp_policy=policy,
            reshard_after_forward=reshard_after_forward(job_config, parallel_dims),
            group_islands=False,
        )
    # As parallelize_deepseek_v4: without the group the per-forward HCA alignment all-reduce is missing.
    bind_hca_param_sync_group(model, hca_param_sync_group(mesh))
    return model


def histc_counts_integers_on_cpu() -> None:
    """``torch.histc`` with explicit bounds on an integer CPU tensor: the same counts, by ``bincount``.

    Bin i holds values v with min + i*w <= v < min + (i+1)*w, w = (max - min) / bins, and v == max in the
    last bin, as histc defines them; values outside [min, max] are not counted. Any other call goes to
    torch's own histc. Installed once, in the deepseek_v3 comparison run's processes only.
    """
    import torch

    original = torch.histc
    if getattr(original, "counts_integers_on_cpu", False):
        return

    def histc(input, bins=100, min=0, max=0, *, out=None):  # torch's own signature (min, max)
        if input.is_floating_point() or input.device.type != "cpu" or out is not None or not min < max:
            return original(input, bins=bins, min=min, max=max, out=out)
        values = input.flatten()
        values = values[(values >= min) & (values <= max)]
        index = ((values - min) * bins // (max - min)).clamp(max=bins - 1).long()
        return torch.bincount(index, minlength=bins).to(input.dtype)

    histc.counts_integers_on_cpu = True
    torch.histc = histc


def _deepseek_v3_on_gloo():
    """deepseek_v3's own TrainSpec with its parallelize_fn followed by the gloo reduction fix."""
    from torchtitan.models.deepseek_v3 import get_train_spec, parallelize_deepseekv3

    from titan_dsv4.infra.parallelize import data_parallel_mesh, force_sum_reduction, uses_gloo

    def parallelize(model, parallel_dims, job_config):
        histc_counts_integers_on_cpu()
        model = parallelize_deepseekv3(model, parallel_dims, job_config)
        mesh = data_parallel_mesh(parallel_dims)
        if mesh is not None and uses_gloo(mesh):
            force_sum_reduction(model)
        return model

    return dataclasses.replace(get_train_spec(), parallelize_fn=parallelize)


def register() -> None:
    """Benchmark flavors and specs, each once (user specs take priority in Titan)."""
    from titan_dsv4.spec import get_train_spec

    register_bench_flavors()
    extra = train_spec_module._extra_train_specs
    if PER_ISLAND not in extra:
        train_spec_module.register_train_spec(
            PER_ISLAND, dataclasses.replace(get_train_spec(), parallelize_fn=parallelize_per_island)
        )
    if "deepseek_v3" not in extra:
        train_spec_module.register_train_spec("deepseek_v3", _deepseek_v3_on_gloo())


def trainer_class() -> type[DeepSeekV4Trainer]:
    """``MeasuredTrainer`` when the run was launched to measure, else the package's Trainer."""
    if not os.environ.get(OUT_ENV):
        return DeepSeekV4Trainer
    from .measured_trainer import MeasuredTrainer

    return MeasuredTrainer


if __name__ == "__main__":
    apply_cpu_support()  # as titan_dsv4.train: Titan's device is the CPU where there is no accelerator
    register_datasets()  # Titan's deepseek_v3 reads the packaged corpus too (its builders do not register it)
    register()
    main(trainer_class())
