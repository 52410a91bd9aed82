"""Tests spawn their ranks with titan_dsv4.multiprocess (each launch has a timeout, so a hang fails fast)."""

from titan_dsv4.multiprocess import run_on_ranks

__all__ = ["run_on_ranks"]
