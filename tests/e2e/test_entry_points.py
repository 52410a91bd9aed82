"""Both entry points train alike, the indexer's warm-up included, and a refused job reads as one message.

``./run_train.sh`` (our Trainer) and TorchTitan's stock ``python -m torchtitan.train`` (the shipped TOMLs name
``titan_dsv4.stock`` as its custom import) on 2 CPU ranks, same seed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
STEP = re.compile(r"^\[rank0\]:.*?step:\s+(\d+)\s+(.*)$", re.M)
FIGURE = re.compile(r"(loss|grad_norm|mtp_loss|indexer_kl|indexer_recall): +(-?[0-9.]+)")

pytestmark = pytest.mark.slow


def _launch(cmd: list[str], timeout: float = 420, **env: str) -> tuple[int, str]:
    env = {**os.environ, "PYTHON": sys.executable, "LOG_RANK": "0,1", **env}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, ANSI.sub("", proc.stdout + proc.stderr)


def ours(*flags: str) -> list[str]:
    return ["./run_train.sh", "--model", "deepseek_v4", *flags]


def stock(*flags: str, ranks: int = 2) -> list[str]:
    """TorchTitan's own entry on the debug config (its TOML names titan_dsv4.stock as the custom import)."""
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--rdzv_backend", "c10d",
        "--rdzv_endpoint=localhost:0", "--local-ranks-filter", ",".join(map(str, range(ranks))), "--role",
        "rank", "--tee", "3", "-m", "torchtitan.train", "--job.config_file", "train_configs/debug_model.toml",
        *flags,
    ]  # fmt: skip


def figures(log: str) -> dict[int, dict[str, float]]:
    """Rank 0's figures per step: Titan's loss line and our extra line merged."""
    out: dict[int, dict[str, float]] = {}
    for step, rest in STEP.findall(log):
        out.setdefault(int(step), {}).update({k: float(v) for k, v in FIGURE.findall(rest)})
    return out


# Indexer warm-up of 2 steps (steps 1-2 dense, the 3rd sparse); a checkpoint after every step.
RUN = [
    "--training.steps", "3", "--deepseek_v4.indexer_warmup_steps", "2", "--debug.seed", "42",
    "--debug.deterministic", "--checkpoint.enable", "--checkpoint.interval", "1",
]  # fmt: skip


def _resume_from_step_1(source: Path, dump: Path) -> list[str]:
    """A dump folder whose checkpoint folder holds only ``source``'s step-1: the run resumes at step 2."""
    shutil.copytree(source / "checkpoint" / "step-1", dump / "checkpoint" / "step-1")
    return [*RUN, "--job.dump_folder", str(dump)]


def test_both_entries_train_alike_and_resume_mid_warmup_alike(tmp_path):
    rc, ours_log = _launch(ours(*RUN, "--job.dump_folder", str(tmp_path / "ours")))
    assert rc == 0, ours_log[-4000:]
    rc, stock_log = _launch(stock(*RUN, "--job.dump_folder", str(tmp_path / "stock")))
    assert rc == 0, stock_log[-4000:]
    straight = figures(ours_log)
    assert sorted(straight) == [1, 2, 3] and all("indexer_kl" in straight[s] for s in straight)
    assert figures(stock_log) == straight  # the same losses and indexer figures, step by step
    # the warm-up trains only the indexer (a small gradient norm), then everything trains from step 3
    assert max(straight[s]["grad_norm"] for s in (1, 2)) < 0.1 < straight[3]["grad_norm"], straight

    # Resume inside the warm-up (its second step), each entry from the other's step-1 checkpoint: the
    # resumed run must still train only the indexer at step 2, and everything at step 3.
    # (run_train.sh's check before the ranks start passed the same job above: skipped here, 4 s of imports)
    resumed = ours(*_resume_from_step_1(tmp_path / "stock", tmp_path / "ours_resumed"))
    rc, log = _launch(resumed, TITAN_DSV4_PREFLIGHT="0")
    assert rc == 0 and "Training starts at step 2" in log, log[-4000:]
    assert figures(log) == {s: straight[s] for s in (2, 3)}
    rc, log = _launch(stock(*_resume_from_step_1(tmp_path / "ours", tmp_path / "stock_resumed")))
    assert rc == 0 and "Training starts at step 2" in log, log[-4000:]
    assert figures(log) == {s: straight[s] for s in (2, 3)}


FLASH = [
    "--config",
    "train_configs/deepseek_v4_flash.toml",
    "--model.hf_assets_path",
    "titan_dsv4/assets/tokenizer",
]
# One launch per checker the preflight runs (check_job, the memory plan): every other key's message is checked
# in-process (tests/unit/test_job_options.py, test_planning.py); the launcher path is the same for all.
REFUSALS = {
    "flash_does_not_fit": (  # its pipeline on 2 ranks: pp 2, one row
        [
            *FLASH,
            "--parallelism.pipeline_parallel_degree",
            "2",
            "--parallelism.expert_parallel_degree",
            "1",
            "--training.local_batch_size",
            "2",
        ],
        "cannot fit this layout",
    ),
    "bad_option": (["--deepseek_v4.attn_impl", "flash"], "deepseek_v4.attn_impl='flash'"),
}


def _refused_once(rc: int, log: str, message: str) -> None:
    assert rc == 2, log[-3000:]
    assert log.count(message) == 1, log[-3000:]
    assert "DeepSeek-V4 refused this job before any work" in log
    assert "Traceback" not in log and "step:" not in log, log[-3000:]


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_run_train_refusal_is_one_message(case, tmp_path):
    flags, message = REFUSALS[case]
    _refused_once(*_launch(ours(*flags, "--job.dump_folder", str(tmp_path)), timeout=180), message)


def test_stock_entry_refusal_is_one_message_from_rank_0(tmp_path):
    rc, log = _launch(
        stock("--deepseek_v4.attn_impl", "flash", "--job.dump_folder", str(tmp_path)), timeout=180
    )
    assert rc != 0 and log.count("deepseek_v4.attn_impl='flash'") == 1, log[-3000:]
    assert not re.search(r"^\[rank\d\]:.*Traceback", log, re.M), log[-3000:]  # no traceback from any rank


def test_traceback_on_request(tmp_path):
    rc, log = _launch(
        ours("--debug", "--model.flavor", "flassh", "--job.dump_folder", str(tmp_path)), timeout=180
    )
    assert rc != 0 and "Traceback" in log and "ConfigError" in log
