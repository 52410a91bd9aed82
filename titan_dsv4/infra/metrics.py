"""Titan's metrics processor, plus DeepSeek-V4's per-step figures: ``mtp_loss``, ``indexer_kl``,
``indexer_recall``.

The figures come from the model's ``StepMetrics`` (closed at each optimizer step), summed over the
data-parallel ranks, and go to the metrics backends (TensorBoard, W&B) with Titan's, and to the console as
a line of their own right after Titan's step line (``step: N  mtp_loss: ...``).
"""

from __future__ import annotations

import torch
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.tools.logging import logger

from ..refusals import release_device_mesh_groups


def step_figures(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Global sums -> the logged figures (means over targets, queries and depths)."""
    figures = {}
    depths = sorted(int(k.split("/")[1]) for k in sums if k.startswith("mtp_loss_sum/"))
    if depths:
        per_depth = [sums[f"mtp_loss_sum/{k}"] / sums[f"mtp_targets/{k}"].clamp_min(1) for k in depths]
        figures["mtp_loss"] = float(torch.stack(per_depth).mean())
    if "indexer_kl_queries" in sums and sums["indexer_kl_queries"] > 0:
        figures["indexer_kl"] = float(sums["indexer_kl_sum"] / sums["indexer_kl_queries"])
    if "indexer_recall_total" in sums and sums["indexer_recall_total"] > 0:
        figures["indexer_recall"] = float(sums["indexer_recall_hits"] / sums["indexer_recall_total"])
        figures["indexer_recall_chance"] = float(sums["indexer_recall_chance"] / sums["indexer_recall_total"])
    return figures


class DeepSeekV4MetricsProcessor(MetricsProcessor):
    """Logs the step's MTP and indexer figures beside Titan's own."""

    def log(self, step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=None):
        pp_mesh = self.parallel_dims.get_optional_mesh("pp") if self.parallel_dims.pp_enabled else None
        if pp_mesh is not None:
            global_avg_loss, global_max_loss = last_stage_losses(global_avg_loss, global_max_loss, pp_mesh)
        figures = step_figures(self._global_sums(pp_mesh))
        extra = {**(extra_metrics or {}), **{f"loss_metrics/{k}": v for k, v in figures.items()}}
        super().log(step, global_avg_loss, global_max_loss, grad_norm, extra)
        if figures:
            logger.info(console_line(step, figures))

    def log_validation(self, loss, step, extra_metrics=None):
        """Titan's validation line, with the last pipeline stage's loss on every stage (Titan's validator
        averages a -1 placeholder on the others, and rank 0, which logs, holds the first stage)."""
        if self.parallel_dims.pp_enabled:
            loss, _ = last_stage_losses(loss, loss, self.parallel_dims.get_optional_mesh("pp"))
        super().log_validation(loss, step, extra_metrics)

    def close(self) -> None:
        super().close()
        # Titan destroys the world group next: release the meshes' groups first (refusals.py says why).
        release_device_mesh_groups()

    def _global_sums(self, pp_mesh=None) -> dict[str, torch.Tensor]:
        """The step's figures summed over this rank's model parts, the data-parallel ranks and the pipeline
        stages (each stage holds some of the layers and only the last one the MTP depths)."""
        closed = {}
        for part in self.model_parts or []:
            for name, value in part.step_metrics.closed.items() if hasattr(part, "step_metrics") else ():
                closed[name] = closed[name] + value if name in closed else value
        names = sorted(closed)
        if pp_mesh is not None:  # every stage must reduce the same names in the same order
            every = [None] * pp_mesh.size()
            torch.distributed.all_gather_object(every, names, group=pp_mesh.get_group())
            names = sorted(set().union(*every))
        if not names:
            return {}
        device = next(iter(closed.values())).device if closed else self.device_memory_monitor.device
        zero = torch.zeros((), device=device)
        values = torch.stack([closed.get(n, zero) for n in names])
        mesh = self.parallel_dims.get_optional_mesh("loss") if self.parallel_dims.dp_cp_enabled else None
        for group_mesh in (mesh, pp_mesh):
            if group_mesh is not None:
                torch.distributed.all_reduce(values, group=group_mesh.get_group())
        return dict(zip(names, values))


def last_stage_losses(avg, max_, pp_mesh) -> tuple[float, float]:
    """The losses the last pipeline stage computed, on every stage (Titan logs a negative placeholder on the
    others, and rank 0, which logs, holds the first stage)."""
    mine = torch.tensor([float(avg), float(max_)], dtype=torch.float64)
    mine = torch.where(mine < 0, torch.zeros_like(mine), mine)  # a cross-entropy is never negative
    mine = mine.to(pp_mesh.device_type)
    torch.distributed.all_reduce(mine, group=pp_mesh.get_group())
    return float(mine[0]), float(mine[1])


def console_line(step: int, figures: dict[str, float]) -> str:
    """``step: N  mtp_loss: x  indexer_kl: y  indexer_recall: z (chance c)``, under Titan's step line."""
    fields = "  ".join(
        f"{k}: {v:.5f}"
        + (f" (chance {figures['indexer_recall_chance']:.3f})" if k == "indexer_recall" else "")
        for k, v in figures.items()
        if k != "indexer_recall_chance"
    )
    return f"step: {step:2}  {fields}"


def build_deepseek_v4_metrics_processor(job_config, parallel_dims, model_args=None, tag=None):
    return DeepSeekV4MetricsProcessor(job_config, parallel_dims, tag)
