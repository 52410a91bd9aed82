"""Attention kernels on one device: sparse against dense, forward+backward time and peak memory vs S.

The bare kernels (``titan_dsv4.model.kernels.ATTENTION_KERNELS``) on the inputs the CPU benchmark builds
(``attention_point.kernel_step``): queries [1, H, S, d], one shared K=V head [1, S, d], per-head sinks,
and the layer's compressed entries — HCA (ratio 128: every entry whose window has ended) or CSA (ratio 4:
the indexer's top-k picks, here random picks among each query's visible entries, -1 where fewer exist).
Everything in bf16 on the device; the logits as the model computes them by default (``fp32_compute``'s
``attention_logits``: q.k in fp32), and the sparse kernel once more with bf16 logits, which prices that
option. Dims: the ``debugmodel`` flavor's attention (what the CPU curves use) and the ``flash`` flavor's.
"""

from __future__ import annotations

import torch

from .gpu_common import Deadline, is_oom, peak_during, release, say, summary, time_reps

# (name, kernel, fp32 logits): the model's default logits first, then the sparse kernel's bf16-logits cost.
VARIANTS = [("sparse", "sparse", True), ("dense", "dense", True), ("sparse_bf16_logits", "sparse", False)]


def flavor_dims(flavor: str) -> dict:
    from titan_dsv4.flavors import deepseek_v4_args

    a = deepseek_v4_args[flavor]
    return dict(
        heads=a.n_heads,
        head_dim=a.head_dim,
        window=a.sliding_window,
        topk=a.index_topk,
        csa_ratio=a.csa_ratio,
        hca_ratio=a.hca_ratio,
    )


def causal_picks(seq_len: int, n_entries: int, ratio: int, k: int, device, seed: int, chunk: int = 2048):
    """[1, S, k] random picks among each query's causally visible entries (-1 = none), built on the device
    in query chunks (as ``attention_point.causal_top_k`` builds them on the CPU)."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    k = min(k, n_entries)
    for start in range(0, seq_len, chunk):
        rows = torch.arange(start, min(start + chunk, seq_len), device=device)
        limit = ((rows + 1) // ratio)[:, None]
        scores = torch.rand(len(rows), n_entries, generator=g, device=device)
        scores = scores.masked_fill(torch.arange(n_entries, device=device) >= limit, -1.0)
        top = scores.topk(k, dim=-1).indices
        out.append(torch.where(top < limit, top, torch.full_like(top, -1)))
    return torch.cat(out).unsqueeze(0)


def kernel_step(dims: dict, kind: str, impl: str, fp32_logits: bool, seq_len: int, device, dtype):
    """One forward+backward of the bare kernel (``attention_point.kernel_step`` on the device)."""
    from titan_dsv4.model.kernels import ATTENTION_KERNELS, CompressedKV

    g = torch.Generator(device=device).manual_seed(seq_len)
    H, d = dims["heads"], dims["head_dim"]

    def randn(*shape, grad=True):
        t = torch.randn(*shape, generator=g, device=device, dtype=dtype)
        return t.requires_grad_(grad)

    q, kv = randn(1, H, seq_len, d), randn(1, seq_len, d)
    # the sinks are an fp32 holder in the model, fp32 under bf16 FSDP too
    sinks = torch.randn(H, generator=g, device=device, dtype=torch.float32).requires_grad_(True)
    ratio = dims["hca_ratio"] if kind == "hca" else dims["csa_ratio"]
    n_entries = max(seq_len // ratio, 1)
    entries = randn(1, n_entries, d)
    picked = causal_picks(seq_len, n_entries, ratio, dims["topk"], device, seq_len) if kind == "csa" else None
    compressed = CompressedKV(entries, ratio, picked)
    grad_out = randn(1, H, seq_len, d, grad=False)
    kernel = ATTENTION_KERNELS[impl]
    leaves = (q, kv, sinks, entries)

    def step() -> None:
        kernel(q, kv, sinks, dims["window"], compressed, fp32_logits=fp32_logits).backward(grad_out)
        for t in leaves:
            t.grad = None

    return step


def run(
    results,
    deadline: Deadline,
    device,
    dtype,
    lengths: list[int],
    dim_sets: list[tuple[str, dict]],
    reps: int = 5,
    point_budget_s: float = 4.0,
) -> None:
    """Every (dims, kind, variant, S) point in order; a variant that ran out of memory (or past the point
    budget) at some S is skipped at the longer ones, and the section stops at its deadline."""
    for dims_name, dims in dim_sets:
        for kind in ("csa", "hca"):
            for name, impl, fp32 in VARIANTS:
                stop_reason = None
                for S in lengths:
                    record = dict(
                        dims=dims_name,
                        dims_values=dims,
                        kind=kind,
                        variant=name,
                        impl=impl,
                        fp32_logits=fp32,
                        seq_len=S,
                        dtype=str(dtype).removeprefix("torch."),
                    )
                    if stop_reason is not None:
                        results.add("attention", {**record, "skipped": stop_reason})
                        continue
                    if deadline.expired(margin=2.0):
                        results.add("attention", {**record, "skipped": "section time cap reached"})
                        stop_reason = "section time cap reached"
                        continue
                    record.update(measure(dims, kind, impl, fp32, S, device, dtype, reps, point_budget_s))
                    results.add("attention", record)
                    if record.get("oom"):
                        stop_reason = f"out of memory at {S} tokens"
                        say(f"attention {dims_name} {kind} {name} S={S}: OUT OF MEMORY")
                    elif "error" in record:
                        stop_reason = f"error at {S} tokens"
                        say(f"attention {dims_name} {kind} {name} S={S}: error {record['error']}")
                    else:
                        peak = record["peak_mib"]
                        say(
                            f"attention {dims_name} {kind} {name} S={S}: fwd+bwd "
                            f"{record['median_ms']:.2f} ms [{record['min_ms']:.2f}-{record['max_ms']:.2f}] "
                            f"x{record['reps']}, peak " + (f"{peak:.0f} MiB" if peak is not None else "n/a")
                        )
                        if record["median_ms"] / 1e3 > point_budget_s:
                            stop_reason = f"one call took {record['median_ms'] / 1e3:.1f} s at {S} tokens"


def measure(dims, kind, impl, fp32, S, device, dtype, reps, point_budget_s) -> dict:
    step = None
    try:
        step = kernel_step(dims, kind, impl, fp32, S, device, dtype)
        peak = peak_during(step, device)  # the first call: warm-up and peak memory
        times = time_reps(step, device, reps, min_reps=2, budget_s=point_budget_s)
        return {**summary(times), "peak_mib": peak}
    except Exception as e:  # OOM is a result; anything else is recorded and the next point runs
        if is_oom(e):
            return {"oom": True, "error": f"{type(e).__name__}"}
        return {"error": f"{type(e).__name__}: {e}"[:500]}
    finally:
        del step
        release(device)


def ratios(records: list[dict]) -> list[dict]:
    """dense / sparse time and memory, and the sparse kernel's fp32-logits cost, per (dims, kind, S)."""
    by = {(r["dims"], r["kind"], r["variant"], r["seq_len"]): r for r in records if "median_ms" in r}
    out = []
    for (dims, kind, variant, S), r in by.items():
        if variant != "sparse":
            continue
        row = {"dims": dims, "kind": kind, "seq_len": S}
        dense = by.get((dims, kind, "dense", S))
        if dense:
            row["dense_over_sparse_time"] = dense["median_ms"] / r["median_ms"]
            if dense["peak_mib"] and r["peak_mib"]:
                row["dense_over_sparse_memory"] = dense["peak_mib"] / r["peak_mib"]
        bf16 = by.get((dims, kind, "sparse_bf16_logits", S))
        if bf16:
            row["fp32_logits_time_cost"] = r["median_ms"] / bf16["median_ms"]
            if bf16["peak_mib"] and r["peak_mib"]:
                row["fp32_logits_memory_cost"] = r["peak_mib"] / bf16["peak_mib"]
        out.append(row)
    return out
