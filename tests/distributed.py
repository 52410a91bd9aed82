"""Tests spawn their ranks with the package's helper (shared with the benchmarks)."""

from titan_dsv4.multiprocess import run_on_ranks

__all__ = ["run_on_ranks"]
