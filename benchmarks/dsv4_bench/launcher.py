"""Trainer entry for section e: ``TRAIN_FILE=dsv4_bench.launcher ./run_train.sh ...`` (PYTHONPATH=benchmarks).

Same as ``titan_dsv4.train`` plus two benchmark-only registrations, so that ours and TorchTitan's
deepseek_v3 run through the very same entry module, Trainer and config:
  * the benchmark shapes become ``--model.flavor`` names (run_train.sh takes flavors by name);
  * ``deepseek_v3`` gets gloo's reduction op: its parallelize sets FSDP's gradient divide factor,
    which FSDP2 turns into PREMUL_SUM, an op gloo lacks. The wrapper applies the same fix ours applies
    on gloo (``force_sum_reduction``: SUM with a divide factor of 1.0 is the same math). Nothing else
    about deepseek_v3 changes.
"""

from __future__ import annotations

import dataclasses

import torchtitan.protocols.train_spec as train_spec_module
from torchtitan.train import Trainer, main

import titan_dsv4  # noqa: F401  (CPU support + deepseek_v4 spec, before torchtitan)

from .shapes import register_bench_flavors


def _deepseek_v3_on_gloo():
    """deepseek_v3's own TrainSpec with its parallelize_fn followed by the gloo reduction fix."""
    from torchtitan.models.deepseek_v3 import get_train_spec, parallelize_deepseekv3

    from titan_dsv4.infra.parallelize import data_parallel_mesh, force_sum_reduction, uses_gloo

    def parallelize(model, parallel_dims, job_config):
        model = parallelize_deepseekv3(model, parallel_dims, job_config)
        mesh = data_parallel_mesh(parallel_dims)
        if mesh is not None and uses_gloo(mesh):
            force_sum_reduction(model)
        return model

    return dataclasses.replace(get_train_spec(), parallelize_fn=parallelize)


def register() -> None:
    register_bench_flavors()
    if "deepseek_v3" not in train_spec_module._extra_train_specs:  # user specs take priority in Titan
        train_spec_module.register_train_spec("deepseek_v3", _deepseek_v3_on_gloo())


if __name__ == "__main__":
    register()
    main(Trainer)
