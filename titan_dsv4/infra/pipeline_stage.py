"""A DeepSeek-V4 model part as one pipeline stage: what crosses the stage, its indexer KL, the loss handoff.

The model's forward knows no pipeline (``model/model.py``); a stage composes the model's pieces
(``embed``, ``context``, ``run_layers``, ``heads``) itself. DeepSeek-V4 differs from TorchTitan's split
LLMs in what crosses a stage boundary: the mHC residual state [B, S, hc_mult, D] (not a [B, S, D] hidden),
the token ids (hash-routed MoE layers route by them and packed documents are found from them on every
stage), and, when MTP trains, the embeddings of the tokens ahead (the MTP depths on the last stage read
them; the embedding itself stays on the first stage, so it has one copy in checkpoints and one gradient).

How a part becomes a stage: its class becomes ``DeepSeekV4Stage`` (a subclass of the model whose
``forward`` is the stage's), as ``fully_shard`` later swaps it for its own FSDP subclass. Not a wrapping
module, on purpose: the part must stay the module torch's ``PipelineStage`` runs (its ``submod``: torch
checks ``isinstance(submod, FSDPModule)`` to defer gradient sync and resharding to the last microbatch, and
FSDP's root hooks run around ``submod.forward``) and the module Titan holds in ``model_parts`` (its
checkpointer saves their state dicts: the names stay the unsplit model's, so a checkpoint of pp 2 resumes at
pp 1 and back). A wrapper would add a name prefix or hide the FSDP root from the schedule.
"""

from __future__ import annotations

import torch

from ..model.context import INDEXER_STATS
from ..model.model import DeepSeekV4Model


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


class DeepSeekV4Stage(DeepSeekV4Model):
    """A model part run as one pipeline stage (never constructed: ``as_stage`` turns a split part into one).

    ``forward(tokens)`` on the first stage, ``forward(streams, tokens, *aheads)`` on a later one, each what
    the stage before it returned. A stage before the last returns ``(streams, tokens, *aheads)`` with its
    indexer KL attached to the streams' backward; the last returns the logits alone (torch's schedule passes
    tensors only): in training those of every head joined along the sequence (main, then each MTP depth:
    one lm_head call, and no view leaves the stage, as zero-bubble schedules detach stage outputs in place),
    with their ``TrainingOutputs`` handed to the loss through ``step.outputs`` (``pipeline_loss``).
    """

    step: PipelineStep  # shared by the rank's stages and the schedule's loss
    mtp_aheads: int  # MTP trains: the first stage embeds the tokens 1 .. mtp_aheads ahead for the last

    @classmethod
    def as_stage(cls, part: DeepSeekV4Model, step: PipelineStep, mtp_aheads: int) -> DeepSeekV4Stage:
        """``part`` (a split copy of the model, its other stages' modules removed) as a stage, in place."""
        part.__class__ = cls
        part.step, part.mtp_aheads = step, mtp_aheads
        part.find_hca_compressors()
        return part

    def forward(self, *inputs: torch.Tensor, positions: torch.Tensor | None = None, **kwargs):
        del kwargs
        if self.tok_embeddings is not None:
            (tokens,) = inputs
            streams = self.embed(tokens)
            aheads = [self.embed_ahead(tokens, k) for k in range(1, self.mtp_aheads + 1)]
        else:
            streams, tokens, *aheads = inputs
        ctx = self.context(tokens, positions)
        streams, stats = self.run_layers(streams, ctx)
        if self.lm_head is None:  # not the last stage
            return (self.indexer_loss_to_backward(streams, stats), tokens, *aheads)
        hidden, mtp_valid = self.heads(streams, ctx, aheads)
        logits = self.lm_head(torch.cat(hidden, dim=1) if len(hidden) > 1 else hidden[0])
        if self.training:  # the loss splits the joined heads again (``pipeline_loss``)
            outputs = self.training_outputs([], mtp_valid, stats, ctx)
            outputs.pipelined = True
            self.step.outputs.append(outputs)
        return logits

    def indexer_loss_to_backward(self, streams: torch.Tensor, stats: torch.Tensor | None) -> torch.Tensor:
        """A stage before the last: its CSA layers' indexer statistics go to the step's metrics, and their
        KL term joins backward through the stage's output (the loss on the last stage cannot reach it)."""
        if stats is None:
            return streams
        for name, value in zip(INDEXER_STATS, stats):
            self.step_metrics.add(f"indexer_{name}", value)
        args = self.model_args
        if not (self.training and args.indexer_loss_weight > 0):
            return streams
        kl = args.indexer_loss_weight * stats[0] / max(1, self.n_csa_layers)
        return attach_to_backward(streams, kl / self.step.tokens)


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


__all__ = ["DeepSeekV4Stage", "PipelineStep", "attach_to_backward"]
