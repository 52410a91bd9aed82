"""Section e: ours vs TorchTitan's deepseek_v3 debugmodel through the same Trainer, tokens/s.

Both run as users run ours: ``./run_train.sh`` (2 CPU ranks over gloo via torchrun) with the same
config (train_configs/debug_model.toml: seq_len 512, local batch 2), tokenizer, dataset, steps and
entry module (``dsv4_bench.launcher``, which registers our benchmark shape as a flavor and gives
deepseek_v3 gloo's reduction op). tokens/s is Titan's own per-rank ``tps``, averaged over the last
steps; active parameters are what each model's ``get_nparams_and_flops`` logs (ours: count_params).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from .shapes import MID

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = ROOT / "benchmarks"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
STEP = re.compile(
    r"\[rank(\d)\].*step:\s+(\d+)\s+loss:\s+([0-9.]+).*memory:\s+([0-9.]+)GiB.*tps:\s+([0-9,]+)"
)
OURS_PARAMS = re.compile(r"DeepSeek-V4 parameters: total ([\d,]+), active per token ([\d,]+)")
TITAN_PARAMS = re.compile(r"Total parameter count: dense ([\d,]+), sparse ([\d,]+), active ([\d,]+)")
COMMON_ARGS = [
    "--model.hf_assets_path",
    "./titan_dsv4/assets/tokenizer",
    "--training.dataset",
    "dsv4_corpus",
    "--training.seq_len",
    "512",
    "--training.local_batch_size",
    "2",
]
MODELS = {
    "deepseek_v3": [
        "--model.name",
        "deepseek_v3",
        "--model.flavor",
        "debugmodel",
        "--experimental.custom_import",
        "titan_dsv4",
    ],
    "ours": ["--model.name", "deepseek_v4", "--model.flavor", MID],
}


def _int(s: str) -> int:
    return int(s.replace(",", ""))


def launch(model: str, steps: int, timeout: float = 420.0) -> str:
    """Run one 2-rank training through run_train.sh; returns its log (ANSI stripped)."""
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "LOG_RANK": "0,1",
        "TRAIN_FILE": "dsv4_bench.launcher",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH_DIR), os.environ.get("PYTHONPATH")])),
    }
    with tempfile.TemporaryDirectory() as dump:
        cmd = [
            "./run_train.sh",
            "--model",
            "deepseek_v4",
            *MODELS[model],
            *COMMON_ARGS,
            "--training.steps",
            str(steps),
            "--job.dump_folder",
            dump,
        ]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    log = ANSI.sub("", proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{model} training failed (exit {proc.returncode}):\n{log[-3000:]}")
    return log


def parse(log: str, model: str, last: int) -> dict:
    """Per-step tps / memory of both ranks, the mean tps over the last ``last`` steps, and params."""
    steps: dict[int, dict[int, tuple]] = {}
    for rank, step, loss, mem, tps in STEP.findall(log):
        steps.setdefault(int(rank), {})[int(step)] = (float(loss), float(mem), _int(tps))
    per_rank_tps = {}
    for rank, by_step in sorted(steps.items()):
        tail = sorted(by_step)[-last:]
        per_rank_tps[rank] = sum(by_step[s][2] for s in tail) / len(tail)
    if model == "ours":
        total, active = map(_int, OURS_PARAMS.search(log).groups())
    else:
        dense, sparse, active = map(_int, TITAN_PARAMS.search(log).groups())
        total = dense + sparse
    rank0 = steps[0]
    return {
        "tps_per_rank_mean_last": per_rank_tps,
        "tps": sum(per_rank_tps.values()) / len(per_rank_tps),
        "tps_by_step_rank0": [rank0[s][2] for s in sorted(rank0)],
        "loss_by_step_rank0": [rank0[s][0] for s in sorted(rank0)],
        "peak_memory_gib_rank0": max(v[1] for v in rank0.values()),
        "params_total": total,
        "params_active": active,
    }


def run(quick: bool) -> dict:
    steps, last = (4, 2) if quick else (12, 6)
    results = {name: parse(launch(name, steps), name, last) for name in ("deepseek_v3", "ours")}
    ours, theirs = results["ours"], results["deepseek_v3"]
    return {
        "steps": steps,
        "averaged_last_steps": last,
        "seq_len": 512,
        "local_batch": 2,
        "ours_flavor": MID,
        "models": results,
        "tps_ratio": ours["tps"] / theirs["tps"],
        "active_param_ratio": ours["params_active"] / theirs["params_active"],
    }
