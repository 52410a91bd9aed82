"""Timing and memory primitives shared by every section (no torch import here).

Peak memory is the process's ru_maxrss. Linux lets a process reset that high-water mark to its
current RSS (``/proc/self/clear_refs`` <- "5"), so a section can build its inputs, reset, and then
read the peak of exactly one call as ``ru_maxrss - baseline``: transient allocations made while
building inputs cannot hide part of the call's peak.
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from collections.abc import Callable, Sequence

MIB = 1024 * 1024


def peak_rss_mib() -> float:
    """This process's high-water RSS (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """Resident memory right now (statm), for baselines of processes that cannot reset their peak."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / MIB


def reset_peak_rss() -> bool:
    """Make ru_maxrss equal the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of log(y) on log(x): the scaling exponent (None with < 2 usable points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y is not None and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    var = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / var if var else None
