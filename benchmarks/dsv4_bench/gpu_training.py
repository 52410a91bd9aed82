"""Training steps on one device through TorchTitan's own Trainer, launched as users launch it.

Each run is ``./run_train.sh --model deepseek_v4`` with ``NGPU=1`` and ``TRAIN_FILE=dsv4_bench.gpu_trainer``
(the package's Trainer, its steps timed with device synchronisation: ``gpu_trainer.py``), the shipped
``train_configs/debug_model.toml`` (embedded corpus, bf16 params / fp32 reduce, AC none, the Lightning
Indexer training after 2 dense warm-up steps) with a longer sequence and a bigger batch, in its own
process group so that a run past its time cap is killed whole (torchrun and its rank).

Two ways of running the step on one GPU:
  * ``fsdp2_1rank`` (``--model.name deepseek_v4_fsdp1``): parallelize_deepseek_v4 plus FSDP2 over a 1-rank
    NCCL mesh by the fp32 unit rules (bf16 params, fp32 reduce, the fp32 islands): each rank's step of a
    multi-GPU job;
  * ``titan_1gpu_autocast`` (``--model.name deepseek_v4``): what TorchTitan itself does on one GPU
    (dp_shard 1, so no FSDP): fp32 parameters under ``torch.autocast(bf16)``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .gpu_common import Deadline, say

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = ROOT / "benchmarks"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def launch(flags: list[str], out: str, warmup: int, timeout: float, log_path: str | None) -> tuple[int, str]:
    """Run one training; returns (exit code or 'timeout' as -9, the log). Lines are echoed as they come."""
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "NGPU": "1",
        "LOG_RANK": "0",
        "TITAN_DSV4_PREFLIGHT": "0",
        "TRAIN_FILE": "dsv4_bench.gpu_trainer",
        "DSV4_GPU_OUT": out,
        "DSV4_GPU_WARMUP": str(warmup),
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(BENCH_DIR), str(ROOT), os.environ.get("PYTHONPATH")])
        ),
        "PYTHONUNBUFFERED": "1",
    }
    cmd = ["./run_train.sh", "--model", "deepseek_v4", *flags]
    say("launch: " + " ".join(cmd))
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    log = open(log_path, "a") if log_path else None

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line)
            if log:
                log.write(line)
            if "step:" in line or "Traceback" in line or "Error:" in line or "[gpu_trainer]" in line:
                print("    " + ANSI.sub("", line).rstrip()[-240:], flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its rank: the group this launch started
        proc.wait()
        code = -9
    reader.join(timeout=5)
    if log:
        log.close()
    return code, "".join(lines)


def derive(record: dict, matmul_tflops: float | None, datasheet_tflops: float) -> dict:
    """tokens/s, MFU against the datasheet and against the measured matmul rate, from the step times."""
    steps = record.get("step_s") or []
    if not steps:
        return {}
    med = statistics.median(steps)
    tokens = record["tokens_per_step"]
    tps = tokens / med
    achieved = tps * record["flops_per_token"] / 1e12
    out = {
        "timed_steps": len(steps),
        "step_ms_median": med * 1e3,
        "step_ms_min": min(steps) * 1e3,
        "step_ms_max": max(steps) * 1e3,
        "tokens_per_s": tps,
        "tokens_per_s_min_max": [tokens / max(steps), tokens / min(steps)],
        "model_tflops": achieved,
        "mfu_datasheet_pct": 100 * achieved / datasheet_tflops,
    }
    if matmul_tflops:
        out["mfu_vs_measured_matmul_pct"] = 100 * achieved / matmul_tflops
    timed_titan = [m for m in record.get("titan_metrics", []) if m["step"] > record.get("warmup_steps", 0)]
    if timed_titan:
        for key, name in [
            ("throughput(tps)", "titan_tps"),
            ("mfu(%)", "titan_mfu_pct"),
            ("tflops", "titan_tflops"),
        ]:
            vals = [m[key] for m in timed_titan if key in m]
            if vals:
                out[name + "_median"] = statistics.median(vals)
        for key, name in [("memory/max_reserved(GiB)", "reserved"), ("memory/max_active(GiB)", "active")]:
            mem = [m[key] for m in timed_titan if key in m]
            if mem:
                out[f"titan_memory_max_{name}_gib"] = max(mem)
    return out


def run(
    results,
    deadline: Deadline,
    runs: list[dict],
    seq_len: int,
    batch: int,
    steps: int,
    warmup: int,
    run_cap_s: float,
    matmul_tflops: float | None,
    datasheet_tflops: float,
    log_path: str | None,
) -> None:
    for spec in runs:
        label = spec["label"]
        if deadline.expired(margin=20.0):
            results.add("training", {"label": label, "skipped": "section time cap reached"})
            say(f"training {label}: skipped (section time cap)")
            continue
        flags = [
            "--model.name",
            spec["model_name"],
            "--model.flavor",
            spec["flavor"],
            "--training.seq_len",
            str(seq_len),
            "--training.local_batch_size",
            str(batch),
            "--training.steps",
            str(steps),
            "--debug.seed",
            "0",
            "--metrics.log_freq",
            "1",
            *spec.get("extra", []),
        ]
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "run.json")
            flags += ["--job.dump_folder", os.path.join(tmp, "dump")]
            start = time.monotonic()
            code, log = launch(flags, out, warmup, min(run_cap_s, deadline.left()), log_path)
            wall = time.monotonic() - start
            record = {
                "label": label,
                **{k: v for k, v in spec.items() if k != "label"},
                "exit_code": code,
                "wall_s": wall,
                "flags": flags,
            }
            if os.path.exists(out):
                measured = json.loads(Path(out).read_text())
                record.update(measured)
                record.update(derive(measured, matmul_tflops, datasheet_tflops))
        if code != 0:
            record["error"] = "timed out (killed)" if code == -9 else f"exit {code}: " + log[-2500:]
        results.add("training", record)
        if "tokens_per_s" in record:
            say(
                f"training {label}: step {record['step_ms_median']:.1f} ms [{record['step_ms_min']:.1f}-"
                f"{record['step_ms_max']:.1f}] over {record['timed_steps']} steps, "
                f"{record['tokens_per_s']:,.0f} tokens/s, {record['model_tflops']:.2f} model TFLOP/s, "
                f"MFU {record['mfu_datasheet_pct']:.2f}% of {datasheet_tflops:.0f} (datasheet)"
                + (
                    f", {record['mfu_vs_measured_matmul_pct']:.2f}% of the measured matmul"
                    if "mfu_vs_measured_matmul_pct" in record
                    else ""
                )
                + (
                    f"; peak allocated {record['max_memory_allocated_gib']:.2f} GiB"
                    if "max_memory_allocated_gib" in record
                    else ""
                )
                + (
                    f"; Titan: tps {record['titan_tps_median']:,.0f}, "
                    f"mfu {record['titan_mfu_pct_median']:.2f}%"
                    if "titan_tps_median" in record
                    else ""
                )
                + f" (run {wall:.0f} s)"
            )
        else:
            say(f"training {label}: no timed step (exit {code}, {wall:.0f} s)")
