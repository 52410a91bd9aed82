"""Benchmark helpers for titan_dsv4 (entry point: ``python benchmarks/bench.py``).

Kept import-free on purpose: the orchestrator must not import torch (its memory would become the
ru_maxrss floor of every process it execs), and the sections run in their own subprocesses.
"""
