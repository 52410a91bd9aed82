"""The Triton Lightning Indexer (titan_dsv4/model/triton_indexer.py) against plain torch references.

Picks are compared with a per-row reference of the tie rule on a dense [S, T] score matrix; the inputs are
small integers (and dI = 16, so dI**-0.5 = 1/4) so that every score is exact in fp32 whatever the
summation order, and ties (exact-zero ReLU scores, duplicated keys) are real ties in both.
"""

import os

import torch

if not torch.cuda.is_available():  # Triton's interpreter: read when triton is imported, so before the module
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from titan_dsv4.model import triton_indexer as ti
from titan_dsv4.model.errors import ConfigError

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or Triton's interpreter",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def dense_scores(q, keys, head_w):
    """[B, S, T] fp32: sum_h w_h * relu(q_h . k) * dI**-0.5 (Indexer._scores' formula)."""
    dots = torch.einsum("bshd,btd->bsht", q.float(), keys.float())
    return (torch.relu(dots) * q.shape[-1] ** -0.5 * head_w.float()[..., None]).sum(2)


def reference_picks(scores, lo, hi, k):
    """The documented rule, row by row: the k highest visible scores, ties to the lower entry, ascending, -1
    last."""
    B, S, T = scores.shape
    out = torch.full((B, S, min(k, T)), -1, dtype=torch.long)
    for b in range(B):
        for t in range(S):
            seen = range(max(0, int(lo[b, t])), min(T, int(hi[b, t])))
            best = sorted(seen, key=lambda e: (-float(scores[b, t, e]), e))[: min(k, T)]
            out[b, t, : len(best)] = torch.tensor(sorted(best), dtype=torch.long)
    return out


def int_inputs(B, S, T, nI, dI=16, seed=0, dup=((5, 2), (9, 2), (11, 7))):
    """Small-integer q, keys, head_w (exact scores, many exact zeros), with some keys duplicated."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (B, S, nI, dI), generator=g).float()
    keys = torch.randint(-2, 3, (B, T, dI), generator=g).float()
    head_w = torch.randint(-3, 4, (B, S, nI), generator=g).float() / 4
    for dst, src in dup:
        if dst < T:
            keys[:, dst] = keys[:, src]
    return q, keys, head_w


def straddling_ties(scores, lo, hi, k):
    """How many rows have more entries tied at their k-th visible score than the k slots can take."""
    n = 0
    B, S, T = scores.shape
    for b in range(B):
        for t in range(S):
            row = scores[b, t, max(0, int(lo[b, t])) : min(T, int(hi[b, t]))]
            if row.numel() > k:
                thr = row.topk(k).values[-1]
                n += int((row > thr).sum() + (row == thr).sum() > k)
    return n


def run_picks(q, keys, head_w, k, lo, hi, **kw):
    """topk_picks on DEVICE, back on the CPU."""
    to = lambda x: x.to(DEVICE)
    return ti.topk_picks(to(q), to(keys), to(head_w), k, to(lo), to(hi), **kw).cpu()


def test_picks_causal_with_ties():
    B, S, T, ratio, k = 2, 48, 24, 2, 5
    q, keys, head_w = int_inputs(B, S, T, nI=2)
    lo, hi = ti.causal_ranges(B, S, T, ratio, "cpu")
    scores = dense_scores(q, keys, head_w)
    assert straddling_ties(scores, lo, hi, k) > 0  # exact ties decided by the rule, not by luck
    assert ((scores == 0) & (torch.arange(T) < hi[..., None])).any()
    before = ti.LAUNCHES["score"]
    picks = run_picks(q, keys, head_w, k, lo, hi)
    assert ti.LAUNCHES["score"] == before + 1  # one chunk, one tile: a single launch
    assert picks.dtype == torch.long and picks.shape == (B, S, k)
    assert torch.equal(picks, reference_picks(scores, lo, hi, k))


def test_picks_fewer_than_k_and_context_parallel_positions():
    # A context-parallel rank's queries: two separate position ranges of a 64-token sequence, ratio 4
    B, T, ratio, k = 1, 16, 4, 6
    query_pos = torch.cat([torch.arange(0, 16), torch.arange(48, 64)])
    S = query_pos.numel()
    q, keys, head_w = int_inputs(B, S, T, nI=3, seed=1)
    lo, hi = ti.causal_ranges(B, S, T, ratio, "cpu", query_pos=query_pos)
    assert int(hi.min()) == 0 and (hi < k).any() and int(hi.max()) == T
    picks = run_picks(q, keys, head_w, k, lo, hi)
    assert torch.equal(picks, reference_picks(dense_scores(q, keys, head_w), lo, hi, k))
    assert (picks[0, :3] == -1).all()  # positions 0..2 see no entry


def test_picks_document_ranges():
    # Packed documents: each query sees the causal prefix of its own document's entries (ratio 2)
    B, T, ratio, k = 2, 30, 2, 4
    layouts = [[20, 28, 12], [8, 36, 16]]  # token lengths per row
    S = 60
    lo = torch.zeros(B, S, dtype=torch.int32)
    hi = torch.zeros(B, S, dtype=torch.int32)
    for b, lengths in enumerate(layouts):
        start = first = 0
        for n in lengths:
            pos = torch.arange(n)
            lo[b, start : start + n] = first
            hi[b, start : start + n] = first + ((pos + 1) // ratio).clamp(max=n // ratio)
            start, first = start + n, first + n // ratio
    q, keys, head_w = int_inputs(B, S, T, nI=2, seed=2)
    picks = run_picks(q, keys, head_w, k, lo, hi)
    assert torch.equal(picks, reference_picks(dense_scores(q, keys, head_w), lo, hi, k))
    assert ((picks < lo[..., None]) & (picks >= 0)).sum() == 0 and (picks < hi[..., None]).all()


def test_picks_tiled_merge():
    # A small tile and budget: several query chunks, each merging running top-k across entry tiles
    B, S, T, ratio, k = 2, 40, 32, 1, 5
    q, keys, head_w = int_inputs(B, S, T, nI=2, seed=3, dup=((5, 2), (12, 2), (20, 2), (27, 7), (30, 7)))
    lo, hi = ti.causal_ranges(B, S, T, ratio, "cpu")
    scores = dense_scores(q, keys, head_w)
    assert straddling_ties(scores, lo, hi, k) > 0
    c, tn = ti._plan(B, S, T, k, budget=480, tile_t=7)
    assert (c, tn) == (20, 7)
    before = ti.LAUNCHES["score"]
    picks = run_picks(q, keys, head_w, k, lo, hi, budget=480, tile_t=7)
    assert ti.LAUNCHES["score"] == before + 2 * 5  # 2 query chunks x 5 entry tiles
    assert torch.equal(picks, reference_picks(scores, lo, hi, k))
    before = ti.LAUNCHES["score"]
    assert torch.equal(run_picks(q, keys, head_w, k, lo, hi, budget=480), picks)  # the planner's own chunks
    assert ti.LAUNCHES["score"] == before + 7  # 40 queries in chunks of 6 (B x 6 x (k + 32) <= 480)


def test_picks_k_above_entries():
    B, S, T, k = 1, 12, 3, 5
    q, keys, head_w = int_inputs(B, S, T, nI=2, seed=4, dup=())
    lo, hi = ti.causal_ranges(B, S, T, 4, "cpu")
    picks = run_picks(q, keys, head_w, k, lo, hi)
    assert picks.shape == (B, S, T)
    assert torch.equal(picks, reference_picks(dense_scores(q, keys, head_w), lo, hi, k))


def test_picks_match_torch_indexer(debug_args):
    """The torch Indexer's picks (as sets; it orders them by score) on float inputs without ties."""
    from titan_dsv4.model.indexer import Indexer, IndexerScoring

    indexer = Indexer(debug_args)
    nI, dI, k, ratio = indexer.n_heads, indexer.head_dim, indexer.topk, indexer.ratio
    B, S, T = 1, 48, 48 // ratio
    g = torch.Generator().manual_seed(5)
    shared = torch.randn(dI, generator=g)  # a common direction: positive dots, so no exact-zero ties
    q = torch.randn(B, S, nI, dI, generator=g) + 2 * shared
    keys = torch.randn(B, T, dI, generator=g) + 2 * shared
    head_w = torch.rand(B, S, nI, generator=g) + 0.1
    want = indexer.pick(IndexerScoring(keys, q, head_w), None)
    lo, hi = ti.causal_ranges(B, S, T, ratio, "cpu")
    got = run_picks(q, keys, head_w, k, lo, hi)
    assert got.shape == want.shape
    want_sorted = torch.where(want < 0, T, want).sort(-1).values
    assert torch.equal(torch.where(want_sorted == T, -1, want_sorted), got)


def test_picked_scores_and_gradients():
    B, S, T, nI, dI, k = 2, 24, 12, 3, 32, 6
    g = torch.Generator().manual_seed(6)
    q = torch.randn(B, S, nI, dI, generator=g)
    keys = torch.randn(B, T, dI, generator=g)
    head_w = torch.randn(B, S, nI, generator=g)
    # Distinct picks per query in any order, several -1s (also one full row of -1)
    picks = torch.stack([torch.randperm(T, generator=g)[:k] for _ in range(B * S)]).view(B, S, k)
    drop = torch.rand(B, S, k, generator=g) < 0.3
    drop[0, 0] = True
    picks = torch.where(drop, -1, picks)
    valid = picks >= 0
    grad = torch.randn(B, S, k, generator=g)

    ref_in = [x.clone().requires_grad_() for x in (q, keys, head_w)]
    ref = dense_scores(*ref_in).gather(-1, picks.clamp(min=0))
    (torch.where(valid, ref, 0.0) * grad).sum().backward()

    tri_in = [x.to(DEVICE).requires_grad_() for x in (q, keys, head_w)]
    before = (ti.LAUNCHES["picked_fwd"], ti.LAUNCHES["picked_bwd"])
    out = ti.picked_scores(*tri_in, picks.to(DEVICE))
    assert out.dtype == torch.float32 and out.shape == (B, S, k)
    assert torch.isneginf(out.cpu()[~valid]).all()
    torch.testing.assert_close(out.cpu()[valid], ref.detach()[valid], atol=1e-5, rtol=1e-5)
    (torch.where(valid.to(DEVICE), out, 0.0) * grad.to(DEVICE)).sum().backward()
    assert (ti.LAUNCHES["picked_fwd"], ti.LAUNCHES["picked_bwd"]) == (before[0] + 1, before[1] + 1)
    for name, r, t in zip(("q", "keys", "head_w"), ref_in, tri_in):
        assert t.grad.dtype == r.dtype, name
        torch.testing.assert_close(t.grad.cpu(), r.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_bf16_inputs():
    """bf16 q and keys: exact integer picks; picked scores and gradients (in bf16) against fp32 math."""
    B, S, T, nI, k = 1, 16, 8, 2, 3
    q, keys, head_w = int_inputs(B, S, T, nI=nI, seed=8)
    lo, hi = ti.causal_ranges(B, S, T, 1, "cpu")
    picks = run_picks(q.bfloat16(), keys.bfloat16(), head_w, k, lo, hi)
    assert torch.equal(picks, reference_picks(dense_scores(q, keys, head_w), lo, hi, k))
    g = torch.Generator().manual_seed(9)
    q, keys = torch.randn(B, S, nI, 32, generator=g).bfloat16(), torch.randn(B, T, 32, generator=g).bfloat16()
    ref_in = [x.float().requires_grad_() for x in (q, keys, head_w)]
    ref = dense_scores(*ref_in).gather(-1, picks.clamp(min=0))
    valid = picks >= 0
    torch.where(valid, ref, 0.0).sum().backward()
    tri_in = [x.to(DEVICE).requires_grad_() for x in (q, keys, head_w)]
    out = ti.picked_scores(*tri_in, picks.to(DEVICE))
    torch.where(valid.to(DEVICE), out, 0.0).sum().backward()
    torch.testing.assert_close(out.cpu()[valid], ref.detach()[valid], atol=1e-5, rtol=1e-5)
    for name, r, t in zip(("q", "keys", "head_w"), ref_in, tri_in):
        assert t.grad.dtype == t.dtype, name
        torch.testing.assert_close(t.grad.cpu(), r.grad.to(t.dtype), msg=name)


def test_picked_scores_at_exact_picks_of_topk():
    """The two halves together on exact inputs (q.k often exactly 0: ReLU's gradient 0 there, as torch's)."""
    B, S, T, k = 1, 32, 16, 4
    q, keys, head_w = int_inputs(B, S, T, nI=2, seed=7)
    lo, hi = ti.causal_ranges(B, S, T, 2, "cpu")
    picks = run_picks(q, keys, head_w, k, lo, hi)
    valid = picks >= 0
    dots = torch.einsum("bshd,btd->bsht", q, keys).gather(
        -1, picks.clamp(min=0)[:, :, None].expand(-1, -1, 2, -1)
    )
    assert ((dots == 0) & valid[:, :, None]).any()
    ref_in = [x.clone().requires_grad_() for x in (q, keys, head_w)]
    ref = dense_scores(*ref_in).gather(-1, picks.clamp(min=0))
    torch.where(valid, ref, 0.0).sum().backward()
    tri_in = [x.to(DEVICE).requires_grad_() for x in (q, keys, head_w)]
    out = ti.picked_scores(*tri_in, picks.to(DEVICE))
    torch.where(valid.to(DEVICE), out, 0.0).sum().backward()
    assert torch.equal(out.detach().cpu()[valid], ref.detach()[valid])
    for name, r, t in zip(("q", "keys", "head_w"), ref_in, tri_in):
        torch.testing.assert_close(t.grad.cpu(), r.grad, atol=1e-5, rtol=0, msg=name)


def test_check_refuses_what_cannot_run(monkeypatch):
    ti.check_triton_indexer(128, 64, DEVICE)  # DeepSeek-V4's index dims run
    for dI, nI, words in [(512, 4, "index_head_dim"), (64, 256, "index_n_heads"), (256, 128, "tile")]:
        with pytest.raises(ConfigError, match=words):
            ti.check_triton_indexer(dI, nI, DEVICE)
    with pytest.raises(ConfigError, match="runs on CUDA"):
        ti.check_triton_indexer(64, 4, "meta")
    monkeypatch.setattr(ti, "_interpreted", lambda: False)
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        ti.check_triton_indexer(64, 4, "cpu")
    q, keys, head_w = int_inputs(1, 4, 4, nI=2)
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):  # the entry points check too: no fallback
        ti.picked_scores(q, keys, head_w, torch.zeros(1, 4, 2, dtype=torch.long))
    with pytest.raises(ConfigError, match="share a dtype"):
        ti.topk_picks(q, keys.double(), head_w, 2, *ti.causal_ranges(1, 4, 4, 1, "cpu"))


def test_plan_long_context_iterations():
    """4K queries x 256K entries, k = 512, 2**24 budget: a few dozen Python iterations, within budget."""
    B, S, T, k, budget = 1, 4096, 1 << 18, 512, 1 << 24
    c, tn = ti._plan(B, S, T, k, budget, None)
    iterations = -(-S // c) * -(-T // tn)
    assert iterations <= 72, (c, tn, iterations)
    assert B * c * (k + tn) <= budget
    assert ti._plan(1, 64, 32, 4, budget, None) == (64, 32)  # small: one chunk, one tile
