"""Launch ``./run_train.sh`` from Python and read what Titan logged: one helper for the tests and the
benchmarks.

* ``run_train`` / ``run_command``: a launch from the repository root with a timeout, every named rank's
  log returned without colours (``check=True`` raises with the log's tail instead of returning a failure);
* ``step_metrics`` / ``losses`` / ``validation_losses``: Titan's per-step console lines, with the figures
  ``DeepSeekV4MetricsProcessor`` appends (``mtp_loss``, ``indexer_kl``, ``indexer_recall``);
* ``IdleWait`` / ``OtherCores``: wait for other people's work to go quiet, and measure how many cores it
  used while a launch ran (on shared cores it lands in every step timed).

Nothing here imports torch or changes anything; it needs the source checkout (``run_train.sh``).
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Titan's training line (not the validator's): "[rank0]:... step:  3  loss:  7.12  ...  tps: 1,234 ..."
STEP = re.compile(r"\[rank(\d+)\].*?(?<!validate )step:\s+(\d+)\s+loss:\s+([0-9.]+)(.*)")
# Our line right under it (infra/metrics.py): "[rank0]:... step:  3  mtp_loss: 7.1  indexer_kl: 0.2 ..."
OURS = "(?:mtp_loss|indexer_kl|indexer_recall)"
EXTRA = re.compile(r"\[rank(\d+)\].*?(?<!validate )step:\s+(\d+)\s+(" + OURS + r":.*)")
VALIDATION = re.compile(r"\[rank(\d+)\].*validate step:\s+(\d+)\s+loss:\s+([0-9.]+)")
FIGURE = re.compile(r"(\w+):\s+([0-9][0-9,]*(?:\.[0-9]+)?)")
CHANCE = re.compile(r"indexer_recall: [0-9.]+ \(chance ([0-9.]+)\)")
READ = re.compile(r"\[rank(\d+)\].*Read ([0-9.]+) MiB of the checkpoint's ([0-9.]+) MiB on this rank")


def run_command(
    cmd: list[str], timeout: float = 300.0, *, log_ranks: str = "0,1", env: dict | None = None
) -> tuple[int, str]:
    """(exit code, the log of the ranks in ``log_ranks`` without colours) of ``cmd`` run from the
    repository root with this interpreter as ``$PYTHON``."""
    if not (ROOT / "run_train.sh").exists():
        raise FileNotFoundError(f"{ROOT} has no run_train.sh: launches need the titan_dsv4 source checkout")
    # Launches from Python skip run_train.sh's one-process check (4 s of imports each); the ranks still
    # refuse a bad job. A launch that tests that check passes TITAN_DSV4_PREFLIGHT=1.
    full_env = {
        **os.environ,
        "PYTHON": sys.executable,
        "LOG_RANK": log_ranks,
        "TITAN_DSV4_PREFLIGHT": "0",
        **(env or {}),
    }
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, ANSI.sub("", proc.stdout + proc.stderr)


def run_train(
    args: list[str],
    timeout: float = 300.0,
    *,
    log_ranks: str = "0,1",
    env: dict | None = None,
    check: bool = False,
) -> tuple[int, str]:
    """``./run_train.sh --model deepseek_v4 ARGS``; with ``check`` a failed run raises (its log's tail)."""
    cmd = ["./run_train.sh", "--model", "deepseek_v4", *args]
    code, log = run_command(cmd, timeout, log_ranks=log_ranks, env=env)
    if check and code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {code}):\n{log[-3000:]}")
    return code, log


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def step_metrics(log: str) -> dict[int, dict[int, dict[str, float]]]:
    """rank -> step -> every figure of Titan's step line: loss, grad_norm, memory_gib (peak RSS on CPU),
    tps (tokens/s per rank), tflops, mfu, and ours when logged: mtp_loss, indexer_kl, indexer_recall and
    indexer_recall_chance."""
    out: dict[int, dict[int, dict[str, float]]] = {}
    for m in STEP.finditer(log):
        rank, step, loss, rest = int(m.group(1)), int(m.group(2)), float(m.group(3)), m.group(4)
        figures = {"memory_gib" if k == "memory" else k: _number(v) for k, v in FIGURE.findall(rest)}
        if "tps" in figures:
            figures["tps"] = int(figures["tps"])  # Titan logs it rounded
        out.setdefault(rank, {}).setdefault(step, {}).update({"loss": loss, **figures})
    for m in EXTRA.finditer(log):
        rank, step, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        figures = {k: _number(v) for k, v in FIGURE.findall(rest)}
        chance = CHANCE.search(rest)
        if chance:
            figures["indexer_recall_chance"] = float(chance.group(1))
        out.setdefault(rank, {}).setdefault(step, {}).update(figures)
    return out


def losses(log: str, rank: int = 0) -> dict[int, float]:
    """step -> training loss that ``rank`` logged."""
    return {step: figures["loss"] for step, figures in step_metrics(log).get(rank, {}).items()}


def validation_losses(log: str, rank: int = 0) -> dict[int, float]:
    """step -> loss of Titan's validator, as ``rank`` logged it."""
    return {int(s): float(v) for r, s, v in VALIDATION.findall(log) if int(r) == rank}


def step_lines(log: str) -> str:
    """Only the training step lines of a log (what a timing run keeps)."""
    return "\n".join(m.group(0) for m in STEP.finditer(log))


def bytes_read(log: str) -> dict[int, tuple[float, float]]:
    """rank -> (MiB this rank read, MiB of the checkpoint), from our storage reader's log line."""
    return {int(r): (float(a), float(b)) for r, a, b in READ.findall(log)}


# ---- other people's work on the same cores ------------------------------------------------------------


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds machine-wide, CPU seconds of this process's reaped children)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy, children.ru_utime + children.ru_stime


def other_cores_now(interval: float = 1.0) -> float:
    """Cores busy over ``interval`` seconds while this process runs nothing: other people's work."""
    busy0, _ = cpu_seconds()
    time.sleep(interval)
    return (cpu_seconds()[0] - busy0) / interval


class IdleWait:
    """Waits until other processes use fewer than ``threshold`` cores, from a budget of seconds shared by
    every wait (a busy machine delays a benchmark by at most the budget, then it measures anyway)."""

    def __init__(self, budget_s: float, threshold: float = 0.3):
        self.budget_s = budget_s
        self.threshold = threshold

    def wait(self, interval: float = 1.0) -> float:
        """The cores other processes used in the last interval (below the threshold unless out of budget)."""
        while True:
            others = other_cores_now(interval)
            self.budget_s -= interval
            if others < self.threshold or self.budget_s <= 0:
                return others


class OtherCores:
    """``with OtherCores() as o: <launch>``: ``o.cores`` is what other processes used meanwhile (the
    machine's busy CPU time minus that of this process's reaped children, over the wall time)."""

    def __enter__(self) -> OtherCores:
        self._busy, self._ours = cpu_seconds()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        busy, ours = cpu_seconds()
        self.wall_s = time.perf_counter() - self._start
        self.cores = max(0.0, ((busy - self._busy) - (ours - self._ours)) / self.wall_s)
