"""Dry runs at scale with Titan's fake backend: Flash and Pro on the meta device, 64 and 256 ranks, the built
plan against the trainer's analytic estimate (with EP, HSDP, padding), and the pipelined Flash (the shipped
config, and a looped schedule whose rank holds two stages)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from titan_dsv4.multiprocess import run_on_ranks

ROOT = Path(__file__).resolve().parents[2]
CASES = [  # (config, world, dp_replicate)
    ("deepseek_v4_flash.toml", 64, 1),
    ("deepseek_v4_flash.toml", 256, 4),
    ("deepseek_v4_pro.toml", 64, 1),
    ("deepseek_v4_pro.toml", 256, 4),
]
# Built plan vs the trainer's analytic estimate (config, world, ep, dp_replicate): with and without EP, HSDP,
# padding, experts sharded on dim 1
LAYOUTS = [
    ("deepseek_v4_flash.toml", 128, 8, 1),
    ("deepseek_v4_flash.toml", 128, 1, 1),
    ("deepseek_v4_flash.toml", 128, 8, 2),
    ("deepseek_v4_flash.toml", 112, 16, 1),  # 16 experts per EP rank over efsdp 7: padded to 21
    ("deepseek_v4_pro.toml", 512, 64, 1),  # efsdp 8 x ep 64 > 384 experts: Shard(1)
]
# The shipped configs pipeline; the cases above plan them without PP.
NO_PIPELINE = ["--parallelism.pipeline_parallel_degree", "1", "--training.local_batch_size", "1"]
# Flash at pp 4 x EP 64 on 256 ranks, 4 microbatches: with 1F1B, and Interleaved1F1B (8 stages)
PP4 = [
    "--parallelism.pipeline_parallel_degree", "4", "--parallelism.expert_parallel_degree", "64",
    "--training.local_batch_size", "4",
]  # fmt: skip
PIPELINED = [  # (world, flags)
    (256, PP4),
    (256, [*PP4, "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B"]),
]


def _plans(rank, world_size):
    """The plans of CASES, LAYOUTS and PIPELINED, built in one process (one spawn: 4 s of imports)."""
    import torch.distributed as dist
    from torchtitan.config import ConfigManager
    from torchtitan.distributed.utils import init_fake_mode

    from titan_dsv4.dry_run import build_plan

    def config(name: str) -> list[str]:
        return ["--job.config_file", str(ROOT / "train_configs" / name)]

    def unpipelined(name: str, ep: int, replicate: int) -> list[str]:
        return [*config(name), *NO_PIPELINE, "--parallelism.expert_parallel_degree", str(ep),
                "--parallelism.data_parallel_replicate_degree", str(replicate)]  # fmt: skip

    # CASES: FSDP alone (the configs default to EP)
    fsdp_alone = [(world, unpipelined(name, 1, replicate)) for name, world, replicate in CASES]
    layouts = [(world, unpipelined(name, ep, replicate)) for name, world, ep, replicate in LAYOUTS]
    pipelined = [(world, [*config("deepseek_v4_flash.toml"), *flags]) for world, flags in PIPELINED]
    jobs = fsdp_alone + layouts + pipelined
    plans = []
    for world, flags in jobs:
        job = ConfigManager().parse_args(flags)
        init_fake_mode(world, "fake_backend")
        plans.append(build_plan(job, world))
        dist.destroy_process_group()
    n, m = len(CASES), len(CASES) + len(LAYOUTS)
    return {"unpipelined": plans[:n], "layouts": plans[n:m], "pipelined": plans[m:]}


@pytest.fixture(scope="module")
def plans():
    return run_on_ranks(_plans, 1, backend=None, timeout=300)[0]


@pytest.mark.slow
def test_analytic_estimate_matches_the_built_unit_plan(plans):
    """The trainer's check (shapes only) and the dry run's parallelized meta model give the same figures,
    FSDP2's padding included (they agree exactly; 0.1% is the rounding of the GiB figures)."""
    memories = [plan["memory"] for plan in plans["layouts"]]
    for (config, world, ep, replicate), memory in zip(LAYOUTS, memories):
        built, analytic = memory["estimate"], memory["analytic"]
        assert built["layout"] == analytic["layout"] == {**built["layout"], "world": world, "ep": ep}
        for part in ("parameters", "largest_unit", "fsdp_forward", "fsdp_backward", "peak"):
            assert built["memory_gib"][part] == pytest.approx(analytic["memory_gib"][part], rel=1e-3), (
                config,
                world,
                ep,
                replicate,
                part,
            )
        for collective, gib in built["communication_gib_per_step"].items():
            assert gib == pytest.approx(
                analytic["communication_gib_per_step"][collective], rel=1e-3, abs=1e-3
            )
        traffic = built["communication_gib_per_step"]
        assert (traffic["all_to_all"] > 0) == (ep > 1)
        assert (traffic["all_reduce"] > 0) == (replicate > 1)
        assert built["mtp_layers"] == 1  # from the built model, or from shapes until it has an MTP module
    flash_ep1, flash_ep8 = memories[1]["estimate"], memories[0]["estimate"]
    # EP gathers an eighth of the experts per rank: the all-gather volume drops by about 8x.
    ratio = (
        flash_ep1["communication_gib_per_step"]["all_gather"]
        / flash_ep8["communication_gib_per_step"]["all_gather"]
    )
    assert 6 < ratio < 8


@pytest.mark.slow
def test_pipelined_flash_plans_rank_0s_stages_and_reports_the_worst_rank(plans):
    """Pipeline rank 0 builds its stages (one, or two under Interleaved1F1B) through the train spec's
    pipelining_fn; their units give the analytic estimate's figures; the printed plan is the rank with the
    highest peak, with the pipeline's bubble and p2p bytes."""
    from titan_dsv4.dry_run import format_plan

    for (world, flags), plan in zip(PIPELINED, plans["pipelined"]):
        assert plan["world_size"] == world
        memory = plan["memory"]
        built, analytic, reported = memory["built"], memory["analytic"], memory["estimate"]
        for part in ("parameters", "largest_unit", "fsdp_forward", "fsdp_backward", "peak"):
            assert built["memory_gib"][part] == pytest.approx(analytic["memory_gib"][part], rel=1e-3), part
        for name, gib in built["communication_gib_per_step"].items():
            assert gib == pytest.approx(analytic["communication_gib_per_step"][name], rel=1e-3, abs=1e-3)
        assert (
            built["pipeline"]["rank"] == 0 and reported["memory_gib"]["peak"] >= built["memory_gib"]["peak"]
        )
        pipeline = reported["pipeline"]
        interleaved = "Interleaved1F1B" in flags
        stages = 8 if interleaved else 4
        assert (pipeline["stages"], pipeline["microbatches"]) == (stages, 4)
        assert pipeline["bubble"] == pytest.approx(3 / (stages // 4 * 4 + 3))  # (pp-1) / (v n + pp - 1)
        assert reported["communication_gib_per_step"]["p2p"] > 0 and memory["fits"]
        blocks = plan["units_by_kind"]["block"]["units"]
        assert blocks == (
            11 if not interleaved else 5 + 6
        )  # rank 0: layers 0-10; stages 0 and 4: 5 + 6 layers
        assert plan["units_by_kind"]["block"]["reshard_after_forward"] == 0  # kept gathered under PP
        text = format_plan(plan)
        assert "pipeline: " in text and "bubble" in text and "pipeline p2p (stage boundaries)" in text
        assert "built plan / analytic estimate (pipeline rank 0)" in text


@pytest.mark.slow
def test_flash_and_pro_plans_at_64_and_256_ranks(plans):
    from titan_dsv4.flavors import deepseek_v4_args
    from titan_dsv4.model.accounting import mtp_depth_params

    for (config, world, replicate), plan in zip(CASES, plans["unpipelined"]):
        layers = 43 if "flash" in config else 61
        kinds = plan["units_by_kind"]
        assert kinds["block"]["units"] == layers
        assert kinds["block"] == {**kinds["block"], "units_computing_bfloat16": layers}
        assert kinds["island"]["units_computing_float32"] == kinds["island"]["units"]
        assert kinds["holder"]["reshard_after_forward"] == 0
        assert list(plan["per_rank_by_storage_dtype"]) == ["float32"]
        per_rank = plan["per_rank_by_storage_dtype"]["float32"]["params"]
        memory = plan["memory"]  # one rank of the built plan, its verdict, and the trainer's analytic check
        mtp_built = not memory["estimate"]["mtp_from_shapes"]  # else the MTP depth is counted from shapes
        flavor = deepseek_v4_args["flash" if "flash" in config else "pro"]
        total = 284_332_230_231 if "flash" in config else 1_572_997_179_491  # published: without MTP
        total += mtp_depth_params(flavor) if mtp_built else 0
        shard = world // replicate
        assert total / shard <= per_rank <= total / shard * 1.01  # even sharding, little padding
        hca = plan["hca_alignment"]
        assert hca["hca_layers"] == (20 if "flash" in config else 31)
        assert hca["enabled"] == (replicate == 1)
        assert hca["group_size"] == (world if replicate == 1 else None)
        built = memory["estimate"]["memory_gib"]
        if mtp_built:  # the unit plan's float32 shards, padding included
            assert built["parameters"] == pytest.approx(per_rank * 4 / 2**30, rel=1e-3)
        assert built["parameters"] == pytest.approx(memory["analytic"]["memory_gib"]["parameters"], rel=2e-3)
        assert built["peak"] > built["parameters"] + built["gradients"] + built["adamw_state"]
        assert memory["device_gib"] == 80.0 and memory["fits"] == (built["peak"] <= 72.0)
        assert memory["fits"] or "GPUs" in memory["fitting_layout"]  # without EP the experts' units are huge
        assert memory["estimate"]["communication_gib_per_step"]["all_to_all"] == 0  # no EP in these cases


@pytest.mark.slow
def test_launcher_dry_run_prints_the_plan(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "COMM_MODE": "fake_backend", "NGPU": "144"}
    proc = subprocess.run(
        [
            "./run_train.sh",
            "--model",
            "deepseek_v4",
            "--config",
            "train_configs/deepseek_v4_flash.toml",
            "--job.dump_folder",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the config's own layout: pp 9 x dp_shard 16, EP 16; this process is pipeline rank 0
    assert "DeepSeek-V4 'flash' FSDP unit plan on 144 ranks" in proc.stdout
    assert "HCA alignment: enabled, group size 16" in proc.stdout
    for table in ("per-rank memory, GiB", "per-rank communication per step, GiB", "built plan / analytic"):
        assert table in proc.stdout
    assert "pipeline: 1F1B, 9 stages, 36 microbatches of 1; rank 8 holds stage 8" in proc.stdout
    assert "bubble 18.2%" in proc.stdout and "pipeline p2p (stage boundaries)" in proc.stdout
    assert "the dry run's default; set --deepseek_v4.gpu_memory_gib" in proc.stdout  # 80 GiB unless set
    plan = json.loads((tmp_path / "unit_plan_flash_144.json").read_text())
    assert {"estimate", "built", "analytic", "fits", "device_gib"} <= set(plan["memory"])
