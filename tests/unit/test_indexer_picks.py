"""The Lightning Indexer's picks follow one documented rule, whatever order ``topk`` gives equal scores.

The rule (``Indexer.pick``): the k highest scores among the entries a query may see, equal scores broken
toward the lower entry index; never an invisible entry; -1 for the rest when fewer than k are visible;
picks in ascending entry order, -1s last. The reference below implements it by a stable sort.
"""

from __future__ import annotations

import types

import pytest
import torch

from titan_dsv4.model.indexer import Indexer, IndexerScoring

NI, DI, RATIO = 4, 8, 4


def _indexer(topk: int, budget: int = 1 << 24) -> Indexer:
    """An Indexer's pick machinery without its projections (pick only reads these attributes)."""
    ix = Indexer.__new__(Indexer)
    torch.nn.Module.__init__(ix)
    ix.ratio, ix.head_dim, ix.n_heads, ix.topk, ix.score_budget = RATIO, DI, NI, topk, budget
    ix.triton = False  # the PyTorch path (the Triton kernel's picks: test_triton_indexer.py)
    return ix


def _scoring(B: int, S: int, T: int, seed: int = 0, ties: bool = True, query_pos=None) -> IndexerScoring:
    """Random queries and keys with many exact ties: duplicated keys, and keys every head's ReLU zeroes
    (score exactly 0, the common tie), plus some negative head weights (scores below 0 too)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, T, DI, generator=g)
    q = torch.randn(B, S, NI, DI, generator=g)
    head_w = torch.randn(B, S, NI, generator=g)
    if ties:
        keys[:, 1::3] = keys[:, 0:1]  # duplicated keys: equal scores at different indices
        q[:, ::2, :, 0] = q[:, ::2, :, 0].abs() + 50  # every second query: ReLU zeroes every key ...
        keys[:, ::2, 0] = -(keys[:, ::2, 0].abs() + 50)  # ... with a large negative first component
    return IndexerScoring(keys, q, head_w, query_pos=query_pos)


def _reference(ix: Indexer, s: IndexerScoring, visible: torch.Tensor) -> torch.Tensor:
    """The rule by a stable descending sort over all T (ties keep the lower index first)."""
    scores = ix._scores(s.q, s.keys, s.head_w).masked_fill(~visible, float("-inf"))
    k = min(ix.topk, scores.shape[-1])
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    order = torch.where(visible.gather(-1, order), order, scores.shape[-1])  # invisible -> after any entry
    picks = order.sort(dim=-1).values
    return torch.where(picks < scores.shape[-1], picks, -1)


def _causal(S: int, T: int, positions=None) -> torch.Tensor:
    t = torch.arange(S) if positions is None else positions
    return (torch.arange(T)[None, :] < ((t + 1) // RATIO)[:, None]).unsqueeze(0)


def _shuffled_topk(monkeypatch, seed: int = 0):
    """Make every topk return equal values in a random order (as a GPU's may): a rule that relied on
    topk's tie order would change its picks."""
    original = torch.Tensor.topk
    g = torch.Generator().manual_seed(seed)

    def topk(self, k, dim=-1, largest=True, sorted=True):
        dim = dim % self.dim()
        perm = torch.randperm(self.shape[dim], generator=g)
        values, at = original(self.index_select(dim, perm), k, dim, largest, sorted)
        return types.SimpleNamespace(values=values, indices=perm[at])

    monkeypatch.setattr(torch.Tensor, "topk", topk)


@pytest.mark.parametrize("budget", [1 << 24, 4 * NI * 3, 1])
@pytest.mark.parametrize("topk", [1, 5, 64])
def test_causal_picks_follow_the_rule(topk, budget):
    """Exact-zero and duplicate-key ties, early queries seeing fewer than k entries, k above T; the
    budget 4*nI*3 forces a few queries per chunk with T in tiles, and 1 forces one query per chunk
    with entry spans merged into running candidates."""
    B, S, T = 2, 48, 12
    ix, s = _indexer(topk, budget), _scoring(B, S, T)
    picks = ix.pick(s, None)
    assert torch.equal(picks, _reference(ix, s, _causal(S, T).expand(B, S, T)))
    assert (picks[:, :3] == -1).all() and (picks[:, -1] >= 0).sum(-1).eq(min(topk, T)).all()


def test_spans_merge_candidates_under_the_rule():
    """A span shorter than T (the merge path) with ties straddling span boundaries."""
    B, S, T = 1, 40, 37
    ix, s = _indexer(6, budget=4 * 7), _scoring(B, S, T, seed=3)
    assert ix._pick_tiles(B, S, T, 6)[1] < T  # several spans per query
    assert torch.equal(ix.pick(s, None), _reference(ix, s, _causal(S, T)))


def test_explicit_visibility_and_context_parallel_positions():
    """``seen`` masks (not the causal rule), and global query positions under context parallelism."""
    B, S, T = 2, 24, 16
    g = torch.Generator().manual_seed(5)
    seen = torch.rand(B, S, T, generator=g) < 0.4
    ix, s = _indexer(5, budget=64), _scoring(B, S, T, seed=5)
    assert torch.equal(ix.pick(s, seen), _reference(ix, s, seen))
    positions = torch.cat([torch.arange(40, 52), torch.arange(4, 16)])  # two chunks, out of order
    s = _scoring(B, S, T, seed=6, query_pos=positions)
    assert torch.equal(ix.pick(s, None), _reference(ix, s, _causal(S, T, positions).expand(B, S, T)))


def test_picks_ignore_topk_tie_order_and_chunking(monkeypatch):
    """The same picks with topk returning ties in random orders, for any budget, and with the queries
    permuted together with their positions (which regroups them into other chunks)."""
    B, S, T = 2, 48, 12
    s = _scoring(B, S, T, seed=1)
    expected = _reference(_indexer(5), s, _causal(S, T).expand(B, S, T))
    perm = torch.randperm(S, generator=torch.Generator().manual_seed(2))
    permuted = IndexerScoring(s.keys, s.q[:, perm], s.head_w[:, perm], query_pos=perm)
    _shuffled_topk(monkeypatch)
    for budget in (1 << 24, 4 * NI * 3, 7, 1):
        ix = _indexer(5, budget)
        assert torch.equal(ix.pick(s, None), expected), budget
        assert torch.equal(ix.pick(permuted, None), expected[:, perm]), budget


def test_unstable_topk_would_fail_the_rule(monkeypatch):
    """The tie-heavy inputs do expose tie order: the old rule (topk indices directly) changes under the
    shuffled topk, so the tests above would notice a rule that depended on it."""
    B, S, T = 1, 48, 12
    ix, s = _indexer(5), _scoring(B, S, T, seed=1)
    visible = _causal(S, T)
    scores = ix._scores(s.q, s.keys, s.head_w).masked_fill(~visible, float("-inf"))
    plain = scores.topk(5, dim=-1).indices.sort(-1).values
    _shuffled_topk(monkeypatch, seed=4)
    shuffled = scores.topk(5, dim=-1).indices.sort(-1).values
    assert not torch.equal(plain, shuffled)


class _Docs:
    def __init__(self, doc_ids: torch.Tensor):
        self.doc_ids = doc_ids
        starts = torch.zeros_like(doc_ids)
        for b in range(doc_ids.shape[0]):
            for i in range(1, doc_ids.shape[1]):
                same = doc_ids[b, i] == doc_ids[b, i - 1]
                starts[b, i] = starts[b, i - 1] if same else i
        self.positions = torch.arange(doc_ids.shape[1]) - starts


@pytest.mark.parametrize("budget", [1 << 24, 8])
def test_per_document_picks_are_each_document_alone(monkeypatch, budget):
    """Packed documents: each document's queries pick among its own entries exactly as ``pick`` would on
    the document alone (the same rule, then offset into the row), tie order shuffled."""
    lengths = [20, 9, 35]
    S = sum(lengths)
    s = _scoring(1, S, 0, seed=7)
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    keys, entry_docs = [], []
    g = torch.Generator().manual_seed(8)
    for i, n in enumerate(lengths):
        part = torch.randn(1, n // RATIO, DI, generator=g)
        part[:, 1::2] = part[:, :1]  # ties inside every document
        keys.append(part)
        entry_docs.append(torch.full((n // RATIO,), i))
    s.keys = torch.cat(keys, dim=1)
    entry_docs = torch.cat(entry_docs)[None]
    ix = _indexer(3, budget)
    _shuffled_topk(monkeypatch, seed=9)
    docs = _Docs(doc_ids)
    local = torch.cat([torch.arange(n // RATIO) for n in lengths])[None]  # each entry's index in its document
    seen = (doc_ids[:, :, None] == entry_docs[:, None, :]) & (
        local[:, None, :] < ((docs.positions + 1) // RATIO)[:, :, None]
    )
    picks = ix.pick(s, seen, (docs, entry_docs))
    q0 = e0 = 0
    for i, n in enumerate(lengths):
        alone = IndexerScoring(keys[i], s.q[:, q0 : q0 + n], s.head_w[:, q0 : q0 + n])
        mine = _reference(ix, alone, _causal(n, n // RATIO))
        width = mine.shape[-1]
        assert torch.equal(picks[:, q0 : q0 + n, :width], torch.where(mine >= 0, mine + e0, -1)), i
        assert (picks[:, q0 : q0 + n, width:] == -1).all()
        q0, e0 = q0 + n, e0 + n // RATIO
