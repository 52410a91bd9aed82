# Over 400 lines: the forward, backward (atomic and deterministic) and entry-probability kernels share
# their index arithmetic and launch helpers, and live beside one autograd Function.
"""DeepSeek-V4 attention as Triton kernels (forward and backward), equal to ``kernels.dense_attention``.

What it computes: MQA (one shared K=V row per key) where query t of head h takes a softmax (scale d**-0.5)
over [window keys | compressed entries | the head's sink logit] and returns sum(p * value). Keys are
described without any [S x S] or [S x T] list:
  * window keys: a key array [B, N, d] and per query a contiguous half-open index range [lo, hi). One rank:
    the keys are kv, hi = t + 1, lo = max(t - W + 1, start of t's document). Under context parallelism
    (``halo``) each local chunk is preceded by its halo in an extended key array built with torch ops
    (autograd carries the keys' gradient back to kv and halo.kv), so every window is again one range and
    halo rows before the sequence's start lie outside it;
  * compressed entries: a range [lo, hi) per query (HCA, CSA's dense warm-up; hidden: empty), optionally
    masked by ``seen`` [B, S, T] (packed documents: the range spans the first to the last entry seen), or
    the CSA picks [B, S, k] (-1 = nothing; a pick duplicated in a row counts once, as in the reference);
  * the sink starts the online softmax (running max = sink, sum = 1), so the saved LSE includes it.

Kernels: one program per (query, batch row, output d-chunk) with all heads in the M dimension of
``tl.dot`` (heads padded to a power of two >= 16 by masked loads); q.k is accumulated in fp32 over d in
chunks of ``D_CHUNK`` and the output in chunks of ``V_CHUNK`` (a program recomputes q.k for its output
chunk: no recompute when d <= V_CHUNK). Backward recomputes P from the saved LSE (D = rowsum(dO * O));
dQ per query, dKeys and dEntries by fp32 ``tl.atomic_add`` or, when torch's deterministic algorithms are on,
by key-centric kernels without atomics (per key block, the queries that may see it form a contiguous range
found by ``torch.searchsorted``; per pick, an inverse index by a stable sort); dSinks in torch.
``entry_probs`` (the indexer's target) is recomputed from the LSE by a small kernel.

Limits: CUDA tensors (or CPU under TRITON_INTERPRET=1, fp32 only there); head_dim a multiple of 16; at most
128 heads; fp32, bf16 or fp16. ``fp32_logits`` changes nothing: q.k always accumulates in fp32 (a bf16 x
bf16 product is exact in fp32). Window keys of a document must be contiguous in the row (documents are
runs of equal ``doc_ids``, as ``Documents`` builds them).
"""

from __future__ import annotations

import collections
import os

import torch

from .errors import ConfigError
from .kernels import CompressedKV
from .sequence_shard import WindowHalo

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - refused by check_triton_attention
    triton = None

LAUNCHES: collections.Counter = collections.Counter()  # kernel name -> launches (tests assert the path ran)
D_CHUNK = 64  # d columns per q.k partial product
V_CHUNK = 128  # output columns per program
BLOCK_N = 32  # keys per inner step
MAX_HEADS = 128

_RANGE, _MASKED, _PICKS = 0, 1, 2  # how entries are described


def check_triton_attention(head_dim: int, n_heads: int, device: torch.device | str) -> None:
    """Refuse, with the fix, what the Triton kernel cannot serve (never fall back to another kernel)."""
    if triton is None:
        raise ConfigError(
            "deepseek_v4.attn_impl='triton' needs the triton package, which is not importable here. Install "
            "triton (it ships with CUDA builds of torch) or use --deepseek_v4.attn_impl sparse."
        )
    if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(
            f"deepseek_v4.attn_impl='triton' runs its kernels on CUDA, and this job's device is "
            f"{torch.device(device).type}: use --deepseek_v4.attn_impl sparse there (or set "
            "TRITON_INTERPRET=1 to run the kernels, slowly and in fp32 only, in Triton's interpreter)."
        )
    if head_dim < 16 or head_dim % 16:
        raise ConfigError(
            f"deepseek_v4.attn_impl='triton' needs head_dim a multiple of 16 (tl.dot tiles), got {head_dim}. "
            "Use a head_dim that is a multiple of 16 or --deepseek_v4.attn_impl sparse."
        )
    if not 1 <= n_heads <= MAX_HEADS:
        raise ConfigError(
            f"deepseek_v4.attn_impl='triton' holds all heads of a query in one tile: at most {MAX_HEADS} "
            f"heads, got {n_heads}. Use --deepseek_v4.attn_impl sparse."
        )


def _chunk(d: int, most: int) -> int:
    """The largest power-of-two chunk <= ``most`` (and >= 16) that divides d."""
    c = most
    while c > 16 and d % c:
        c //= 2
    return min(c, d)


# ---- kernels ----------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _scores(q_base, sq_h, k_base, sk_n, rows, ok, heads, heads_ok, D: tl.constexpr, DC: tl.constexpr):
        """q.k [HP, BN] in fp32 over d in chunks of DC (rows: key indices, ok: which exist)."""
        s = tl.zeros((heads.shape[0], rows.shape[0]), dtype=tl.float32)
        for d0 in tl.static_range(0, D, DC):
            col = d0 + tl.arange(0, DC)
            qc = tl.load(q_base + heads[:, None] * sq_h + col[None, :], mask=heads_ok[:, None], other=0.0)
            kc = tl.load(k_base + rows[:, None] * sk_n + col[None, :], mask=ok[:, None], other=0.0)
            s += tl.dot(qc, tl.trans(kc), input_precision="ieee")
        return s

    @triton.jit
    def _scores2(
        q_base, do_base, sq_h, k_base, sk_n, rows, ok, heads, heads_ok, D: tl.constexpr, DC: tl.constexpr
    ):
        """(q.k, dO.k), both [HP, BN] in fp32, sharing the key loads."""
        s = tl.zeros((heads.shape[0], rows.shape[0]), dtype=tl.float32)
        dp = tl.zeros((heads.shape[0], rows.shape[0]), dtype=tl.float32)
        for d0 in tl.static_range(0, D, DC):
            col = d0 + tl.arange(0, DC)
            hm = heads_ok[:, None]
            qc = tl.load(q_base + heads[:, None] * sq_h + col[None, :], mask=hm, other=0.0)
            dc = tl.load(do_base + heads[:, None] * sq_h + col[None, :], mask=hm, other=0.0)
            kc = tl.trans(tl.load(k_base + rows[:, None] * sk_n + col[None, :], mask=ok[:, None], other=0.0))
            s += tl.dot(qc, kc, input_precision="ieee")
            dp += tl.dot(dc.to(kc.dtype), kc, input_precision="ieee")
        return s, dp

    @triton.jit
    def _fwd_step(q_base, sq_h, k_base, sk_n, rows, ok, heads, heads_ok, vcol, m_i, l_i, acc, scale,
                  D: tl.constexpr, DC: tl.constexpr):  # fmt: skip
        """One online-softmax step over a block of keys."""
        s = _scores(q_base, sq_h, k_base, sk_n, rows, ok, heads, heads_ok, D, DC) * scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        v = tl.load(k_base + rows[:, None] * sk_n + vcol[None, :], mask=ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        return m_new, l_i * alpha + tl.sum(p, 1), acc

    @triton.jit
    def _entry_bounds(ELO, EHI, b, t, sw_b, n_picks, MODE: tl.constexpr):
        """Query t's entry bounds: its picks' slots (MODE 2), or its range of entries."""
        if MODE == 2:
            lo = 0
            hi = n_picks
        else:
            lo = tl.load(ELO + b * sw_b + t)
            hi = tl.load(EHI + b * sw_b + t)
        return lo, hi

    @triton.jit
    def _entry_rows(E_IDX, E_MASK, b, t, se_b, se_s, sm_b, sm_s, sm_t, start, lo, hi,
                    BN: tl.constexpr, MODE: tl.constexpr):  # fmt: skip
        """Entry indices and validity of one block: a range [lo, hi) (masked by ``seen``) or picks."""
        j = start + tl.arange(0, BN)
        if MODE == 2:
            rows = tl.load(E_IDX + b * se_b + t * se_s + j, mask=j < hi, other=-1)
            ok = rows >= 0
            rows = tl.where(ok, rows, 0)
        else:
            rows = j
            ok = j < hi
            if MODE == 1:
                ok = ok & (tl.load(E_MASK + b * sm_b + t * sm_s + j * sm_t, mask=ok, other=0) != 0)
        return rows.to(tl.int64), ok

    @triton.jit
    def _fwd_kernel(Q, K, E, SINKS, WLO, WHI, ELO, EHI, E_IDX, E_MASK, OUT, LSE,
                    sq_b, sq_h, sq_s, sk_b, sk_n, ske_b, ske_n, sw_b, se_b, se_s, sm_b, sm_s, sm_t,
                    so_b, so_h, so_s, sl_b, sl_h, H, n_picks, scale,
                    HAS_ENT: tl.constexpr, MODE: tl.constexpr, D: tl.constexpr, DC: tl.constexpr,
                    DV: tl.constexpr, HP: tl.constexpr, BN: tl.constexpr):  # fmt: skip
        """O and LSE (sink included) of one query, all heads, one output chunk."""
        t = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        c = tl.program_id(2)
        heads = tl.arange(0, HP)
        heads_ok = heads < H
        vcol = c * DV + tl.arange(0, DV)
        q_base = Q + b * sq_b + t * sq_s
        m_i = tl.load(SINKS + heads, mask=heads_ok, other=0.0).to(tl.float32)
        l_i = tl.full((HP,), 1.0, dtype=tl.float32)
        acc = tl.zeros((HP, DV), dtype=tl.float32)
        lo = tl.load(WLO + b * sw_b + t)
        hi = tl.load(WHI + b * sw_b + t)
        k_base = K + b * sk_b
        for start in range(lo, hi, BN):
            rows = (start + tl.arange(0, BN)).to(tl.int64)
            m_i, l_i, acc = _fwd_step(q_base, sq_h, k_base, sk_n, rows, rows < hi, heads, heads_ok, vcol,
                                      m_i, l_i, acc, scale, D, DC)  # fmt: skip
        if HAS_ENT:
            e_base = E + b * ske_b
            lo, hi = _entry_bounds(ELO, EHI, b, t, sw_b, n_picks, MODE)
            for start in range(lo, hi, BN):
                rows, ok = _entry_rows(E_IDX, E_MASK, b, t, se_b, se_s, sm_b, sm_s, sm_t, start, lo, hi,
                                       BN, MODE)  # fmt: skip
                m_i, l_i, acc = _fwd_step(q_base, sq_h, e_base, ske_n, rows, ok, heads, heads_ok, vcol,
                                          m_i, l_i, acc, scale, D, DC)  # fmt: skip
        out = acc / l_i[:, None]
        o_ptr = OUT + b * so_b + t * so_s + heads[:, None] * so_h + vcol[None, :]
        tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=heads_ok[:, None])
        if c == 0:
            tl.store(LSE + b * sl_b + heads * sl_h + t, m_i + tl.log(l_i), mask=heads_ok)

    @triton.jit
    def _bwd_step(q_base, do_base, sq_h, k_base, sk_n, rows, ok, heads, heads_ok, vcol, lse, delta, scale,
                  D: tl.constexpr, DC: tl.constexpr):  # fmt: skip
        """Recomputed P and dS (gradient of the scaled logits) of one query against a block of keys."""
        s, dp = _scores2(q_base, do_base, sq_h, k_base, sk_n, rows, ok, heads, heads_ok, D, DC)
        live = heads_ok[:, None] & ok[None, :]
        p = tl.where(live, tl.exp(s * scale - lse[:, None]), 0.0)
        return p, p * (dp - delta[:, None])

    @triton.jit
    def _bwd_block(q_base, do_base, sq_h, k_base, sk_n, DK, sdk_n, rows, ok, heads, heads_ok, vcol, lse,
                   delta, dq, scale, ATOMIC: tl.constexpr, D: tl.constexpr, DC: tl.constexpr):  # fmt: skip
        """dQ step of one query against a block of keys; dKeys by atomics when ATOMIC."""
        p, ds = _bwd_step(q_base, do_base, sq_h, k_base, sk_n, rows, ok, heads, heads_ok, vcol, lse, delta,
                          scale, D, DC)  # fmt: skip
        v = tl.load(k_base + rows[:, None] * sk_n + vcol[None, :], mask=ok[:, None], other=0.0)
        dq += tl.dot(ds.to(v.dtype), v, input_precision="ieee")
        if ATOMIC:
            qc = tl.load(q_base + heads[:, None] * sq_h + vcol[None, :], mask=heads_ok[:, None], other=0.0)
            dc = tl.load(do_base + heads[:, None] * sq_h + vcol[None, :], mask=heads_ok[:, None], other=0.0)
            dk = tl.dot(tl.trans(ds * scale).to(qc.dtype), qc, input_precision="ieee")
            dk += tl.dot(tl.trans(p).to(dc.dtype), dc.to(qc.dtype), input_precision="ieee")
            tl.atomic_add(DK + rows[:, None] * sdk_n + vcol[None, :], dk, mask=ok[:, None])
        return dq

    @triton.jit
    def _bwd_query_kernel(Q, DO, K, E, LSE, DELTA, WLO, WHI, ELO, EHI, E_IDX, E_MASK, DQ, DK, DE,
                          sq_b, sq_h, sq_s, sk_b, sk_n, ske_b, ske_n, sw_b, se_b, se_s, sm_b, sm_s, sm_t,
                          sl_b, sl_h, H, n_picks, scale,
                          HAS_ENT: tl.constexpr, MODE: tl.constexpr, ATOMIC: tl.constexpr,
                          D: tl.constexpr, DC: tl.constexpr, DV: tl.constexpr, HP: tl.constexpr,
                          BN: tl.constexpr):  # fmt: skip
        """dQ of one query (all heads, one d-chunk); dKeys and dEntries by atomics when ATOMIC."""
        t = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        c = tl.program_id(2)
        heads = tl.arange(0, HP)
        heads_ok = heads < H
        vcol = c * DV + tl.arange(0, DV)
        q_base = Q + b * sq_b + t * sq_s
        do_base = DO + b * sq_b + t * sq_s
        lse = tl.load(LSE + b * sl_b + heads * sl_h + t, mask=heads_ok, other=0.0)
        delta = tl.load(DELTA + b * sl_b + heads * sl_h + t, mask=heads_ok, other=0.0)
        dq = tl.zeros((HP, DV), dtype=tl.float32)
        lo = tl.load(WLO + b * sw_b + t)
        hi = tl.load(WHI + b * sw_b + t)
        k_base = K + b * sk_b
        dk_base = DK + b * sk_b
        for start in range(lo, hi, BN):
            rows = (start + tl.arange(0, BN)).to(tl.int64)
            dq = _bwd_block(q_base, do_base, sq_h, k_base, sk_n, dk_base, sk_n, rows, rows < hi, heads,
                            heads_ok, vcol, lse, delta, dq, scale, ATOMIC, D, DC)  # fmt: skip
        if HAS_ENT:
            e_base = E + b * ske_b
            de_base = DE + b * ske_b
            lo, hi = _entry_bounds(ELO, EHI, b, t, sw_b, n_picks, MODE)
            for start in range(lo, hi, BN):
                rows, ok = _entry_rows(E_IDX, E_MASK, b, t, se_b, se_s, sm_b, sm_s, sm_t, start, lo, hi,
                                       BN, MODE)  # fmt: skip
                dq = _bwd_block(q_base, do_base, sq_h, e_base, ske_n, de_base, ske_n, rows, ok, heads,
                                heads_ok, vcol, lse, delta, dq, scale, ATOMIC, D, DC)  # fmt: skip
        dq_ptr = DQ + b * sq_b + t * sq_s + heads[:, None] * sq_h + vcol[None, :]
        tl.store(dq_ptr, (dq * scale).to(DQ.dtype.element_ty), mask=heads_ok[:, None])

    @triton.jit
    def _bwd_keys_kernel(Q, DO, K, LSE, DELTA, LO, HI, TLO, THI, E_MASK, DK,
                         sq_b, sq_h, sq_s, sk_b, sk_n, sw_b, st_b, sm_b, sm_s, sm_t, sl_b, sl_h, H, N, scale,
                         MASKED: tl.constexpr, D: tl.constexpr, DC: tl.constexpr, DV: tl.constexpr,
                         HP: tl.constexpr, BN: tl.constexpr):  # fmt: skip
        """Deterministic dKeys of one block of range-described keys: loop over the queries that may see it."""
        kb = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        c = tl.program_id(2)
        heads = tl.arange(0, HP)
        heads_ok = heads < H
        vcol = c * DV + tl.arange(0, DV)
        rows = kb * BN + tl.arange(0, BN)
        rows_ok = rows < N
        k_base = K + b * sk_b
        dk = tl.zeros((BN, DV), dtype=tl.float32)
        for tq in range(tl.load(TLO + b * st_b + kb), tl.load(THI + b * st_b + kb)):
            t = tq
            lo = tl.load(LO + b * sw_b + t)
            hi = tl.load(HI + b * sw_b + t)
            ok = rows_ok & (rows >= lo) & (rows < hi)
            if MASKED:
                ok = ok & (tl.load(E_MASK + b * sm_b + t * sm_s + rows * sm_t, mask=ok, other=0) != 0)
            q_base = Q + b * sq_b + t * sq_s
            do_base = DO + b * sq_b + t * sq_s
            lse = tl.load(LSE + b * sl_b + heads * sl_h + t, mask=heads_ok, other=0.0)
            delta = tl.load(DELTA + b * sl_b + heads * sl_h + t, mask=heads_ok, other=0.0)
            p, ds = _bwd_step(q_base, do_base, sq_h, k_base, sk_n, rows, ok, heads, heads_ok, vcol, lse,
                              delta, scale, D, DC)  # fmt: skip
            qc = tl.load(q_base + heads[:, None] * sq_h + vcol[None, :], mask=heads_ok[:, None], other=0.0)
            dc = tl.load(do_base + heads[:, None] * sq_h + vcol[None, :], mask=heads_ok[:, None], other=0.0)
            dk += tl.dot(tl.trans(ds * scale).to(qc.dtype), qc, input_precision="ieee")
            dk += tl.dot(tl.trans(p).to(dc.dtype), dc.to(qc.dtype), input_precision="ieee")
        tl.store(DK + b * sk_b + rows[:, None] * sk_n + vcol[None, :], dk, mask=rows_ok[:, None])

    @triton.jit
    def _bwd_picks_kernel(Q, DO, E, LSE, DELTA, ORDER, START, END, DE,
                          sq_b, sq_h, sq_s, ske_b, ske_n, so_b, sst_b, sl_b, sl_h, H, n_picks, scale,
                          D: tl.constexpr, DC: tl.constexpr, DV: tl.constexpr, HP: tl.constexpr):  # fmt: skip
        """Deterministic dEntries of one picked entry: loop over the (query, slot) pairs that picked it."""
        w = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        c = tl.program_id(2)
        heads = tl.arange(0, HP)
        heads_ok = heads < H
        hm = heads_ok[:, None]
        vcol = c * DV + tl.arange(0, DV)
        e_base = E + b * ske_b + w * ske_n
        de = tl.zeros((DV,), dtype=tl.float32)
        for i in range(tl.load(START + b * sst_b + w), tl.load(END + b * sst_b + w)):
            t = (tl.load(ORDER + b * so_b + i) // n_picks).to(tl.int64)
            q_base = Q + b * sq_b + t * sq_s
            do_base = DO + b * sq_b + t * sq_s
            s = tl.zeros((HP,), dtype=tl.float32)
            dp = tl.zeros((HP,), dtype=tl.float32)
            for d0 in tl.static_range(0, D, DC):
                col = d0 + tl.arange(0, DC)
                e = tl.load(e_base + col).to(tl.float32)
                qc = tl.load(q_base + heads[:, None] * sq_h + col[None, :], mask=hm, other=0.0)
                dc = tl.load(do_base + heads[:, None] * sq_h + col[None, :], mask=hm, other=0.0)
                s += tl.sum(qc.to(tl.float32) * e[None, :], 1)
                dp += tl.sum(dc.to(tl.float32) * e[None, :], 1)
            lse = tl.load(LSE + b * sl_b + heads * sl_h + t, mask=heads_ok, other=0.0)
            delta = tl.load(DELTA + b * sl_b + heads * sl_h + t, mask=heads_ok, other=0.0)
            p = tl.where(heads_ok, tl.exp(s * scale - lse), 0.0)
            ds = p * (dp - delta) * scale
            qc = tl.load(q_base + heads[:, None] * sq_h + vcol[None, :], mask=hm, other=0.0).to(tl.float32)
            dc = tl.load(do_base + heads[:, None] * sq_h + vcol[None, :], mask=hm, other=0.0).to(tl.float32)
            de += tl.sum(ds[:, None] * qc + p[:, None] * dc, 0)
        tl.store(DE + b * ske_b + w * ske_n + vcol, de)

    @triton.jit
    def _entry_probs_kernel(Q, E, LSE, ELO, EHI, E_IDX, E_MASK, P,
                            sq_b, sq_h, sq_s, ske_b, ske_n, sw_b, se_b, se_s, sm_b, sm_s, sm_t, sp_b, sp_s,
                            sl_b, sl_h, H, n_picks, scale, MODE: tl.constexpr, D: tl.constexpr,
                            DC: tl.constexpr, HP: tl.constexpr, BN: tl.constexpr):  # fmt: skip
        """Probability one query gives each entry it sees, summed over heads (picks order, or by index)."""
        t = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        heads = tl.arange(0, HP)
        heads_ok = heads < H
        q_base = Q + b * sq_b + t * sq_s
        lse = tl.load(LSE + b * sl_b + heads * sl_h + t, mask=heads_ok, other=0.0)
        lo, hi = _entry_bounds(ELO, EHI, b, t, sw_b, n_picks, MODE)
        for start in range(lo, hi, BN):
            rows, ok = _entry_rows(E_IDX, E_MASK, b, t, se_b, se_s, sm_b, sm_s, sm_t, start, lo, hi, BN, MODE)
            s = _scores(q_base, sq_h, E + b * ske_b, ske_n, rows, ok, heads, heads_ok, D, DC)
            live = heads_ok[:, None] & ok[None, :]
            p = tl.sum(tl.where(live, tl.exp(s * scale - lse[:, None]), 0.0), 0)
            j = start + tl.arange(0, BN)
            if MODE == 2:
                tl.store(P + b * sp_b + t * sp_s + j, p, mask=j < hi)
            else:
                tl.store(P + b * sp_b + t * sp_s + rows, p, mask=j < hi)


# ---- index ranges (torch, on the device, no host synchronisation) -----------------------------------------
def _run_starts(seg: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
    """[B, N]: where each element's run of equal ``seg`` starts (``first``: forced run starts)."""
    idx = torch.arange(seg.shape[1], device=seg.device)
    boundary = torch.ones_like(seg, dtype=torch.bool)
    boundary[:, 1:] = seg[:, 1:] != seg[:, :-1]
    if first is not None:
        boundary = boundary | first
    return torch.cummax(torch.where(boundary, idx, 0), dim=1).values


def window_ranges(kv: torch.Tensor, window: int, doc_ids: torch.Tensor | None, halo: WindowHalo | None):
    """(keys [B, N, d], lo [B, S], hi [B, S]): each query's window keys as a half-open index range."""
    B, S, d = kv.shape
    dev = kv.device
    if halo is None:
        t = torch.arange(S, device=dev)
        hi = (t + 1).expand(B, S)
        lo = (t - window + 1).clamp(min=0).expand(B, S)
        if doc_ids is not None:
            lo = torch.maximum(lo, _run_starts(doc_ids))
        return kv, lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()
    n_local, Wh = halo.key_pos.shape
    C = S // n_local
    keys = torch.cat([halo.kv.to(kv.dtype), kv.view(B, n_local, C, d)], dim=2).reshape(B, -1, d)
    if doc_ids is None:
        seg = torch.zeros(B, n_local, Wh + C, dtype=torch.long, device=dev)
    else:
        seg = torch.cat([halo.key_docs.long(), doc_ids.view(B, n_local, C).long()], dim=2)
    seg[:, :, :Wh] = torch.where(halo.key_pos[None] >= 0, seg[:, :, :Wh], -3)  # before the sequence
    first = torch.zeros(n_local, Wh + C, dtype=torch.bool, device=dev)
    first[:, 0] = True
    starts = _run_starts(seg.view(B, -1), first.view(1, -1))
    t = torch.arange(S, device=dev)
    ext = (t // C) * (Wh + C) + Wh + t % C  # each query's index in the extended keys
    lo = torch.maximum(ext - window + 1, starts[:, ext])
    return keys, lo.to(torch.int32).contiguous(), (ext + 1).to(torch.int32).expand(B, S).contiguous()


def dedup_picks(picked: torch.Tensor) -> torch.Tensor:
    """Picks with a row's repeated entries set to -1 (the reference counts a picked entry once)."""
    values, order = picked.sort(dim=-1, stable=True)
    repeat = torch.zeros_like(values, dtype=torch.bool)
    repeat[..., 1:] = (values[..., 1:] == values[..., :-1]) & (values[..., 1:] >= 0)
    repeat = repeat.gather(-1, order.argsort(dim=-1))  # back to the picks' order (no scatter)
    return torch.where(repeat, -1, picked).to(torch.int32).contiguous()


def entry_ranges(compressed: CompressedKV, B: int, S: int):
    """(mode, lo, hi, mask, picks) describing the entries each query sees (see the module docstring)."""
    T = compressed.entries.shape[1]
    dev = compressed.entries.device
    if compressed.picked is not None:
        return _PICKS, None, None, None, dedup_picks(compressed.picked)
    if compressed.hidden:
        zero = torch.zeros(B, S, dtype=torch.int32, device=dev)
        return _RANGE, zero, zero, None, None
    if compressed.seen is not None:
        seen = compressed.seen
        idx = torch.arange(T, device=dev, dtype=torch.int32)
        lo = torch.where(seen, idx, T).amin(-1) if T else torch.zeros(B, S, device=dev, dtype=torch.int32)
        hi = torch.where(seen, idx + 1, 0).amax(-1) if T else lo
        return _MASKED, lo.to(torch.int32), hi.to(torch.int32), seen.to(torch.uint8), None
    t = torch.arange(S, device=dev) if compressed.query_pos is None else compressed.query_pos
    hi = ((t + 1) // compressed.ratio).clamp(max=T).to(torch.int32).expand(B, S).contiguous()
    return _RANGE, torch.zeros_like(hi), hi, None, None


def _queries_of_key_blocks(lo: torch.Tensor, hi: torch.Tensor, n_keys: int, block: int):
    """[B, n_blocks] (first, end) of the queries that may see each key block: a contiguous superset (exact
    when the ranges are monotone in t) found by searchsorted on the running max of hi / min of lo."""
    empty = lo >= hi
    hi_max = torch.cummax(torch.where(empty, 0, hi), dim=1).values.contiguous()
    lo_min = torch.where(empty, torch.iinfo(torch.int32).max, lo).flip(1)
    lo_min = torch.cummin(lo_min, dim=1).values.flip(1).contiguous()
    k0 = torch.arange(0, n_keys, block, device=lo.device, dtype=torch.int32).expand(lo.shape[0], -1)
    first = torch.searchsorted(hi_max, k0.contiguous(), side="right")
    end = torch.searchsorted(lo_min, (k0 + block).contiguous(), side="left")
    return first.to(torch.int32).contiguous(), torch.maximum(first, end).to(torch.int32).contiguous()


# ---- autograd ---------------------------------------------------------------------------------------------
def _meta(q: torch.Tensor) -> dict:
    """Tile sizes for this head_dim / head count."""
    d = q.shape[-1]
    return dict(
        D=d, DC=_chunk(d, D_CHUNK), DV=_chunk(d, V_CHUNK), HP=max(16, triton.next_power_of_2(q.shape[1]))
    )


def _entry_args(mode, e_lo, e_hi, e_mask, picks, w_lo):
    """Pointers and strides of the entry description (unused ones point at the window ranges)."""
    lo = e_lo if e_lo is not None else w_lo
    hi = e_hi if e_hi is not None else w_lo
    idx = picks if picks is not None else w_lo.view(w_lo.shape[0], w_lo.shape[1], 1)
    mask = e_mask if e_mask is not None else w_lo.view(w_lo.shape[0], w_lo.shape[1], 1)
    strides = (idx.stride(0), idx.stride(1), mask.stride(0), mask.stride(1), mask.stride(2))
    return lo, hi, idx, mask, strides, (picks.shape[-1] if picks is not None else 0)


class _TritonAttention(torch.autograd.Function):
    """O = attention(q, keys, entries, sinks) over index ranges / picks; also returns the LSE."""

    @staticmethod
    def forward(ctx, q, keys, entries, sinks, w_lo, w_hi, mode, e_lo, e_hi, e_mask, picks):
        B, H, S, d = q.shape
        meta = _meta(q)
        has_ent = entries is not None
        ent = entries if has_ent else keys
        out = torch.empty_like(q)
        lse = torch.empty(B, H, S, device=q.device, dtype=torch.float32)
        lo, hi, idx, mask, es, n_picks = _entry_args(mode, e_lo, e_hi, e_mask, picks, w_lo)
        grid = (S, B, d // meta["DV"])
        _fwd_kernel[grid](
            q, keys, ent, sinks, w_lo, w_hi, lo, hi, idx, mask, out, lse,
            q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), ent.stride(0),
            ent.stride(1), w_lo.stride(0), *es, out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1), H, n_picks, d**-0.5,
            HAS_ENT=has_ent, MODE=mode, BN=BLOCK_N, **meta,
        )  # fmt: skip
        LAUNCHES["forward"] += 1
        ctx.mode = mode
        ctx.save_for_backward(q, keys, entries, sinks, w_lo, w_hi, e_lo, e_hi, e_mask, picks, out, lse)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, _d_lse):
        q, keys, entries, sinks, w_lo, w_hi, e_lo, e_hi, e_mask, picks, out, lse = ctx.saved_tensors
        mode = ctx.mode
        B, H, S, d = q.shape
        meta = _meta(q)
        d_out = d_out.contiguous()
        delta = (d_out.float() * out.float()).sum(-1).contiguous()  # [B, H, S]
        d_sinks = -(torch.exp(sinks.float()[None, :, None] - lse) * delta).sum((0, 2)).to(sinks.dtype)
        has_ent = entries is not None
        ent = entries if has_ent else keys
        atomic = not torch.are_deterministic_algorithms_enabled()
        dq = torch.empty_like(q)
        dk = torch.zeros(keys.shape, device=q.device, dtype=torch.float32)
        de = torch.zeros(ent.shape, device=q.device, dtype=torch.float32) if has_ent else dk
        lo, hi, idx, mask, es, n_picks = _entry_args(mode, e_lo, e_hi, e_mask, picks, w_lo)
        scale = d**-0.5
        _bwd_query_kernel[(S, B, d // meta["DV"])](
            q, d_out, keys, ent, lse, delta, w_lo, w_hi, lo, hi, idx, mask, dq, dk, de,
            q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), ent.stride(0),
            ent.stride(1), w_lo.stride(0), *es, lse.stride(0), lse.stride(1), H, n_picks, scale,
            HAS_ENT=has_ent, MODE=mode, ATOMIC=atomic, BN=BLOCK_N, **meta,
        )  # fmt: skip
        LAUNCHES["backward"] += 1
        if not atomic:
            _keys_grad(q, d_out, keys, lse, delta, w_lo, w_hi, None, dk, meta)
            if has_ent and mode == _PICKS:
                _picks_grad(q, d_out, entries, lse, delta, picks, de, meta)
            elif has_ent:
                _keys_grad(q, d_out, entries, lse, delta, e_lo, e_hi, e_mask, de, meta)
        d_ent = de.to(entries.dtype) if has_ent else None
        return dq, dk.to(keys.dtype), d_ent, d_sinks, None, None, None, None, None, None, None


def _keys_grad(q, d_out, keys, lse, delta, lo, hi, mask, dk, meta) -> None:
    """Deterministic dKeys of range-described keys into ``dk`` (fp32)."""
    B, H, S, d = q.shape
    N = keys.shape[1]
    if N == 0:
        return
    t_lo, t_hi = _queries_of_key_blocks(lo, hi, N, BLOCK_N)
    m = mask if mask is not None else lo.view(B, S, 1)
    _bwd_keys_kernel[(t_lo.shape[1], B, d // meta["DV"])](
        q, d_out, keys, lse, delta, lo, hi, t_lo, t_hi, m, dk,
        q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), lo.stride(0),
        t_lo.stride(0), m.stride(0), m.stride(1), m.stride(2), lse.stride(0), lse.stride(1), H, N, d**-0.5,
        MASKED=mask is not None, BN=BLOCK_N, **meta,
    )  # fmt: skip
    LAUNCHES["backward_keys"] += 1


def _picks_grad(q, d_out, entries, lse, delta, picks, de, meta) -> None:
    """Deterministic dEntries of picked entries into ``de`` (fp32), by an inverse index of the picks."""
    B, H, S, d = q.shape
    T = entries.shape[1]
    if T == 0:
        return
    values, order = picks.view(B, -1).sort(dim=1, stable=True)
    w = torch.arange(T, device=q.device, dtype=values.dtype).expand(B, T).contiguous()
    start = torch.searchsorted(values, w, side="left").to(torch.int32).contiguous()
    end = torch.searchsorted(values, w, side="right").to(torch.int32).contiguous()
    order = order.to(torch.int32).contiguous()
    _bwd_picks_kernel[(T, B, d // meta["DV"])](
        q, d_out, entries, lse, delta, order, start, end, de,
        q.stride(0), q.stride(1), q.stride(2), entries.stride(0), entries.stride(1), order.stride(0),
        start.stride(0), lse.stride(0), lse.stride(1), H, picks.shape[-1], d**-0.5,
        D=meta["D"], DC=meta["DC"], DV=meta["DV"], HP=meta["HP"],
    )  # fmt: skip
    LAUNCHES["backward_picks"] += 1


def _entry_probs(q, entries, lse, mode, e_lo, e_hi, e_mask, picks, w_lo) -> torch.Tensor:
    """[B, S, k] (picks order) or [B, S, T]: the entries' probabilities summed over heads, fp32, detached."""
    B, H, S, d = q.shape
    meta = _meta(q)
    n = picks.shape[-1] if mode == _PICKS else entries.shape[1]
    p = torch.zeros(B, S, n, device=q.device, dtype=torch.float32)
    if n == 0:
        return p
    lo, hi, idx, mask, es, n_picks = _entry_args(mode, e_lo, e_hi, e_mask, picks, w_lo)
    _entry_probs_kernel[(S, B)](
        q, entries, lse, lo, hi, idx, mask, p,
        q.stride(0), q.stride(1), q.stride(2), entries.stride(0), entries.stride(1), w_lo.stride(0), *es,
        p.stride(0), p.stride(1), lse.stride(0), lse.stride(1), H, n_picks, d**-0.5,
        MODE=mode, D=meta["D"], DC=meta["DC"], HP=meta["HP"], BN=BLOCK_N,
    )  # fmt: skip
    LAUNCHES["entry_probs"] += 1
    return p


def triton_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    sinks: torch.Tensor,
    window: int,
    compressed: CompressedKV | None,
    doc_ids: torch.Tensor | None = None,
    fp32_logits: bool = False,
    entry_probs: bool = False,
    halo: WindowHalo | None = None,
):
    """``dense_attention``'s result (same signature and shapes) by the Triton kernels above."""
    B, H, S, d = q.shape
    check_triton_attention(d, H, q.device)
    q = q.contiguous()
    keys, w_lo, w_hi = window_ranges(kv, window, doc_ids, halo)
    keys = keys.contiguous()
    entries, mode, e_lo, e_hi, e_mask, picks = None, _RANGE, None, None, None, None
    if compressed is not None:
        entries = compressed.entries.to(kv.dtype).contiguous()
        mode, e_lo, e_hi, e_mask, picks = entry_ranges(compressed, B, S)
    out, lse = _TritonAttention.apply(
        q, keys, entries, sinks.contiguous(), w_lo, w_hi, mode, e_lo, e_hi, e_mask, picks
    )
    if not entry_probs:
        return out
    if compressed is None:
        return out, torch.zeros(B, S, 0, device=q.device, dtype=torch.float32)
    probs_picks = compressed.picked.to(torch.int32).contiguous() if mode == _PICKS else None
    with torch.no_grad():
        p = _entry_probs(q, entries, lse, mode, e_lo, e_hi, e_mask, probs_picks, w_lo)
    return out, p
