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
