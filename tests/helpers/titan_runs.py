"""Launch ``./run_train.sh`` on 2 CPU ranks from a test and read what it logged."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOSS = re.compile(r"\[rank(\d)\].*step:\s+(\d+)\s+loss:\s+([0-9.]+)")
READ = re.compile(r"\[rank(\d)\].*Read ([0-9.]+) MiB of the checkpoint's ([0-9.]+) MiB on this rank")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Bit-exact resume runs: same seed, deterministic kernels, same schedule length.
RESUMABLE = [
    "--training.steps",
    "10",
    "--checkpoint.enable",
    "--checkpoint.interval",
    "5",
    "--debug.seed",
    "42",
    "--debug.deterministic",
]


def run_command(cmd: list[str], timeout: float = 300, **env: str) -> tuple[int, str]:
    """(exit code, every rank's log without colours) of a launch from the repository root."""
    full_env = {**os.environ, "PYTHON": sys.executable, "LOG_RANK": "0,1", **env}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, ANSI.sub("", proc.stdout + proc.stderr)


def run_train(args: list[str], timeout: float = 300, **env: str) -> tuple[int, str]:
    """(exit code, both ranks' log without colours) of ``./run_train.sh --model deepseek_v4 ARGS``."""
    return run_command(["./run_train.sh", "--model", "deepseek_v4", *args], timeout, **env)


def run_with_fault(args: list[str], fault: str, mark: Path, timeout: float = 300) -> tuple[int, str]:
    """The same launch through tests/helpers/fault_injection_train.py, with rank 1 killed (or stopped) at
    ``fault``."""
    env = {
        "TRAIN_FILE": "tests.helpers.fault_injection_train",  # run_train.sh runs it from the repository root
        "DSV4_KILL_RANK": "1",
        "DSV4_KILL_AT": fault,
        "DSV4_KILL_MARK": str(mark),
    }
    return run_train(args, timeout=timeout, **env)


def losses(log: str, rank: int = 0) -> dict[int, float]:
    return {int(s): float(v) for r, s, v in LOSS.findall(log) if int(r) == rank}


def bytes_read(log: str) -> dict[int, tuple[float, float]]:
    """rank -> (MiB this rank read, MiB of the checkpoint), from the storage reader's log line."""
    return {int(r): (float(a), float(b)) for r, a, b in READ.findall(log)}


def error_lines(log: str) -> list[str]:
    """The exception lines the ranks printed (``SomeError: message``), first line of each."""
    return re.findall(r"^\[rank\d\]:\[rank\d\]: (\w+(?:Error|Exception)): (.*)$", log, flags=re.M)


def first_global_batch(config: str = "train_configs/debug_model.toml", ranks: int = 2):
    """(inputs, labels) of step 1 on every rank, concatenated: what Titan's dataloaders feed a run of
    ``config``."""
    import torch
    from torchtitan.components.tokenizer import build_hf_tokenizer
    from torchtitan.config import ConfigManager
    from torchtitan.hf_datasets.text_datasets import build_text_dataloader

    import titan_dsv4  # noqa: F401  (registers the embedded corpus)

    cwd = os.getcwd()
    os.chdir(ROOT)  # the configs name repository-relative assets
    try:
        job = ConfigManager().parse_args(["--job.config_file", config])
        tokenizer = build_hf_tokenizer(job)
        batches = [
            next(
                iter(
                    build_text_dataloader(dp_world_size=ranks, dp_rank=r, tokenizer=tokenizer, job_config=job)
                )
            )
            for r in range(ranks)
        ]
    finally:
        os.chdir(cwd)
    return torch.cat([b[0]["input"] for b in batches]), torch.cat([b[1] for b in batches])
