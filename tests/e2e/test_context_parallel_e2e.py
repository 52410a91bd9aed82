"""Context parallelism through TorchTitan's Trainer: cp 2 on 2 CPU ranks trains and resumes bit-exactly."""

from __future__ import annotations

import shutil

import pytest

from titan_dsv4.launch import run_train, step_metrics

pytestmark = pytest.mark.slow

# cp 2 (dp 1) with every V4 option on: MTP, indexer KL after a dense warm-up step, packed documents.
CP2 = [
    "--parallelism.context_parallel_degree", "2", "--training.steps", "4", "--debug.seed", "42",
    "--debug.deterministic", "--deepseek_v4.mtp_layers", "1", "--deepseek_v4.indexer_warmup_steps", "1",
    "--deepseek_v4.attn_mask_type", "block_causal", "--checkpoint.enable", "--checkpoint.interval", "2",
]  # fmt: skip


def test_cp2_trains_and_resumes_bit_exactly(tmp_path):
    code, log = run_train([*CP2, "--job.dump_folder", str(tmp_path / "straight")], timeout=600)
    assert code == 0 and log.count("Process group destroyed") == 2, log[-4000:]
    straight = step_metrics(log)[0]
    assert sorted(straight) == [1, 2, 3, 4] and all(
        "mtp_loss" in f and "indexer_kl" in f for f in straight.values()
    )
    # both cp ranks log the same global loss
    assert {s: f["loss"] for s, f in step_metrics(log)[1].items()} == {
        s: f["loss"] for s, f in straight.items()
    }
    resumed = tmp_path / "resumed" / "checkpoint"
    shutil.copytree(tmp_path / "straight" / "checkpoint" / "step-2", resumed / "step-2")
    code, log = run_train([*CP2, "--job.dump_folder", str(tmp_path / "resumed")], timeout=600)
    assert code == 0 and "Training starts at step 3" in log, log[-4000:]
    after = step_metrics(log)[0]
    keys = ("loss", "mtp_loss", "indexer_kl")
    assert {s: [after[s][k] for k in keys] for s in (3, 4)} == {
        s: [straight[s][k] for k in keys] for s in (3, 4)
    }
