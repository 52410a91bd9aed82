"""What every forward returns beside the logits (``TrainingOutputs``, for the loss), the step's extra
figures (``StepMetrics``, for the metrics processor), and the multi-token-prediction targets they hold."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sequence_shard import SequenceShard


@dataclass
class TrainingOutputs:
    """What every forward returns beside the logits, for the loss and the step's metrics (in evaluation: no
    MTP logits and no indexer statistics, so the loss is the cross-entropy alone)."""

    mtp_logits: list[torch.Tensor]  # depth k (1-based) predicts the token k+1 positions ahead: [B, S, V]
    mtp_valid: list[torch.Tensor]  # [B, S - k] bool: the target exists and is in the query's document
    mtp_loss_weight: float
    indexer_stats: torch.Tensor | None  # INDEXER_STATS summed over CSA layers (the KL sum has gradient)
    indexer_loss_weight: float
    n_csa_layers: int
    metrics: StepMetrics
    indexer_warmup: bool = False  # the dense warm-up: only the indexer learns (the LM loss trains nothing)
    # context parallelism: MTP targets labels[t+k] may live on another shard (mtp_valid is then [B, S])
    shard: SequenceShard | None = None
    # set by a pipeline's last stage (infra/pipeline_stage.py), not the model: the loss must keep a graph
    # back to the stage's input
    pipelined: bool = False


class StepMetrics:
    """The current step's extra losses and counts (summed over micro-batches), for the metrics processor.

    The loss adds to it; the optimizer's pre-step hook closes the step (``close_step``), so a step's
    figures are what its micro-batches added, however often the step is logged.
    """

    def __init__(self):
        self._open: dict[str, torch.Tensor] = {}
        self.closed: dict[str, torch.Tensor] = {}

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self._open[name] = self._open[name] + value if name in self._open else value

    def close_step(self) -> None:
        self.closed, self._open = self._open, {}


def shifted(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """The tokens k positions ahead; the last k positions (no such token) get token 0, their targets
    ignored."""
    return torch.cat([tokens[:, k:], tokens.new_zeros(tokens.shape[0], k)], dim=1)


def mtp_targets_in_document(tokens: torch.Tensor, k: int, eos_id: int | None) -> torch.Tensor:
    """[B, S - k] bool: depth k's target at position t (token t+k+1) exists and shares t's document.

    A document ends with eos, so the target is in t's document iff none of tokens t .. t+k is eos.
    """
    B, S = tokens.shape
    if eos_id is None:
        return torch.ones(B, max(S - k, 0), dtype=torch.bool, device=tokens.device)
    ends = torch.cumsum(torch.nn.functional.pad((tokens == eos_id).long(), (1, 0)), dim=1)  # ends before t
    return (ends[:, k + 1 :] - ends[:, : S - k]) == 0
