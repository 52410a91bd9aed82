"""Launch TorchTitan's Trainer as users do (``./run_train.sh --model deepseek_v4 ...``); collect its figures.

Every run: 2 CPU ranks over gloo (run_train.sh's default; torchrun gives each rank 1 thread), the shipped
``train_configs/debug_model.toml`` (embedded corpus, seq 512 x local batch 2 per rank) with command-line
overrides, ``--debug.seed 0`` (same initial weights and data in every run), a fresh dump folder, and the
entry module ``dsv4_bench.launcher`` (PYTHONPATH=benchmarks). A measured run (``measured_run``) gets
``MeasuredTrainer``, whose ranks write their own figures (``measured_trainer.py``); its untimed steps
include the config's dense indexer warm-up (a different step: CSA attends every entry and only the
indexer learns). Titan's logged step lines (loss, memory, tps) are parsed from both ranks' output.
"""

from __future__ import annotations

import json
import os
import tempfile
import tomllib
from pathlib import Path

from titan_dsv4.launch import ROOT, run_train, step_metrics

# How a measured run is configured (read by measured_trainer on every rank; this module imports no torch).
OUT_ENV = "DSV4_BENCH_OUT"  # path prefix of the per-rank JSON files; unset: no measurements
WARMUP_ENV = "DSV4_BENCH_WARMUP"  # first steps, not timed (lazy init, first-call allocations)
PROFILE_ENV = "DSV4_BENCH_PROFILE"  # "1": the last step runs under torch.profiler on rank 0, untimed
BENCH_DIR = ROOT / "benchmarks"
CONFIG = ROOT / "train_configs" / "debug_model.toml"  # run_train.sh's default
RANKS = 2
SEED = 0


def indexer_warmup_steps() -> int:
    """The shipped config's dense indexer warm-up steps (``[deepseek_v4] indexer_warmup_steps``)."""
    with open(CONFIG, "rb") as f:
        return int(tomllib.load(f).get("deepseek_v4", {}).get("indexer_warmup_steps") or 0)


def measured_run(flags: list[str], warmup: int, timed: int, profile: bool = False) -> dict:
    """A measured training, merged over ranks: the config's indexer warm-up and ``warmup`` more steps
    untimed, then ``timed`` steps, then (``profile``) one step under torch.profiler on rank 0."""
    untimed = indexer_warmup_steps() + warmup
    run = launch(flags, untimed + timed + int(profile), untimed=untimed, profile=profile)
    return {**measured(run), "indexer_warmup_steps": indexer_warmup_steps()}


def launch(
    flags: list[str],
    steps: int,
    untimed: int | None = None,
    profile: bool = False,
    timeout: float = 480.0,
) -> dict:
    """One 2-rank training; ``{"log": str, "titan_steps": {...}, "ranks": [rank 0's, rank 1's] or None}``.

    ``untimed``: measure the steps after it (None: an unmeasured run, the package's own Trainer);
    ``profile``: the last step runs under torch.profiler on rank 0 (not timed).
    """
    env = {
        "NGPU": str(RANKS),
        "TRAIN_FILE": "dsv4_bench.launcher",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH_DIR), os.environ.get("PYTHONPATH")])),
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "measured")
        if untimed is not None:
            env.update({OUT_ENV: out, WARMUP_ENV: str(untimed), PROFILE_ENV: "1" if profile else "0"})
        flags_and_run = [
            *flags,
            "--training.steps",
            str(steps),
            "--debug.seed",
            str(SEED),
            "--job.dump_folder",
            os.path.join(tmp, "dump"),
        ]
        log_ranks = ",".join(map(str, range(RANKS)))
        _, log = run_train(flags_and_run, timeout, log_ranks=log_ranks, env=env, check=True)
        ranks = None
        if untimed is not None:
            ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(RANKS)]
    # rank -> step -> Titan's logged figures: loss, memory_gib (peak RSS on CPU), tps (tokens/s per rank), ...
    return {"flags": flags, "log": log, "titan_steps": step_metrics(log), "ranks": ranks}


def measured(run: dict) -> dict:
    """Both ranks' measurements of one run, merged: the slower rank bounds each step, memory per rank."""
    import statistics

    ranks = run["ranks"]
    first = ranks[0]
    step_s = [max(per_rank) for per_rank in zip(*(r["step_s"] for r in ranks))]
    step = statistics.median(step_s)
    tokens_per_rank = first["tokens_per_step_per_rank"]
    timed = range(first["warmup_steps"] + 1, first["warmup_steps"] + 1 + len(step_s))
    titan = run["titan_steps"]
    titan_tps = [
        statistics.mean(titan[r][s]["tps"] for s in timed if s in titan.get(r, {})) for r in range(len(ranks))
    ]
    return {
        "flags": run["flags"],
        "model": first["model"],
        "flavor": first["flavor"],
        "expert_parallel_degree": first["expert_parallel_degree"],
        "mixed_precision_param": first["mixed_precision_param"],
        "params_total": first["params_total"],
        "params_active": first["params_active"],
        "warmup_steps": first["warmup_steps"],
        "step_s_median": step,
        "step_s_all": step_s,
        "tokens_per_s_per_rank": tokens_per_rank / step,
        "tokens_per_s_global": len(ranks) * tokens_per_rank / step,
        "titan_tps_per_rank_mean_timed": titan_tps,
        "peak_rss_mib_per_rank": [r["peak_rss_mib"] for r in ranks],
        "rss_before_build_mib_per_rank": [r["rss_before_build_mib"] for r in ranks],
        "global_losses": [sum(per_rank) for per_rank in zip(*(r["losses"] for r in ranks))],
        "titan_losses_rank0": [titan[0][s]["loss"] for s in sorted(titan.get(0, {}))],
        "comms_per_rank": [r["comms"] for r in ranks],
        "routed_bytes_per_step": first["routed_bytes_per_step"],
        "profile": first.get("profile"),
    }
