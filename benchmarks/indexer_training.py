#!/usr/bin/env python
"""Does the Lightning Indexer learn? ``python benchmarks/indexer_training.py [--steps 200] [--seeds ...]``.

Trains the debug model from scratch with ``./run_train.sh`` (2 CPU ranks, the embedded corpus) twice per
seed: with the indexer frozen (``indexer_loss_weight 0``, recall still logged) and trained by the KL
distillation (``indexer_loss_weight 1`` after ``indexer_warmup_steps`` of dense warm-up). Reports, per run,
``indexer_recall`` (the fraction of the main attention's top-k entries, computed densely for sampled
queries, that the indexer picks) against the chance level (index_topk / visible entries), and Titan's
validation loss at equal steps; writes ``benchmarks/results/indexer_training.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
STEP = re.compile(
    r"\[rank0\].*step:\s+(\d+)\s+loss:\s+([0-9.]+).*indexer_recall: ([0-9.]+) \(chance ([0-9.]+)\)"
)
VALIDATION = re.compile(r"\[rank0\].*validate step:\s+(\d+)\s+loss:\s+([0-9.]+)")
RUNS = {
    "frozen": [
        "--deepseek_v4.indexer_loss_weight",
        "0",
        "--deepseek_v4.indexer_warmup_steps",
        "0",
        "--deepseek_v4.log_indexer_recall",
    ],
    "trained": ["--deepseek_v4.indexer_loss_weight", "1", "--deepseek_v4.indexer_warmup_steps", "10"],
}


def run(name: str, seed: int, steps: int, validate_every: int) -> dict:
    """One training run; its per-step recall and loss, and its validation losses."""
    with tempfile.TemporaryDirectory() as dump:
        cmd = [
            "./run_train.sh",
            "--model",
            "deepseek_v4",
            "--training.steps",
            str(steps),
            "--debug.seed",
            str(seed),
            "--validation.enable",
            "--validation.freq",
            str(validate_every),
            "--validation.steps",
            "4",
            "--metrics.log_freq",
            "1",
            "--job.dump_folder",
            dump,
            *RUNS[name],
        ]
        env = {**os.environ, "PYTHON": sys.executable, "LOG_RANK": "0"}
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
        log = ANSI.sub("", proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed:\n{log[-3000:]}")
    steps_seen = {int(s): (float(loss), float(r), float(c)) for s, loss, r, c in STEP.findall(log)}
    return {
        "seed": seed,
        "wall_s": time.perf_counter() - start,
        "loss": {s: v[0] for s, v in steps_seen.items()},
        "recall": {s: v[1] for s, v in steps_seen.items()},
        "chance": {s: v[2] for s, v in steps_seen.items()},
        "validation_loss": {int(s): float(v) for s, v in VALIDATION.findall(log)},
    }


def window_mean(series: dict[int, float], last: int) -> float:
    """Mean of the last ``last`` steps (recall is sampled: one step is noisy)."""
    keys = sorted(series)[-last:]
    return statistics.fmean(series[k] for k in keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--validate-every", type=int, default=50)
    opts = parser.parse_args()
    runs = {name: [run(name, seed, opts.steps, opts.validate_every) for seed in opts.seeds] for name in RUNS}
    lines = [f"Indexer training on the debug model, {opts.steps} steps, seeds {opts.seeds} (2 CPU ranks)"]
    lines.append("  recall = fraction of the main attention's dense top-16 CSA entries the indexer picks")
    for name, rs in runs.items():
        first = [window_mean(dict(sorted(r["recall"].items())[:10]), 10) for r in rs]
        last = [window_mean(r["recall"], 20) for r in rs]
        chance = [window_mean(r["chance"], 20) for r in rs]
        lines.append(
            f"  {name:8s} recall, steps 1-10: {min(first):.3f}-{max(first):.3f};  "
            f"last 20 steps: {min(last):.3f}-{max(last):.3f}; chance {min(chance):.3f}-{max(chance):.3f}"
            " (min-max over seeds)"
        )
    vsteps = sorted(set.intersection(*(set(r["validation_loss"]) for rs in runs.values() for r in rs)))
    for step in vsteps:
        cells = []
        for name, rs in runs.items():
            values = [r["validation_loss"][step] for r in rs]
            cells.append(f"{name} {statistics.fmean(values):.4f} ({min(values):.4f}-{max(values):.4f})")
        lines.append(f"  validation loss at step {step}: " + ";  ".join(cells))
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "indexer_training.json").write_text(
        json.dumps({"args": vars(opts), "runs": runs, "report": text}, indent=1)
    )


if __name__ == "__main__":
    main()
