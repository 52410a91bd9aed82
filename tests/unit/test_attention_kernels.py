"""The sparse fast path equals the dense reference (fp32, <= 1e-5) on every layer type and length."""

from __future__ import annotations

import pytest
import torch

from titan_dsv4.model.kernels import CompressedKV, dense_attention, sparse_attention

B, H, d, W = 2, 3, 16, 8


def _inputs(S: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, d, generator=g, requires_grad=True)
    kv = torch.randn(B, S, d, generator=g, requires_grad=True)
    sinks = torch.randn(H, generator=g, requires_grad=True)
    return q, kv, sinks, g


def _compressed(kind: str, S: int, g: torch.Generator) -> CompressedKV | None:
    if kind == "sliding":
        return None
    ratio = 4 if kind == "csa" else 8
    T = max(S // ratio, 1)
    entries = torch.randn(B, T, d, generator=g, requires_grad=True)
    if kind == "csa":
        k = 5
        limit = ((torch.arange(S) + 1) // ratio)[None, :, None]
        scores = torch.rand(B, S, T, generator=g).masked_fill(torch.arange(T) >= limit, -1.0)
        picked = scores.topk(min(k, T), dim=-1).indices
        picked = torch.where(picked < limit, picked, torch.full_like(picked, -1))
        return CompressedKV(entries, ratio, picked)
    return CompressedKV(entries, ratio, hidden=(kind == "hidden"))


@pytest.mark.parametrize("kind", ["sliding", "csa", "hca", "hidden"])
@pytest.mark.parametrize("S", [5, 8, 29, 64, 77])
def test_sparse_equals_dense_outputs_and_gradients(kind, S):
    q, kv, sinks, g = _inputs(S, seed=S)
    compressed = _compressed(kind, S, g)
    leaves = [q, kv, sinks] + ([compressed.entries] if compressed is not None else [])
    grad_out = torch.randn(B, H, S, d, generator=g)
    results = []
    for kernel in (dense_attention, sparse_attention):
        out = kernel(q, kv, sinks, W, compressed)
        grads = torch.autograd.grad(out, leaves, grad_out)
        results.append((out, grads))
    (ref, ref_grads), (fast, fast_grads) = results
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5)
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def _largest_saved(kernel, S: int, kind: str) -> int:
    q, kv, sinks, g = _inputs(S)
    compressed = _compressed(kind, S, g)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kernel(q, kv, sinks, W, compressed)
    return max(sizes)


@pytest.mark.parametrize("kind", ["sliding", "csa"])
def test_sparse_path_memory_grows_linearly_not_quadratically(kind):
    """Doubling S doubles the largest saved activation of the fast path; the reference's quadruples."""
    dense = _largest_saved(dense_attention, 2048, kind) / _largest_saved(dense_attention, 1024, kind)
    sparse = _largest_saved(sparse_attention, 2048, kind) / _largest_saved(sparse_attention, 1024, kind)
    assert dense > 3.9
    assert sparse < 2.1


def _leaves_grads(kernel, q, kv, sinks, compressed, grad_out, **kwargs):
    leaves = [q, kv, sinks, compressed.entries]
    out = kernel(q, kv, sinks, W, compressed, **kwargs)
    probs = None
    if isinstance(out, tuple):
        out, probs = out
    return out, probs, torch.autograd.grad(out, leaves, grad_out)


@pytest.mark.parametrize("budget", [1, 5 * d * 7, 1 << 24])  # one query per chunk, seven, all at once
def test_csa_query_chunks_equal_dense(monkeypatch, budget):
    """CSA's gather in query chunks (each recomputed in backward): outputs, gradients and the entry
    probabilities equal the dense reference's, whatever the chunk size."""
    import titan_dsv4.model.kernels as kernels

    monkeypatch.setattr(kernels, "CSA_GATHER_BUDGET", budget)
    S = 29
    q, kv, sinks, g = _inputs(S, seed=3)
    compressed = _compressed("csa", S, g)
    grad_out = torch.randn(B, H, S, d, generator=g)
    ref, ref_p, ref_grads = _leaves_grads(
        dense_attention, q, kv, sinks, compressed, grad_out, entry_probs=True
    )
    fast, fast_p, fast_grads = _leaves_grads(
        sparse_attention, q, kv, sinks, compressed, grad_out, entry_probs=True
    )
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast_p, ref_p, rtol=0, atol=1e-5)
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    with torch.no_grad():  # the path without checkpointing
        torch.testing.assert_close(sparse_attention(q, kv, sinks, W, compressed), ref, rtol=0, atol=1e-5)


def test_empty_picks_send_no_gradient_to_any_entry():
    """A -1 pick reads a spare zero row, not entry 0: a query whose picks are all -1 (query 0 sees no entry;
    the last query's picks are blanked) contributes nothing to any entry's gradient, even a NaN upstream
    gradient (0 x NaN would poison entry 0 if its empty picks were gathered from there)."""
    S = 29
    q, kv, sinks, g = _inputs(S, seed=4)
    compressed = _compressed("csa", S, g)
    compressed.picked[:, -1] = -1
    assert (compressed.picked[:, 0] == -1).all()
    grad_out = torch.randn(B, H, S, d, generator=g)
    clean = grad_out.clone()
    clean[:, :, [0, -1]] = 0.0
    grad_out[:, :, [0, -1]] = float("nan")
    *_, (_, _, _, ref) = _leaves_grads(dense_attention, q, kv, sinks, compressed, clean)
    *_, (_, _, _, fast) = _leaves_grads(sparse_attention, q, kv, sinks, compressed, grad_out)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5)
