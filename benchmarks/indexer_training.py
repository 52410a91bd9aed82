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
import statistics
import tempfile
import time

from titan_dsv4.launch import ROOT, run_train, step_metrics, validation_losses

RESULTS = ROOT / "benchmarks" / "results"
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
        args = [
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
        start = time.perf_counter()
        _, log = run_train(args, 3600, log_ranks="0", check=True)
    steps_seen = {s: f for s, f in step_metrics(log).get(0, {}).items() if "indexer_recall" in f}
    return {
        "seed": seed,
        "wall_s": time.perf_counter() - start,
        "loss": {s: f["loss"] for s, f in steps_seen.items()},
        "recall": {s: f["indexer_recall"] for s, f in steps_seen.items()},
        "chance": {s: f["indexer_recall_chance"] for s, f in steps_seen.items()},
        "validation_loss": validation_losses(log),
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
