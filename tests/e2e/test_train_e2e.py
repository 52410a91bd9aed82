"""End to end through TorchTitan's Trainer: 2 CPU ranks over gloo, launched as users launch it."""

from __future__ import annotations

import re

import pytest

from titan_dsv4.launch import losses as _losses
from titan_dsv4.launch import run_command


def _run(cmd: list[str], timeout: float = 420) -> tuple[int, str]:
    # NGPU unset, as users launch: run_train.sh picks the rank count itself (2 CPU ranks here)
    return run_command(cmd, timeout, env={"NGPU": ""})


@pytest.mark.slow
def test_run_train_default_config_trains_on_two_cpu_ranks(tmp_path):
    rc, log = _run(
        [
            "./run_train.sh",
            "--model",
            "deepseek_v4",
            "--validation.enable",
            "--validation.freq",
            "12",
            "--validation.steps",
            "2",
            "--training.steps",
            "12",
            "--job.dump_folder",
            str(tmp_path),
        ]
    )
    assert rc == 0, log[-4000:]
    assert log.count("Process group destroyed") == 2  # both ranks finished and tore down cleanly
    losses = _losses(log)
    assert sorted(losses) == list(range(1, 13)), log[-3000:]
    assert losses[12] < losses[1] - 1.0, losses
    assert "global batch size 4" in log  # 2 ranks x local batch 2: FSDP over both
    assert re.search(r"validate step: 12  loss: +[0-9.]+", log), log[-3000:]  # Titan's validator runs


def test_launcher_rejects_unknown_model_and_missing_config():
    rc, log = _run(["./run_train.sh", "--model", "llama3"], timeout=60)
    assert rc == 2 and "unknown --model 'llama3'" in log
    rc, log = _run(["./run_train.sh", "--model", "deepseek_v4", "--config", "nope.toml"], timeout=60)
    assert rc == 2 and "config file 'nope.toml' not found" in log
