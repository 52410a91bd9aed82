"""Optimizers with DeepSeek-V4's aux-loss-free expert-bias update (and the step's metrics closed).

Titan's ``build_optimizers_with_moe_load_balancing`` assumes every MoE layer has the same
``load_balance_coeff``: it decides from the first layer and stops at the first layer without one.
V4's first layers are hash-routed (no selection bias), so that hook would never run. This builder
keeps Titan's update rule (coeff * sign(mean - load), centred) and skips only the hash layers.
"""

from __future__ import annotations

import torch
from torch import nn
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
    if any(m.load_balance_coeff for m in _moe_layers(model_parts)):
        optimizers.register_step_pre_hook(lambda *a, **k: update_expert_bias(model_parts, parallel_dims))
    optimizers.register_step_pre_hook(lambda *a, **k: close_step_metrics(model_parts))
    return optimizers
