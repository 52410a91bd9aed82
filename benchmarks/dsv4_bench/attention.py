"""Section c: attention forward+backward time and peak memory vs sequence length, dense vs sparse.

Each (case, path, length) point is measured in fresh children forked from an idle forkserver that
has only imported torch and titan_dsv4: one child for its memory, one for its time (see
``attention_point``). This driver imports no torch itself.
"""

from __future__ import annotations

import multiprocessing as mp

from .measure import loglog_slope

CASES = {
    "kernel_hca": "kernel alone, HCA-like input (ratio 128, every causal entry)",
    "kernel_csa": "kernel alone, CSA-like input (ratio 4, indexer-style top-16 picks)",
    "module_csa": "Attention module, CSA layer (+ compressor + Lightning Indexer)",
    "module_hca": "Attention module, HCA layer (+ compressor)",
}
IMPLS = ("dense", "sparse")
FULL_SEQ_LENS = (512, 1024, 2048, 4096, 8192)
QUICK_SEQ_LENS = (512, 1024, 2048)
FIT_FROM = 1024  # exponents are fitted on lengths >= this (small lengths are overhead-bound)


def repetitions(seq_len: int, quick: bool) -> int:
    """Timed calls per point: more where a call is short and noisy."""
    return 3 if quick or seq_len > 2048 else 5


def run_points(seq_lens, quick: bool, point_timeout: float = 240.0) -> list[dict]:
    """Every case x path x length, each in fresh forked children; a failed point is recorded, not fatal."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["dsv4_bench.attention_point"])
    results = []
    for case in CASES:
        for impl in IMPLS:
            for seq_len in seq_lens:
                results.append(_run_one(ctx, case, impl, seq_len, repetitions(seq_len, quick), point_timeout))
    return results


def _point_in_child(*args) -> None:
    """Process target, importable without torch; the module it defers to is preloaded in the server."""
    from .attention_point import point_entry

    point_entry(*args)


def _run_one(ctx, case: str, impl: str, seq_len: int, reps: int, timeout: float) -> dict:
    """Memory, then time, of one point, each in its own fresh child."""
    point, errors = {"case": case, "impl": impl, "seq_len": seq_len}, []
    for what in ("memory", "time"):
        result = _in_child(ctx, what, case, impl, seq_len, reps, timeout)
        if "error" in result:
            errors.append(result.pop("error"))
        point.update(result)
    return {**point, "error": "; ".join(errors)} if errors else point


def _in_child(ctx, what: str, case: str, impl: str, seq_len: int, reps: int, timeout: float) -> dict:
    """One measurement in a new child forked from the server; killed (and reported) past ``timeout``."""
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_point_in_child, args=(what, case, impl, seq_len, reps, send))
    proc.start()
    send.close()
    try:
        if recv.poll(timeout):
            return recv.recv()
        return {"error": f"{what}: timed out after {timeout:.0f}s"}
    except EOFError:
        return {"error": f"{what}: child died (exit code {proc.exitcode})"}
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()


def exponents(points: list[dict]) -> dict:
    """Log-log slopes of time and memory for lengths >= FIT_FROM, per case and path."""
    fits = {}
    for case in CASES:
        for impl in IMPLS:
            pts = sorted(
                (
                    p
                    for p in points
                    if p["case"] == case
                    and p["impl"] == impl
                    and "error" not in p
                    and p["seq_len"] >= FIT_FROM
                ),
                key=lambda p: p["seq_len"],
            )
            xs = [p["seq_len"] for p in pts]
            fits[f"{case}/{impl}"] = {
                "time": loglog_slope(xs, [p["time_s"] for p in pts]),
                "memory": loglog_slope(xs, [p["peak_mib"] for p in pts]),
                "fit_range": [xs[0], xs[-1]] if xs else None,
            }
    return fits


def run(quick: bool) -> dict:
    points = run_points(QUICK_SEQ_LENS if quick else FULL_SEQ_LENS, quick)
    return {"cases": CASES, "points": points, "exponents": exponents(points), "fit_from": FIT_FROM}
