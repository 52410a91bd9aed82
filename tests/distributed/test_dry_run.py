"""Dry runs at scale with Titan's fake backend: Flash and Pro on the meta device, 64 and 256 ranks."""

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


def _plans(rank, world_size):
    import torch.distributed as dist
    from torchtitan.config import ConfigManager
    from torchtitan.distributed.utils import init_fake_mode

    from titan_dsv4.dry_run import build_plan

    plans = []
    for config, world, replicate in CASES:
        job = ConfigManager().parse_args(
            [
                "--job.config_file",
                str(ROOT / "train_configs" / config),
                "--parallelism.data_parallel_replicate_degree",
                str(replicate),
                "--parallelism.expert_parallel_degree",  # FSDP alone (the configs default to EP)
                "1",
            ]
        )
        init_fake_mode(world, "fake_backend")
        plans.append(build_plan(job, world))
        dist.destroy_process_group()
    return plans


@pytest.mark.slow
def test_flash_and_pro_plans_at_64_and_256_ranks():
    from titan_dsv4.flavors import deepseek_v4_args
    from titan_dsv4.model.accounting import mtp_depth_params

    plans = run_on_ranks(_plans, 1, backend=None, timeout=300)[0]
    for (config, world, replicate), plan in zip(CASES, plans):
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
    env = {**os.environ, "PYTHON": sys.executable, "COMM_MODE": "fake_backend", "NGPU": "128"}
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
    assert "DeepSeek-V4 'flash' FSDP unit plan on 128 ranks" in proc.stdout  # the config's own layout: EP 128
    assert "HCA alignment: enabled, group size 128" in proc.stdout
    for table in ("per-rank memory, GiB", "per-rank communication per step, GiB", "built plan / analytic"):
        assert table in proc.stdout
    assert "the dry run's default; set --deepseek_v4.gpu_memory_gib" in proc.stdout  # 80 GiB unless set
    plan = json.loads((tmp_path / "unit_plan_flash_128.json").read_text())
    assert {"estimate", "analytic", "fits", "device_gib"} <= set(plan["memory"])
