"""The generated parity matrix: tiny transformers configs that vary every field that changes numerics.

Each case is one change to ``BASE`` (or a few, for the combinations) plus the batch and length it runs
at. The base is small (dim 64, 4 layers) so that the whole matrix runs in well under 3 minutes on 2 cores,
and its HCA ratio is 16 (not 128) so that short sequences complete HCA windows; the cases at ratio 128
use the released value with lengths around it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

YARN = {
    "type": "yarn",
    "factor": 16,
    "original_max_position_embeddings": 65536,
    "beta_fast": 32,
    "beta_slow": 1,
}

# sliding, CSA, HCA, CSA (+ the legacy format's trailing MTP entry); HCA at ratio 16 via compress_rate_hca.
BASE = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=32,
    qk_rope_head_dim=16,
    q_lora_rank=32,
    o_groups=2,
    o_lora_rank=16,
    sliding_window=16,
    compress_ratios=[0, 4, 128, 4, 0],
    compress_rate_hca=16,
    num_hash_layers=2,
    index_n_heads=4,
    index_head_dim=16,
    index_topk=8,
    hc_mult=4,
    hc_sinkhorn_iters=20,
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    routed_scaling_factor=1.5,
    swiglu_limit=10.0,
    rope_theta=10000.0,
    compress_rope_theta=160000.0,
    rope_scaling=YARN,
    max_position_embeddings=4096,
)
SEQ = 96  # 24 CSA entries (> index_topk 8), 6 HCA entries at ratio 16


@dataclass
class Case:
    name: str
    changes: dict = field(default_factory=dict)
    drop: tuple[str, ...] = ()
    batch: int = 2
    seq_len: int = SEQ

    def config(self) -> dict:
        c = copy.deepcopy(BASE)
        for key in self.drop:
            c.pop(key)
        c.update(copy.deepcopy(self.changes))
        return c


def nested(main: dict, compress: dict) -> dict:
    return {"rope_parameters": {"main": main, "compress": compress}}


NO_LEGACY_ROPE = ("rope_scaling",)

CASES = [
    Case("base_legacy_yarn"),
    # RoPE tables: types and parameters, both forms
    Case("flat_no_rope_scaling_is_plain_rope", drop=NO_LEGACY_ROPE),
    Case(
        "nested_default_tables",
        nested(
            {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            {"rope_type": "default", "rope_theta": 50000.0, "partial_rotary_factor": 0.5},
        ),
        drop=NO_LEGACY_ROPE,
    ),
    Case(
        "nested_yarn_on_both_tables",
        nested(
            {
                "rope_type": "yarn",
                "rope_theta": 20000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 256,
                "beta_fast": 16,
                "beta_slow": 2,
                "attention_factor": 1.0,
                "partial_rotary_factor": 0.5,
            },
            {
                "rope_type": "yarn",
                "rope_theta": 160000.0,
                "factor": 8.0,
                "original_max_position_embeddings": 1024,
                "beta_fast": 32,
                "beta_slow": 1,
                "attention_factor": 1.0,
                "partial_rotary_factor": 0.5,
            },
        ),
        drop=NO_LEGACY_ROPE,
    ),
    Case(
        "yarn_small_factor_and_betas",
        {
            "rope_scaling": {
                "type": "yarn",
                "factor": 2.5,
                "original_max_position_embeddings": 512,
                "beta_fast": 8,
                "beta_slow": 0.5,
            }
        },
    ),
    Case(
        "yarn_factor_from_max_positions",
        {"rope_scaling": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 1024}},
    ),
    Case("compress_theta_10k", {"compress_rope_theta": 10000.0}),
    Case("partial_rotary_factor_quarter", {"partial_rotary_factor": 0.25}, drop=("qk_rope_head_dim",)),
    Case("qk_rope_head_dim_24", {"qk_rope_head_dim": 24, "index_head_dim": 32}),
    # layer schedules
    Case("hca_first", {"compress_ratios": [128, 4, 0, 128, 0]}),
    Case("csa_first", {"compress_ratios": [4, 128, 4, 0, 0]}),
    Case("all_sliding", {"compress_ratios": [0, 0, 0, 0, 0]}),
    Case("no_hash_layers", {"num_hash_layers": 0}),
    Case("hash_layers_only", {"num_hash_layers": 4}),
    Case(
        "modern_layer_types",
        {
            "layer_types": [
                "compressed_sparse_attention",
                "sliding_attention",
                "heavily_compressed_attention",
                "compressed_sparse_attention",
            ],
            "mlp_layer_types": ["hash_moe", "moe", "moe", "moe"],
            "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
        },
        drop=("compress_ratios", "compress_rate_hca", "num_hash_layers"),
    ),
    # windows, groups, experts, clamps, scales, streams
    Case("window_7", {"sliding_window": 7}),
    Case("window_13_len_67", {"sliding_window": 13}, seq_len=67),
    Case("o_groups_1", {"o_groups": 1}),
    Case("o_groups_4", {"o_groups": 4}),
    Case("experts_16_top_4", {"n_routed_experts": 16, "num_experts_per_tok": 4}),
    Case("experts_4_top_1", {"n_routed_experts": 4, "num_experts_per_tok": 1}),
    Case("swiglu_limit_0.3", {"swiglu_limit": 0.3}),
    Case("swiglu_limit_50", {"swiglu_limit": 50.0}),
    Case("routed_scaling_1", {"routed_scaling_factor": 1.0}),
    Case("routed_scaling_2.5", {"routed_scaling_factor": 2.5}),
    Case("sigmoid_router", {"scoring_func": "sigmoid"}),
    Case("hc_mult_1", {"hc_mult": 1}),
    Case("hc_mult_2", {"hc_mult": 2}),
    Case("hc_mult_3", {"hc_mult": 3}),
    Case("sinkhorn_1_iteration", {"hc_sinkhorn_iters": 1}),
    Case("eps_values", {"rms_norm_eps": 1e-5, "hc_eps": 1e-4}),
    # batches and lengths
    Case("batch_1", batch=1),
    Case("batch_3", batch=3),
    Case("len_64_multiple_of_4_and_16", seq_len=64),
    Case("len_67_not_multiple_of_4", seq_len=67),
    Case("len_130_hca_128_partial_window", {"compress_rate_hca": 128}, batch=1, seq_len=130),
    Case("len_256_hca_128_two_windows", {"compress_rate_hca": 128}, batch=1, seq_len=256),
    # top-k against the number of CSA entries (24 at length 96)
    Case("topk_2_below_entries", {"index_topk": 2}),
    Case("topk_64_above_entries", {"index_topk": 64}),
    # the configuration the first parity test used: released HCA ratio, 300 tokens (dense kernel bit-exact)
    Case("hca_128_len_300", {"compress_rate_hca": 128, "vocab_size": 512, "index_n_heads": 8}, seq_len=300),
    # combinations
    Case(
        "combo_hca_first_nested_yarn_hc2_window7_groups4",
        {
            "compress_ratios": [128, 4, 0, 128, 0],
            "hc_mult": 2,
            "sliding_window": 7,
            "o_groups": 4,
            **nested(
                {
                    "rope_type": "yarn",
                    "rope_theta": 10000.0,
                    "factor": 2.0,
                    "original_max_position_embeddings": 128,
                    "attention_factor": 1.0,
                    "partial_rotary_factor": 0.5,
                },
                {"rope_type": "default", "rope_theta": 160000.0, "partial_rotary_factor": 0.5},
            ),
        },
        drop=NO_LEGACY_ROPE,
        batch=2,
        seq_len=67,
    ),
    Case(
        "combo_csa_first_quarter_rope_sigmoid_experts16_clamp",
        {
            "compress_ratios": [4, 128, 4, 0, 0],
            "partial_rotary_factor": 0.25,
            "scoring_func": "sigmoid",
            "n_routed_experts": 16,
            "num_experts_per_tok": 4,
            "swiglu_limit": 0.5,
            "index_topk": 3,
            "compress_rate_hca": 32,
            "num_hash_layers": 1,
        },
        drop=("qk_rope_head_dim",),
        batch=1,
        seq_len=130,
    ),
    Case(
        "combo_all_hash_window13_hc3_scale2.5",
        {
            "num_hash_layers": 4,
            "sliding_window": 13,
            "hc_mult": 3,
            "routed_scaling_factor": 2.5,
            "index_topk": 5,
        },
        batch=3,
        seq_len=61,
    ),
]


def transformers_default_case() -> Case:
    """transformers' own default DeepseekV4Config() (compress table: plain RoPE), shrunk to the tiny shape."""
    from transformers import DeepseekV4Config

    shape = {
        k: v
        for k, v in BASE.items()
        if k not in ("rope_scaling", "rope_theta", "compress_rope_theta", "max_position_embeddings")
    }
    config = DeepseekV4Config(**shape).to_dict()
    return Case("transformers_default_config", config, drop=tuple(BASE))
