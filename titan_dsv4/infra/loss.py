"""The train spec's loss: Titan's cross-entropy, plus DeepSeek-V4's multi-token-prediction and indexer terms.

The value returned is the LM loss alone (what Titan logs as ``loss``); the extra terms join its gradient
as ``aux - aux.detach()`` (exactly 0 in value) and are logged on their own by ``infra/metrics.py``:
  * MTP: ``mtp_loss_weight`` x the mean over depths of each depth's cross-entropy sum; depth k at position
    t predicts token t+k+1 (``labels[:, t+k]``); positions without such a target, or whose target lies in
    another document, are ignored;
  * indexer: ``indexer_loss_weight`` x the KL sum (over queries, averaged over CSA layers) of the
    Lightning Indexer's distillation (its inputs are detached: this term trains only the indexer); during
    the dense warm-up (``indexer_warmup_steps``) it is the only term with a gradient, so the indexer learns
    alone while the LM loss is logged.
Like the main loss these are sums; Titan divides by the global token count, so gradient accumulation
and data parallelism stay exact.
"""

from __future__ import annotations

import torch
from torchtitan.components.loss import IGNORE_INDEX, cross_entropy_loss
from torchtitan.tools.logging import logger

from ..model.context import INDEXER_STATS
from ..model.outputs import TrainingOutputs


def mtp_labels(labels: torch.Tensor, k: int, valid: torch.Tensor, shard=None) -> torch.Tensor:
    """Depth k's targets for positions 0 .. S-k-1: ``labels[:, t + k]`` where valid, else ignored.

    Under context parallelism (``shard``) t + k may lie on another rank: the labels are all-gathered (ids,
    B x S integers) and every local position gets its target ([B, S_local]).
    """
    ahead = labels[:, k:] if shard is None else shard.ahead_labels(labels, k, IGNORE_INDEX)
    return torch.where(valid, ahead, torch.full_like(ahead, IGNORE_INDEX))


def deepseek_v4_loss(pred, labels: torch.Tensor, ce=cross_entropy_loss) -> torch.Tensor:
    """Titan's summed cross-entropy of the model's ``(logits, TrainingOutputs)``, plus the extra terms they
    carry; of plain logits (a pipeline's last stage in evaluation, ``infra/pipeline.py``) the cross-entropy
    alone."""
    if isinstance(pred, torch.Tensor):
        return ce(pred, labels)
    logits, extra = pred
    if not isinstance(extra, TrainingOutputs):
        raise TypeError(
            f"the model returned {type(extra).__name__} beside the logits; expected TrainingOutputs"
        )
    main = ce(logits, labels)
    aux = main.new_zeros(())
    if extra.mtp_logits:
        sums = []
        for k, (mtp_logits, valid) in enumerate(zip(extra.mtp_logits, extra.mtp_valid), start=1):
            targets = mtp_labels(labels, k, valid, extra.shard)
            sums.append(ce(mtp_logits[:, : targets.shape[1]], targets))
            extra.metrics.add(f"mtp_loss_sum/{k}", sums[-1])
            extra.metrics.add(f"mtp_targets/{k}", (targets != IGNORE_INDEX).sum())
        aux = aux + extra.mtp_loss_weight * torch.stack(sums).mean()
    kl = None
    if extra.indexer_stats is not None:
        for name, value in zip(INDEXER_STATS, extra.indexer_stats):
            extra.metrics.add(f"indexer_{name}", value)
        if extra.indexer_loss_weight > 0:
            kl = extra.indexer_loss_weight * extra.indexer_stats[0] / max(1, extra.n_csa_layers)
    if extra.indexer_warmup and (
        kl is not None or extra.pipelined
    ):  # dense warm-up: the indexer learns alone, the LM loss is only logged
        # A pipeline's last stage must still send a gradient (zeros) back to the stages before it, whose
        # indexers learn through their outputs; the schedule's step drops the gradients it gives the other
        # parameters before they are clipped (infra/pipeline.py: zeros, or NaN where the logits hold an inf).
        logged = main.detach() + (0 * main if extra.pipelined else 0)
        return logged if kl is None else logged + (kl - kl.detach())
    if kl is not None:
        aux = aux + kl
    return main + (aux - aux.detach())


def build_deepseek_v4_loss(job_config, **kwargs):
    """Titan's loss builder for DeepSeek-V4 (``loss`` in ``compile.components`` compiles the
    cross-entropy)."""
    del kwargs
    ce = cross_entropy_loss
    if job_config.compile.enable and "loss" in job_config.compile.components:
        logger.info("Compiling the cross-entropy with torch.compile")
        ce = torch.compile(cross_entropy_loss, backend=job_config.compile.backend)
    return lambda pred, labels: deepseek_v4_loss(pred, labels, ce)
