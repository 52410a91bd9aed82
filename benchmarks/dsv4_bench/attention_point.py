"""One point of the attention scaling curves, measured in processes that run nothing else.

Imported by the forkserver (torch and titan_dsv4 load once there); each point's memory and its time
are then measured in two fresh children forked from that idle server, so no point's allocations or
caches leak into another's, and the memory child's allocator setting cannot slow the timed calls.
Memory: ru_maxrss growth of one forward+backward over a baseline taken right before it (high-water
mark reset, inputs already built). Time: median of a few forward+backward calls.
"""

from __future__ import annotations

import gc

import torch

from titan_dsv4.model.attention import Attention
from titan_dsv4.model.context import ForwardContext
from titan_dsv4.model.kernels import ATTENTION_KERNELS, CompressedKV
from titan_dsv4.model.layers import RotaryTables

from .measure import median, peak_rss_mib, reset_peak_rss, timed
from .shapes import shape_args

# The kernel-alone inputs use debugmodel's attention dims, read from the flavor itself.
_DEBUG = shape_args("debugmodel")
DIMS = dict(
    heads=_DEBUG.n_heads,
    head_dim=_DEBUG.head_dim,
    window=_DEBUG.sliding_window,
    topk=_DEBUG.index_topk,
    csa_ratio=_DEBUG.csa_ratio,
    hca_ratio=_DEBUG.hca_ratio,
)
HEADS, HEAD_DIM, WINDOW, TOPK = DIMS["heads"], DIMS["head_dim"], DIMS["window"], DIMS["topk"]
CSA_RATIO, HCA_RATIO = DIMS["csa_ratio"], DIMS["hca_ratio"]
# One intra-op thread: the fitted exponents then measure the algorithm, not how parallel efficiency
# changes with size, and no OpenMP barrier can stall on a thread descheduled by other work on the two
# cores (with 2 threads a 5 ms call was seen taking 0.5 s). The dense reference is memory-bound at
# large S, so it runs no slower on one thread there.
THREADS = 1
PRIMER_LEN = 256  # a small call first pages in the code paths, so the measured call's RSS growth is data


def causal_top_k(
    seq_len: int, n_entries: int, ratio: int, k: int, g: torch.Generator, chunk: int = 512
) -> torch.Tensor:
    """[1, S, k] random picks among each query's causally visible entries (-1 = none), as the indexer
    returns them; built in query chunks so no [S, T] temporary inflates the memory baseline."""
    picks = []
    for start in range(0, seq_len, chunk):
        rows = torch.arange(start, min(start + chunk, seq_len))
        limit = ((rows + 1) // ratio)[:, None]
        scores = torch.rand(len(rows), n_entries, generator=g).masked_fill(
            torch.arange(n_entries) >= limit, -1.0
        )
        top = scores.topk(min(k, n_entries), dim=-1).indices
        picks.append(torch.where(top < limit, top, torch.full_like(top, -1)))
    return torch.cat(picks).unsqueeze(0)


def kernel_step(kind: str, impl: str, seq_len: int):
    """A closure running one forward+backward of the bare kernel on an HCA- or CSA-like input."""
    g = torch.Generator().manual_seed(seq_len)
    q = torch.randn(1, HEADS, seq_len, HEAD_DIM, generator=g, requires_grad=True)
    kv = torch.randn(1, seq_len, HEAD_DIM, generator=g, requires_grad=True)
    sinks = torch.randn(HEADS, generator=g, requires_grad=True)
    ratio = HCA_RATIO if kind == "hca" else CSA_RATIO
    n_entries = max(seq_len // ratio, 1)
    entries = torch.randn(1, n_entries, HEAD_DIM, generator=g, requires_grad=True)
    picked = causal_top_k(seq_len, n_entries, ratio, TOPK, g) if kind == "csa" else None
    compressed = CompressedKV(entries, ratio, picked)
    grad_out = torch.randn(1, HEADS, seq_len, HEAD_DIM, generator=g)
    kernel = ATTENTION_KERNELS[impl]
    leaves = (q, kv, sinks, entries)

    def step() -> None:
        kernel(q, kv, sinks, WINDOW, compressed).backward(grad_out)
        for t in leaves:  # gradients are part of the call's memory, not of the next call's baseline
            t.grad = None

    return step


def module_step(kind: str, impl: str, seq_len: int):
    """A closure running one forward+backward of a debugmodel CSA or HCA ``Attention`` layer
    (projections, compressor and, for CSA, the Lightning Indexer included)."""
    args = shape_args("debugmodel", seq_len).replace(attn_impl=impl)
    layer_id = args.compress_ratios.index(args.csa_ratio if kind == "csa" else args.hca_ratio)
    torch.manual_seed(0)
    attn = Attention(args, args.layer_type(layer_id))
    attn.init_weights(args.init_std, args.init_std / (2 * (layer_id + 1)) ** 0.5)  # as its block does
    g = torch.Generator().manual_seed(seq_len)
    x = torch.randn(1, seq_len, args.dim, generator=g, requires_grad=True)
    grad_out = torch.randn(1, seq_len, args.dim, generator=g)
    # What the model hands every block: rotary tables and token ids (one sequence per row, no indexer loss).
    ctx = ForwardContext(RotaryTables(args), torch.zeros(1, seq_len, dtype=torch.long))

    def step() -> None:
        attn(x, ctx)[0].backward(grad_out)
        x.grad = None  # gradients are part of the call's memory, not of the next call's baseline
        attn.zero_grad(set_to_none=True)

    return step


def exact_rss_accounting() -> bool:
    """Make RSS follow live tensors: glibc returns every block >= 64 KiB to the OS on free.

    By default glibc raises its mmap threshold (up to 32 MiB) after the first large free and keeps
    freed heap memory mapped, so RSS growth would also count what earlier allocations left behind
    (it does for tensors of a few MiB: every length below ~8k here). Set first thing in the memory
    child only; the timing child keeps the allocator's defaults. False where libc is not glibc.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 64 * 1024) and libc.mallopt(m_trim_threshold, 64 * 1024))
    except (OSError, AttributeError):
        return False


def _prepared_step(case: str, impl: str, seq_len: int):
    """The case's step at ``seq_len``, after a small primer call has loaded library code and thread
    pools (whose pages would otherwise count as data, and whose start-up would count as time)."""
    torch.set_num_threads(THREADS)
    scope, kind = case.split("_")
    build = kernel_step if scope == "kernel" else module_step
    build(kind, impl, PRIMER_LEN)()
    return build(kind, impl, seq_len)


def measure_memory(case: str, impl: str, seq_len: int) -> dict:
    """Peak memory of one forward+backward: ru_maxrss growth over a baseline reset right before it."""
    exact = exact_rss_accounting()
    step = _prepared_step(case, impl, seq_len)
    gc.collect()
    resettable = reset_peak_rss()
    baseline = peak_rss_mib()
    step()
    return {
        "peak_mib": peak_rss_mib() - baseline,
        "baseline_mib": baseline,
        "peak_reset": resettable,
        "exact_rss": exact,
    }


def measure_time(case: str, impl: str, seq_len: int, reps: int) -> dict:
    """Median wall time of ``reps`` forward+backward calls (default allocator)."""
    step = _prepared_step(case, impl, seq_len)
    times = [timed(step) for _ in range(reps)]
    return {"time_s": median(times), "times_s": times, "threads": torch.get_num_threads(), "dims": DIMS}


def point_entry(what: str, case: str, impl: str, seq_len: int, reps: int, conn) -> None:
    """Child-process target: one measurement ("memory" or "time") of one point, sent back (or the error)."""
    try:
        conn.send(
            measure_memory(case, impl, seq_len)
            if what == "memory"
            else measure_time(case, impl, seq_len, reps)
        )
    except BaseException as e:  # report, never hang the driver
        conn.send({"error": f"{what}: {type(e).__name__}: {e}"})
    finally:
        conn.close()
