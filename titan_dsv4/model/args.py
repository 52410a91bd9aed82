"""Model arguments for DeepSeek-V4 in TorchTitan's ``BaseModelArgs`` protocol."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from torch import nn

from torchtitan.config import JobConfig
from torchtitan.models.moe import MoEArgs
from torchtitan.protocols.model import BaseModelArgs
from torchtitan.tools.logging import logger

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
HASH_MOE, MOE = "hash_moe", "moe"


class ConfigError(ValueError):
    """A model or job configuration DeepSeek-V4 cannot run; the message names the fix."""


@dataclass
class DeepSeekV4ModelArgs(BaseModelArgs):
    """Shapes and schedules of one DeepSeek-V4 model (HF names in comments)."""

    vocab_size: int = 129280
    dim: int = 4096  # hidden_size
    n_layers: int = 43  # num_hidden_layers (MTP excluded)
    n_heads: int = 64  # num_attention_heads; one shared K=V head
    head_dim: int = 512
    rope_head_dim: int = 64  # qk_rope_head_dim = head_dim * partial_rotary_factor
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    # Per-layer compression ratio: 0 sliding only, csa_ratio (CSA), hca_ratio (HCA).
    compress_ratios: list[int] = field(default_factory=list)
    csa_ratio: int = 4
    hca_ratio: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    n_hash_layers: int = 3  # first layers route by the tid2eid table
    moe_inter_dim: int = 2048
    moe_args: MoEArgs = field(default_factory=MoEArgs)
    swiglu_limit: float = 10.0
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0  # YaRN, compress table only
    original_seq_len: int = 65536
    beta_fast: int = 32
    beta_slow: int = 1
    max_seq_len: int = 4096
    init_std: float = 0.02
    # Titan's Trainer reads attn_type to decide whether to build flex/varlen masks;
    # DeepSeek-V4 builds its own masks inside attention, so this stays "sdpa".
    attn_type: str = "sdpa"
    # "sparse": block-local window + gathered entries (training default); "dense": the masked
    # [S x (S+T)] reference every fast path is tested against.
    attn_impl: str = "sparse"

    # ---- schedule -------------------------------------------------------------------------
    def layer_type(self, layer_id: int) -> str:
        ratio = self.compress_ratios[layer_id]
        return {0: SLIDING, self.csa_ratio: CSA, self.hca_ratio: HCA}[ratio]

    def mlp_type(self, layer_id: int) -> str:
        return HASH_MOE if layer_id < self.n_hash_layers else MOE

    def validate(self) -> None:
        """Reject inconsistent shapes and schedules before anything is built."""
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
            problems.append(f"csa_ratio ({self.csa_ratio}) and hca_ratio ({self.hca_ratio}) must be distinct and > 0")
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
            problems.append(f"top_k={self.moe_args.top_k} must lie in [1, num_experts={self.moe_args.num_experts}]")
        if self.moe_args.num_shared_experts != 1:
            problems.append(f"DeepSeek-V4 has exactly one shared expert, got {self.moe_args.num_shared_experts}")
        if self.sliding_window < 1 or self.index_topk < 1 or self.hc_mult < 1 or self.hc_sinkhorn_iters < 1:
            problems.append("sliding_window, index_topk, hc_mult and hc_sinkhorn_iters must all be >= 1")
        if self.attn_impl not in ("sparse", "dense"):
            problems.append(f"attn_impl={self.attn_impl!r} is unknown; use 'sparse' (fast) or 'dense' (reference)")
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

    # ---- Titan protocol --------------------------------------------------------------------
    def update_from_config(self, job_config: JobConfig, **kwargs) -> None:
        self.validate()
        seq_len = job_config.training.seq_len
        self.check_seq_len(seq_len)
        self.max_seq_len = seq_len
        self._check_tokenizer_fits(job_config.model.hf_assets_path)
        if job_config.parallelism.context_parallel_degree > 1:
            raise ConfigError(
                "context_parallel_degree > 1 is not supported by DeepSeek-V4 yet (the compressors pool "
                "windows across the whole sequence); set --parallelism.context_parallel_degree 1"
            )
        from torchtitan.tools.utils import has_cuda_capability

        if self.moe_args.use_grouped_mm and not has_cuda_capability(9, 0):
            # Same rule as Titan's deepseek_v3: grouped mm needs SM90+, otherwise the for-loop experts run.
            self.moe_args.use_grouped_mm = False
        self.moe_args._debug_force_load_balance = job_config.debug.moe_force_load_balance

    def _check_tokenizer_fits(self, hf_assets_path: str | None) -> None:
        path = os.path.join(hf_assets_path or "", "tokenizer.json")
        if not hf_assets_path or not os.path.isfile(path):
            return
        from tokenizers import Tokenizer

        n = Tokenizer.from_file(path).get_vocab_size(with_added_tokens=True)
        if n > self.vocab_size:
            raise ConfigError(
                f"the tokenizer at {hf_assets_path} has {n} tokens but the model vocab_size is "
                f"{self.vocab_size}: token ids >= {self.vocab_size} would index past the embedding. "
                "Use a flavor with a larger vocab_size or the matching tokenizer (--model.hf_assets_path)."
            )

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        total, active = count_params(self, model)
        logger.info(f"DeepSeek-V4 parameters: total {total:,}, active per token {active:,}")
        return total, int(self.train_flops_per_token(seq_len))

    # ---- accounting --------------------------------------------------------------------------
    def train_flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs of the sparse computation per token (fwd+bwd = 3x fwd), averaged over positions."""
        D, H, d, q = self.dim, self.n_heads, self.head_dim, self.q_lora_rank
        g, o, n = self.o_groups, self.o_lora_rank, self.hc_mult
        nI, dI = self.index_n_heads, self.index_head_dim
        E, k, inter = self.moe_args.num_experts, self.moe_args.top_k, self.moe_inter_dim
        avg = lambda f: sum(f(t) for t in range(seq_len)) / seq_len  # noqa: E731
        win = avg(lambda t: min(t + 1, self.sliding_window))
        fwd = 2 * self.vocab_size * D + 2 * n * n * D
        for layer_id in range(self.n_layers):
            kind = self.layer_type(layer_id)
            fwd += 2 * (D * q + q * H * d + D * d + H * d * o + g * o * D)
            fwd += 2 * 2 * (2 + n) * n * (n * D)
            fwd += 2 * E * D + 6 * D * inter * (k + 1)
            cmp_keys = 0.0
            if kind == HCA:
                cmp_keys = avg(lambda t: (t + 1) // self.hca_ratio)
                fwd += 2 * 2 * D * d
            elif kind == CSA:
                cmp_keys = avg(lambda t: min(self.index_topk, (t + 1) // self.csa_ratio))
                fwd += 2 * 2 * D * 2 * d
                fwd += 2 * 2 * D * 2 * dI + 2 * q * nI * dI + 2 * D * nI
                fwd += 2 * nI * dI * avg(lambda t: (t + 1) // self.csa_ratio)
            fwd += 4 * H * d * (win + cmp_keys)
        return 3 * fwd

    def mtp_nparams(self) -> int:
        """Parameters of the released checkpoint's single MTP depth (not built here)."""
        D, n = self.dim, self.hc_mult
        return _block_params(self, 0) + 2 * D * D + 3 * D + n * n * D + n + 1

    # ---- Hugging Face config -------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: dict | str) -> "DeepSeekV4ModelArgs":
        """Build args from a transformers ``config.json`` (dict or path), modern or legacy keys."""
        if isinstance(config, (str, os.PathLike)):
            path = os.path.join(config, "config.json") if os.path.isdir(config) else config
            with open(path) as f:
                config = json.load(f)
        c = dict(config)
        model_type = c.get("model_type")
        if model_type not in (None, "deepseek_v4"):
            raise ConfigError(
                f"config.json has model_type={model_type!r}; titan_dsv4 only loads 'deepseek_v4' checkpoints"
            )
        n_layers = int(c.get("num_hidden_layers", 43))
        rates = dict(c.get("compress_rates") or {})
        csa = int(c.get("compress_rate_csa", rates.get(CSA, 4)))
        hca = int(c.get("compress_rate_hca", rates.get(HCA, 128)))
        if c.get("layer_types") is not None:
            to_ratio = {SLIDING: 0, CSA: csa, HCA: hca}
            try:
                ratios = [to_ratio[t] for t in c["layer_types"]]
            except KeyError as e:
                raise ConfigError(f"config.json layer_types has unknown entry {e}; allowed: {list(to_ratio)}")
        elif c.get("compress_ratios") is not None:
            ratios = [int(r) for r in c["compress_ratios"]]
        else:
            raise ConfigError(
                "config.json has neither layer_types nor compress_ratios; refusing to guess the attention "
                "schedule (transformers' default puts HCA/CSA on the opposite parity of the released models)"
            )
        ratios = ratios[:n_layers]  # the legacy list carries a trailing MTP entry
        if c.get("mlp_layer_types") is not None:
            kinds = list(c["mlp_layer_types"])[:n_layers]
            n_hash = sum(1 for t in kinds if t == HASH_MOE)
            if kinds != [HASH_MOE] * n_hash + [MOE] * (len(kinds) - n_hash):
                raise ConfigError(f"mlp_layer_types must be hash_moe layers followed by moe layers, got {kinds}")
        else:
            n_hash = int(c.get("num_hash_layers", 3))
        head_dim = int(c.get("head_dim", 512))
        if c.get("qk_rope_head_dim") is not None:
            rope = int(c["qk_rope_head_dim"])
        else:
            rope = int(head_dim * float(c.get("partial_rotary_factor") or 64 / 512))
        if int(c.get("num_key_value_heads", 1)) != 1:
            raise ConfigError("DeepSeek-V4 has a single shared K=V head; config.json num_key_value_heads must be 1")
        yarn = _compress_rope_params(c)
        args = cls(
            vocab_size=int(c.get("vocab_size", 129280)),
            dim=int(c.get("hidden_size", 4096)),
            n_layers=n_layers,
            n_heads=int(c.get("num_attention_heads", 64)),
            head_dim=head_dim,
            rope_head_dim=rope,
            q_lora_rank=int(c.get("q_lora_rank", 1024)),
            o_groups=int(c.get("o_groups", 8)),
            o_lora_rank=int(c.get("o_lora_rank", 1024)),
            sliding_window=int(c.get("sliding_window", 128)),
            compress_ratios=ratios,
            csa_ratio=csa,
            hca_ratio=hca,
            index_n_heads=int(c.get("index_n_heads", 64)),
            index_head_dim=int(c.get("index_head_dim", 128)),
            index_topk=int(c.get("index_topk", 512)),
            hc_mult=int(c.get("hc_mult", 4)),
            hc_sinkhorn_iters=int(c.get("hc_sinkhorn_iters", 20)),
            hc_eps=float(c.get("hc_eps", 1e-6)),
            norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            n_hash_layers=n_hash,
            moe_inter_dim=int(c.get("moe_intermediate_size", 2048)),
            moe_args=MoEArgs(
                num_experts=int(c.get("n_routed_experts", 256)),
                num_shared_experts=int(c.get("n_shared_experts", 1)),
                score_func="sqrtsoftplus",  # type: ignore[arg-type]
                route_norm=True,
                route_scale=float(c.get("routed_scaling_factor", 1.5)),
                score_before_experts=False,
                top_k=int(c.get("num_experts_per_tok", 6)),
                load_balance_coeff=1e-3,
            ),
            swiglu_limit=float(c.get("swiglu_limit", 10.0)),
            rope_theta=float(c.get("rope_theta", 10000.0)),
            compress_rope_theta=float(c.get("compress_rope_theta", 160000.0)),
            rope_factor=float(yarn.get("factor", 16.0)),
            original_seq_len=int(yarn.get("original_max_position_embeddings", 65536)),
            beta_fast=int(yarn.get("beta_fast") or 32),
            beta_slow=int(yarn.get("beta_slow") or 1),
            init_std=float(c.get("initializer_range", 0.02)),
        )
        if c.get("scoring_func", "sqrtsoftplus") != "sqrtsoftplus":
            raise ConfigError(f"scoring_func={c['scoring_func']!r} is not DeepSeek-V4's sqrtsoftplus")
        args.validate()
        return args

    def to_hf_config(self) -> dict:
        """The transformers ``config.json`` dict that rebuilds exactly this model."""
        to_type = {0: SLIDING, self.csa_ratio: CSA, self.hca_ratio: HCA}
        return {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": 1,
            "head_dim": self.head_dim,
            "partial_rotary_factor": self.rope_head_dim / self.head_dim,
            "q_lora_rank": self.q_lora_rank,
            "o_groups": self.o_groups,
            "o_lora_rank": self.o_lora_rank,
            "sliding_window": self.sliding_window,
            "layer_types": [to_type[r] for r in self.compress_ratios],
            "compress_rates": {CSA: self.csa_ratio, HCA: self.hca_ratio},
            "mlp_layer_types": [self.mlp_type(i) for i in range(self.n_layers)],
            "index_n_heads": self.index_n_heads,
            "index_head_dim": self.index_head_dim,
            "index_topk": self.index_topk,
            "hc_mult": self.hc_mult,
            "hc_sinkhorn_iters": self.hc_sinkhorn_iters,
            "hc_eps": self.hc_eps,
            "rms_norm_eps": self.norm_eps,
            "n_routed_experts": self.moe_args.num_experts,
            "n_shared_experts": 1,
            "num_experts_per_tok": self.moe_args.top_k,
            "moe_intermediate_size": self.moe_inter_dim,
            "routed_scaling_factor": self.moe_args.route_scale,
            "scoring_func": "sqrtsoftplus",
            "norm_topk_prob": True,
            "swiglu_limit": self.swiglu_limit,
            "rope_theta": self.rope_theta,
            "compress_rope_theta": self.compress_rope_theta,
            "rope_scaling": {
                "type": "yarn",
                "factor": self.rope_factor,
                "original_max_position_embeddings": self.original_seq_len,
                "beta_fast": self.beta_fast,
                "beta_slow": self.beta_slow,
            },
            "max_position_embeddings": max(self.max_seq_len, 1048576),
            "initializer_range": self.init_std,
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "bos_token_id": 0,
            "eos_token_id": 1,
        }

    def replace(self, **changes) -> "DeepSeekV4ModelArgs":
        """A deep copy with some fields changed (flavors are shared singletons in Titan)."""
        new = dataclasses.replace(self, moe_args=dataclasses.replace(self.moe_args), **changes)
        new.compress_ratios = list(new.compress_ratios)
        return new


def _compress_rope_params(c: dict) -> dict:
    rp = c.get("rope_parameters")
    if isinstance(rp, dict) and isinstance(rp.get("compress"), dict):
        return rp["compress"]
    return dict(c.get("rope_scaling") or {})


def _block_params(a: DeepSeekV4ModelArgs, ratio: int) -> int:
    D, H, d, q, n = a.dim, a.n_heads, a.head_dim, a.q_lora_rank, a.hc_mult
    E, inter = a.moe_args.num_experts, a.moe_inter_dim
    attn = D * q + q + q * H * d + D * d + d + a.o_groups * a.o_lora_rank * (H * d // a.o_groups)
    attn += a.o_groups * a.o_lora_rank * D + H
    if ratio == a.hca_ratio:
        attn += 2 * D * d + ratio * d + d
    elif ratio == a.csa_ratio:
        dI, nI = a.index_head_dim, a.index_n_heads
        attn += 2 * D * 2 * d + ratio * 2 * d + d
        attn += 2 * D * 2 * dI + ratio * 2 * dI + dI + q * nI * dI + D * nI
    moe = E * D + E * 3 * D * inter + 3 * D * inter
    hc = 2 * ((2 + n) * n * n * D + (2 + n) * n + 3)
    return attn + moe + hc + 2 * D


def count_params(args: DeepSeekV4ModelArgs, model: nn.Module) -> tuple[int, int]:
    """(total, active per token): routed experts count top_k / num_experts of their size."""
    total = routed = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if ".moe.experts." in name:
            routed += p.numel()
    active = total - routed + routed * args.moe_args.top_k // args.moe_args.num_experts
    # The embedding is a lookup, not a matmul: not an active parameter for FLOPs, but it is counted
    # in the published "active" figures, so it stays in.
    return total, active


def analytic_nparams(args: DeepSeekV4ModelArgs) -> int:
    """Closed-form parameter count (no model built), used to cross-check the meta model."""
    n = args.hc_mult
    total = 2 * args.vocab_size * args.dim + args.dim + n * n * args.dim + n + 1
    for i in range(args.n_layers):
        total += _block_params(args, args.compress_ratios[i])
    return total
