"""Bad input a user can hand us around checkpoints and job configs: one clear error each, before compute.

Unknown flavors, inconsistent schedules, short seq_len and out-of-vocabulary token ids are covered in
test_bad_input.py and test_train_e2e.py; this file covers the rest of the issue's list.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers.checkpoint_fixtures import debug_args, debug_hf_model
from titan_dsv4.checkpoint.files import CheckpointError
from titan_dsv4.checkpoint.validation import CheckpointMismatchError
from titan_dsv4.launch import losses, run_train
from titan_dsv4.model import ConfigError
from titan_dsv4.model.hf_config import hf_config_from_args


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A save_pretrained folder of the debugmodel flavor."""
    folder = tmp_path_factory.mktemp("good")
    debug_hf_model().save_pretrained(folder)
    return folder


def _copy(good: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "ckpt"))


def _check(folder: Path):
    from titan_dsv4.checkpoint.adapter import DeepSeekV4CheckpointAdapter

    return DeepSeekV4CheckpointAdapter(debug_args(), None).get_hf_storage_reader(str(folder))


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _edit_tensors(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


# ---- config keys ---------------------------------------------------------------------------------
def test_misspelled_toml_key_and_section_are_named(tmp_path):
    from torchtitan.config import ConfigManager

    for text, name in (
        ("[training]\nstepz = 5\n", "Training'> data: {'stepz'}"),
        ("[trainig]\nsteps = 5\n", "JobConfig'> data: {'trainig'}"),
    ):
        path = tmp_path / "bad.toml"
        path.write_text(text)
        with pytest.raises(
            ValueError, match=f"Invalid field names in .*{name}.*\n.*modify your .toml config"
        ):
            ConfigManager().parse_args(["--job.config_file", str(path)])


def test_misspelled_command_line_key_suggests_the_right_one(capsys):
    from torchtitan.config import ConfigManager

    with pytest.raises(SystemExit) as exit_info:
        ConfigManager().parse_args(["--training.stepz", "5"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert (
        "Unrecognized options: --training.stepz" in err
        and "Perhaps you meant:" in err
        and "--training.steps" in err
    )


# ---- parallel degrees ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "degrees, message",
    [
        (
            dict(dp_shard=3),
            r"data_parallel_shard_degree=3 x 1 = 3 ranks, but the job has 2\. "
            r"Set --parallelism.data_parallel_shard_degree -1",
        ),
        (dict(dp_replicate=3), r"data_parallel_replicate_degree=3 = 3 does not divide the 2 ranks"),
        (dict(tp=3), r"tensor_parallel_degree=3 = 3 does not divide the 2 ranks"),
        (
            dict(dp_shard=0),
            r"must be >= 1 \(data_parallel_shard_degree may be -1\): got data_parallel_shard_degree=0",
        ),
    ],
)
def test_degrees_that_do_not_fit_the_world_size(degrees, message):
    from torchtitan.config import JobConfig

    from titan_dsv4.job_config import check_parallel_degrees

    names = dict(
        dp_replicate="data_parallel_replicate_degree",
        dp_shard="data_parallel_shard_degree",
        tp="tensor_parallel_degree",
        ep="expert_parallel_degree",
    )
    p = JobConfig().parallelism
    for key, value in degrees.items():
        setattr(p, names[key], value)
    with pytest.raises(ConfigError, match=message):
        check_parallel_degrees(p, 2)


# ---- checkpoint options ----------------------------------------------------------------------------
def test_checkpoint_options_titan_would_refuse_only_at_the_last_step(tmp_path):
    from torchtitan.config import Checkpoint

    from titan_dsv4.job_config import check_checkpoint_options

    cfg = Checkpoint(enable=True, last_save_in_hf=True, last_save_model_only=False)
    with pytest.raises(
        ConfigError, match="last_save_in_hf exports model weights only.*add --checkpoint.last_save_model_only"
    ):
        check_checkpoint_options(cfg, str(tmp_path / "checkpoint"))
    cfg = Checkpoint(enable=True, initial_load_path=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="initial_load_path .*nowhere is not a folder"):
        check_checkpoint_options(cfg, str(tmp_path / "checkpoint"))


# ---- checkpoints -----------------------------------------------------------------------------------
def test_checkpoint_of_another_model_type(good, tmp_path):
    folder = _copy(good, tmp_path)
    _edit_config(folder, model_type="llama")
    with pytest.raises(
        CheckpointMismatchError,
        match="config.json: config.json has model_type='llama'; titan_dsv4 only "
        "loads 'deepseek_v4' checkpoints.*convert_config",
    ):
        _check(folder)
    # without config.json the tensor names give it away: a Llama's attention and MLP
    os.remove(folder / "config.json")
    llama = {
        "model.embed_tokens.weight": torch.zeros(2048, 256),
        "model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4),
        "model.layers.0.mlp.up_proj.weight": torch.zeros(4, 4),
    }
    save_file(llama, folder / "model.safetensors")
    with pytest.raises(
        CheckpointMismatchError,
        match=r"missing: .*\n.*2 stored tensor\(s\) belong to no model tensor: "
        r"model\.layers\.0\.mlp\.up_proj\.weight, model\.layers\.0\.self_attn\.q_proj",
    ):
        _check(folder)
    save_file({"wte.weight": torch.zeros(4, 4)}, folder / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match="is not a DeepSeek-V4 checkpoint: none of its tensors"):
        _check(folder)


def test_checkpoint_of_another_size_names_the_fields_and_the_flavor(good, tmp_path):
    folder = _copy(good, tmp_path)
    _edit_config(folder, hidden_size=512, num_attention_heads=8)
    with pytest.raises(
        CheckpointMismatchError,
        match=r"config.json differs in 2 field\(s\): hidden_size: checkpoint 512, "
        r"model 256; num_attention_heads: checkpoint 8, model 4\..*convert_config",
    ):
        _check(folder)
    from titan_dsv4.flavors import deepseek_v4_args

    (folder / "config.json").write_text(json.dumps(hf_config_from_args(deepseek_v4_args["flash"])))
    with pytest.raises(CheckpointMismatchError, match="It is the 'flash' flavor: set --model.flavor flash"):
        _check(folder)


def test_missing_unexpected_and_misshapen_tensors_are_named(good, tmp_path):
    folder = _copy(good, tmp_path)
    os.remove(folder / "config.json")  # isolate the tensor check from the config check

    def damage(t):
        del t["model.layers.2.attn.compressor.ape"]
        t["model.layers.0.attn.extra_proj.weight"] = torch.zeros(2, 2)
        t["model.layers.3.ffn.gate.weight"] = torch.zeros(9, 256)

    _edit_tensors(folder, damage)
    with pytest.raises(CheckpointMismatchError) as e:
        _check(folder)
    msg = str(e.value)
    assert "1 tensor(s) the model needs are missing: model.layers.2.self_attn.compressor.position_bias" in msg
    assert "1 stored tensor(s) belong to no model tensor: model.layers.0.attn.extra_proj.weight" in msg
    assert "model.layers.3.mlp.gate.weight is [9, 256] on disk but [8, 256] in the model" in msg


def test_missing_expert_is_named(good, tmp_path):
    folder = _copy(good, tmp_path)
    _edit_tensors(folder, lambda t: t.pop("model.layers.1.ffn.experts.5.w3.weight"))
    with pytest.raises(
        CheckpointError, match=r"gate_up_proj: the stored experts are incomplete.*first gap: expert 5, part 1"
    ):
        _check(folder)


def test_truncated_safetensors_file(good, tmp_path):
    folder = _copy(good, tmp_path)
    shard = folder / "model.safetensors"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(
        CheckpointError,
        match=rf"model.safetensors is truncated: its safetensors header describes "
        rf"{size:,} bytes but the file holds {size - 1000:,}.*copy that file again",
    ):
        _check(folder)
    with open(shard, "r+b") as f:
        f.truncate(100)  # inside the header
    with pytest.raises(CheckpointError, match="is truncated"):
        _check(folder)


def test_shard_named_by_the_index_but_absent(good, tmp_path):
    folder = _copy(good, tmp_path)
    index = {"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match="names shard\\(s\\) that are not in the folder: model-00002-of-00002"
    ):
        _check(folder)


@pytest.mark.slow
def test_truncated_checkpoint_stops_the_run_before_training_and_writes_nothing(good, tmp_path):
    folder = _copy(good, tmp_path)
    shard = folder / "model.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    dump = tmp_path / "run"
    rc, log = run_train(
        [
            "--training.steps",
            "2",
            "--checkpoint.enable",
            "--checkpoint.initial_load_path",
            str(folder),
            "--checkpoint.initial_load_in_hf",
            "--job.dump_folder",
            str(dump),
        ],
        timeout=180,
    )
    assert rc != 0
    assert "CheckpointError: " in log and "model.safetensors is truncated" in log
    assert not losses(log) and "Training starts" not in log
    assert not (dump / "checkpoint").exists()
    assert before == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
