"""What ``benchmarks/gpu.py``'s sections share: the results file, time caps, device timing, OOM handling."""

from __future__ import annotations

import gc
import json
import os
import statistics
import time
from collections.abc import Callable

import torch


def say(line: str) -> None:
    """One figure per line, printed as soon as it is known."""
    print(f"[gpu] {line}", flush=True)


class Results:
    """The JSON results file, rewritten whole (atomically) after every figure, so a run stopped at any
    point leaves everything measured until then."""

    def __init__(self, path: str | None):
        self.path = path
        self.data: dict = {"sections": {}, "errors": []}
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.write()

    def add(self, section: str, record: dict) -> None:
        self.data["sections"].setdefault(section, []).append(record)
        self.write()

    def error(self, section: str, message: str) -> None:
        self.data["errors"].append({"section": section, "error": message})
        say(f"ERROR in {section}: {message}")
        self.write()

    def write(self) -> None:
        if not self.path:
            return
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)


class Deadline:
    """A section's time cap (seconds from now), never past the whole run's."""

    def __init__(self, seconds: float, outer: Deadline | None = None):
        end = time.monotonic() + seconds
        self.end = min(end, outer.end) if outer is not None else end

    def left(self) -> float:
        return self.end - time.monotonic()

    def expired(self, margin: float = 0.0) -> bool:
        return self.left() <= margin


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call on the device: CUDA events around it on a GPU, wall time elsewhere."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1000.0


def time_reps(
    fn: Callable[[], object], device: torch.device, reps: int, min_reps: int, budget_s: float
) -> list[float]:
    """Up to ``reps`` timed calls, stopping early (after ``min_reps``) once ``budget_s`` is spent."""
    times: list[float] = []
    start = time.monotonic()
    while len(times) < reps:
        times.append(time_call(fn, device))
        if len(times) >= min_reps and time.monotonic() - start > budget_s:
            break
    return times


def summary(times: list[float]) -> dict:
    """Median and range, in milliseconds."""
    return {
        "median_ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "max_ms": max(times) * 1e3,
        "reps": len(times),
    }


def peak_during(fn: Callable[[], object], device: torch.device) -> float | None:
    """MiB the allocator's peak rises above what was allocated before the call (None off the GPU)."""
    if device.type != "cuda":
        fn()
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
