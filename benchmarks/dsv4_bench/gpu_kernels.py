"""Section "kernels" of ``benchmarks/gpu.py``: the Triton attention and Lightning Indexer kernels on one GPU.

Every figure is printed and written to the results file (section ``kernels``) as soon as it is measured.
The section runs under one time cap (``Deadline``; 225 s on a GPU), split into parts that each get a share
of it; the parts before the training run leave it its slot (60 s). A point whose predicted time passes its
part's cap is recorded as skipped, as is everything after an out-of-memory or error in its series.

Parts (``--kernel_parts``; all by default on a GPU, all but ``training`` in smoke mode), in the order they
run:
  * ``triton``: ``triton_attention`` at Flash attention dims (64 heads x 512, window 128, CSA top-k 512,
    ratios 4 / 128), S = 4K, 16K, 64K (ascending, so that a cap leaves every kind at the shorter lengths),
    kinds CSA (random picks among each query's visible entries: ``gpu_attention.causal_picks``), HCA
    (every entry whose window has ended) and window-only; forward alone (under ``no_grad``) and
    forward+backward. Inputs bf16 on the device, as ``gpu_attention.kernel_step`` builds them (q [1, H, S,
    d], one K=V row [1, S, d], fp32 sinks). Pro dims (128 heads x 512, top-k 1024) run after ``indexer``;
  * ``fp32``: ``fp32_logits=True`` against False on the Triton kernel, fwd+bwd at Flash dims, the first S,
    one point per kind (the kernel always accumulates q.k in fp32: the ratio should be 1); and, per kind,
    the largest |triton - sparse| of the forward outputs (a check that the timed kernels agree);
  * ``indexer``: ``triton_indexer.topk_picks`` (scoring + top-k) on the long-context shard: 4K queries at
    global positions [S_total - 4096, S_total) against T = 256K entries (S_total = 4 T = 1M tokens; Flash's
    index heads 64 x 128, top-k 512, the model's 2**24-score budget); ``picked_scores`` forward and
    fwd+bwd at that shard's picks; then ``topk_picks`` and ``Indexer.pick`` (the PyTorch path) at T = 64K,
    with how often their picks agree;
  * ``sparse``: the PyTorch ``sparse_attention`` path on the same points as ``triton`` (both dims; out of
    memory is a result, and skips the longer lengths);
  * ``training``: one training run through TorchTitan's Trainer (``gpu_training.run``) of a Flash-width
    model with ``--deepseek_v4.attn_impl triton``: Flash's dim, heads, head_dim, window, index heads and
    top-k, 4 layers (sliding, CSA, HCA, CSA), 8 routed experts (top-2), the debug tokenizer's 2048-token
    vocabulary, no MTP; seq_len 4096 x batch 2. The shape is passed as ``--model.flavor hf:<dir>`` (the
    package's own flavor mechanism for a checkpoint's config.json, written here by
    ``hf_config_from_args``), so no flavor table is edited. It runs in TorchTitan's one-GPU mode
    (``--model.name deepseek_v4``: fp32 parameters under bf16 autocast): under FSDP2's bf16 parameters the
    indexer's fp32 islands (wkv, wgate) hand the Triton indexer fp32 keys against bf16 queries, which it
    refuses. Its record (tokens/s, MFU, peak memory) goes to the ``training`` section as the other runs',
    and is copied here;
  * ``flex`` (last: a compile cannot be cut short, so a point starts only with 30 s left): FlexAttention
    (``torch.compile(flex_attention)``, a ``create_block_mask`` block mask) at Flash dims for window-only
    and HCA only. The sink is folded in as one extra key with a zero value whose logit ``score_mod``
    replaces by the head's sink (so it joins the softmax's denominator and adds nothing to the output:
    exactly the reference's [logits | sink] softmax; checked against ``sparse_attention`` at the first S);
    the compressed entries are keys after the S window keys, visible by the causal rule
    ``(w + 1) * ratio <= t + 1``. CSA is left out: each query sees its own k picked entries, which a block
    mask (a [q-block x kv-block] pattern shared by a block's queries) can only express as every entry any
    query of the block picked, masked per query by an [S, T] lookup in ``mask_mod``: a different, much
    larger computation than the kernel it would be compared with. head_dim 512 needs small Triton blocks
    in Flex: ``FLEX_OPTIONS`` are tried in order when a compile runs out of shared memory.

Useful FLOPs (counted analytically; padding, recomputation, masked-out keys and the sink excluded):
  * attention forward = 4 * H * d * (sum over queries of the keys each sees: its window keys, min(t + 1, W),
    plus its visible entries: HCA min(T, (t + 1) // ratio), CSA its valid picks): 2 for q.k, 2 for p.v;
    backward = 2.5 x forward (FlashAttention's convention: 5 matmuls against 2), so fwd+bwd = 3.5 x forward;
  * indexer scoring = 2 * nI * dI * (sum over queries of the entries visible by the causal rule at the
    queries' global positions); top-k selection is not counted;
  * picked_scores forward = 2 * nI * dI per valid pick; backward = 3 x forward (q.k recomputed for the
    ReLU mask and dW, dq, dkeys), fwd+bwd = 4 x forward.
Useful TFLOP/s = useful FLOPs / median time; printed as a percentage of the same run's measured bf16 matmul
rate (the ``matmul`` section) and of the datasheet's. Targets beside the Triton CSA figures: forward >= 50%
and fwd+bwd >= 30% of the measured matmul rate. Memory: the allocator's peak above what was allocated
before the call (``peak_during``; the inputs are allocated before), as a ratio of measured (inputs + that
peak) to expected (inputs + outputs + LSE [fp32, B x H x S], plus for fwd+bwd the inputs' gradients);
target <= 1.10.

Smoke mode (CPU): the same code at tiny sizes in Triton's interpreter (``TRITON_INTERPRET=1``, which
``gpu.py`` sets before triton is imported), fp32 (the interpreter has no bf16), Flex uncompiled and forward
only (Flex has no CPU backward); no timings worth reading, only that every path runs.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable

import torch

from .gpu_common import Deadline, is_oom, peak_during, release, say, summary, sync, time_call, time_reps

SECTION = "kernels"
PARTS = ("triton", "fp32", "indexer", "sparse", "flex", "training")
KINDS = ("csa", "hca", "window")
MODES = ("fwd", "fwd_bwd")
BWD_OVER_FWD = 2.5  # FlashAttention's convention: backward = 2.5 x forward matmul FLOPs
PICKED_BWD_OVER_FWD = 3.0  # picked_scores: q.k recomputed, dq, dkeys
TARGET_PCT = {("csa", "fwd"): 50.0, ("csa", "fwd_bwd"): 30.0}  # Triton CSA, % of the measured matmul rate
MEMORY_TARGET = 1.10

# Tiny attention / indexer dims for the CPU smoke run (head_dim a multiple of 16 for the Triton kernel).
SMOKE_DIMS = dict(heads=4, head_dim=32, window=8, topk=8, csa_ratio=4, hca_ratio=16)
SMOKE_INDEX = dict(heads=4, head_dim=16, topk=8, ratio=4)

# Flex's Triton blocks for head_dim 512 (its default for head_dim > 256 is 64 x 32 with 3 stages forward,
# 16 x 16 backward): tried in order until one compiles. 64 x 32 with 2 stages keeps Q (64 KiB) and two
# stages of K and V (128 KiB) in shared memory; 8 warps for the 64 x 512 fp32 accumulator.
FLEX_OPTIONS = [
    {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 32, "fwd_num_stages": 2, "fwd_num_warps": 8},
    {"fwd_BLOCK_M": 32, "fwd_BLOCK_N": 32, "fwd_num_stages": 1, "fwd_num_warps": 4},
]


# ---- plan -------------------------------------------------------------------------------------------------
def plan(smoke: bool) -> dict:
    """Sizes, repetitions and the parts' shares of the section cap (seconds)."""
    if smoke:
        return dict(
            dims=[("smoke", SMOKE_DIMS)],
            lengths=[16],
            flex_lengths=[16],
            index=dict(S=16, T_long=256, T_torch=128, **SMOKE_INDEX),
            reps=1,
            min_reps=1,
            point_budget=0.5,
            shares=dict(triton_flash=10, triton_rest=0, fp32=8, indexer=6, sparse=4, flex=4),
            margin=0.5,
            flex_compile_s=0.0,
            training=dict(
                model_name="deepseek_v4", seq_len=128, batch=1, steps=3, warmup=1, min_s=25.0, cap_s=40.0
            ),
        )
    from titan_dsv4.flavors import deepseek_v4_args

    from .gpu_attention import flavor_dims

    flash = deepseek_v4_args["flash"]
    return dict(
        dims=[("flash", flavor_dims("flash")), ("pro", flavor_dims("pro"))],
        lengths=[4096, 16384, 65536],
        flex_lengths=[4096, 16384, 65536],
        index=dict(
            S=4096,
            T_long=262144,
            T_torch=65536,
            heads=flash.index_n_heads,
            head_dim=flash.index_head_dim,
            topk=flash.index_topk,
            ratio=flash.csa_ratio,
        ),
        reps=10,
        min_reps=2,
        point_budget=1.0,
        shares=dict(triton_flash=45, triton_rest=30, fp32=10, indexer=20, sparse=25, flex=45),
        margin=5.0,  # seconds a part keeps in hand before starting a long point
        flex_compile_s=30.0,  # each Flex shape and grad mode compiles anew (static shapes)
        training=dict(
            model_name="deepseek_v4", seq_len=4096, batch=2, steps=8, warmup=3, min_s=60.0, cap_s=90.0
        ),
    )


class Ctx:
    """What every part needs: the results file, the device, the rates figures are compared with."""

    def __init__(self, results, device, matmul_tflops, datasheet_tflops, cfg, log_path):
        self.results = results
        self.device = device
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.matmul_tflops = matmul_tflops
        self.datasheet_tflops = datasheet_tflops
        self.cfg = cfg
        self.log_path = log_path

    def add(self, record: dict) -> None:
        self.results.add(SECTION, record)

    def rates(self, flops: float, median_ms: float) -> dict:
        tflops = flops / (median_ms / 1e3) / 1e12
        out = {"useful_tflops": tflops, "pct_of_datasheet": 100 * tflops / self.datasheet_tflops}
        if self.matmul_tflops:
            out["pct_of_matmul"] = 100 * tflops / self.matmul_tflops
        return out

    def rate_text(self, r: dict) -> str:
        text = f"{r['useful_tflops']:.1f} useful TFLOP/s"
        if "pct_of_matmul" in r:
            text += f" = {r['pct_of_matmul']:.1f}% of the measured matmul"
        return text + f" ({r['pct_of_datasheet']:.1f}% of datasheet)"


def _mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f} MiB"


def _timing_text(r: dict) -> str:
    return f"{r['median_ms']:.3f} ms [{r['min_ms']:.3f}-{r['max_ms']:.3f}] x{r['reps']}"


def measure(ctx: Ctx, step: Callable[[], object], budget_s: float | None = None) -> dict:
    """On a GPU: a first call (compiles; its time is kept), the allocator's peak of a second call, then the
    timed calls. On the CPU (the smoke run: no compile, no memory figures) the timed calls only."""
    dev = ctx.device
    first = time_call(step, dev) if dev.type == "cuda" else None
    peak = peak_during(step, dev) if dev.type == "cuda" else None
    budget = ctx.cfg["point_budget"] if budget_s is None else budget_s
    times = time_reps(step, dev, ctx.cfg["reps"], min_reps=ctx.cfg["min_reps"], budget_s=budget)
    return {**summary(times), "first_call_s": first, "peak_mib": peak}


# ---- attention inputs, FLOPs and bytes ----------------------------------------------------------------
def window_keys(S: int, W: int) -> int:
    """sum over t < S of min(t + 1, W)."""
    if S <= W:
        return S * (S + 1) // 2
    return W * (W + 1) // 2 + (S - W) * W


def hca_entries(S: int, T: int, ratio: int) -> int:
    """sum over t < S of min(T, (t + 1) // ratio)."""
    t = torch.arange(1, S + 1, dtype=torch.int64)
    return int((t // ratio).clamp(max=T).sum())


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def attention_inputs(dims: dict, kind: str, S: int, device, dtype, seed: int = 0) -> dict:
    """Inputs of one point, as ``gpu_attention.kernel_step`` builds them, with their useful-key count."""
    from titan_dsv4.model.kernels import CompressedKV

    from .gpu_attention import causal_picks

    g = torch.Generator(device=device).manual_seed(seed + S)
    H, d, W = dims["heads"], dims["head_dim"], dims["window"]

    def randn(*shape, dt=dtype, grad=True):
        return torch.randn(*shape, generator=g, device=device, dtype=dt).requires_grad_(grad)

    q, kv = randn(1, H, S, d), randn(1, S, d)
    sinks = randn(H, dt=torch.float32)  # an fp32 holder in the model
    entries = picked = compressed = None
    ratio, n_entries = 0, 0
    visible = window_keys(S, W)
    if kind in ("csa", "hca"):
        ratio = dims["hca_ratio"] if kind == "hca" else dims["csa_ratio"]
        n_entries = max(S // ratio, 1)
        entries = randn(1, n_entries, d)
        if kind == "csa":
            picked = causal_picks(S, n_entries, ratio, dims["topk"], device, seed + S)
            visible += int((picked >= 0).sum())
        else:
            visible += hca_entries(S, n_entries, ratio)
        compressed = CompressedKV(entries, ratio, picked)
    grad_out = randn(1, H, S, d, grad=False)
    out_bytes = q.numel() * q.element_size()
    return dict(
        q=q,
        kv=kv,
        sinks=sinks,
        entries=entries,
        picked=picked,
        compressed=compressed,
        grad_out=grad_out,
        window=W,
        ratio=ratio,
        n_entries=n_entries,
        visible_keys=visible,
        flops_fwd=4.0 * H * d * visible,
        # memory model: inputs (+ grad_out for fwd+bwd), outputs + LSE, and (fwd+bwd) the inputs' grads
        input_bytes=_nbytes(q, kv, sinks, entries, picked),
        grad_out_bytes=out_bytes,
        output_bytes=out_bytes + H * S * 4,
        grad_bytes=_nbytes(q, kv, sinks, entries),
    )


def attention_step(fn, inp: dict, mode: str, fp32_logits: bool = True) -> Callable[[], None]:
    args = (inp["q"], inp["kv"], inp["sinks"], inp["window"], inp["compressed"])
    if mode == "fwd":

        def fwd() -> None:
            with torch.no_grad():
                fn(*args, fp32_logits=fp32_logits)

        return fwd
    leaves = [t for t in (inp["q"], inp["kv"], inp["sinks"], inp["entries"]) if t is not None]

    def fwd_bwd() -> None:
        fn(*args, fp32_logits=fp32_logits).backward(inp["grad_out"])
        for t in leaves:
            t.grad = None

    return fwd_bwd


def memory_model(inp: dict, mode: str, peak_mib: float | None) -> dict:
    inputs = inp["input_bytes"] + (inp["grad_out_bytes"] if mode == "fwd_bwd" else 0)
    expected = inputs + inp["output_bytes"] + (inp["grad_bytes"] if mode == "fwd_bwd" else 0)
    out = {"input_mib": inputs / 2**20, "expected_total_mib": expected / 2**20}
    if peak_mib is not None:
        out["measured_total_mib"] = inputs / 2**20 + peak_mib
        out["memory_ratio"] = out["measured_total_mib"] / out["expected_total_mib"]
    return out


# ---- implementations --------------------------------------------------------------------------------------
def kernel_fn(impl: str, ctx: Ctx):
    """The callable with ``dense_attention``'s signature for one implementation."""
    if impl == "triton":
        from titan_dsv4.model.triton_attention import triton_attention

        return triton_attention
    if impl == "sparse":
        from titan_dsv4.model.kernels import sparse_attention

        return sparse_attention
    if impl == "flex":
        return FlexAttention(ctx.device)
    raise ValueError(impl)


class FlexAttention:
    """Window-only and HCA attention with a sink by FlexAttention (see the module docstring).

    Keys and values: one [B, 1, S + T + 1, d] tensor (MQA: ``enable_gqa``), [window keys | entries | a
    zero row for the sink]; ``score_mod`` replaces the last key's logit by the head's sink. The block mask
    is built once per shape (``prepare``), outside the timed call, as a model would build it once per batch.
    """

    def __init__(self, device: torch.device):
        from torch.nn.attention.flex_attention import flex_attention

        self.device = device
        self.options = FLEX_OPTIONS[0] if device.type == "cuda" else None
        if device.type == "cuda":
            import torch._dynamo

            for name in ("recompile_limit", "cache_size_limit"):  # one compile per shape and grad mode
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, 64)
            self.flex = torch.compile(flex_attention, dynamic=False)
        else:  # the CPU smoke: eager (the reference implementation)
            self.flex = flex_attention
        self.mask = None
        self.score_mod = None

    def prepare(self, S: int, T: int, window: int, ratio: int, sinks: torch.Tensor) -> float:
        """Build the block mask and score_mod of one point; returns the seconds the mask took."""
        from torch.nn.attention.flex_attention import create_block_mask

        sink = S + T
        r = max(ratio, 1)

        def mask_mod(b, h, q_idx, kv_idx):
            in_window = (kv_idx <= q_idx) & (q_idx - kv_idx < window)
            e = kv_idx - S
            entry = (e >= 0) & (e < T) & ((e + 1) * r <= q_idx + 1)
            return in_window | entry | (kv_idx == sink)

        if self.device.type != "cuda":  # no Flex backward on the CPU: the smoke runs its forward only
            sinks = sinks.detach()

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(kv_idx == sink, sinks[h].to(score.dtype), score)

        start = time.perf_counter()
        # uncompiled, create_block_mask evaluates mask_mod on the whole [S, S + T + 1] grid (GiBs at 64K)
        big = self.device.type == "cuda" and S > 16384
        self.mask = create_block_mask(mask_mod, None, None, S, S + T + 1, device=self.device, _compile=big)
        sync(self.device)
        self.score_mod = score_mod
        return time.perf_counter() - start

    def __call__(self, q, kv, sinks, window, compressed, doc_ids=None, fp32_logits=True):
        B, H, S, d = q.shape
        parts = [kv]
        if compressed is not None:
            if compressed.picked is not None:
                raise NotImplementedError("FlexAttention is benchmarked for window-only and HCA only")
            parts.append(compressed.entries.to(kv.dtype))
        parts.append(kv.new_zeros(B, 1, d))
        keys = torch.cat(parts, dim=1).unsqueeze(1)  # [B, 1, S + T + 1, d]
        if self.device.type != "cuda":  # Flex refuses inputs that require grad on the CPU
            q, keys = q.detach(), keys.detach()
        kwargs = dict(score_mod=self.score_mod, block_mask=self.mask, enable_gqa=True)
        if self.options is not None:
            kwargs["kernel_options"] = self.options
        return self.flex(q, keys, keys, **kwargs)


# ---- attention series -------------------------------------------------------------------------------------
def _base_record(impl, dims_name, dims, kind, mode, S, dtype, fp32_logits=True) -> dict:
    return dict(
        part="attention",
        impl=impl,
        dims=dims_name,
        heads=dims["heads"],
        head_dim=dims["head_dim"],
        window=dims["window"],
        topk=dims["topk"] if kind == "csa" else None,
        kind=kind,
        mode=mode,
        seq_len=S,
        dtype=str(dtype).removeprefix("torch."),
        fp32_logits=fp32_logits,
    )


def _launch_counts(impl: str) -> dict:
    if impl != "triton":
        return {}
    from titan_dsv4.model.triton_attention import LAUNCHES

    return dict(LAUNCHES)


def attention_point(ctx: Ctx, impl: str, fn, inp: dict, mode: str, fp32_logits: bool = True) -> dict:
    """One measured point: time, useful rate, memory against the model; errors and OOM as results."""
    before = _launch_counts(impl)
    step = None
    try:
        step = attention_step(fn, inp, mode, fp32_logits)
        m = measure(ctx, step)
    except Exception as e:  # OOM is a result; anything else is recorded and the next point runs
        if is_oom(e):
            return {"oom": True, "error": type(e).__name__}
        text = f"{type(e).__name__}: {e}"
        return {"error": text[:600], "out_of_resources": "out of resource" in text.lower()}
    finally:
        del step
        release(ctx.device)
    flops = inp["flops_fwd"] * (1 + BWD_OVER_FWD if mode == "fwd_bwd" else 1)
    rec = {
        **m,
        "visible_keys": inp["visible_keys"],
        "n_entries": inp["n_entries"],
        "useful_flops": flops,
        **ctx.rates(flops, m["median_ms"]),
        **memory_model(inp, mode, m["peak_mib"]),
    }
    after = _launch_counts(impl)
    if after:
        rec["launches"] = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    return rec


def _verdicts(impl: str, kind: str, mode: str, rec: dict) -> str:
    notes = []
    target = TARGET_PCT.get((kind, mode)) if impl == "triton" else None
    if target is not None and "pct_of_matmul" in rec:
        rec["target_pct_of_matmul"] = target
        rec["meets_rate_target"] = rec["pct_of_matmul"] >= target
        notes.append(f"target >= {target:.0f}%: {'PASS' if rec['meets_rate_target'] else 'MISS'}")
    if "memory_ratio" in rec:
        text = f"memory {rec['memory_ratio']:.2f}x inputs+outputs+LSE"
        if mode == "fwd_bwd":
            text += "+grads"
        if impl == "triton":
            rec["meets_memory_target"] = rec["memory_ratio"] <= MEMORY_TARGET
            text += f" (target <= {MEMORY_TARGET:.2f}: {'PASS' if rec['meets_memory_target'] else 'MISS'})"
        notes.append(text)
    return "; ".join(notes)


def attention_series(
    ctx: Ctx,
    deadline: Deadline,
    impl: str,
    dim_sets: list[tuple[str, dict]],
    lengths: list[int],
    kinds=KINDS,
    fn=None,
    modes=MODES,
) -> None:
    """Every (S, dims, kind, mode) point of one implementation, S ascending. A (dims, kind, mode) series
    that ran out of memory, failed, or took longer than the point budget per call stops there; a point
    whose predicted time (from the last S, scaled by the useful keys, or S^2 for the sparse path's HCA)
    passes the cap is skipped."""
    fn = fn if fn is not None else kernel_fn(impl, ctx)
    stopped: dict[tuple, str] = {}
    last: dict[tuple, tuple[int, float]] = {}  # series -> (visible keys, seconds per call)
    calls = ctx.cfg["min_reps"] + (2 if ctx.device.type == "cuda" else 0)  # see measure()
    for S in lengths:
        for dims_name, dims in dim_sets:
            for kind in kinds:
                inp = None
                for mode in modes:
                    key = (dims_name, kind, mode)
                    record = _base_record(impl, dims_name, dims, kind, mode, S, ctx.dtype)
                    reason = stopped.get(key)
                    if reason is None and deadline.expired(margin=1.0):
                        reason = "section time cap reached"
                    if reason is None and impl == "flex" and deadline.left() < ctx.cfg["flex_compile_s"]:
                        reason = (
                            f"a Flex compile (up to {ctx.cfg['flex_compile_s']:.0f} s) would pass the cap"
                        )
                    if reason is None and key in last:
                        keys0, sec0 = last[key]
                        visible = _predicted_visible(dims, kind, S)
                        growth = visible / max(keys0, 1)
                        if impl == "sparse" and kind == "hca":
                            growth = max(growth, (S / last[key + ("S",)][0]) ** 2)
                        if sec0 * growth * calls > deadline.left():
                            reason = f"predicted {sec0 * growth * calls:.0f} s passes the time cap"
                    if reason is not None:
                        ctx.add({**record, "skipped": reason})
                        say(f"kernels {impl} {dims_name} {kind} {mode} S={S}: skipped ({reason})")
                        continue
                    if inp is None:
                        try:
                            inp = attention_inputs(dims, kind, S, ctx.device, ctx.dtype)
                            if impl == "flex":
                                record["mask_build_s"] = fn.prepare(
                                    S, inp["n_entries"] if kind == "hca" else 0, dims["window"],
                                    inp["ratio"], inp["sinks"],
                                )  # fmt: skip
                        except Exception as e:
                            err = {"oom": True} if is_oom(e) else {}
                            ctx.add({**record, **err, "error": f"inputs: {type(e).__name__}: {e}"[:600]})
                            say(
                                f"kernels {impl} {dims_name} {kind} S={S}: inputs failed ({type(e).__name__})"
                            )
                            for m in MODES:
                                stopped[(dims_name, kind, m)] = f"inputs failed at {S} tokens"
                            release(ctx.device)
                            break
                    rec = attention_point(ctx, impl, fn, inp, mode)
                    if impl == "flex" and _resources_error(rec) and fn.options is not None:
                        rec = _flex_retry(ctx, fn, inp, mode, rec)
                    if impl == "flex" and mode == "fwd" and S == lengths[0] and "error" not in rec:
                        rec.update(_agreement(ctx, fn, inp, f"kernels flex {dims_name} {kind} S={S}"))
                    record.update(rec)
                    name = f"kernels {impl} {dims_name} {kind} {mode} S={S}"
                    if "error" in record:
                        stopped[key] = ("out of memory" if record.get("oom") else "error") + f" at {S} tokens"
                        say(f"{name}: {'OUT OF MEMORY' if record.get('oom') else 'error ' + record['error']}")
                    else:
                        verdict = _verdicts(impl, kind, mode, record)
                        say(
                            f"{name}: {_timing_text(record)}, {ctx.rate_text(record)}; peak "
                            f"{_mib(record['peak_mib'])} above inputs" + (f"; {verdict}" if verdict else "")
                        )
                        sec = record["median_ms"] / 1e3
                        last[key] = (record["visible_keys"], sec)
                        last[key + ("S",)] = (S, sec)
                        if sec > ctx.cfg["point_budget"] * 4:
                            stopped[key] = f"one call took {sec:.1f} s at {S} tokens"
                    ctx.add(record)
                del inp
                release(ctx.device)


def _agreement(ctx: Ctx, fn, inp: dict, name: str) -> dict:
    """The largest |fn - sparse_attention| of the forward outputs (the PyTorch path is the reference)."""
    from titan_dsv4.model.kernels import sparse_attention

    try:
        args = (inp["q"], inp["kv"], inp["sinks"], inp["window"], inp["compressed"])
        with torch.no_grad():
            a = fn(*args, fp32_logits=True).float()
            b = sparse_attention(*args, fp32_logits=True).float()
        out = {"max_abs_diff_vs_sparse": float((a - b).abs().max()), "max_abs_sparse": float(b.abs().max())}
        say(
            f"{name}: max |output - sparse's| {out['max_abs_diff_vs_sparse']:.3g} "
            f"(outputs up to {out['max_abs_sparse']:.3g})"
        )
        return out
    except Exception as e:
        return {"agreement_error": f"{type(e).__name__}: {e}"[:400]}
    finally:
        release(ctx.device)


def _predicted_visible(dims: dict, kind: str, S: int) -> int:
    """Useful keys of a point before its inputs exist (CSA: every query sees min(k, visible) picks)."""
    v = window_keys(S, dims["window"])
    if kind == "hca":
        v += hca_entries(S, max(S // dims["hca_ratio"], 1), dims["hca_ratio"])
    elif kind == "csa":
        t = torch.arange(1, S + 1, dtype=torch.int64)
        v += int((t // dims["csa_ratio"]).clamp(max=dims["topk"]).sum())
    return v


def _resources_error(rec: dict) -> bool:
    """A Triton compile that asked for more shared memory or registers than the GPU has."""
    return bool(rec.get("out_of_resources"))


def _flex_retry(ctx: Ctx, fn: FlexAttention, inp: dict, mode: str, rec: dict) -> dict:
    """A Flex compile that failed (e.g. shared memory at head_dim 512) is retried with smaller blocks."""
    tried = [fn.options]
    for options in FLEX_OPTIONS[FLEX_OPTIONS.index(fn.options) + 1 :]:
        say(f"kernels flex: {rec['error'][:200]}; retrying with kernel_options {options}")
        fn.options = options
        tried.append(options)
        rec = attention_point(ctx, "flex", fn, inp, mode)
        if "error" not in rec:
            break
    rec["flex_kernel_options"] = fn.options
    rec["flex_options_tried"] = tried
    return rec


# ---- fp32 logits and agreement ----------------------------------------------------------------------------
def fp32_part(ctx: Ctx, deadline: Deadline) -> None:
    from titan_dsv4.model.triton_attention import triton_attention

    dims_name, dims = ctx.cfg["dims"][0]
    S = ctx.cfg["lengths"][0]
    for kind in KINDS:
        if deadline.expired(margin=1.0):
            ctx.add(dict(part="fp32_logits", dims=dims_name, kind=kind, seq_len=S, skipped="time cap"))
            continue
        inp = attention_inputs(dims, kind, S, ctx.device, ctx.dtype)
        pair = {}
        for fp32 in (True, False):
            pair[fp32] = attention_point(ctx, "triton", triton_attention, inp, "fwd_bwd", fp32_logits=fp32)
        record = dict(part="fp32_logits", impl="triton", dims=dims_name, kind=kind, mode="fwd_bwd", seq_len=S)
        record["fp32_logits_true"], record["fp32_logits_false"] = pair[True], pair[False]
        if "median_ms" in pair[True] and "median_ms" in pair[False]:
            record["time_ratio_true_over_false"] = pair[True]["median_ms"] / pair[False]["median_ms"]
            if pair[True]["peak_mib"] and pair[False]["peak_mib"]:
                record["memory_ratio_true_over_false"] = pair[True]["peak_mib"] / pair[False]["peak_mib"]
            say(
                f"kernels fp32_logits {dims_name} {kind} fwd_bwd S={S}: True/False time "
                f"{record['time_ratio_true_over_false']:.3f}x ({pair[True]['median_ms']:.3f} / "
                f"{pair[False]['median_ms']:.3f} ms)"
                + (
                    f", memory {record['memory_ratio_true_over_false']:.3f}x"
                    if "memory_ratio_true_over_false" in record
                    else ""
                )
            )
        else:
            say(f"kernels fp32_logits {dims_name} {kind}: error {pair[True].get('error') or pair[False]}")
        # agreement: the forward outputs of the two timed implementations on the same inputs
        record.update(
            _agreement(ctx, triton_attention, inp, f"kernels agreement triton {dims_name} {kind} S={S}")
        )
        ctx.add(record)
        del inp
        release(ctx.device)


# ---- indexer ----------------------------------------------------------------------------------------------
def indexer_inputs(ix: dict, T: int, device, dtype, seed: int = 0) -> dict:
    """The shard's last S queries (global positions [ratio T - S, ratio T)) against T entries."""
    from titan_dsv4.model.triton_indexer import causal_ranges

    g = torch.Generator(device=device).manual_seed(seed + T)
    S, nI, dI, ratio = ix["S"], ix["heads"], ix["head_dim"], ix["ratio"]
    q = torch.randn(1, S, nI, dI, generator=g, device=device, dtype=dtype)
    keys = torch.randn(1, T, dI, generator=g, device=device, dtype=dtype)
    head_w = torch.randn(1, S, nI, generator=g, device=device, dtype=torch.float32) * nI**-0.5
    pos = torch.arange(ratio * T - S, ratio * T, device=device)
    lo, hi = causal_ranges(1, S, T, ratio, device, query_pos=pos)
    visible = int((hi - lo).clamp(min=0).sum())
    return dict(q=q, keys=keys, head_w=head_w, pos=pos, lo=lo, hi=hi, visible=visible, T=T, S_total=ratio * T)


def _indexer_record(ix: dict, inp: dict, what: str) -> dict:
    return dict(
        part="indexer",
        what=what,
        queries=ix["S"],
        entries=inp["T"],
        tokens_total=inp["S_total"],
        index_heads=ix["heads"],
        index_head_dim=ix["head_dim"],
        topk=ix["topk"],
        visible_pairs=inp["visible"],
    )


def indexer_part(ctx: Ctx, deadline: Deadline) -> None:
    from titan_dsv4.model import triton_indexer

    ix = ctx.cfg["index"]
    k = ix["topk"]
    flops_per_pair = 2.0 * ix["heads"] * ix["head_dim"]

    def topk_point(inp: dict) -> tuple[dict, torch.Tensor | None]:
        record = _indexer_record(ix, inp, "triton topk_picks (scoring + top-k)")
        picks = None
        try:

            def step():
                return triton_indexer.topk_picks(
                    inp["q"], inp["keys"], inp["head_w"], k, inp["lo"], inp["hi"]
                )

            record.update(measure(ctx, step, budget_s=2 * ctx.cfg["point_budget"]))
            flops = flops_per_pair * inp["visible"]
            record.update(useful_flops=flops, **ctx.rates(flops, record["median_ms"]))
            say(
                f"kernels indexer triton topk S={ix['S']} x T={inp['T']} (positions up to {inp['S_total']}): "
                f"{_timing_text(record)}, {flops / 1e12:.2f} TFLOP, {ctx.rate_text(record)}; peak "
                f"{_mib(record['peak_mib'])}"
            )
            picks = step()
        except Exception as e:
            record["error"] = f"{type(e).__name__}: {e}"[:600]
            say(f"kernels indexer triton topk T={inp['T']}: error {record['error']}")
        ctx.add(record)
        return record, picks

    # 1. the long-context shard
    long_inp = indexer_inputs(ix, ix["T_long"], ctx.device, ctx.dtype)
    _, long_picks = topk_point(long_inp)

    # 2. picked_scores at the shard's picks
    if long_picks is not None and not deadline.expired(margin=ctx.cfg["margin"] / 2):
        picked_scores_points(ctx, ix, long_inp, long_picks)
    del long_inp, long_picks
    release(ctx.device)

    # 3. triton against the PyTorch Indexer.pick at a shorter shard
    if deadline.expired(margin=ctx.cfg["margin"]):
        ctx.add(dict(part="indexer", what="torch Indexer.pick", skipped="time cap"))
        say("kernels indexer torch pick: skipped (time cap)")
        return
    inp = indexer_inputs(ix, ix["T_torch"], ctx.device, ctx.dtype)
    tri, tri_picks = topk_point(inp)
    record = _indexer_record(ix, inp, "torch Indexer.pick (scoring + top-k)")
    try:
        indexer = _torch_indexer(ix)
        from titan_dsv4.model.indexer import IndexerScoring

        scoring = IndexerScoring(inp["keys"], inp["q"], inp["head_w"], query_pos=inp["pos"])

        def step():
            return indexer.pick(scoring, None)

        first = time_call(step, ctx.device)
        record["first_call_s"] = first
        if first * 2 < deadline.left():
            times = time_reps(step, ctx.device, 3, min_reps=1, budget_s=min(3.0, deadline.left() / 2))
            record.update(summary(times))
        else:
            record.update(summary([first]))
            record["note"] = "one (first) call only: time cap"
        flops = flops_per_pair * inp["visible"]
        record.update(useful_flops=flops, **ctx.rates(flops, record["median_ms"]))
        if "median_ms" in tri:
            record["torch_over_triton_time"] = record["median_ms"] / tri["median_ms"]
        if tri_picks is not None:
            torch_picks = step()
            record["rows_identical_pct"] = 100 * float((torch_picks == tri_picks).all(-1).float().mean())
            record["slots_identical_pct"] = 100 * float((torch_picks == tri_picks).float().mean())
        say(
            f"kernels indexer torch Indexer.pick S={ix['S']} x T={inp['T']}: {_timing_text(record)}, "
            f"{ctx.rate_text(record)}"
            + (
                f"; {record['torch_over_triton_time']:.1f}x the Triton time"
                if "torch_over_triton_time" in record
                else ""
            )
            + (
                f"; picks identical in {record['rows_identical_pct']:.1f}% of queries "
                f"({record['slots_identical_pct']:.1f}% of slots)"
                if "rows_identical_pct" in record
                else ""
            )
        )
    except Exception as e:
        if is_oom(e):
            record["oom"] = True
        record["error"] = f"{type(e).__name__}: {e}"[:600]
        say(f"kernels indexer torch pick: error {record['error']}")
    ctx.add(record)
    release(ctx.device)


def _torch_indexer(ix: dict):
    """An ``Indexer`` with these index dims (parameters on the meta device: ``pick`` uses none)."""
    from titan_dsv4.flavors import deepseek_v4_args
    from titan_dsv4.model.indexer import Indexer

    args = deepseek_v4_args["flash"].replace(
        index_n_heads=ix["heads"], index_head_dim=ix["head_dim"], index_topk=ix["topk"], csa_ratio=ix["ratio"]
    )
    args.attn_impl = "sparse"  # the PyTorch path
    with torch.device("meta"):
        indexer = Indexer(args)
    indexer.triton = False
    return indexer


def picked_scores_points(ctx: Ctx, ix: dict, inp: dict, picks: torch.Tensor) -> None:
    from titan_dsv4.model.triton_indexer import picked_scores

    q = inp["q"].detach().requires_grad_(True)
    keys = inp["keys"].detach().requires_grad_(True)
    head_w = inp["head_w"].detach().requires_grad_(True)
    g = torch.Generator(device=ctx.device).manual_seed(1)
    grad = torch.randn(picks.shape, generator=g, device=ctx.device, dtype=torch.float32)
    n_valid = int((picks >= 0).sum())
    fwd_flops = 2.0 * ix["heads"] * ix["head_dim"] * n_valid

    def fwd():
        with torch.no_grad():
            picked_scores(q, keys, head_w, picks)

    def fwd_bwd():
        picked_scores(q, keys, head_w, picks).backward(grad)
        for t in (q, keys, head_w):
            t.grad = None

    for mode, step in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        record = _indexer_record(ix, inp, f"triton picked_scores {mode}")
        record.update(mode=mode, valid_picks=n_valid)
        try:
            record.update(measure(ctx, step))
            flops = fwd_flops * (1 + PICKED_BWD_OVER_FWD if mode == "fwd_bwd" else 1)
            gathered = n_valid * ix["head_dim"] * inp["keys"].element_size()
            record.update(
                useful_flops=flops,
                gathered_key_gb_per_s=gathered / (record["median_ms"] / 1e3) / 1e9,
                **ctx.rates(flops, record["median_ms"]),
            )
            say(
                f"kernels indexer picked_scores {mode} S={ix['S']} k={picks.shape[-1]} (T={inp['T']}): "
                f"{_timing_text(record)}, {ctx.rate_text(record)}, picked keys read at "
                f"{record['gathered_key_gb_per_s']:.0f} GB/s; peak {_mib(record['peak_mib'])}"
            )
        except Exception as e:
            record["error"] = f"{type(e).__name__}: {e}"[:600]
            say(f"kernels indexer picked_scores {mode}: error {record['error']}")
        ctx.add(record)
        release(ctx.device)


# ---- training ---------------------------------------------------------------------------------------------
def flash_width_args(smoke: bool):
    """The training run's shape (see the module docstring); tiny in smoke mode (the CPU interpreter)."""
    from titan_dsv4.flavors import deepseek_v4_args
    from titan_dsv4.model.args import v4_moe_args

    if smoke:
        args = deepseek_v4_args["debugmodel"].replace(
            n_heads=SMOKE_DIMS["heads"], head_dim=32, rope_head_dim=16, index_head_dim=16, sliding_window=8,
            index_topk=8, compress_ratios=[0, 4, 128, 4],
        )  # fmt: skip
        return args
    args = deepseek_v4_args["flash"].replace(
        vocab_size=2048,  # the debug tokenizer's (the shipped config's corpus)
        n_layers=4,
        compress_ratios=[0, 4, 128, 4],
        n_hash_layers=2,
        mtp_layers=0,
    )
    args.moe_args = v4_moe_args(num_experts=8, top_k=2, route_scale=args.moe_args.route_scale)
    return args


def training_part(ctx: Ctx, deadline: Deadline, smoke: bool) -> None:
    from titan_dsv4.model.hf_config import hf_config_from_args

    from . import gpu_training

    t = ctx.cfg["training"]
    label = "flash_width titan-autocast attn_impl=triton"
    if deadline.left() < t["min_s"]:
        reason = f"{deadline.left():.0f} s left of the section cap, {t['min_s']:.0f} s needed"
        ctx.add(dict(part="training", label=label, skipped=reason))
        say(f"kernels training {label}: skipped ({reason})")
        return
    args = flash_width_args(smoke)
    with tempfile.TemporaryDirectory(prefix="dsv4_flash_width_") as folder:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(hf_config_from_args(args), f, indent=1)
        spec = dict(
            label=label,
            model_name=t["model_name"],
            flavor=f"hf:{folder}",
            extra=["--deepseek_v4.attn_impl", "triton"],
        )
        n_before = len(ctx.results.data["sections"].get("training", []))
        gpu_training.run(
            ctx.results,
            Deadline(min(t["cap_s"], deadline.left()), deadline),
            [spec],
            seq_len=t["seq_len"],
            batch=t["batch"],
            steps=t["steps"],
            warmup=t["warmup"],
            run_cap_s=t["cap_s"],
            matmul_tflops=ctx.matmul_tflops,
            datasheet_tflops=ctx.datasheet_tflops,
            log_path=ctx.log_path,
        )
    runs = ctx.results.data["sections"].get("training", [])[n_before:]
    shape = dict(
        dim=args.dim,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        head_dim=args.head_dim,
        sliding_window=args.sliding_window,
        compress_ratios=args.compress_ratios,
        index_n_heads=args.index_n_heads,
        index_head_dim=args.index_head_dim,
        index_topk=args.index_topk,
        num_experts=args.moe_args.num_experts,
        experts_top_k=args.moe_args.top_k,
        vocab_size=args.vocab_size,
    )
    for run in runs:
        keep = {k: v for k, v in run.items() if k not in ("titan_metrics", "losses", "step_s")}
        ctx.add({"part": "training", "shape": shape, **keep})


# ---- section ----------------------------------------------------------------------------------------------
def run(
    results,
    deadline: Deadline,
    device: torch.device,
    smoke: bool,
    matmul_tflops: float | None,
    datasheet_tflops: float,
    parts: list[str] | None = None,
    log_path: str | None = None,
) -> None:
    """The section's parts in order, each under its share of ``deadline`` (the training run's slot kept).

    ``parts`` None: every part on a GPU; in smoke mode every part but ``training`` (a step of even the tiny
    shape takes about 15 s in Triton's interpreter: name it to run it)."""
    if not parts:
        parts = [p for p in PARTS if not (smoke and p == "training")]
    parts = list(parts)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown kernel parts {unknown}; known: {', '.join(PARTS)}")
    cfg = plan(smoke)
    ctx = Ctx(results, device, matmul_tflops, datasheet_tflops, cfg, log_path)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "the kernels section on the CPU needs TRITON_INTERPRET=1 set before triton is imported"
        )
    reserve = cfg["training"]["min_s"] if "training" in parts else 0.0
    results.set(
        "kernels_plan",
        {
            "parts": parts,
            "dims": dict(cfg["dims"]),
            "lengths": cfg["lengths"],
            "index": cfg["index"],
            "dtype": str(ctx.dtype),
            "cap_s": deadline.left(),
            "training_reserve_s": reserve,
            "flops": "attention fwd 4*H*d*visible keys, bwd 2.5x fwd; indexer 2*nI*dI*visible pairs",
        },
    )
    say(
        f"kernels: {', '.join(parts)} under {deadline.left():.0f} s ({reserve:.0f} s kept for training); "
        f"{ctx.dtype}, matmul reference "
        + (f"{matmul_tflops:.0f} TFLOP/s" if matmul_tflops else "not measured (run the matmul section)")
    )
    shares = cfg["shares"]
    dims = cfg["dims"]
    L = cfg["lengths"]

    def share(name: str) -> Deadline:  # the parts before the training run leave it its slot
        return Deadline(max(0.0, min(shares[name], deadline.left() - reserve)), deadline)

    steps: list[tuple[str, Callable[[], None]]] = []
    if "triton" in parts:  # Flash first; Pro after the fp32 and indexer parts
        steps.append(
            ("triton flash", lambda: attention_series(ctx, share("triton_flash"), "triton", dims[:1], L))
        )
    if "fp32" in parts:
        steps.append(("fp32", lambda: fp32_part(ctx, share("fp32"))))
    if "indexer" in parts:
        steps.append(("indexer", lambda: indexer_part(ctx, share("indexer"))))
    if "triton" in parts and len(dims) > 1:
        steps.append(
            ("triton rest", lambda: attention_series(ctx, share("triton_rest"), "triton", dims[1:], L))
        )
    if "sparse" in parts:
        steps.append(("sparse", lambda: attention_series(ctx, share("sparse"), "sparse", dims, L)))
    if "training" in parts:
        steps.append(("training", lambda: training_part(ctx, deadline, smoke)))
    if "flex" in parts:  # last: its compiles (tens of seconds each on a GPU) cannot be cut short
        flex_kinds = ("window", "hca")  # CSA: see the module docstring
        flex_modes = MODES if device.type == "cuda" else ("fwd",)  # Flex has no backward on the CPU
        fl = cfg["flex_lengths"]

        def flex() -> None:
            dl = Deadline(max(0.0, min(shares["flex"], deadline.left())), deadline)
            attention_series(ctx, dl, "flex", dims[:1], fl, flex_kinds, modes=flex_modes)

        steps.append(("flex", flex))

    for name, fn in steps:
        start = time.monotonic()
        try:
            fn()
        except Exception as e:  # one part's failure is recorded; the next part runs
            results.error(f"{SECTION}/{name}", f"{type(e).__name__}: {e}"[:1000])
        release(device)
        say(f"kernels part {name} done in {time.monotonic() - start:.1f} s")
    summarise(ctx)


def summarise(ctx: Ctx) -> None:
    """The Triton CSA rates against their targets and the memory ratios, as one record and a few lines."""
    rows = [
        r
        for r in ctx.results.data["sections"].get(SECTION, [])
        if r.get("part") == "attention" and "median_ms" in r
    ]
    out = []
    for r in rows:
        if r["impl"] != "triton":
            continue
        row = {k: r.get(k) for k in ("dims", "kind", "mode", "seq_len", "median_ms", "useful_tflops")}
        row.update({k: r[k] for k in ("pct_of_matmul", "memory_ratio", "meets_rate_target") if k in r})
        others = {
            o["impl"]: o["median_ms"]
            for o in rows
            if o["impl"] != "triton"
            and (o["dims"], o["kind"], o["mode"], o["seq_len"])
            == (r["dims"], r["kind"], r["mode"], r["seq_len"])
        }
        for impl, ms in others.items():
            row[f"{impl}_over_triton_time"] = ms / r["median_ms"]
        out.append(row)
    ctx.results.set("kernels_summary", out)
    for row in out:
        speedups = ", ".join(
            f"{k.removesuffix('_over_triton_time')} {v:.2f}x"
            for k, v in row.items()
            if k.endswith("_over_triton_time")
        )
        say(
            f"kernels summary {row['dims']} {row['kind']} {row['mode']} S={row['seq_len']}: triton "
            f"{row['median_ms']:.3f} ms, {row['useful_tflops']:.1f} TFLOP/s"
            + (f" ({row['pct_of_matmul']:.1f}% of matmul)" if "pct_of_matmul" in row else "")
            + (f"; others' time / triton's: {speedups}" if speedups else "")
        )
