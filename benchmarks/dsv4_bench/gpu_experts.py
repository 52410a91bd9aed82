"""Routed experts on one device: ``torch._grouped_mm`` against the per-expert loop, forward+backward.

The module is the model's own (``titan_dsv4.model.moe.ClampedGroupedExperts``, Titan's
``GroupedExperts`` layout with V4's clamped SwiGLU): with ``use_grouped_mm`` (the default on SM90+ GPUs,
as Titan's deepseek_v3) it pads each expert's rows with Titan's ``indices_padding_wrapper`` and runs three
``torch._grouped_mm`` calls; without it, one matmul per expert (``_experts_for_loop``, the CPU path).
Inputs are what the MoE hands the experts: rows sorted by expert (each token's top-k distinct experts,
chosen at random), bf16 weights and rows as FSDP's bf16 parameters give them; weight and input gradients
both computed. Off CUDA the module always loops (grouped mm is an SM90+ kernel), which the record says.
"""

from __future__ import annotations

import torch

from .gpu_common import Deadline, is_oom, peak_during, release, say, summary, time_reps

# rows = tokens x top_k routed rows. flash_ep8_local: the 32 local experts of one rank of EP 8 when each of
# the 8 ranks sends 8,192 tokens (8 x 8,192 x 6 / 8 = 49,152 rows, the same rows as all 256 experts get).
CONFIGS = [
    dict(name="bench_mid", dim=256, inter=256, experts=8, top_k=2, tokens=32768),
    dict(name="flash_256_experts", dim=4096, inter=2048, experts=256, top_k=6, tokens=8192),
    dict(name="flash_ep8_local_32_experts", dim=4096, inter=2048, experts=32, top_k=6, tokens=8192),
]
SMOKE_CONFIGS = [
    dict(name="tiny", dim=64, inter=32, experts=4, top_k=2, tokens=256),
]


def routed_counts(tokens: int, experts: int, top_k: int, device, seed: int = 0) -> torch.Tensor:
    """Rows per expert when each token picks ``top_k`` distinct experts at random."""
    g = torch.Generator(device=device).manual_seed(seed)
    picks = torch.rand(tokens, experts, generator=g, device=device).topk(top_k, dim=-1).indices
    return torch.bincount(picks.reshape(-1), minlength=experts)


def experts_inputs(cfg: dict, device, dtype, limit: float):
    """The module (built and initialised on the device, then cast), sorted rows and their gradient."""
    from titan_dsv4.model.moe import ClampedGroupedExperts

    torch.manual_seed(0)
    with torch.device(device), torch.no_grad():
        module = ClampedGroupedExperts(cfg["dim"], cfg["inter"], cfg["experts"], True, limit)
        module.init_weights(0.02)
    module.to(dtype=dtype)
    counts = routed_counts(cfg["tokens"], cfg["experts"], cfg["top_k"], device)
    rows = int(counts.sum())
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(rows, cfg["dim"], generator=g, device=device, dtype=dtype).requires_grad_(True)
    grad_out = torch.randn(rows, cfg["dim"], generator=g, device=device, dtype=dtype)
    return module, counts, x, grad_out


def experts_step(module, counts, x, grad_out, grouped: bool):
    def step() -> None:
        module.use_grouped_mm = grouped
        module(x, counts).backward(grad_out)
        x.grad = None
        module.zero_grad(set_to_none=True)

    return step


def run(results, deadline: Deadline, device, dtype, configs: list[dict], reps: int = 10) -> None:
    from titan_dsv4.flavors import deepseek_v4_args

    limit = deepseek_v4_args["flash"].swiglu_limit
    for cfg in configs:
        per_cfg = {}
        inputs = None
        for path in ("grouped_mm", "for_loop"):
            record = dict(cfg, path=path, dtype=str(dtype).removeprefix("torch."))
            if deadline.expired(margin=2.0):
                results.add("experts", {**record, "skipped": "section time cap reached"})
                continue
            grouped = path == "grouped_mm"
            record["ran_grouped_mm"] = grouped and device.type == "cuda"
            step = None
            try:
                if inputs is None:
                    inputs = experts_inputs(cfg, device, dtype, limit)
                counts = inputs[1]
                rows = int(counts.sum())
                step = experts_step(*inputs, grouped)
                peak = peak_during(step, device)  # warm-up (grouped mm / triton kernels load) and memory
                times = time_reps(
                    step, device, reps, min_reps=3, budget_s=min(5.0, max(deadline.left() / 4, 1))
                )
                s = summary(times)
                flops = 18 * rows * cfg["dim"] * cfg["inter"]  # 3 matmuls x 2 FLOPs, x3 for fwd+bwd
                record.update(
                    s,
                    rows=rows,
                    rows_per_expert_min=int(counts.min()),
                    rows_per_expert_max=int(counts.max()),
                    peak_mib=peak,
                    tokens_per_s=cfg["tokens"] / (s["median_ms"] / 1e3),
                    tflops=flops / (s["median_ms"] / 1e3) / 1e12,
                )
                per_cfg[path] = record
                say(
                    f"experts {cfg['name']} {path}: fwd+bwd {s['median_ms']:.2f} ms "
                    f"[{s['min_ms']:.2f}-{s['max_ms']:.2f}], {record['tokens_per_s']:,.0f} tokens/s, "
                    f"{record['tflops']:.1f} TFLOP/s"
                )
            except Exception as e:
                record["oom" if is_oom(e) else "error"] = f"{type(e).__name__}: {e}"[:500]
                what = "OUT OF MEMORY" if is_oom(e) else "error " + str(e)[:200]
                say(f"experts {cfg['name']} {path}: {what}")
            finally:
                step = None
                release(device)
            results.add("experts", record)
        inputs = None
        release(device)
        if "grouped_mm" in per_cfg and "for_loop" in per_cfg:
            speedup = per_cfg["for_loop"]["median_ms"] / per_cfg["grouped_mm"]["median_ms"]
            results.add("experts_ratio", {"name": cfg["name"], "grouped_speedup_over_loop": speedup})
            say(f"experts {cfg['name']}: grouped_mm is {speedup:.2f}x the loop's speed")
