"""Sections a (training step) and b (collectives, FSDP unit layouts), and the step profile.

Every run is TorchTitan's own Trainer (titan_dsv4's ``DeepSeekV4Trainer``, measured by ``MeasuredTrainer``)
launched by ``./run_train.sh`` on 2 CPU ranks over gloo with the shipped debug config (``trainer_runs.py``):
the real step, real data (the embedded corpus), the same seed in every run. Warmup steps are not timed.
"""

from __future__ import annotations

from .shapes import MID
from .trainer_runs import measured_run

# FSDP layouts of section b: key -> (label, description, the command-line flags that select it).
FSDP_LAYOUTS = {
    "grouped": (
        "(1) ours, grouped",
        "the shipped spec (parallelize_deepseek_v4 -> apply_fsdp(group_islands=True)): per block 1 bf16 "
        "unit + 1 fp32 island unit + 1 fp32 holder unit",
        [],
    ),
    "per_island": (
        "(2) per-island",
        "--model.name deepseek_v4_per_island (the launcher's spec variant: apply_fsdp(group_islands=False)): "
        "1 bf16 unit + one fp32 unit per island",
        ["--model.name", "deepseek_v4_per_island"],
    ),
    "fp32": (
        "(3) all-fp32",
        "the shipped spec, --training.mixed_precision_param float32: nothing to isolate, 1 unit per block",
        ["--training.mixed_precision_param", "float32"],
    ),
}


def run_layout(flavor: str, layout: str, warmup: int, timed: int, profile: bool = False) -> dict:
    """One measured 2-rank training of ``flavor`` in one FSDP layout."""
    label, description, flags = FSDP_LAYOUTS[layout]
    run = measured_run(["--model.flavor", flavor, *flags], warmup, timed, profile)
    return {**run, "layout": label, "layout_description": description}


def run(quick: bool) -> dict:
    """Sections a and b (and the step profile): one training per (shape, layout), in a fixed order.

    The two layouts compared side by side, (1) and (2), run back to back with the same seed and data.
    """
    steps = dict(warmup=1, timed=2) if quick else dict(warmup=1, timed=8)
    jobs = {
        "debugmodel/grouped": ("debugmodel", "grouped", False),
        "debugmodel/per_island": ("debugmodel", "per_island", False),
        "debugmodel/fp32": ("debugmodel", "fp32", False),
        f"{MID}/grouped": (MID, "grouped", True),
    }
    return {
        name: run_layout(flavor, layout, profile=profile, **steps)
        for name, (flavor, layout, profile) in jobs.items()
    }
