"""Triton Lightning Indexer: top-k picks and the scores at the picks, never a [S, nI, T] tensor.

What it computes (``Indexer._scores``, ``Indexer.pick`` and the sparse stage of ``Indexer._chunk_kl`` are
the numerical reference). For query t (``q`` [B, S, nI, dI], ``head_w`` [B, S, nI] fp32) and compressed
entry e (``keys`` [B, T, dI]):

    score(t, e) = sum_h head_w[t, h] * relu(q[t, h] . keys[e]) * dI**-0.5      (fp32 accumulation)

Entry e is visible to query t iff lo[t] <= e < hi[t] (per-query ranges [B, S] int32; ``causal_ranges``
builds the causal rule lo = 0, hi = min(T, (pos + 1) // ratio), pos = t or ``query_pos[t]`` under context
parallelism; a packed document gives its queries the range of its own entries).

* ``topk_picks``: the k highest scores among visible entries, ties broken toward the lower entry index
  (exact-zero ReLU scores of visible entries are legitimate picks; invisible entries never are); fewer than
  k visible leaves -1 in the remaining slots. Picks [B, S, min(k, T)] int64, ascending entry index, -1s
  last. Queries go in chunks and entries in tiles, so that about ``budget`` fp32 scores (plus k running
  candidates per query) live at once; each tile's scores are merged into the running top-k by the same
  rule. No host synchronisation.
* ``picked_scores``: the scores at given picks [B, S, k] with gradient to q, keys and head_w (Triton
  forward and backward kernels; keys' gradient by fp32 atomics). A -1 pick scores -inf (no gradient).

Limits (``check_triton_indexer`` refuses them): Triton must import; CUDA tensors, or CPU tensors with
``TRITON_INTERPRET=1`` set before triton was first imported (the interpreter: slow, for tests); at most
256 for index_head_dim and 128 for index_n_heads, with next_pow2(max(16, nI)) * next_pow2(max(16, dI))
<= 16384 (one query's heads are held in one tile). Visibility is a per-query range only: an arbitrary
[B, S, T] mask (and entries of other documents inside a range) is not expressible. NaN scores are never
picked. Not tuned for speed (one block configuration, no autotuning).
"""

from __future__ import annotations

import collections

import torch

from .errors import ConfigError

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - reported by check_triton_indexer
    triton = None

LAUNCHES: collections.Counter = collections.Counter()  # kernel launches by kernel name (tests check them)

_MAX_HEAD_DIM, _MAX_HEADS, _MAX_HEAD_TILE = 256, 128, 16384
_BLOCK_M, _BLOCK_N, _BLOCK_K = 32, 64, 32


def _pow2(n: int) -> int:
    """The next power of two at or above max(16, n) (Triton's smallest dot tile)."""
    return max(16, 1 << max(0, n - 1).bit_length())


def _dot_args(q: torch.Tensor) -> dict:
    """q.k's tl.dot: IEEE for fp32 (no TF32); bf16/fp16 natively (exact products), but upcast under the
    interpreter, whose bf16 dot is wrong (an exact change: products of bf16 are exact in fp32)."""
    if q.dtype == torch.float32 or _interpreted():
        return dict(DOT_DTYPE=tl.float32, PRECISION="ieee")
    return dict(DOT_DTYPE=tl.bfloat16 if q.dtype == torch.bfloat16 else tl.float16, PRECISION="tf32")


def _interpreted() -> bool:
    """Whether Triton's CPU interpreter built this module's kernels and triton.language's own (both happen
    at import: TRITON_INTERPRET=1 must be set before triton is first imported)."""
    return triton is not None and all(
        type(f).__name__ == "InterpretedFunction" for f in (_score_kernel, tl.sum)
    )


def check_triton_indexer(index_head_dim: int, index_n_heads: int, device: torch.device | str) -> None:
    """Raise ConfigError, naming the problem and the fix, when the Triton indexer cannot run here."""
    device = torch.device(device)
    problems = []
    if triton is None:
        problems.append("Triton is not installed: install triton, or use the torch indexer")
    elif device.type == "cpu" and not _interpreted():
        problems.append(
            "the Triton indexer got CPU tensors but Triton's interpreter is off: set TRITON_INTERPRET=1 "
            "before triton is first imported (slow; for tests), or run on a CUDA device"
        )
    elif device.type == "cuda" and not torch.cuda.is_available():
        problems.append("the Triton indexer was asked for CUDA but torch sees no CUDA device")
    elif device.type not in ("cpu", "cuda"):
        problems.append(f"the Triton indexer runs on CUDA (or the CPU interpreter), not {device.type}")
    if not 1 <= index_head_dim <= _MAX_HEAD_DIM:
        problems.append(f"index_head_dim must be in [1, {_MAX_HEAD_DIM}] (got {index_head_dim})")
    if not 1 <= index_n_heads <= _MAX_HEADS:
        problems.append(f"index_n_heads must be in [1, {_MAX_HEADS}] (got {index_n_heads})")
    if _pow2(index_n_heads) * _pow2(index_head_dim) > _MAX_HEAD_TILE:
        problems.append(
            f"index_n_heads x index_head_dim (padded to powers of two: {_pow2(index_n_heads)} x "
            f"{_pow2(index_head_dim)}) exceeds the {_MAX_HEAD_TILE}-element tile of one query's heads: "
            "use fewer or smaller index heads, or the torch indexer"
        )
    if problems:
        raise ConfigError("Triton Lightning Indexer: " + "; ".join(problems))


def _check(q: torch.Tensor, keys: torch.Tensor, head_w: torch.Tensor) -> None:
    """Refuse what the kernels cannot run (shapes, device, interpreter) before any launch."""
    if q.dim() != 4 or keys.dim() != 3 or head_w.dim() != 3:
        raise ConfigError("Triton indexer: q must be [B, S, nI, dI], keys [B, T, dI], head_w [B, S, nI]")
    B, S, nI, dI = q.shape
    if keys.shape[0] != B or keys.shape[2] != dI or tuple(head_w.shape) != (B, S, nI):
        raise ConfigError(
            f"Triton indexer: shapes disagree: q {tuple(q.shape)}, keys {tuple(keys.shape)}, "
            f"head_w {tuple(head_w.shape)}"
        )
    if q.device != keys.device or q.device != head_w.device:
        raise ConfigError("Triton indexer: q, keys and head_w must be on one device")
    if q.dtype != keys.dtype or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(
            f"Triton indexer: q ({q.dtype}) and keys ({keys.dtype}) must share a dtype among fp32, bf16, fp16"
        )
    check_triton_indexer(dI, nI, q.device)


def causal_ranges(
    batch: int, seq_len: int, n_entries: int, ratio: int, device, query_pos: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) [B, S] int32 of the causal rule: entries [0, min(T, (pos + 1) // ratio))."""
    pos = torch.arange(seq_len, device=device) if query_pos is None else query_pos.to(device)
    hi = ((pos + 1) // ratio).clamp(min=0, max=n_entries).to(torch.int32)
    return torch.zeros_like(hi).expand(batch, seq_len), hi.expand(batch, seq_len)


if triton is not None:

    @triton.jit
    def _score_kernel(
        q_ptr, k_ptr, w_ptr, lo_ptr, hi_ptr, out_ptr,
        n_rows, n_cols, t0, T, n_heads, head_dim, scale,
        sq_b, sq_s, sq_h, sq_d, sk_b, sk_t, sk_d, sw_b, sw_s, sw_h, sl_b, sl_s, sh_b, sh_s, so_b, so_s, so_t,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """out[b, m, n] = score(query m, entry t0 + n), -inf where invisible; heads reduced in registers."""
        pid_m, pid_n, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok, d_ok = offs_m < n_rows, offs_d < head_dim
        e = t0 + offs_n
        e_ok = (offs_n < n_cols) & (e < T)
        k_ptrs = k_ptr + b * sk_b + e[:, None].to(tl.int64) * sk_t + offs_d[None, :] * sk_d
        k_t = tl.trans(tl.load(k_ptrs, mask=e_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE))  # [D, N]
        q_base = q_ptr + b * sq_b + offs_m[:, None].to(tl.int64) * sq_s + offs_d[None, :] * sq_d
        w_base = w_ptr + b * sw_b + offs_m.to(tl.int64) * sw_s
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for h in range(n_heads):
            q_h = tl.load(q_base + h * sq_h, mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # [M, D]
            w_h = tl.load(w_base + h * sw_h, mask=m_ok, other=0.0).to(tl.float32)
            s = tl.dot(q_h.to(DOT_DTYPE), k_t, input_precision=PRECISION)  # [M, N] fp32
            acc += tl.maximum(s, 0.0) * scale * w_h[:, None]
        lo = tl.load(lo_ptr + b * sl_b + offs_m * sl_s, mask=m_ok, other=0)
        hi = tl.load(hi_ptr + b * sh_b + offs_m * sh_s, mask=m_ok, other=0)
        seen = e_ok[None, :] & (e[None, :] >= lo[:, None]) & (e[None, :] < hi[:, None])
        acc = tl.where(seen, acc, float("-inf"))
        out_ptrs = out_ptr + b * so_b + offs_m[:, None].to(tl.int64) * so_s + offs_n[None, :] * so_t
        tl.store(out_ptrs, acc, mask=m_ok[:, None] & (offs_n < n_cols)[None, :])

    @triton.jit
    def _picked_fwd_kernel(
        q_ptr, k_ptr, w_ptr, idx_ptr, out_ptr,
        n_pick, n_heads, head_dim, scale,
        sq_b, sq_s, sq_h, sq_d, sk_b, sk_t, sk_d, sw_b, sw_s, sw_h, si_b, si_s, si_k, so_b, so_s, so_k,
        BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """out[b, t, j] = score(query t, entry picks[b, t, j]) for a tile of j, all heads; -inf at -1."""
        t, pid_k, b = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2).to(tl.int64)
        offs_j = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_h, offs_d = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_D)
        j_ok, h_ok, d_ok = offs_j < n_pick, offs_h < n_heads, offs_d < head_dim
        idx = tl.load(idx_ptr + b * si_b + t * si_s + offs_j * si_k, mask=j_ok, other=-1)
        valid = idx >= 0
        k_ptrs = k_ptr + b * sk_b + idx[:, None] * sk_t + offs_d[None, :] * sk_d
        keys = tl.load(k_ptrs, mask=valid[:, None] & d_ok[None, :], other=0.0)  # [K, D]
        q_ptrs = q_ptr + b * sq_b + t * sq_s + offs_h[:, None] * sq_h + offs_d[None, :] * sq_d
        q = tl.load(q_ptrs, mask=h_ok[:, None] & d_ok[None, :], other=0.0)  # [H, D]
        w = tl.load(w_ptr + b * sw_b + t * sw_s + offs_h * sw_h, mask=h_ok, other=0.0).to(tl.float32)
        s = tl.dot(keys.to(DOT_DTYPE), tl.trans(q.to(DOT_DTYPE)), input_precision=PRECISION)  # [K, H] fp32
        score = tl.sum(tl.maximum(s, 0.0) * scale * w[None, :], axis=1)
        score = tl.where(valid, score, float("-inf"))
        tl.store(out_ptr + b * so_b + t * so_s + offs_j * so_k, score, mask=j_ok)

    @triton.jit
    def _picked_bwd_kernel(
        q_ptr, k_ptr, w_ptr, idx_ptr, g_ptr, dq_ptr, dk_ptr, dw_ptr,
        n_pick, n_heads, head_dim, scale,
        sq_b, sq_s, sq_h, sq_d, sk_b, sk_t, sk_d, sw_b, sw_s, sw_h, si_b, si_s, si_k, sg_b, sg_s, sg_k,
        sdq_b, sdq_s, sdq_h, sdk_b, sdk_t, sdw_b, sdw_s,
        BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """One query's dq and dhead_w over all its picks; dkeys by fp32 atomic adds at the picked rows."""
        t, b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
        offs_h, offs_d = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_D)
        h_ok, d_ok = offs_h < n_heads, offs_d < head_dim
        q_ptrs = q_ptr + b * sq_b + t * sq_s + offs_h[:, None] * sq_h + offs_d[None, :] * sq_d
        q = tl.load(q_ptrs, mask=h_ok[:, None] & d_ok[None, :], other=0.0)  # [H, D]
        q32 = q.to(tl.float32)
        w = tl.load(w_ptr + b * sw_b + t * sw_s + offs_h * sw_h, mask=h_ok, other=0.0).to(tl.float32)
        dq = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        dw = tl.zeros([BLOCK_H], dtype=tl.float32)
        for j0 in range(0, n_pick, BLOCK_K):
            offs_j = j0 + tl.arange(0, BLOCK_K)
            j_ok = offs_j < n_pick
            idx = tl.load(idx_ptr + b * si_b + t * si_s + offs_j * si_k, mask=j_ok, other=-1)
            valid = idx >= 0
            kd_ok = valid[:, None] & d_ok[None, :]
            keys = tl.load(
                k_ptr + b * sk_b + idx[:, None] * sk_t + offs_d[None, :] * sk_d, mask=kd_ok, other=0.0
            )
            g = tl.load(g_ptr + b * sg_b + t * sg_s + offs_j * sg_k, mask=valid, other=0.0).to(tl.float32)
            # [K, H], computed as in forward, so that the ReLU mask is forward's
            s = tl.dot(keys.to(DOT_DTYPE), tl.trans(q.to(DOT_DTYPE)), input_precision=PRECISION)
            dw += tl.sum(tl.maximum(s, 0.0) * scale * g[:, None], axis=0)
            ds = tl.where(s > 0.0, g[:, None] * scale * w[None, :], 0.0)  # [K, H]
            keys32 = keys.to(tl.float32)
            dq += tl.dot(tl.trans(ds), keys32, input_precision="ieee")  # [H, D]
            dk = tl.dot(ds, q32, input_precision="ieee")  # [K, D]
            tl.atomic_add(dk_ptr + b * sdk_b + idx[:, None] * sdk_t + offs_d[None, :], dk, mask=kd_ok)
        dq_ptrs = dq_ptr + b * sdq_b + t * sdq_s + offs_h[:, None] * sdq_h + offs_d[None, :]
        tl.store(dq_ptrs, dq, mask=h_ok[:, None] & d_ok[None, :])
        tl.store(dw_ptr + b * sdw_b + t * sdw_s + offs_h, dw, mask=h_ok)


def _launch_scores(q, keys, head_w, lo, hi, out, t0: int) -> None:
    """Fill ``out`` [B, c, n] with the scores of queries q [B, c, nI, dI] at entries t0..t0+n-1."""
    B, c, nI, dI = q.shape
    n = out.shape[-1]
    grid = (triton.cdiv(c, _BLOCK_M), triton.cdiv(n, _BLOCK_N), B)
    _score_kernel[grid](
        q, keys, head_w, lo, hi, out, c, n, t0, keys.shape[1], nI, dI, dI**-0.5,
        *q.stride(), *keys.stride(), *head_w.stride(), *lo.stride(), *hi.stride(), *out.stride(),
        BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_D=_pow2(dI), **_dot_args(q),
    )  # fmt: skip
    LAUNCHES["score"] += 1


def _plan(B: int, S: int, T: int, k: int, budget: int, tile_t: int | None) -> tuple[int, int]:
    """(queries per chunk, entries per tile): the fewest Python iterations (then tiles) with B x chunk x
    (k + tile) fp32 within ``budget``; tiles no narrower than max(4k, 256) unless forced by ``tile_t``."""
    if tile_t is not None:
        tn = max(1, min(T, tile_t))
        return max(1, min(S, budget // (B * (k + tn)))), tn
    best = None
    for n_tiles in range(1, max(1, -(-T // max(4 * k, 256))) + 1):
        tn = -(-T // n_tiles)
        c = min(S, budget // (B * (k + tn)))
        if c >= 1:
            n_chunks = -(-S // c)
            if best is None or (n_chunks * n_tiles, n_tiles) < best[0]:
                best = (n_chunks * n_tiles, n_tiles), -(-S // n_chunks), tn
    if best is None:  # even one query's k + tile exceeds the budget: one query, the widest tile that fits
        return 1, max(1, min(T, budget // B - k))
    return best[1], best[2]


def _merge(buf: torch.Tensor, run_idx: torch.Tensor, t0: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of [running candidates | tile scores] by (score desc, entry asc): (scores, entries) [B, c, k].

    ``buf`` [B, c, k + n]: the k running candidates' scores (entries ``run_idx``, ascending, below t0, -inf
    where none), then entries t0..t0+n-1. Candidates are ordered by entry along the last axis, so a cumsum
    ranks the ties at the k-th score toward the lower entry; -inf (invisible) is never chosen.
    """
    W = buf.shape[-1]
    thr = buf.topk(k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)  # the k-th largest
    above = buf > thr
    tie = buf == thr
    room = k - above.sum(dim=-1, keepdim=True, dtype=torch.int32)
    chosen = (above | (tie & (tie.cumsum(dim=-1, dtype=torch.int32) <= room))) & (buf > float("-inf"))
    rank = torch.arange(W, 0, -1, dtype=torch.int32, device=buf.device)  # distinct, larger for earlier
    top = torch.where(chosen, rank, 0).topk(k, dim=-1).values  # descending: chosen positions ascending
    ok = top > 0
    pos = (W - top).clamp(max=W - 1).long()
    scores = torch.where(ok, buf.gather(-1, pos), float("-inf"))
    entry = torch.where(pos < k, run_idx.gather(-1, pos.clamp(max=k - 1)), pos - k + t0)
    return scores, torch.where(ok, entry, -1)


@torch.no_grad()
def topk_picks(
    q: torch.Tensor,
    keys: torch.Tensor,
    head_w: torch.Tensor,
    k: int,
    lo: torch.Tensor,
    hi: torch.Tensor,
    *,
    budget: int = 1 << 24,
    tile_t: int | None = None,
) -> torch.Tensor:
    """Picks [B, S, min(k, T)] int64: each query's top-k visible entries (lo <= e < hi), ascending, -1 last.

    At most about ``budget`` fp32 scores exist at once (B x chunk x (k + tile)); ``tile_t`` forces the
    entry tile width (tests use it to run the merge). Python iterations: about B S T / budget.
    """
    _check(q, keys, head_w)
    B, S = q.shape[:2]
    T = keys.shape[1]
    if tuple(lo.shape) != (B, S) or tuple(hi.shape) != (B, S):
        raise ConfigError(f"Triton indexer: lo and hi must be [B, S] = {[B, S]} (got {list(lo.shape)})")
    kk = min(k, T)
    picks = torch.full((B, S, kk), -1, dtype=torch.long, device=q.device)
    if kk <= 0 or S == 0:
        return picks
    lo, hi = lo.to(torch.int32), hi.to(torch.int32)
    c, tn = _plan(B, S, T, kk, budget, tile_t)
    for i in range(0, S, c):
        rows = min(c, S - i)
        run_scores = torch.full((B, rows, kk), float("-inf"), device=q.device)
        run_idx = torch.full((B, rows, kk), -1, dtype=torch.long, device=q.device)
        for t0 in range(0, T, tn):
            buf = torch.empty(B, rows, kk + min(tn, T - t0), device=q.device)
            buf[..., :kk] = run_scores
            sl = slice(i, i + rows)
            _launch_scores(q[:, sl], keys, head_w[:, sl], lo[:, sl], hi[:, sl], buf[..., kk:], t0)
            run_scores, run_idx = _merge(buf, run_idx, t0, kk)
        picks[:, i : i + rows] = run_idx
    return picks


def _picked_blocks(q: torch.Tensor) -> dict:
    """The block sizes shared by the picked-scores kernels."""
    return dict(BLOCK_K=_BLOCK_K, BLOCK_H=_pow2(q.shape[2]), BLOCK_D=_pow2(q.shape[3]), **_dot_args(q))


class _PickedScores(torch.autograd.Function):
    """Scores at the picks by a Triton gather kernel; backward by a Triton kernel (dkeys: fp32 atomics)."""

    @staticmethod
    def forward(ctx, q, keys, head_w, picks):
        B, S, nI, dI = q.shape
        n_pick = picks.shape[-1]
        out = torch.empty(B, S, n_pick, dtype=torch.float32, device=q.device)
        if out.numel():
            grid = (S, triton.cdiv(n_pick, _BLOCK_K), B)
            _picked_fwd_kernel[grid](
                q, keys, head_w, picks, out, n_pick, nI, dI, dI**-0.5,
                *q.stride(), *keys.stride(), *head_w.stride(), *picks.stride(), *out.stride(),
                **_picked_blocks(q),
            )  # fmt: skip
            LAUNCHES["picked_fwd"] += 1
        ctx.save_for_backward(q, keys, head_w, picks)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, keys, head_w, picks = ctx.saved_tensors
        B, S, nI, dI = q.shape
        n_pick = picks.shape[-1]
        grad = grad.float()
        dq = torch.zeros(B, S, nI, dI, dtype=torch.float32, device=q.device)
        dk = torch.zeros(keys.shape, dtype=torch.float32, device=q.device)
        dw = torch.zeros(B, S, nI, dtype=torch.float32, device=q.device)
        if grad.numel():
            _picked_bwd_kernel[(S, B)](
                q, keys, head_w, picks, grad, dq, dk, dw, n_pick, nI, dI, dI**-0.5,
                *q.stride(), *keys.stride(), *head_w.stride(), *picks.stride(), *grad.stride(),
                *dq.stride()[:3], *dk.stride()[:2], *dw.stride()[:2],
                **_picked_blocks(q), num_warps=8,
            )  # fmt: skip
            LAUNCHES["picked_bwd"] += 1
        needs = ctx.needs_input_grad
        return (
            dq.to(q.dtype) if needs[0] else None,
            dk.to(keys.dtype) if needs[1] else None,
            dw.to(head_w.dtype) if needs[2] else None,
            None,
        )


def picked_scores(
    q: torch.Tensor, keys: torch.Tensor, head_w: torch.Tensor, picks: torch.Tensor
) -> torch.Tensor:
    """[B, S, k] fp32 scores at ``picks`` [B, S, k] (-1 = none: -inf, no gradient), differentiable in q, keys,
    head_w; memory [B, S, k], never [B, S, nI, T]."""
    _check(q, keys, head_w)
    B, S = q.shape[:2]
    if picks.dim() != 3 or tuple(picks.shape[:2]) != (B, S):
        raise ConfigError(f"Triton indexer: picks must be [B, S, k] with B, S = {B}, {S}")
    return _PickedScores.apply(q, keys, head_w, picks.long())
