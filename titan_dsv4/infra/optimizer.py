"""Optimizers with DeepSeek-V4's aux-loss-free expert-bias update (and the step's metrics closed), optimizer
state for every trainable parameter from the start, and the model's training clock.

Titan's ``build_optimizers_with_moe_load_balancing`` assumes every MoE layer has the same
``load_balance_coeff``: it decides from the first layer and stops at the first layer without one.
V4's first layers are hash-routed (no selection bias), so that hook would never run. This builder
keeps Titan's update rule (coeff * sign(mean - load), centred) and skips only the hash layers.
"""

from __future__ import annotations

import torch
from torch import nn
from torchtitan.components.lr_scheduler import LRSchedulersContainer, build_lr_schedulers
from torchtitan.components.optimizer import OptimizersContainer, build_optimizers
from torchtitan.config import Optimizer as OptimizerConfig
from torchtitan.distributed import ParallelDims


def _moe_layers(model_parts: list[nn.Module]) -> list[nn.Module]:
    """Every block's MoE, the MTP depths' included (their routers are learned, with a selection bias)."""
    return [getattr(b, "_checkpoint_wrapped_module", b).moe for part in model_parts for b in part.blocks()]


def close_step_metrics(model_parts: list[nn.Module]) -> None:
    """The step's extra losses are complete once the optimizer steps: hand them to the metrics processor."""
    for part in model_parts:
        if hasattr(part, "step_metrics"):
            part.step_metrics.close_step()


def update_expert_bias(model_parts: list[nn.Module], parallel_dims: ParallelDims) -> None:
    """Steer each learned router's selection bias toward uniform load over the global batch."""
    moes = _moe_layers(model_parts)
    learned = [m for m in moes if m.load_balance_coeff is not None]
    if learned:
        counts = torch.vstack([m.tokens_per_expert for m in learned])  # this rank's tokens, all experts
        loss_mesh = parallel_dims.get_optional_mesh("loss")
        if loss_mesh is not None:  # every data-parallel rank's tokens, each counted once
            torch.distributed.all_reduce(counts, group=loss_mesh.get_group())
        with torch.no_grad():
            for m, load in zip(learned, counts.float()):
                delta = m.load_balance_coeff * torch.sign(load.mean() - load)
                m.expert_bias.add_(delta - delta.mean())
    with torch.no_grad():
        for m in moes:
            m.tokens_per_expert.zero_()


def build_optimizers_with_v4_load_balancing(
    model_parts: list[nn.Module],
    optimizer_config: OptimizerConfig,
    parallel_dims: ParallelDims,
    ft_manager=None,
) -> OptimizersContainer:
    optimizers = build_optimizers(
        model_parts=model_parts,
        optimizer_config=optimizer_config,
        parallel_dims=parallel_dims,
        ft_manager=ft_manager,
    )
    complete_optimizer_state(optimizers)
    if any(m.load_balance_coeff for m in _moe_layers(model_parts)):
        optimizers.register_step_pre_hook(lambda *a, **k: update_expert_bias(model_parts, parallel_dims))
    optimizers.register_step_pre_hook(lambda *a, **k: close_step_metrics(model_parts))
    if parallel_dims.pp_enabled:
        # The dense warm-up's gradients of the parameters that do not learn are dropped by the pipeline
        # schedule's step, before Titan clips; this pre-hook (after clipping) only drops the exact zero a
        # rank without indexers keeps for clipping (infra/pipeline.py, ``drop_warmup_gradients``).
        from .pipeline import drop_warmup_gradients

        optimizers.register_step_pre_hook(lambda *a, **k: drop_warmup_gradients(model_parts))
    return optimizers


def complete_optimizer_state(optimizers) -> None:
    """Give every trainable parameter the optimizer state entry it would get at its first gradient, now.

    A parameter that has not received a gradient yet (during the indexer's dense warm-up only the indexer
    learns; an HCA compressor whose layer never saw a complete window) would have no AdamW state, while a
    resumed optimizer initialises state for every parameter and asks the checkpoint for all of it: a save
    in that window could not be resumed. One zero-gradient step at lr 0 over just those parameters creates
    their entries and changes no value; their step counter is then put back to 0, so each entry is exactly
    what the optimizer creates at a first gradient. Done once, when the optimizers are built, on every
    entry point.
    """
    for opt in optimizers.optimizers:
        params = [p for group in opt.param_groups for p in group["params"]]
        missing = [p for p in params if p.requires_grad and p not in opt.state]
        if not missing:
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


class SchedulerClock:
    """The 1-based step the next training forward belongs to: the LR schedulers' steps taken, plus one.

    Titan steps its LR schedulers once per optimizer step, on every entry point, and restores their
    ``last_epoch`` from the checkpoint on resume: so the model knows its step without a trainer of ours,
    a resume in the middle of the indexer's warm-up included.
    """

    def __init__(self, schedulers: LRSchedulersContainer):
        self.schedulers = schedulers

    @property
    def step(self) -> int:
        return self.schedulers.schedulers[0].last_epoch + 1


def build_lr_schedulers_with_training_clock(
    optimizers: OptimizersContainer, lr_scheduler_config, training_steps: int
) -> LRSchedulersContainer:
    """Titan's LR schedulers; their step count becomes every model part's training clock."""
    schedulers = build_lr_schedulers(optimizers, lr_scheduler_config, training_steps)
    clock = SchedulerClock(schedulers)
    for part in optimizers.model_parts:
        part.bind_training_clock(clock)
    return schedulers
