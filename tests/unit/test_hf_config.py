"""config.json translation: read as transformers reads it, round trips, and refuses what is not
implemented."""

from __future__ import annotations

import copy

import pytest

from tests.helpers.parity_cases import BASE, CASES, YARN
from titan_dsv4.flavors import deepseek_v4_args
from titan_dsv4.model import ConfigError, DeepSeekV4ModelArgs
from titan_dsv4.model.args import RopeTable
from titan_dsv4.model.hf_config import args_from_hf_config, hf_config_from_args


def _from(**changes) -> DeepSeekV4ModelArgs:
    c = copy.deepcopy(BASE)
    c.update(changes)
    return args_from_hf_config(c)


def _round_trips(args: DeepSeekV4ModelArgs) -> None:
    back = args_from_hf_config(hf_config_from_args(args))
    assert back.replace(max_seq_len=args.max_seq_len) == args


@pytest.mark.parametrize("flavor", ["debugmodel", "flash", "pro"])
def test_every_flavor_round_trips(flavor):
    _round_trips(deepseek_v4_args[flavor].replace())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_matrix_config_round_trips(case):
    _round_trips(args_from_hf_config(case.config()))


def test_a_table_without_a_type_gets_no_yarn():
    """The bug this translation fixes: a compress table with no YaRN block used to get YaRN factor 16."""
    plain = _from(rope_scaling=None)
    assert plain.compress_rope == RopeTable("default", 160000.0)
    assert plain.main_rope == RopeTable("default", 10000.0)
    nested = args_from_hf_config(
        {
            **{k: v for k, v in BASE.items() if k != "rope_scaling"},
            "partial_rotary_factor": 0.5,
            "rope_parameters": {"main": {"rope_type": "default"}, "compress": {"rope_theta": 160000.0}},
        }
    )
    assert nested.compress_rope.rope_type == "default"


def test_legacy_and_nested_yarn_read_the_same_parameters():
    legacy = _from()
    assert legacy.compress_rope == RopeTable("yarn", 160000.0, 16.0, 65536, 32.0, 1.0)
    table = {
        "rope_type": "yarn",
        "rope_theta": 160000.0,
        "factor": 16,
        "original_max_position_embeddings": 65536,
        "beta_fast": 32,
        "beta_slow": 1,
        "attention_factor": 1.0,
        "partial_rotary_factor": 0.5,
    }
    nested = _from(
        rope_scaling=None,
        rope_parameters={
            "main": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            "compress": table,
        },
    )
    assert nested == legacy


def test_partial_rotary_factor_wins_over_qk_rope_head_dim_as_in_transformers():
    assert _from(partial_rotary_factor=0.25).rope_head_dim == 8  # qk_rope_head_dim 16 is ignored then
    assert _from().rope_head_dim == 16


def test_missing_keys_take_transformers_defaults():
    minimal = {"num_hidden_layers": 4, "compress_ratios": [0, 4, 128, 4]}
    args = args_from_hf_config(minimal)
    assert args.n_layers == 4 and args.head_dim == 512 and args.rope_head_dim == 64
    assert args.dim == 4096 and args.moe_args.num_experts == 256 and args.moe_args.top_k == 6
    assert args.compress_rope == RopeTable("default", 160000.0) and args.mtp_layers == 1 and args.eos_id == 1


@pytest.mark.parametrize(
    "changes, key",
    [
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_parameters.compress.rope_type"),
        (dict(rope_scaling={**YARN, "attention_factor": 0.5}), "rope_parameters.compress.attention_factor"),
        # a nested YaRN table without attention_factor gets transformers' derived mscale 0.1 ln(16) + 1
        (
            dict(
                rope_scaling=None,
                rope_parameters={
                    "main": {"rope_type": "default"},
                    "compress": {
                        "rope_type": "yarn",
                        "factor": 16,
                        "original_max_position_embeddings": 65536,
                    },
                },
            ),
            "rope_parameters.compress.attention_factor",
        ),
        (dict(rope_scaling={**YARN, "factor": 0.5}), "rope_parameters.compress.factor"),
        (
            dict(rope_scaling={"type": "yarn", "original_max_position_embeddings": 4}),
            "rope_parameters.compress.factor",
        ),
        (
            dict(
                rope_scaling=None,
                rope_parameters={
                    "main": {"rope_type": "default", "partial_rotary_factor": 0.5},
                    "compress": {"rope_type": "default", "partial_rotary_factor": 0.25},
                },
            ),
            "rope_parameters",
        ),
        (dict(scoring_func="softmax"), "scoring_func"),
        (dict(hc_sinkhorn_iters=0), "hc_sinkhorn_iters"),
        (dict(hc_mult=0), "hc_mult"),
        (dict(num_key_value_heads=2), "num_key_value_heads"),
        (dict(n_shared_experts=2), "n_shared_experts"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(tie_word_embeddings=True), "tie_word_embeddings"),
        (dict(attention_dropout=0.1), "attention_dropout"),
        (dict(compress_ratios=[0, 4, 8, 4]), "compress_ratios"),
        (
            dict(
                layer_types=["sliding_attention", "dense_attention", "sliding_attention", "sliding_attention"]
            ),
            "layer_types",
        ),
        (dict(mlp_layer_types=["moe", "hash_moe", "moe", "moe"]), "mlp_layer_types"),
        (dict(compress_rates={"compressed_sparse_attention": 4, "linear_attention": 8}), "compress_rates"),
        (dict(eos_token_id=[1, 2]), "eos_token_id"),
    ],
)
def test_values_we_do_not_implement_are_refused_by_name(changes, key):
    with pytest.raises(ConfigError, match=rf"config.json {key}="):
        _from(**changes)


def test_other_models_and_a_missing_schedule_are_refused():
    with pytest.raises(ConfigError, match="model_type='llama'"):
        _from(model_type="llama")
    no_schedule = {k: v for k, v in BASE.items() if k != "compress_ratios"}
    with pytest.raises(ConfigError, match="refusing to guess"):
        args_from_hf_config(no_schedule)


def test_legacy_trailing_mtp_entry_is_dropped():
    args = _from()
    assert args.compress_ratios == [0, 4, 16, 4] and args.n_hash_layers == 2
