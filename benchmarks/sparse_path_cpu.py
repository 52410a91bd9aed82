#!/usr/bin/env python
"""The PyTorch sparse path on CPU, old against new: ``python benchmarks/sparse_path_cpu.py [--reps 3]``.

(a) CSA ``sparse_attention`` forward + backward (B1 H8 S2048 d64, W128, T512 entries, k64 picks of which
many are -1): the old path gathered all [B, S, k, d] picks at once (kept for backward) and read -1 picks
from entry 0 (``clamp``); the new one routes -1 to a spare zero row and gathers in checkpointed query
chunks: ``new`` with CSA_GATHER_BUDGET = 2**18 (64-query chunks, as long context takes many chunks),
``new_one_chunk`` with the default 2**24 (the whole S2048 in one chunk at this shape).
(b) ``Indexer.pick`` at a long-context shape scaled to CPU with the long config's budget ratio (one query
per chunk for the old loop: budget = B nI T, as 2**24 is for 64 heads x 256K entries): the old loop of
``budget // (B nI T)`` queries, each scoring all T and one ``topk`` over T, against the tiled pick.

Each measurement runs in a fresh subprocess (one thread), reporting the best wall time of ``--reps`` runs
and the peak RSS growth of the first run over the process's RSS once the inputs exist (Linux VmHWM, so it
counts every allocation: tensors, autograd's saved activations, temporaries). For (a) it also reports the
bytes autograd saves for backward (a saved-tensors hook; a checkpointed chunk saves only its inputs).
Writes ``benchmarks/results/sparse_path_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

ATTN = dict(B=1, H=8, S=2048, d=64, W=128, ratio=4, k=64)
ATTN_GATHER_BUDGET = 1 << 18  # 64 queries per chunk at this shape (2**24 does the same at 2**6 x wider rows)
PICK = dict(B=1, S=256, T=32768, nI=8, dI=64, topk=512)  # budget = B nI T: one query per old chunk


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


# ----- (a) CSA attention: the old gather-all path, reconstructed as a local baseline -----


def old_csa_attention(q, kv, sinks, window, entries, picked):
    """The old sparse CSA path: window logits block-locally, then every pick gathered at once from
    entries[clamp(pick, 0)] ([B, S, k, d], kept for backward), one joint softmax with the sink."""
    from titan_dsv4.model.kernels import _logits, _softmax_with_sink, _window_allowed

    B, H, S, d = q.shape
    W = window
    n_blocks = -(-S // W)
    pad = n_blocks * W - S
    qb = F.pad(q, (0, 0, 0, pad)).view(B, H, n_blocks, W, d)
    kvb = F.pad(kv, (0, 0, 0, pad)).view(B, n_blocks, W, d)
    keys = torch.cat([F.pad(kvb[:, :-1], (0, 0, 0, 0, 1, 0)), kvb], dim=2)
    allowed = _window_allowed(n_blocks, W, q.device, None, pad)
    logits_w = _logits(qb, keys, "bhnqd,bnkd->bhnqk", False).masked_fill(~allowed, float("-inf"))
    logits_w = logits_w.reshape(B, H, n_blocks * W, 2 * W)[:, :, :S]
    T = entries.shape[1]
    flat = picked.clamp(min=0) + (torch.arange(B) * T).view(B, 1, 1)
    gathered = entries.reshape(B * T, d)[flat]  # [B, S, k, d]
    logits_c = _logits(q, gathered, "bhsd,bskd->bhsk", False)
    logits_c = logits_c.masked_fill(~(picked >= 0).unsqueeze(1), float("-inf"))
    probs = _softmax_with_sink(torch.cat([logits_w, logits_c], dim=-1), sinks)
    p_w = F.pad(probs[..., : 2 * W], (0, 0, 0, pad)).view(B, H, n_blocks, W, 2 * W)
    out = torch.einsum("bhnqk,bnkd->bhnqd", p_w, keys).reshape(B, H, n_blocks * W, d)[:, :, :S]
    return out + torch.einsum("bhsk,bskd->bhsd", probs[..., 2 * W :], gathered)


def _attention_inputs():
    B, H, S, d, ratio, k = (ATTN[n] for n in ("B", "H", "S", "d", "ratio", "k"))
    T = S // ratio
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, S, d, generator=g, requires_grad=True)
    kv = torch.randn(B, S, d, generator=g, requires_grad=True)
    sinks = torch.randn(H, generator=g, requires_grad=True)
    entries = torch.randn(B, T, d, generator=g, requires_grad=True)
    # Causal picks: query t sees (t+1)//ratio entries, so the first k*ratio queries have -1 picks
    limit = ((torch.arange(S) + 1) // ratio)[None, :, None]
    scores = torch.rand(B, S, T, generator=g).masked_fill(torch.arange(T) >= limit, -1.0)
    picked = scores.topk(k, dim=-1).indices
    picked = torch.where(picked < limit, picked, -1)
    picked = picked.masked_fill(torch.rand(picked.shape, generator=g) < 0.5, -1)  # as short documents leave
    return q, kv, sinks, entries, picked, torch.randn(B, H, S, d, generator=g)


def attention_child(variant: str, reps: int) -> dict:
    from titan_dsv4.model import kernels
    from titan_dsv4.model.kernels import CompressedKV, sparse_attention

    if variant == "new":
        kernels.CSA_GATHER_BUDGET = ATTN_GATHER_BUDGET
    q, kv, sinks, entries, picked, grad_out = _attention_inputs()
    leaves = [q, kv, sinks, entries]

    def run():
        if variant == "old":
            out = old_csa_attention(q, kv, sinks, ATTN["W"], entries, picked)
        else:
            out = sparse_attention(q, kv, sinks, ATTN["W"], CompressedKV(entries, ATTN["ratio"], picked))
        return out, torch.autograd.grad(out, leaves, grad_out)

    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()[0]
    del out
    base = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out, grads = run()
        times.append(time.perf_counter() - t0)
        if len(times) == 1:
            peak = _rss_kib("VmHWM") - base
        del out, grads
    return {
        "seconds": min(times),
        "peak_rss_growth_mib": peak / 1024,
        "saved_for_backward_mib": sum(saved) / 2**20,
        "empty_pick_fraction": float((picked < 0).float().mean()),
    }


# ----- (b) Indexer.pick: the old per-chunk loop, reconstructed as a local baseline -----


def old_pick(ix, s):
    """The old pick: chunks of budget // (B nI T) queries, each scoring all T, one topk over T."""
    B, S = s.q.shape[:2]
    T = s.keys.shape[1]
    step = max(1, ix.score_budget // max(1, B * ix.n_heads * T))
    picks, iterations = [], 0
    for i in range(0, S, step):
        q, head_w = s.q[:, i : i + step], s.head_w[:, i : i + step]
        scores = ix._scores(q, s.keys, head_w)
        allowed = ix._allowed(B, i, q.shape[1], T, None, q.device, s.query_pos)
        picked = scores.masked_fill(~allowed, float("-inf")).topk(min(ix.topk, T), dim=-1).indices
        picks.append(torch.where(allowed.gather(-1, picked), picked, -1))
        iterations += 1
    return torch.cat(picks, dim=1), {"chunks": iterations, "tiles_scored": iterations}


def _pick_inputs():
    from titan_dsv4.model.indexer import Indexer, IndexerScoring

    B, S, T, nI, dI, topk = (PICK[n] for n in ("B", "S", "T", "nI", "dI", "topk"))
    ix = Indexer.__new__(Indexer)
    torch.nn.Module.__init__(ix)
    # Queries at the end of a long sequence (global positions >= 4T), so every query sees all T entries
    ix.ratio, ix.head_dim, ix.n_heads, ix.topk, ix.score_budget = 4, dI, nI, topk, B * nI * T
    ix.triton = False  # the PyTorch path
    g = torch.Generator().manual_seed(0)
    s = IndexerScoring(
        torch.randn(B, T, dI, generator=g),
        torch.randn(B, S, nI, dI, generator=g),
        torch.randn(B, S, nI, generator=g),
        query_pos=torch.arange(4 * T, 4 * T + S),
    )
    return ix, s


def pick_child(variant: str, reps: int) -> dict:
    from titan_dsv4.model import indexer

    ix, s = _pick_inputs()
    counts = {"chunks": 0, "tiles_scored": 0}
    if variant == "new":
        scores, select = ix._scores, indexer._top_k_low_ties

        def counted_scores(*a):
            counts["tiles_scored"] += 1
            return scores(*a)

        def counted_select(*a):
            counts["chunks"] += 1
            return select(*a)

        ix._scores, indexer._top_k_low_ties = counted_scores, counted_select

    def run():
        counts.update(chunks=0, tiles_scored=0)
        if variant == "old":
            picks, c = old_pick(ix, s)
            counts.update(c)
            return picks
        return ix.pick(s, None)

    base = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        picks = run()
        times.append(time.perf_counter() - t0)
        if len(times) == 1:
            peak = _rss_kib("VmHWM") - base
    kept = int((picks >= 0).sum())
    return {"seconds": min(times), "peak_rss_growth_mib": peak / 1024, "picks": kept, **counts}


def _long_config_counts() -> dict:
    """Chunk and tile counts of old and new pick at the long config (4K queries, 256K entries, 64 heads)."""
    from titan_dsv4.model.indexer import Indexer

    S, T, nI, k = 4096, 262144, 64, 512
    ix = Indexer.__new__(Indexer)
    ix.n_heads, ix.score_budget = nI, 1 << 24
    c, span, tile = ix._pick_tiles(1, S, T, k)
    n_chunks = -(-S // c)
    tiles = n_chunks * -(-T // span) * -(-span // tile)
    old = -(-S // max(1, (1 << 24) // (nI * T)))
    return {
        "S": S,
        "T": T,
        "nI": nI,
        "old_chunks": old,
        "new_chunks": n_chunks,
        "queries_per_chunk": c,
        "new_tiles": tiles,
    }


def _child(kind: str, variant: str, reps: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, variant, "--reps", str(reps)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        kind, variant = args.child
        result = (attention_child if kind == "attention" else pick_child)(variant, args.reps)
        print(json.dumps(result))
        return
    results = {"attention": dict(ATTN, gather_budget=ATTN_GATHER_BUDGET), "pick": dict(PICK)}
    for kind, variants in (("attention", ("old", "new", "new_one_chunk")), ("pick", ("old", "new"))):
        for variant in variants:
            results[kind][variant] = _child(kind, variant, args.reps)
    a, p = results["attention"], results["pick"]
    empty = a["old"]["empty_pick_fraction"]
    print(f"(a) CSA sparse_attention fwd+bwd, B1 H8 S2048 d64 W128 T512 k64 ({empty:.0%} of picks -1)")
    print(f"{'':14}{'seconds':>10}{'peak RSS +MiB':>16}{'saved MiB':>12}")
    for v in ("old", "new", "new_one_chunk"):
        r = a[v]
        print(
            f"{v:14}{r['seconds']:10.3f}{r['peak_rss_growth_mib']:16.1f}{r['saved_for_backward_mib']:12.1f}"
        )
    shape = f"B1 S{PICK['S']} T{PICK['T']} nI{PICK['nI']} dI{PICK['dI']} k{PICK['topk']}"
    print(f"(b) Indexer.pick, {shape}, budget B nI T")
    print(f"{'':14}{'seconds':>10}{'peak RSS +MiB':>16}{'chunks':>8}{'tiles':>8}")
    for v in ("old", "new"):
        r = p[v]
        print(
            f"{v:14}{r['seconds']:10.3f}{r['peak_rss_growth_mib']:16.1f}{r['chunks']:8d}{r['tiles_scored']:8d}"
        )
    same = p["old"]["picks"] == p["new"]["picks"]
    print(f"picks kept: old {p['old']['picks']}, new {p['new']['picks']} ({'same' if same else 'DIFFERENT'})")
    p["long_config"] = long = _long_config_counts()
    print(
        f"long config (S{long['S']} T{long['T']} nI{long['nI']} budget 2**24, no compute): old chunks "
        f"{long['old_chunks']}; new chunks {long['new_chunks']} of {long['queries_per_chunk']} queries, "
        f"tiles scored {long['new_tiles']} (S T nI / budget = {long['S'] * long['T'] * long['nI'] >> 24})"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sparse_path_cpu.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {RESULTS / 'sparse_path_cpu.json'}")


if __name__ == "__main__":
    main()
