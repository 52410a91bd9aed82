"""The ``[deepseek_v4]`` training options, declared once: the model args inherit these fields, and the
job-config section (``titan_dsv4/job_config.py``) is this dataclass plus the job-level keys.

No ``from __future__ import annotations`` here: tyro resolves these field types after TorchTitan merges the
section into its own ``JobConfig``, from another module.
"""

from dataclasses import dataclass, field, fields

from .errors import ConfigError

__all__ = ["ATTN_IMPLS", "ATTN_MASK_TYPES", "FP32_COMPUTE_PARTS", "ConfigError", "TrainingOptions"]

ATTN_MASK_TYPES = ("causal", "block_causal")
ATTN_IMPLS = ("sparse", "dense", "triton")
# Parts of a bf16 step that can compute in fp32 (see ``fp32_compute``); no-ops when activations are fp32.
FP32_COMPUTE_PARTS = ("attention_logits", "router", "experts", "hc_mixing")


@dataclass
class TrainingOptions:
    """How a DeepSeek-V4 model trains (not stored in config.json); every flavor starts from these defaults."""

    mtp_loss_weight: float = 0.1
    """Weight of the MTP loss, the mean over depths of their cross-entropies (0.1 as NeMo; 0: MTP kept for
    export, neither run nor trained)."""
    indexer_loss_weight: float = 0.0
    """Weight of the Lightning Indexer's KL distillation loss; 0 keeps the indexer frozen."""
    indexer_warmup_steps: int = 0
    """First steps in which CSA attends every entry and only the indexer learns (dense warm-up)."""
    attn_mask_type: str = "causal"
    """"causal" (one sequence per row) or "block_causal" (documents ending with eos stay apart)."""
    attn_impl: str = "sparse"
    """"sparse" (the PyTorch fast path, every device), "triton" (fused Triton kernels for attention and the
    Lightning Indexer, CUDA) or "dense" (the masked [S x (S+T)] reference both are tested against)."""
    fp32_compute: list[str] = field(default_factory=lambda: ["attention_logits", "hc_mixing"])
    """Parts of a bf16 step computed in fp32: attention_logits, router, experts, hc_mixing ("" for none). The
    default is the pair the numerics report found to pay (README "Numerics"); a no-op in fp32."""
    log_indexer_recall: bool = False
    """Log indexer_recall every step even with the indexer frozen (on whenever indexer_loss_weight > 0)."""

    def option_problems(self) -> list[str]:
        """Every option value the model cannot serve, each naming its ``[deepseek_v4]`` key and the fix."""
        problems = []
        for key in ("mtp_loss_weight", "indexer_loss_weight"):
            if getattr(self, key) < 0:
                problems.append(f"deepseek_v4.{key}={getattr(self, key)}: a loss weight must be >= 0")
        if self.indexer_warmup_steps < 0:
            problems.append(f"deepseek_v4.indexer_warmup_steps={self.indexer_warmup_steps} must be >= 0")
        if self.indexer_warmup_steps > 0 and self.indexer_loss_weight == 0:
            problems.append(
                f"deepseek_v4.indexer_warmup_steps={self.indexer_warmup_steps} trains only the indexer, but "
                "deepseek_v4.indexer_loss_weight is 0 (indexer frozen): set "
                "--deepseek_v4.indexer_loss_weight > 0 or --deepseek_v4.indexer_warmup_steps 0"
            )
        if self.attn_mask_type not in ATTN_MASK_TYPES:
            problems.append(
                f"deepseek_v4.attn_mask_type={self.attn_mask_type!r}: use one of {ATTN_MASK_TYPES}"
            )
        if self.attn_impl not in ATTN_IMPLS:
            problems.append(
                f"deepseek_v4.attn_impl={self.attn_impl!r}: use 'sparse' (PyTorch, any device), 'triton' "
                "(CUDA) or 'dense' (reference)"
            )
        unknown = sorted(set(self.fp32_compute) - set(FP32_COMPUTE_PARTS))
        if unknown:
            problems.append(
                f"deepseek_v4.fp32_compute names unknown parts {unknown}; known: {list(FP32_COMPUTE_PARTS)} "
                '("" for none)'
            )
        return problems

    def copy_options_from(self, source: "TrainingOptions") -> None:
        """Take every training option of ``source`` (the job's section); "" items of a CLI list mean none."""
        for f in fields(TrainingOptions):
            value = getattr(source, f.name)
            setattr(self, f.name, [v for v in value if v] if isinstance(value, (list, tuple)) else value)
