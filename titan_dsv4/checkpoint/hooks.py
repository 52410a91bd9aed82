"""TorchTitan 0.2.2 behaviours this package completes; each wrapper adds exactly one thing.

1. Checkpoint options Titan rejects only when it reaches them (an HF export is refused at the *last*
   step, after all the compute) are checked when the CheckpointManager is built, before the first step.
2. An HF export (``checkpoint.last_save_in_hf``) is completed into a folder transformers loads: the adapter's
   ``finish_export`` adds config.json, the tokenizer and the int64 hash tables torch cannot consolidate.
3. Parallel degrees that do not multiply to the world size get a message that names the degrees and the
   fix, instead of Titan's bare assertion.
4. Before a DCP save, every trainable parameter gets an optimizer state entry (see
   ``complete_optimizer_state``), so that a resumed job finds every key its fresh optimizer asks for.

``install()`` runs once, from the train spec's registration; calling it again changes nothing.
"""

from __future__ import annotations

import functools
import inspect
import os
from math import prod

import torch
import torch.distributed as dist

from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.config import Checkpoint as CheckpointConfig
from torchtitan.distributed.parallel_dims import ParallelDims

from ..model.args import ConfigError

_MARK = "_titan_dsv4_hook"


def check_checkpoint_options(cfg: CheckpointConfig, checkpoint_folder: str) -> None:
    """Refuse option combinations that Titan refuses only at load time or at the final save."""
    if not cfg.enable:
        return
    problems = []
    if cfg.last_save_in_hf and not cfg.last_save_model_only:
        problems.append("checkpoint.last_save_in_hf exports model weights only, but checkpoint.last_save_model_only "
                        "is false: add --checkpoint.last_save_model_only")
    if cfg.initial_load_in_hf and not cfg.initial_load_model_only:
        problems.append("checkpoint.initial_load_in_hf loads model weights only, but checkpoint.initial_load_model_only "
                        "is false: drop --checkpoint.no_initial_load_model_only")
    if cfg.initial_load_in_hf_quantized and not cfg.initial_load_in_hf:
        problems.append("checkpoint.initial_load_in_hf_quantized needs checkpoint.initial_load_in_hf: add "
                        "--checkpoint.initial_load_in_hf")
    resuming = os.path.isdir(checkpoint_folder)  # Titan then ignores initial_load_path
    if cfg.initial_load_path and not resuming and not os.path.isdir(cfg.initial_load_path):
        problems.append(f"checkpoint.initial_load_path {cfg.initial_load_path} is not a folder: point it at a "
                        "checkpoint folder (a Hugging Face folder with --checkpoint.initial_load_in_hf, or a DCP step-N folder)")
    if problems:
        raise ConfigError("Invalid checkpoint options:\n  - " + "\n  - ".join(problems))


def check_parallel_degrees(dims: ParallelDims) -> None:
    """The degrees must multiply to the world size; data_parallel_shard_degree -1 takes the ranks left over."""
    others = {
        "data_parallel_replicate_degree": dims.dp_replicate,
        "context_parallel_degree": dims.cp,
        "tensor_parallel_degree": dims.tp,
        "pipeline_parallel_degree": dims.pp,
    }
    below_one = [f"{k}={v}" for k, v in {**others, "expert_parallel_degree": dims.ep}.items() if v < 1]
    if dims.dp_shard < 1 and dims.dp_shard != -1:
        below_one.append(f"data_parallel_shard_degree={dims.dp_shard}")
    if below_one:
        raise ConfigError(f"parallelism degrees must be >= 1 (data_parallel_shard_degree may be -1): got "
                          f"{', '.join(below_one)}; set them to 1 to disable that parallelism")
    fixed, world = prod(others.values()), dims.world_size
    product = " x ".join(f"{k}={v}" for k, v in others.items() if v > 1) or "1"
    if dims.dp_shard == -1 and world % fixed:
        raise ConfigError(
            f"parallelism degrees do not divide the world size: {product} = {fixed} does not divide the {world} "
            f"ranks (data_parallel_shard_degree=-1 takes the ranks left over). Pick degrees whose product divides "
            f"{world}, or launch a multiple of {fixed} ranks (NGPU)."
        )
    if dims.dp_shard != -1 and fixed * dims.dp_shard != world:
        raise ConfigError(
            f"parallelism degrees do not match the world size: data_parallel_shard_degree={dims.dp_shard} x {product} "
            f"= {fixed * dims.dp_shard} ranks, but the job has {world}. Set --parallelism.data_parallel_shard_degree -1 "
            f"to use every remaining rank, or launch {fixed * dims.dp_shard} ranks (NGPU={fixed * dims.dp_shard})."
        )


def complete_optimizer_state(optimizers) -> None:
    """Give every trainable parameter an optimizer state entry before a save.

    Parameters that never receive a gradient (the CSA indexer: as in transformers, no LM-loss gradient
    reaches it) have no AdamW state, while a resumed optimizer initialises state for every parameter and
    asks the checkpoint for all of it, so resume would fail on a missing key. One zero-gradient step at
    lr 0 over just those parameters creates their entries and changes no value; their step counter is
    then put back to 0, so the entry is exactly what the optimizer would create at a first gradient.
    Parameters that already have state are left out. A never-stepped optimizer is left to torch, which
    initialises all of its parameters itself.
    """
    for opt in getattr(optimizers, "optimizers", []):
        params = [p for group in opt.param_groups for p in group["params"]]
        missing = [p for p in params if p.requires_grad and p not in opt.state]
        if not opt.state or not missing:
            continue
        grads, lrs = [p.grad for p in params], [group["lr"] for group in opt.param_groups]
        try:
            for p in params:
                p.grad = None
            for p in missing:
                p.grad = torch.zeros_like(p)
            for group in opt.param_groups:
                group["lr"] = torch.zeros_like(group["lr"]) if isinstance(group["lr"], torch.Tensor) else 0.0
            opt.step()
            for p in missing:
                step = opt.state[p].get("step")
                if isinstance(step, torch.Tensor):
                    step.zero_()
                elif step is not None:
                    opt.state[p]["step"] = 0
        finally:
            for p, g in zip(params, grads):
                p.grad = g
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr


def _checked_options(init):
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        bound = inspect.signature(init).bind(self, *args, **kwargs)
        bound.apply_defaults()
        cfg = bound.arguments["checkpoint_config"]
        check_checkpoint_options(cfg, os.path.join(bound.arguments["base_folder"], cfg.folder))
        init(self, *args, **kwargs)

    return __init__


def _with_hf_config(save_last_step):
    @functools.wraps(save_last_step)
    def _save_last_step(self, curr_step: int) -> None:
        adapter = self.sd_adapter
        export = self.last_save_in_hf and hasattr(adapter, "finish_export")
        if export:
            adapter.exporting = True
        try:
            save_last_step(self, curr_step)
        finally:
            if export:
                adapter.exporting = False
        if export and (not dist.is_initialized() or dist.get_rank() == 0):
            folder = self._create_checkpoint_id(curr_step)
            adapter.finish_export(folder, self.states["model"].state_dict(), self.export_dtype)

    return _save_last_step


def _with_complete_optimizer_state(dcp_save):
    @functools.wraps(dcp_save)
    def wrapper(self, state_dict, *args, **kwargs):
        if "optimizer" in state_dict:
            complete_optimizer_state(state_dict["optimizer"])
        return dcp_save(self, state_dict, *args, **kwargs)

    return wrapper


def _checked_degrees(validate):
    @functools.wraps(validate)
    def _validate(self) -> None:
        check_parallel_degrees(self)
        validate(self)

    return _validate


def _wrap(cls, name: str, wrapper) -> None:
    if not getattr(getattr(cls, name), _MARK, False):
        wrapped = wrapper(getattr(cls, name))
        setattr(wrapped, _MARK, True)
        setattr(cls, name, wrapped)


def install() -> None:
    """Apply the four wrappers (idempotent)."""
    _wrap(CheckpointManager, "__init__", _checked_options)
    _wrap(CheckpointManager, "_save_last_step", _with_hf_config)
    _wrap(CheckpointManager, "dcp_save", _with_complete_optimizer_state)
    _wrap(ParallelDims, "_validate", _checked_degrees)
