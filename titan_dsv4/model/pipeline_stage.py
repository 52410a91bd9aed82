"""What a model part needs to know to run as one pipeline stage (``infra/pipeline.py`` splits the model).

DeepSeek-V4 differs from TorchTitan's split LLMs in what crosses a stage boundary: the mHC residual
state [B, S, hc_mult, D] (not a [B, S, D] hidden), the token ids (hash-routed MoE layers route by them and
packed documents are found from them on every stage), and, when MTP trains, the embeddings of the tokens
ahead (the MTP depths on the last stage read them; the embedding itself stays on the first stage, so
it has one copy in checkpoints and one gradient).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class PipelineStep:
    """What the stages and the loss of one pipeline share during a training step.

    ``tokens``: the step's global count of target tokens, the divisor of every loss term. Titan divides the
    summed loss by it outside the model; under pipelining the loss and each stage's indexer KL reach
    backward inside the schedule, so they are divided there. 1 outside a training step (validation divides
    after the schedule, as Titan does).
    ``outputs``: the last stage's ``TrainingOutputs`` for the loss of the same microbatch (a stage may hand
    the schedule tensors only; the schedule computes each microbatch's loss right after its forward).
    """

    def __init__(self):
        self.tokens: torch.Tensor | float = 1.0
        self.outputs: list = []


@dataclass
class StageRole:
    """A model part's place in the pipeline; the default is the whole model (no pipelining)."""

    pipelined: bool = False
    mtp_aheads: int = 0  # MTP trains: the first stage embeds the tokens 1..mtp_aheads ahead for the last
    step: PipelineStep = field(default_factory=PipelineStep)


class _AttachToBackward(torch.autograd.Function):
    """Identity on ``x``; backward also gives ``aux`` the gradient 1 (an extra loss term's own path)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_dtype = aux.dtype
        return x.clone()  # not a view: zero-bubble schedules detach stage outputs in place

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones((), dtype=ctx.aux_dtype, device=grad.device)


def attach_to_backward(x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    """``x``, with the scalar ``aux`` added to whatever loss ``x`` reaches (value unchanged)."""
    return _AttachToBackward.apply(x, aux)
