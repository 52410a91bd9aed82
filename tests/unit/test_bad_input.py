"""Bad input gets one clear error that names the problem and the fix, before any compute."""

from __future__ import annotations

import json

import pytest
import torch

from titan_dsv4.flavors import UnknownFlavorError, deepseek_v4_args
from titan_dsv4.model import ConfigError, DeepSeekV4Model


def _job(seq_len=512, hf_assets_path=None):
    """The debug config as Titan parses it (with its [deepseek_v4] section), seq_len and assets changed."""
    from pathlib import Path

    from torchtitan.config import ConfigManager

    config = Path(__file__).parents[2] / "train_configs" / "debug_model.toml"
    job = ConfigManager().parse_args(["--job.config_file", str(config)])
    job.training.seq_len = seq_len
    job.model.hf_assets_path = hf_assets_path
    return job


def test_unknown_flavor_lists_the_known_ones():
    with pytest.raises(UnknownFlavorError, match="known flavors: debugmodel, flash, pro"):
        deepseek_v4_args["flassh"]


def test_inconsistent_layer_schedule(debug_args):
    bad = debug_args.replace(compress_ratios=[0, 4, 128])
    with pytest.raises(ConfigError, match="compress_ratios has 3 entries but n_layers=4"):
        DeepSeekV4Model(bad)
    with pytest.raises(ConfigError, match=r"contains \[64\]"):
        debug_args.replace(compress_ratios=[0, 4, 64, 4]).validate()
    with pytest.raises(ConfigError, match="n_hash_layers=5"):
        debug_args.replace(n_hash_layers=5).validate()


def test_seq_len_the_compressors_cannot_serve(debug_args):
    with pytest.raises(
        ConfigError, match=r"seq_len=100 is shorter than the HCA compression ratio 128.*at least 128"
    ):
        debug_args.update_from_config(_job(seq_len=100))
    debug_args.replace().update_from_config(_job(seq_len=128))  # one complete HCA window is enough


def test_tokenizer_larger_than_vocab(tmp_path):
    from torchtitan.components.tokenizer import build_hf_tokenizer

    from titan_dsv4.job_config import check_tokenizer_fits

    (tmp_path / "tokenizer.json").write_text(json.dumps(_tiny_tokenizer_json(3000)))
    job = _job(hf_assets_path=str(tmp_path))
    with pytest.raises(ConfigError, match="has 3000 tokens but the model vocab_size is 2048"):
        check_tokenizer_fits(build_hf_tokenizer(job), job)


def test_token_ids_outside_the_vocabulary(debug_args):
    model = DeepSeekV4Model(debug_args.replace(max_seq_len=128))
    model.init_weights()
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 2048\); got min 0, max 2048"):
        model(torch.tensor([[0, 5, 2048]]))
    with pytest.raises(ValueError, match="got min -1"):
        model(torch.tensor([[-1, 5, 7]]))


def test_unimplemented_parallelism_is_refused_before_any_change(debug_args):
    from torchtitan.distributed import ParallelDims

    from titan_dsv4.infra.parallelize import UnsupportedParallelismError, refuse_unimplemented_parallelism

    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=2, pp=2, ep=1, etp=1, world_size=4)
    with pytest.raises(UnsupportedParallelismError, match="tensor_parallel_degree=2 yet"):
        refuse_unimplemented_parallelism(dims)


def _tiny_tokenizer_json(n: int) -> dict:
    vocab = {f"t{i}": i for i in range(n)}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"},
    }
