"""Every V4 option at once through TorchTitan's Trainer: context parallelism (cp 2), expert parallelism (EP 2,
borrowed from the cp ranks), MTP, the indexer's dense warm-up then KL, packed documents and gradient
accumulation, on 2 CPU ranks; it trains and resumes bit-exactly."""

from __future__ import annotations

import shutil

import pytest

from titan_dsv4.launch import run_train, step_metrics

pytestmark = pytest.mark.slow

# cp 2 x EP 2 (dp 1) with every V4 option on: MTP, indexer KL after a dense warm-up step, packed documents,
# two micro-batches per step (the extra losses accumulate like Titan's).
CP2 = [
    "--parallelism.context_parallel_degree", "2", "--parallelism.expert_parallel_degree", "2",
    "--training.global_batch_size", "4", "--training.steps", "4", "--debug.seed", "42",
    "--debug.deterministic", "--deepseek_v4.mtp_layers", "1", "--deepseek_v4.indexer_warmup_steps", "1",
    "--deepseek_v4.attn_mask_type", "block_causal", "--checkpoint.enable", "--checkpoint.interval", "2",
]  # fmt: skip


def test_every_option_with_cp2_and_ep2_trains_and_resumes_bit_exactly(tmp_path):
    code, log = run_train([*CP2, "--job.dump_folder", str(tmp_path / "straight")], timeout=600)
    assert code == 0 and log.count("Process group destroyed") == 2, log[-4000:]
    straight = step_metrics(log)[0]
    assert sorted(straight) == [1, 2, 3, 4] and all(
        "mtp_loss" in f and "indexer_kl" in f for f in straight.values()
    )
    assert straight[4]["loss"] < straight[1]["loss"]
    # both ranks log the same global figures, ours included
    keys = ("loss", "mtp_loss", "indexer_kl")
    other = step_metrics(log)[1]
    assert {s: [other[s][k] for k in keys] for s in other} == {
        s: [straight[s][k] for k in keys] for s in straight
    }
    resumed = tmp_path / "resumed" / "checkpoint"
    shutil.copytree(tmp_path / "straight" / "checkpoint" / "step-2", resumed / "step-2")
    code, log = run_train([*CP2, "--job.dump_folder", str(tmp_path / "resumed")], timeout=600)
    assert code == 0 and "Training starts at step 3" in log, log[-4000:]
    after = step_metrics(log)[0]
    assert {s: [after[s][k] for k in keys] for s in (3, 4)} == {
        s: [straight[s][k] for k in keys] for s in (3, 4)
    }
