"""DeepSeek-V4 model arguments: the architecture, its validation, and TorchTitan's ``BaseModelArgs`` hooks.

One source of defaults: every architecture field defaults to transformers' ``DeepseekV4Config`` value, so
``config.json`` translation (``hf_config.py``) falls back to these fields and nowhere else; the flavors
(``titan_dsv4/flavors.py``) state what differs. Parameter and FLOP accounting live in ``accounting.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import nn
from torchtitan.models.moe import MoEArgs
from torchtitan.protocols.model import BaseModelArgs
from torchtitan.tools.logging import logger

from .errors import ConfigError
from .options import ATTN_IMPLS, ATTN_MASK_TYPES, FP32_COMPUTE_PARTS, TrainingOptions

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
HASH_MOE, MOE = "hash_moe", "moe"
ROPE_TYPES = ("default", "yarn")
SCORE_FUNCS = ("sqrtsoftplus", "sigmoid")
# transformers' max_position_embeddings default (YaRN tables without an original length fall back to it)
HF_MAX_POSITION_EMBEDDINGS = 1048576

__all__ = ["ATTN_IMPLS", "ATTN_MASK_TYPES", "FP32_COMPUTE_PARTS", "ConfigError", "DeepSeekV4ModelArgs"]


@dataclass
class RopeTable:
    """One rotary table ("main" or "compress"): plain RoPE, or YaRN with attention factor 1 (no mscale)."""

    rope_type: str = "default"  # "default" | "yarn"
    theta: float = 10000.0
    # YaRN only (transformers' rope_parameters keys of the same names)
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0


def v4_moe_args(
    num_experts: int = 256, top_k: int = 6, route_scale: float = 1.5, score_func: str = "sqrtsoftplus"
):
    """Titan's MoEArgs as DeepSeek-V4 uses them: one shared expert, renormalised weights applied after W2."""
    return MoEArgs(
        num_experts=num_experts,
        num_shared_experts=1,
        score_func=score_func,  # type: ignore[arg-type]  (V4 adds sqrtsoftplus)
        route_norm=True,
        route_scale=route_scale,
        score_before_experts=False,
        top_k=top_k,
        load_balance_coeff=1e-3,
    )


@dataclass
class DeepSeekV4ModelArgs(TrainingOptions, BaseModelArgs):
    """Shapes and schedules of one DeepSeek-V4 model (transformers' names in comments, defaults its own); the
    training options (``options.py``, the ``[deepseek_v4]`` section) are inherited fields."""

    # ---- architecture (what config.json stores) ---------------------------------------------
    vocab_size: int = 129280
    dim: int = 4096  # hidden_size
    n_layers: int = 43  # num_hidden_layers (MTP excluded)
    n_heads: int = 64  # num_attention_heads; one shared K=V head
    head_dim: int = 512
    rope_head_dim: int = 64  # head_dim * partial_rotary_factor: the trailing channels that rotate
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    # Per-layer compression ratio: 0 sliding only, csa_ratio (CSA), hca_ratio (HCA). transformers has
    # a default schedule, but it is not the released models' one, so there is no default here.
    compress_ratios: list[int] = field(default_factory=list)
    csa_ratio: int = 4
    hca_ratio: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6  # rms_norm_eps
    n_hash_layers: int = 3  # the first layers route by the tid2eid table
    moe_inter_dim: int = 2048  # moe_intermediate_size
    moe_args: MoEArgs = field(default_factory=v4_moe_args)
    swiglu_limit: float = 10.0
    main_rope: RopeTable = field(default_factory=lambda: RopeTable("default", 10000.0))  # sliding layers
    compress_rope: RopeTable = field(
        default_factory=lambda: RopeTable("default", 160000.0)
    )  # CSA / HCA layers
    mtp_layers: int = 1  # num_nextn_predict_layers: multi-token-prediction depths
    init_std: float = 0.02  # initializer_range
    eos_id: int = 1  # eos_token_id: ends a document under attn_mask_type "block_causal"

    # ---- run-time fields (not stored in config.json; the [deepseek_v4] options are inherited) ---------
    max_seq_len: int = 4096  # rotary table length; follows training.seq_len
    # Titan's Trainer reads attn_type to decide whether to build flex/varlen masks; DeepSeek-V4
    # builds its own masks inside attention, so this stays "sdpa".
    attn_type: str = "sdpa"

    # ---- schedule ----------------------------------------------------------------------------
    def layer_type(self, layer_id: int) -> str:
        ratio = self.compress_ratios[layer_id]
        return {0: SLIDING, self.csa_ratio: CSA, self.hca_ratio: HCA}[ratio]

    def mlp_type(self, layer_id: int) -> str:
        return HASH_MOE if layer_id < self.n_hash_layers else MOE

    def validate(self) -> None:
        """Reject inconsistent shapes, schedules and options before anything is built."""
        problems = []
        if len(self.compress_ratios) != self.n_layers:
            problems.append(
                f"compress_ratios has {len(self.compress_ratios)} entries but n_layers={self.n_layers}; "
                "give exactly one ratio per layer (0 sliding, "
                f"{self.csa_ratio} CSA, {self.hca_ratio} HCA)"
            )
        bad = sorted({r for r in self.compress_ratios if r not in (0, self.csa_ratio, self.hca_ratio)})
        if bad:
            problems.append(
                f"compress_ratios contains {bad}; allowed values are 0, {self.csa_ratio} (CSA) and "
                f"{self.hca_ratio} (HCA)"
            )
        if self.csa_ratio == self.hca_ratio or min(self.csa_ratio, self.hca_ratio) <= 0:
            problems.append(
                f"csa_ratio ({self.csa_ratio}) and hca_ratio ({self.hca_ratio}) must be distinct and > 0"
            )
        if not 0 <= self.n_hash_layers <= self.n_layers:
            problems.append(f"n_hash_layers={self.n_hash_layers} must lie in [0, n_layers={self.n_layers}]")
        if self.n_heads % self.o_groups:
            problems.append(f"n_heads={self.n_heads} must be divisible by o_groups={self.o_groups}")
        if self.rope_head_dim % 2 or not 0 < self.rope_head_dim <= min(self.head_dim, self.index_head_dim):
            problems.append(
                f"rope_head_dim={self.rope_head_dim} must be even and <= head_dim ({self.head_dim}) "
                f"and index_head_dim ({self.index_head_dim})"
            )
        if not 0 < self.moe_args.top_k <= self.moe_args.num_experts:
            problems.append(
                f"top_k={self.moe_args.top_k} must lie in [1, num_experts={self.moe_args.num_experts}]"
            )
        if self.moe_args.num_shared_experts != 1:
            problems.append(
                f"DeepSeek-V4 has exactly one shared expert, got {self.moe_args.num_shared_experts}"
            )
        if self.moe_args.score_func not in SCORE_FUNCS:
            problems.append(
                f"score_func={self.moe_args.score_func!r} is not implemented; use one of {SCORE_FUNCS}"
            )
        if self.sliding_window < 1 or self.index_topk < 1 or self.hc_mult < 1 or self.hc_sinkhorn_iters < 1:
            problems.append("sliding_window, index_topk, hc_mult and hc_sinkhorn_iters must all be >= 1")
        for name, table in (("main_rope", self.main_rope), ("compress_rope", self.compress_rope)):
            if table.rope_type not in ROPE_TYPES:
                problems.append(
                    f"{name}.rope_type={table.rope_type!r} is not implemented; use one of {ROPE_TYPES}"
                )
            elif table.rope_type == "yarn" and (
                table.factor < 1 or table.original_max_position_embeddings < 1
            ):
                problems.append(f"{name}: YaRN needs factor >= 1 and original_max_position_embeddings >= 1")
        if self.mtp_layers < 0:
            problems.append(f"mtp_layers={self.mtp_layers} must be >= 0 (0: no multi-token prediction)")
        problems += self.option_problems()
        if problems:
            raise ConfigError("Invalid DeepSeek-V4 model args:\n  - " + "\n  - ".join(problems))

    def check_seq_len(self, seq_len: int) -> None:
        """Every compressed layer must see at least one complete window, or its compressor never trains."""
        if seq_len < 1:
            raise ConfigError(f"training.seq_len must be >= 1, got {seq_len}")
        needed = max([r for r in self.compress_ratios if r > 0], default=1)
        if seq_len < needed:
            kinds = "HCA" if needed == self.hca_ratio else "CSA"
            raise ConfigError(
                f"training.seq_len={seq_len} is shorter than the {kinds} compression ratio {needed}: those "
                f"layers would produce no compressed entry and their compressors would never train. "
                f"Set --training.seq_len to at least {needed} (a multiple of {needed} uses every token)."
            )

    # ---- Titan protocol ------------------------------------------------------------------------
    def update_from_config(self, job_config, **kwargs) -> None:
        """Apply the job (seq_len, the ``[deepseek_v4]`` section, Titan's MoE switches), then validate.

        The job's own checks (``titan_dsv4.job_config.check_job``) have run before, from the spec's first
        hook; what is checked here is what makes these args consistent.
        """
        seq_len = job_config.training.seq_len
        self.check_seq_len(seq_len)
        validation = job_config.validation
        # the rotary tables cover the longest sequence the job runs (Titan validates at validation.seq_len)
        self.max_seq_len = max(seq_len, validation.seq_len if validation.enable else 0)
        self.apply_section(job_config.deepseek_v4)
        from torchtitan.tools.utils import has_cuda_capability

        if self.moe_args.use_grouped_mm and not has_cuda_capability(9, 0):
            # Same rule as Titan's deepseek_v3: grouped mm needs SM90+, otherwise the for-loop experts run.
            self.moe_args.use_grouped_mm = False
        self.moe_args._debug_force_load_balance = job_config.debug.moe_force_load_balance
        self.validate()

    def apply_section(self, section) -> None:
        """The ``[deepseek_v4]`` section's options; its ``mtp_layers`` only when set (None: the flavor's)."""
        self.copy_options_from(section)
        if section.mtp_layers is not None:
            self.mtp_layers = section.mtp_layers

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        from .accounting import count_params, train_flops_per_token

        total, active = count_params(self, model)
        logger.info(f"DeepSeek-V4 parameters: total {total:,}, active per token {active:,}")
        return total, int(train_flops_per_token(self, seq_len))

    def replace(self, **changes) -> DeepSeekV4ModelArgs:
        """A deep copy with some fields changed (flavors are shared singletons in Titan)."""
        new = dataclasses.replace(
            self,
            moe_args=dataclasses.replace(self.moe_args),
            main_rope=dataclasses.replace(self.main_rope),
            compress_rope=dataclasses.replace(self.compress_rope),
            **changes,
        )
        new.compress_ratios = list(new.compress_ratios)
        new.fp32_compute = list(new.fp32_compute)
        return new
