"""Section f: expert parallelism (EP 2) vs FSDP alone, 2 gloo ranks, ``bench_mid``, through the Trainer.

Both configurations are the same ``./run_train.sh`` training (shipped debug config, ``bench_mid`` flavor,
same seed and data, ``MeasuredTrainer``); only ``--parallelism.expert_parallel_degree`` differs: 1 (every
rank holds an FSDP shard of every routed expert, all-gathered per block) or 2 (each rank holds half the
experts whole; token copies travel to their expert's rank and back by all-to-all). The runs are
interleaved in pairs, FSDP/EP2 then EP2/FSDP, so that drift in the machine's load hits both alike; every
figure is reported as its range over runs, and each EP2/FSDP ratio as the ratio of medians with its range
over the pairs run back to back.
"""

from __future__ import annotations

import statistics

from .shapes import MID
from .trainer_runs import measured_run

CONFIGS = {
    "fsdp": ("FSDP (EP 1)", []),
    "ep2": ("EP 2 + FSDP", ["--parallelism.expert_parallel_degree", "2"]),
}
MIB = 2**20


def _mean_over_ranks(m: dict, key: str, kind: str | None = None) -> float:
    values = [c[key] if kind is None else c[key][kind] for c in m["comms_per_rank"]]
    return sum(values) / len(values)


# figure -> (label, its value in one merged run). Collective figures are per rank, averaged over the ranks
# (under EP the ranks' all-to-all volumes differ with the routing).
FIGURES = {
    "step_s": ("step s (median)", lambda m: m["step_s_median"]),
    "tokens_per_s": ("tokens/s (2 ranks)", lambda m: m["tokens_per_s_global"]),
    "peak_rss_mib": ("peak RSS MiB (max rank)", lambda m: max(m["peak_rss_mib_per_rank"])),
    "all_gather_mib": ("all-gather MiB", lambda m: _mean_over_ranks(m, "bytes_per_step", "all-gather") / MIB),
    "reduce_scatter_mib": (
        "reduce-scatter MiB",
        lambda m: _mean_over_ranks(m, "bytes_per_step", "reduce-scatter") / MIB,
    ),
    "all_to_all_mib": ("all-to-all MiB", lambda m: _mean_over_ranks(m, "bytes_per_step", "all-to-all") / MIB),
    "all_reduce_mib": ("all-reduce MiB", lambda m: _mean_over_ranks(m, "bytes_per_step", "all-reduce") / MIB),
    "sent_mib": (
        "sent to the other rank MiB",
        lambda m: _mean_over_ranks(m, "sent_bytes_per_step_total") / MIB,
    ),
    "collectives": (
        "collectives (AG+RS+A2A+AR)",
        lambda m: sum(m["comms_per_rank"][0]["per_step"].values()),
    ),
}


def pair_order(pair: int) -> tuple[str, str]:
    """Pair 0 runs FSDP first, pair 1 EP2 first, and so on (ABBA...), so linear drift cancels."""
    return ("fsdp", "ep2") if pair % 2 == 0 else ("ep2", "fsdp")


def run_config(name: str, warmup: int, timed: int) -> dict:
    label, flags = CONFIGS[name]
    return {**measured_run(["--model.flavor", MID, *flags], warmup, timed), "config": label}


def compare(runs: dict[str, list[dict]]) -> dict:
    """Each figure's values per configuration; EP2/FSDP as a ratio of medians and per back-to-back pair."""
    out = {}
    for key, (label, value) in FIGURES.items():
        fsdp = [value(m) for m in runs["fsdp"]]
        ep2 = [value(m) for m in runs["ep2"]]
        out[key] = {
            "label": label,
            "fsdp": fsdp,
            "ep2": ep2,
            "ratio_of_medians": _ratio(statistics.median(ep2), statistics.median(fsdp)),
            "ratio_pairs": [_ratio(e, f) for e, f in zip(ep2, fsdp)],
        }
    return out


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def losses(runs: dict[str, list[dict]]) -> dict:
    """Same seed and data: the step-1 loss (before any update) should agree; later steps drift in bf16."""
    fsdp, ep2 = runs["fsdp"][0]["global_losses"], runs["ep2"][0]["global_losses"]
    rel = [abs(e - f) / abs(f) for e, f in zip(ep2, fsdp)]
    return {
        "fsdp": fsdp,
        "ep2": ep2,
        "step1_abs_diff": abs(ep2[0] - fsdp[0]),
        "max_rel_diff": max(rel),
        "repeatable": {
            k: all(r["global_losses"] == v[0]["global_losses"] for r in v) for k, v in runs.items()
        },
    }


def run(quick: bool) -> dict:
    warmup, timed, pairs = (1, 2, 2) if quick else (1, 6, 2)
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    order = []
    for pair in range(pairs):
        for name in pair_order(pair):
            runs[name].append(run_config(name, warmup, timed))
            order.append(name)
    ep2 = runs["ep2"]
    expected = ep2[0]["routed_bytes_per_step"] / MIB
    measured_a2a = statistics.median(_mean_over_ranks(m, "bytes_per_step", "all-to-all") / MIB for m in ep2)
    return {
        "flavor": MID,
        "untimed_steps": ep2[0]["warmup_steps"],
        "indexer_warmup_steps": ep2[0]["indexer_warmup_steps"],
        "timed_steps": timed,
        "order": order,
        "configs": {name: {"label": CONFIGS[name][0], "flags": CONFIGS[name][1]} for name in CONFIGS},
        "runs": runs,
        "figures": compare(runs),
        "losses": losses(runs),
        "all_to_all_mib_expected_from_routing": expected,
        "all_to_all_mib_measured": measured_a2a,
        "params_active": ep2[0]["params_active"],
        "params_total": ep2[0]["params_total"],
    }
