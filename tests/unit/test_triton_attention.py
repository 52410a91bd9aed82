"""The Triton attention kernels equal the dense reference (fp32, <= 1e-5): outputs, gradients of q, kv,
sinks, entries and halo kv, and entry probabilities, on every layer type, packed documents and CP halos.

On a machine without CUDA they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch

from titan_dsv4.model import triton_attention as ta
from titan_dsv4.model.errors import ConfigError
from titan_dsv4.model.kernels import CompressedKV, dense_attention
from titan_dsv4.model.sequence_shard import WindowHalo

pytest.importorskip("triton")

B, H, d, W = 2, 3, 16, 8


def _inputs(S: int, seed: int = 0, dim: int = d, heads: int = H):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, heads, S, dim, generator=g, requires_grad=True)
    kv = torch.randn(B, S, dim, generator=g, requires_grad=True)
    sinks = torch.randn(heads, generator=g, requires_grad=True)
    return q, kv, sinks, g


def _picks(seen: torch.Tensor, k: int, g: torch.Generator, duplicate: bool = False) -> torch.Tensor:
    """Top-k of random scores among the visible entries, -1 where fewer are visible (as the indexer)."""
    scores = torch.rand(seen.shape, generator=g).masked_fill(~seen, -1.0)
    picked = scores.topk(min(k, seen.shape[-1]), dim=-1).indices
    picked = torch.where(seen.gather(-1, picked), picked, -1)
    if duplicate:  # a repeated pick (ties): the reference counts the entry once
        picked[..., -1] = torch.where(picked[..., 0] >= 0, picked[..., 0], picked[..., -1])
    return picked


def _causal_seen(pos: torch.Tensor, T: int, ratio: int) -> torch.Tensor:
    return (torch.arange(T)[None, :] < ((pos + 1) // ratio)[:, None]).expand(B, -1, -1)


def _doc_ids(lengths) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).expand(B, -1).clone()


def _slot_seen(lengths, ratio: int, pos: torch.Tensor) -> torch.Tensor:
    """[B, len(pos), S // ratio] visibility of document-aligned windows stored in slots (SequenceShard's
    layout: slot s holds the window whose last token lies in [s*ratio, (s+1)*ratio); some slots empty)."""
    S = sum(lengths)
    T = S // ratio
    last = torch.full((T,), -1)
    doc = torch.full((T,), -1)
    start = 0
    for i, n in enumerate(lengths):
        for w in range(n // ratio):
            end = start + (w + 1) * ratio - 1
            last[end // ratio], doc[end // ratio] = end, i
        start += n
    docs = _doc_ids(lengths)[0][pos]
    seen = (doc[None, :] == docs[:, None]) & (last[None, :] >= 0) & (last[None, :] <= pos[:, None])
    return seen.expand(B, -1, -1).clone()


def _compare(q, kv, sinks, compressed, doc_ids=None, halo=None, probs=False, extra=(), seed=1):
    """Run dense and triton; assert outputs, LSE-consistent outputs, gradients and entry probs agree."""
    leaves = [q, kv, sinks, *extra] + ([compressed.entries] if compressed is not None else [])
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(q.shape, generator=g)
    results = []
    for kernel in (dense_attention, ta.triton_attention):
        res = kernel(q, kv, sinks, W, compressed, doc_ids=doc_ids, entry_probs=probs, halo=halo)
        out, p = res if probs else (res, None)
        grads = torch.autograd.grad(out, leaves, grad_out)
        results.append((out, grads, p))
    (ref, ref_grads, ref_p), (out, grads, p) = results
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    if probs:
        assert p.dtype == torch.float32 and not p.requires_grad
        torch.testing.assert_close(p, ref_p, rtol=0, atol=1e-5)
    return grads


def test_window_only_odd_length_and_heads():
    before = ta.LAUNCHES["forward"], ta.LAUNCHES["backward"]
    q, kv, sinks, _ = _inputs(29)
    _compare(q, kv, sinks, None, probs=True)
    assert ta.LAUNCHES["forward"] > before[0] and ta.LAUNCHES["backward"] > before[1]


def test_lse_includes_the_sink_and_explains_the_output():
    """The saved LSE is logsumexp over [window | entries | sink], and O = exp(logits - LSE) @ values."""
    from titan_dsv4.model.kernels import window_mask

    S, ratio = 29, 4
    q, kv, sinks, g = _inputs(S, seed=2)
    entries = torch.randn(B, S // ratio, d, generator=g)
    compressed = CompressedKV(entries, ratio)
    keys, w_lo, w_hi = ta.window_ranges(kv, W, None, None)
    mode, e_lo, e_hi, e_mask, picks = ta.entry_ranges(compressed, B, S)
    with torch.no_grad():
        out, lse = ta._TritonAttention.apply(
            q, keys, entries, sinks, w_lo, w_hi, mode, e_lo, e_hi, e_mask, picks
        )
        values = torch.cat([kv, entries], dim=1)
        visible = torch.cat([window_mask(S, W, q.device).expand(B, S, S), compressed.visible(S)], dim=-1)
        logits = (q @ values.unsqueeze(1).transpose(-1, -2) * d**-0.5).masked_fill(
            ~visible[:, None], -torch.inf
        )
        with_sink = torch.cat([logits, sinks.view(1, H, 1, 1).expand(B, H, S, 1)], dim=-1)
        torch.testing.assert_close(lse, torch.logsumexp(with_sink, dim=-1), rtol=0, atol=1e-5)
        torch.testing.assert_close(
            out, torch.exp(logits - lse[..., None]) @ values.unsqueeze(1), rtol=0, atol=1e-5
        )


@pytest.mark.parametrize("kind", ["hca", "hidden", "csa_dense"])
def test_compressed_ranges(kind):
    q, kv, sinks, g = _inputs(29, seed=3)
    ratio = 4 if kind == "csa_dense" else 8
    entries = torch.randn(B, 29 // ratio, d, generator=g, requires_grad=True)
    _compare(q, kv, sinks, CompressedKV(entries, ratio, hidden=kind == "hidden"), probs=True)


def test_csa_picks_with_none_and_duplicates():
    q, kv, sinks, g = _inputs(29, seed=4)
    T = 29 // 4
    entries = torch.randn(B, T, d, generator=g, requires_grad=True)
    picked = _picks(_causal_seen(torch.arange(29), T, 4), 4, g, duplicate=True)
    assert (picked < 0).any()
    before = ta.LAUNCHES["entry_probs"]
    _compare(q, kv, sinks, CompressedKV(entries, 4, picked), probs=True)
    assert ta.LAUNCHES["entry_probs"] > before


@pytest.mark.parametrize("picks", [False, True])
def test_packed_documents(picks):
    lengths, ratio = (11, 5, 13), 4
    S = sum(lengths)
    q, kv, sinks, g = _inputs(S, seed=5)
    seen = _slot_seen(lengths, ratio, torch.arange(S))
    entries = torch.randn(B, S // ratio, d, generator=g, requires_grad=True)
    picked = _picks(seen, 3, g) if picks else None
    compressed = CompressedKV(entries, ratio, picked, seen=seen)
    _compare(q, kv, sinks, compressed, doc_ids=_doc_ids(lengths), probs=True)


def _halo(kv_global, chunks, C, doc_ids=None, dim=d):
    """A hand-made WindowHalo for the rank holding ``chunks`` of a global row: (halo, local kv, halo leaf)."""
    starts = torch.tensor(chunks) * C
    key_pos = starts[:, None] - W + torch.arange(W)[None, :]
    rows = key_pos.clamp(min=0)
    halo_kv = torch.where((key_pos >= 0)[None, :, :, None], kv_global[:, rows], 0.0).detach().requires_grad_()
    query_pos = (starts[:, None] + torch.arange(C)[None, :]).flatten()
    key_docs = None if doc_ids is None else torch.where(key_pos >= 0, doc_ids[:, rows], -2)
    local_pred = torch.isin(torch.tensor(chunks) - 1, torch.tensor(chunks))
    halo = WindowHalo(halo_kv, key_pos, key_docs, query_pos, local_pred)
    return halo, query_pos


@pytest.mark.parametrize("kind", ["hca", "csa", "docs"])
def test_context_parallel_halo(kind):
    C, ratio = 8, 4
    S_g = 4 * C
    g = torch.Generator().manual_seed(6)
    kv_g = torch.randn(B, S_g, d, generator=g)
    lengths = (13, 12, 7)
    doc_g = _doc_ids(lengths) if kind == "docs" else None
    halo, pos = _halo(kv_g, [0, 3], C, doc_g)
    kv = kv_g[:, pos].clone().requires_grad_()
    q = torch.randn(B, H, 2 * C, d, generator=g, requires_grad=True)
    sinks = torch.randn(H, generator=g, requires_grad=True)
    entries = torch.randn(B, S_g // ratio, d, generator=g, requires_grad=True)
    if kind == "hca":
        compressed = CompressedKV(entries, ratio, query_pos=pos)
    elif kind == "csa":
        picked = _picks(_causal_seen(pos, S_g // ratio, ratio), 3, g)
        compressed = CompressedKV(entries, ratio, picked, query_pos=pos)
    else:
        compressed = CompressedKV(entries, ratio, seen=_slot_seen(lengths, ratio, pos), query_pos=pos)
    doc_ids = None if doc_g is None else doc_g[:, pos]
    grads = _compare(q, kv, sinks, compressed, doc_ids=doc_ids, halo=halo, probs=True, extra=[halo.kv])
    assert grads[3][:, 1].abs().sum() > 0  # chunk 3's halo received gradient


def test_context_parallel_local_predecessor():
    """Chunks 1 and 2: chunk 2's halo is chunk 1's tail, a view of the local kv (gradient reaches kv)."""
    C = 8
    g = torch.Generator().manual_seed(7)
    kv_g = torch.randn(B, 4 * C, d, generator=g)
    halo, pos = _halo(kv_g, [1, 2], C)
    kv = kv_g[:, pos].clone().requires_grad_()
    remote = halo.kv[:, :1].detach().requires_grad_()
    halo.kv = torch.cat([remote, kv[:, C - W : C, None].transpose(1, 2)], dim=1)
    q = torch.randn(B, H, 2 * C, d, generator=g, requires_grad=True)
    sinks = torch.randn(H, generator=g, requires_grad=True)
    _compare(q, kv, sinks, None, halo=halo, extra=[remote])


def test_head_dim_chunks(monkeypatch):
    """d = 64 in q.k chunks of 32 and two output chunks of 32."""
    monkeypatch.setattr(ta, "D_CHUNK", 32)
    monkeypatch.setattr(ta, "V_CHUNK", 32)
    q, kv, sinks, g = _inputs(20, seed=8, dim=64, heads=2)
    entries = torch.randn(B, 5, 64, generator=g, requires_grad=True)
    picked = _picks(_causal_seen(torch.arange(20), 5, 4), 3, g)
    _compare(q, kv, sinks, CompressedKV(entries, 4, picked))


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["docs_seen", "picks", "cp"])
def test_deterministic_path_equals_atomic(kind, deterministic):
    lengths, ratio, C = (11, 5, 16), 4, 8
    S = sum(lengths)
    q, kv, sinks, g = _inputs(S, seed=9)
    entries = torch.randn(B, S // ratio, d, generator=g, requires_grad=True)
    doc_ids, halo, extra = None, None, []
    if kind == "docs_seen":
        doc_ids = _doc_ids(lengths)
        compressed = CompressedKV(entries, ratio, seen=_slot_seen(lengths, ratio, torch.arange(S)))
    elif kind == "picks":
        compressed = CompressedKV(
            entries, ratio, _picks(_causal_seen(torch.arange(S), S // ratio, ratio), 3, g)
        )
    else:
        halo, pos = _halo(torch.randn(B, S, d, generator=g), [0, 3], C)
        q, kv = q[:, :, : 2 * C].detach().requires_grad_(), kv[:, : 2 * C].detach().requires_grad_()
        compressed, extra = CompressedKV(entries, ratio, query_pos=pos), [halo.kv]
    before = ta.LAUNCHES["backward_keys"] + ta.LAUNCHES["backward_picks"]
    det = _compare(q, kv, sinks, compressed, doc_ids=doc_ids, halo=halo, extra=extra)
    assert ta.LAUNCHES["backward_keys"] + ta.LAUNCHES["backward_picks"] > before
    torch.use_deterministic_algorithms(False)
    atomic = _compare(q, kv, sinks, compressed, doc_ids=doc_ids, halo=halo, extra=extra)
    for a, b in zip(det, atomic):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_refusals(monkeypatch):
    with pytest.raises(ConfigError, match="multiple of 16"):
        ta.check_triton_attention(24, 4, "cpu")
    with pytest.raises(ConfigError, match="at most 128 heads"):
        ta.check_triton_attention(64, 256, "cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="runs its kernels on CUDA"):
        ta.check_triton_attention(64, 4, "cpu")
