"""Trainer entry of ``benchmarks/gpu.py``'s training runs (``TRAIN_FILE=dsv4_bench.gpu_trainer``).

The Trainer is the package's (``DeepSeekV4Trainer``, TorchTitan's ``train_step`` unchanged); this module
only times it and registers what the one-GPU runs need:
  * the benchmark shapes as ``--model.flavor`` names (``bench_mid``), as ``dsv4_bench.launcher`` does;
  * ``--model.name deepseek_v4_fsdp1``: the shipped spec whose parallelize_fn, on a world of one rank, also
    applies FSDP2 over a 1-rank ``('fsdp',)`` mesh (``apply_fsdp``: the fp32 unit rules, bf16 params /
    fp32 reduce), which TorchTitan skips on one GPU (there it runs the fp32 model under
    ``torch.autocast``). So the step computes what each rank of a multi-GPU FSDP job computes; the
    Trainer's autocast is then turned off, as Titan turns it off whenever FSDP is on. On torch < 2.13
    the fp32 islands get one unit each (``grouped_islands_supported`` says why).

``GpuTimedTrainer`` wraps ``train_step`` with device synchronisation on both sides (the step's wall time
on the device), keeps TorchTitan's own logged metrics (tps, tflops, mfu, memory) of every step with the
allocator's peak of that step (read before Titan resets it), and rewrites ``$DSV4_GPU_OUT`` after every
step, so a run killed at its time cap still leaves the steps it finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time

import torch
import torchtitan.protocols.train_spec as train_spec_module
from torchtitan.tools.logging import logger
from torchtitan.train import main

import titan_dsv4  # noqa: F401  (registers the deepseek_v4 spec)
from titan_dsv4.cpu import apply_cpu_support
from titan_dsv4.data import register_datasets
from titan_dsv4.trainer import DeepSeekV4Trainer

from .launcher import register as register_bench

OUT_ENV = "DSV4_GPU_OUT"  # JSON file this run writes
WARMUP_ENV = "DSV4_GPU_WARMUP"  # untimed first steps (the config's indexer warm-up included)
GROUP_ENV = "DSV4_GPU_GROUP_ISLANDS"  # "1" / "0" force grouped / per-island fp32 units; unset: by torch
FSDP1 = "deepseek_v4_fsdp1"


def grouped_islands_supported() -> bool:
    """Whether FSDP2 casts the inputs of every module of a grouped ``fully_shard([a, b, ...])`` unit.

    torch 2.13 runs a group's pre-forward hook (``cast_forward_inputs``) for each module; older torch ran
    it for the group's first module only, so the grouped fp32 islands' later modules got bf16 inputs
    ("expected mat1 and mat2 to have the same dtype": seen on torch 2.11 on an H200). The package pins
    torch>=2.13; on older torch this benchmark falls back to one fp32 unit per island (``group_islands=
    False``, section b's baseline layout) and records it.
    """
    forced = os.environ.get(GROUP_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 13)


def parallelize_fsdp_one_rank(model, parallel_dims, job_config):
    """The spec's ``parallelize_deepseek_v4``; then, when Titan has no data-parallel mesh on a world of
    one rank, FSDP2 by the same unit rules over a 1-rank ``('fsdp',)`` mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torchtitan.config import TORCH_DTYPE_MAP
    from torchtitan.tools.utils import device_type

    from titan_dsv4.infra.parallelize import (
        apply_fsdp,
        bind_hca_param_sync_group,
        data_parallel_mesh,
        hca_param_sync_group,
        parallelize_deepseek_v4,
        reshard_after_forward,
    )

    model = parallelize_deepseek_v4(model, parallel_dims, job_config)
    if data_parallel_mesh(parallel_dims) is not None or parallel_dims.world_size != 1:
        return model
    mesh = init_device_mesh(device_type, (1,), mesh_dim_names=("fsdp",))
    apply_fsdp(
        model,
        mesh,
        mp_policy=MixedPrecisionPolicy(
            param_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_reduce],
        ),
        reshard_after_forward=reshard_after_forward(job_config, parallel_dims),
        group_islands=grouped_islands_supported(),
    )
    bind_hca_param_sync_group(model, hca_param_sync_group(mesh))
    model.fsdp_one_rank = True
    model.fsdp_group_islands = grouped_islands_supported()
    return model


def register() -> None:
    from titan_dsv4.spec import get_train_spec

    register_bench()
    if FSDP1 not in train_spec_module._extra_train_specs:
        train_spec_module.register_train_spec(
            FSDP1, dataclasses.replace(get_train_spec(), parallelize_fn=parallelize_fsdp_one_rank)
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GpuTimedTrainer(DeepSeekV4Trainer):
    """DeepSeekV4Trainer whose steps are timed on the device and whose figures go to ``$DSV4_GPU_OUT``."""

    def __init__(self, job_config):
        start = time.perf_counter()
        super().__init__(job_config)
        self.fsdp_one_rank = bool(getattr(self.model_parts[0], "fsdp_one_rank", False))
        if self.fsdp_one_rank:  # FSDP casts; autocast on top would also cast the fp32 islands
            self.maybe_enable_amp = contextlib.nullcontext()
            logger.info("[gpu_trainer] FSDP2 on a 1-rank mesh: mixed precision by fully_shard, no autocast")
        self.warmup = int(os.environ.get(WARMUP_ENV, "3"))
        self.out = os.environ.get(OUT_ENV)
        self.step_s: list[float] = []
        self.titan: list[dict] = []
        self.losses: list[float] = []
        mp = self.metrics_processor
        titan_log = mp.logger.log

        def keep(metrics, step):  # TorchTitan's own figures of the step, as it logs them
            figures = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            if self.device.type == "cuda":  # read before Titan resets the allocator's peak after logging
                figures["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            self.titan.append({"step": step, **figures})
            return titan_log(metrics, step)

        mp.logger.log = keep
        from titan_dsv4.model.accounting import count_params

        model = self.model_parts[0]
        total, active = count_params(model.model_args, model)
        self.info = {
            "build_s": time.perf_counter() - start,
            "flavor": job_config.model.flavor,
            "model_name": job_config.model.name,
            "mode": "fsdp2_1rank" if self.fsdp_one_rank else "titan_1gpu_autocast",
            "fsdp_group_islands": getattr(self.model_parts[0], "fsdp_group_islands", None),
            "seq_len": job_config.training.seq_len,
            "local_batch_size": job_config.training.local_batch_size,
            "tokens_per_step": job_config.training.seq_len * job_config.training.local_batch_size,
            "mixed_precision_param": job_config.training.mixed_precision_param,
            "fp32_compute": list(model.model_args.fp32_compute),
            "use_grouped_mm": bool(model.model_args.moe_args.use_grouped_mm),
            "attn_impl": model.model_args.attn_impl,
            "indexer_warmup_steps": model.model_args.indexer_warmup_steps,
            "activation_checkpoint": job_config.activation_checkpoint.mode,
            "params_total": total,
            "params_active": active,
            "flops_per_token": float(mp.num_flops_per_token),
            "titan_peak_flops": float(mp.gpu_peak_flops),
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "warmup_steps": self.warmup,
        }
        self._write()

    def forward_backward_step(self, **kwargs):
        loss = super().forward_backward_step(**kwargs)
        self.losses.append(float(loss.detach()))
        return loss

    def train_step(self, data_iterator):
        timed = self.step > self.warmup
        _sync(self.device)
        start = time.perf_counter()
        super().train_step(data_iterator)
        _sync(self.device)
        elapsed = time.perf_counter() - start
        if timed:
            self.step_s.append(elapsed)
        self._write()

    def _write(self) -> None:
        if not self.out:
            return
        record = {
            **self.info,
            "step_s": self.step_s,
            "losses": self.losses,
            "titan_metrics": self.titan,
        }
        timed = [m for m in self.titan if m["step"] > self.warmup]
        peaks = [m["max_memory_allocated_gib"] for m in timed if "max_memory_allocated_gib" in m]
        if peaks:  # over the timed steps (Titan resets the allocator's peak at every logged step)
            record["max_memory_allocated_gib"] = max(peaks)
        tmp = f"{self.out}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, self.out)


if __name__ == "__main__":
    apply_cpu_support()  # as titan_dsv4.train: Titan's device is the CPU where there is no accelerator
    register_datasets()
    register()
    main(GpuTimedTrainer)
