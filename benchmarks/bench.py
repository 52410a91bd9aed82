#!/usr/bin/env python
"""Every titan_dsv4 benchmark in one command: ``python benchmarks/bench.py [--quick]``.

  a. training step time, tokens/s and peak RSS per rank (debugmodel and a mid-size shape, 2 gloo ranks)
  b. collectives per step by kind and bytes for three FSDP layouts; grouped vs per-island side by side
  c. attention fwd+bwd time and memory vs sequence length, dense reference vs sparse fast path
  d. ours vs transformers' DeepseekV4ForCausalLM (eager), same weights
  e. ours vs TorchTitan's deepseek_v3 debugmodel through the same Trainer, matched active parameters
  f. expert parallelism (EP 2) vs FSDP alone at the mid-size shape, interleaved runs, side by side
  + a torch.profiler view of one training step, and PASS / MISS for every target.
Sections a, b, e, f and the profile train through TorchTitan's own Trainer (``./run_train.sh``).

Each section runs in its own subprocess (``dsv4_bench.run_section``), one after the other, so that
no two measurements share the two cores and each section's memory figures start from a clean
process; this orchestrator never imports torch. Outputs: the printed report,
benchmarks/results/bench.json, benchmarks/results/attention_scaling.png, and each section's raw
log under benchmarks/results/logs/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

from dsv4_bench.plot import plot_attention_scaling  # noqa: E402
from dsv4_bench.report import evaluate_targets, render  # noqa: E402

from titan_dsv4.launch import IdleWait, OtherCores  # noqa: E402

SECTIONS = ("training", "attention", "hf", "titan", "ep")  # a+b (+profile), c, d, e, f
TIMEOUT_S = {"training": 900, "attention": 1200, "hf": 600, "titan": 900, "ep": 1200}
IDLE_WAIT_BUDGET_S = {"full": 90.0, "quick": 10.0}  # total wait for other processes to go quiet


def run_section(name: str, quick: bool, idle: IdleWait) -> dict:
    """Run one section in a fresh process group; its JSON record, or an error record.

    Records how many cores other processes used while it ran: the machine's CPU time minus the CPU
    time of this section's own (reaped) process tree, over its wall time.
    """
    out = RESULTS / f".{name}.json"
    log = RESULTS / "logs" / f"{name}.log"
    out.unlink(missing_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, "-m", "dsv4_bench.run_section", name, "--out", str(out)] + (
        ["--quick"] if quick else []
    )
    busy = idle.wait()  # other people's work on the same two cores would land in this section's timings
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    with OtherCores() as others, open(log, "w") as log_file:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            proc.wait(timeout=TIMEOUT_S[name])
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the section's ranks and points die with it
            proc.wait()
    record = (
        json.loads(out.read_text())
        if out.exists()
        else {
            "error": f"section process exited with {proc.returncode} and no result; see "
            f"{log.relative_to(ROOT)}"
        }
    )
    out.unlink(missing_ok=True)
    record["busy_cores_before"] = busy
    record["other_cores_during"] = others.cores
    record["process_wall_s"] = others.wall_s
    status = "FAILED" if "error" in record else "done"
    print(f"[bench] {name} {status} in {record['process_wall_s']:.0f} s", file=sys.stderr, flush=True)
    return record


def plot_if_possible(attention: dict | None, path: Path) -> str | None:
    """Draw the attention figure; why not (no result, no matplotlib) instead of failing the whole report."""
    if not attention:
        return "no plot: attention section failed"
    try:
        plot_attention_scaling(attention, str(path))
    except ImportError as e:
        return f"no plot: {e} (pip install -e '.[bench]')"
    return None


def header(args, sections: dict, total_s: float) -> list[str]:
    versions = {}
    for rec in sections.values():
        versions.update(rec.get("versions", {}))
    lib = ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
    walls = ", ".join(f"{name} {rec['process_wall_s']:.0f} s" for name, rec in sections.items())
    return [
        f"titan_dsv4 benchmark ({'quick' if args.quick else 'full'} run) - "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}",
        f"  {os.cpu_count()} CPU cores; {lib}; total runtime {total_s:.0f} s ({walls})",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few steps (a few minutes)")
    args = parser.parse_args()
    (RESULTS / "logs").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    idle = IdleWait(IDLE_WAIT_BUDGET_S["quick" if args.quick else "full"])  # shared by all sections
    sections = {name: run_section(name, args.quick, idle) for name in SECTIONS}
    attention = sections["attention"].get("result")
    plot_path = RESULTS / "attention_scaling.png"
    plot_note = plot_if_possible(attention, plot_path)
    total_s = time.perf_counter() - start
    targets = evaluate_targets(sections)
    text = render(sections, targets, header(args, sections, total_s))
    report = {
        "command": " ".join(["python", "benchmarks/bench.py"] + (["--quick"] if args.quick else [])),
        "mode": "quick" if args.quick else "full",
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "total_wall_s": total_s,
        "cpu_count": os.cpu_count(),
        "targets": [t.as_dict() for t in targets],
        "sections": sections,
        "plot": None if plot_note else str(plot_path.relative_to(ROOT)),
        "report": text,
    }
    (RESULTS / "bench.json").write_text(json.dumps(report, indent=1))
    print(text)
    print(
        f"\nwrote {(RESULTS / 'bench.json').relative_to(ROOT)}"
        + (f" ({plot_note})" if plot_note else f" and {plot_path.relative_to(ROOT)}")
    )


if __name__ == "__main__":
    main()
