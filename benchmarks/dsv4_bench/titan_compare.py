"""Section e: ours vs TorchTitan's deepseek_v3 debugmodel through the same Trainer, tokens/s.

Both run as users run ours: ``./run_train.sh`` (2 CPU ranks over gloo via torchrun) with the same
config (train_configs/debug_model.toml: seq_len 512, local batch 2), tokenizer, dataset, seed, steps and
entry module (``dsv4_bench.launcher``: titan_dsv4's ``DeepSeekV4Trainer``, our benchmark shape as a
flavor, deepseek_v3 given gloo's reduction op). tokens/s is Titan's own per-rank ``tps``, averaged over
the last steps; active parameters are what each model's ``get_nparams_and_flops`` logs (ours:
count_params).
"""

from __future__ import annotations

import re

from .shapes import MID
from .trainer_runs import indexer_warmup_steps, launch

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


def parse(run: dict, model: str, last: int) -> dict:
    """Per-step tps / memory of both ranks, the mean tps over the last ``last`` steps, and params."""
    log, steps = run["log"], run["titan_steps"]
    per_rank_tps = {}
    for rank, by_step in sorted(steps.items()):
        tail = sorted(by_step)[-last:]
        per_rank_tps[rank] = sum(by_step[s]["tps"] for s in tail) / len(tail)
    if model == "ours":
        total, active = map(_int, OURS_PARAMS.search(log).groups())
    else:
        dense, sparse, active = map(_int, TITAN_PARAMS.search(log).groups())
        total = dense + sparse
    rank0 = steps[0]
    return {
        "tps_per_rank_mean_last": per_rank_tps,
        "tps": sum(per_rank_tps.values()) / len(per_rank_tps),
        "tps_by_step_rank0": [rank0[s]["tps"] for s in sorted(rank0)],
        "loss_by_step_rank0": [rank0[s]["loss"] for s in sorted(rank0)],
        "peak_memory_gib_rank0": max(v["memory_gib"] for v in rank0.values()),
        "params_total": total,
        "params_active": active,
    }


def run(quick: bool) -> dict:
    steps, last = (4, 2) if quick else (12, 6)
    results = {
        name: parse(launch([*MODELS[name], *COMMON_ARGS], steps), name, last)
        for name in ("deepseek_v3", "ours")
    }
    ours, theirs = results["ours"], results["deepseek_v3"]
    return {
        "steps": steps,
        "averaged_last_steps": last,
        "seq_len": 512,
        "local_batch": 2,
        "ours_flavor": MID,
        "ours_indexer_warmup_steps": indexer_warmup_steps(),
        "models": results,
        "tps_ratio": ours["tps"] / theirs["tps"],
        "active_param_ratio": ours["params_active"] / theirs["params_active"],
    }
