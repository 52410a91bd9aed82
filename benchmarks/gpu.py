"""titan_dsv4 on one GPU: the Triton kernels, training step, attention sparse vs dense, grouped-mm experts.

    python benchmarks/gpu.py --sections matmul,kernels --out benchmarks/results/gpu_kernels.json  # <= 4.5 min
    python benchmarks/gpu.py --out benchmarks/results/gpu.json   # every section, one GPU, bf16, about 9 min
    python benchmarks/gpu.py --smoke                             # every section on the CPU, tiny, < 2 min
    python benchmarks/gpu.py --smoke --sections kernels          # the kernels section in Triton's interpreter

Sections, each under its own time cap (a run stopped anywhere leaves what it measured: the JSON file is
rewritten after every figure, and every figure is printed as soon as it is known):
  0. the device, torch, and an 8192^3 bf16 matmul (the measured rate MFU is also given against);
  k. the Triton attention and Lightning Indexer kernels (``--deepseek_v4.attn_impl triton``) against the
     PyTorch sparse path and FlexAttention, useful TFLOP/s against the matmul rate, memory against inputs +
     outputs, and one training run of a Flash-width model on them (``dsv4_bench/gpu_kernels.py``; under a
     225 s cap, ``--kernel_parts`` picks parts);
  1. training steps of the ``debugmodel`` flavor and the ``bench_mid`` shape through TorchTitan's own
     Trainer (``./run_train.sh``, NGPU=1; ``dsv4_bench/gpu_training.py``): tokens/s, MFU (the package's
     FLOP accounting, ``get_nparams_and_flops``), peak memory; FSDP2 on a 1-rank mesh (each rank's step of
     a multi-GPU job) and TorchTitan's one-GPU autocast; ``fp32_compute hc_mixing`` (the default less
     ``attention_logits``) prices the fp32 attention logits;
  2. the attention kernels, sparse against dense, fwd+bwd at 4K-32K tokens (``dsv4_bench/gpu_attention.py``);
  3. the routed experts, ``torch._grouped_mm`` against the per-expert loop (``dsv4_bench/gpu_experts.py``).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (str(ROOT), str(ROOT / "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402
from dsv4_bench.gpu_common import Deadline, Results, say, summary, time_reps  # noqa: E402

# Dense bf16, NVIDIA's H100/H200 SXM datasheet (and TorchTitan's get_peak_flops for "H200").
H200_DATASHEET_TFLOPS = 989.0
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu.json"

# (label, model name, flavor, extra flags): FSDP2 on one rank first (each rank of a multi-GPU job),
# the fp32 attention logits' price at the step level (the default fp32_compute less attention_logits),
# then TorchTitan's own one-GPU mode (autocast).
TRAINING_RUNS = [
    dict(label="debugmodel fsdp2", model_name="deepseek_v4_fsdp1", flavor="debugmodel"),
    dict(label="bench_mid fsdp2", model_name="deepseek_v4_fsdp1", flavor="bench_mid"),
    dict(
        label="bench_mid fsdp2 fp32_compute=hc_mixing",
        model_name="deepseek_v4_fsdp1",
        flavor="bench_mid",
        extra=["--deepseek_v4.fp32_compute", "hc_mixing"],
    ),
    dict(label="bench_mid titan-autocast", model_name="deepseek_v4", flavor="bench_mid"),
    dict(label="debugmodel titan-autocast", model_name="deepseek_v4", flavor="debugmodel"),
]


def sizes(smoke: bool) -> dict:
    if smoke:
        return dict(
            matmul=256,
            seq_len=512,
            batch=1,
            steps=3,
            warmup=1,
            run_cap=60,
            training_cap=40,
            # an FSDP2 run with an option flag and an autocast run, on the small flavor
            runs=[
                dict(TRAINING_RUNS[2], flavor="debugmodel", label="debugmodel fsdp2 fp32_compute=hc_mixing"),
                TRAINING_RUNS[4],
            ],
            lengths=[512, 1024],
            attention_cap=10,
            attention_dims=["debugmodel"],
            experts_cap=8,
            matmul_cap=10,
            kernels_cap=50,
            total=110,
        )
    return dict(
        matmul=8192,
        seq_len=4096,
        batch=8,
        steps=13,
        warmup=3,
        run_cap=60,
        training_cap=170,
        runs=TRAINING_RUNS,
        lengths=[4096, 8192, 16384, 32768],
        attention_cap=70,
        attention_dims=["debugmodel", "flash"],
        experts_cap=35,
        matmul_cap=20,
        kernels_cap=225,
        total=560,
    )


def environment(device: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": str(device),
        "host": platform.node(),
    }
    try:
        import torchtitan

        env["torchtitan"] = getattr(torchtitan, "__version__", "?")
    except Exception as e:  # recorded; the sections that need it report their own errors
        env["torchtitan"] = f"import failed: {e}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu_name=torch.cuda.get_device_name(device),
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
            gpu_memory_gib=props.total_memory / 2**30,
            multiprocessors=props.multi_processor_count,
        )
    commit_file = ROOT / "COMMIT"
    if commit_file.exists():
        env["commit"] = commit_file.read_text().strip()
    else:
        try:
            env["commit"] = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except Exception:
            pass
    return env


def matmul_rate(n: int, device: torch.device, dtype: torch.dtype) -> dict:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = time_reps(lambda: a @ b, device, reps=10, min_reps=3, budget_s=5.0)
    s = summary(times)
    return {
        **s,
        "n": n,
        "tflops": 2 * n**3 / (s["median_ms"] / 1e3) / 1e12,
        "tflops_best": 2 * n**3 / (s["min_ms"] / 1e3) / 1e12,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default=str(DEFAULT_OUT), help="JSON results file (rewritten as figures come)"
    )
    parser.add_argument("--smoke", action="store_true", help="every section on the CPU at tiny sizes")
    parser.add_argument("--sections", default="matmul,kernels,training,attention,experts")
    parser.add_argument(
        "--kernel_parts",
        default="",
        help="the kernels section's parts, of triton,fp32,indexer,sparse,flex,training "
        "(dsv4_bench/gpu_kernels.py; default: all on a GPU, all but training in smoke mode)",
    )
    parser.add_argument("--log", default=None, help="append the training runs' full logs to this file")
    args = parser.parse_args()
    wall_start = time.monotonic()
    cfg = sizes(args.smoke)
    sections = set(args.sections.split(","))
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        say("no CUDA device: running the smoke sizes on the CPU")
        cfg = sizes(True)
    if device.type == "cpu" and "kernels" in sections:
        # The Triton kernels run in Triton's interpreter on the CPU. Triton reads this when it is imported
        # (and when @triton.jit decorates), so before anything imports it (titan_dsv4.model does).
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            say("triton was imported before TRITON_INTERPRET=1 could be set: the kernels section will fail")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dtype = torch.bfloat16
    total = Deadline(cfg["total"])
    results = Results(args.out)
    results.set("mode", "smoke" if device.type == "cpu" else "gpu")
    env = environment(device)
    results.set("environment", env)
    say(
        f"torch {env['torch']} (CUDA {env['cuda']}), torchtitan {env['torchtitan']}, "
        f"device: {env.get('gpu_name', 'cpu')}"
        + (f", {env['gpu_memory_gib']:.1f} GiB" if "gpu_memory_gib" in env else "")
    )
    results.set("sizes", {k: v for k, v in cfg.items() if k != "runs"})
    results.set("datasheet_tflops", H200_DATASHEET_TFLOPS)

    matmul_tflops = None
    if "matmul" in sections:
        try:
            m = matmul_rate(cfg["matmul"], device, dtype)
            matmul_tflops = m["tflops"]
            results.add("matmul", m)
            say(
                f"matmul {m['n']}^3 bf16: {m['tflops']:.0f} TFLOP/s (median of {m['reps']}; best "
                f"{m['tflops_best']:.0f}); datasheet {H200_DATASHEET_TFLOPS:.0f}"
            )
        except Exception as e:
            results.error("matmul", f"{type(e).__name__}: {e}")
        torch.cuda.empty_cache() if device.type == "cuda" else None

    if "kernels" in sections:
        try:
            from dsv4_bench import gpu_kernels

            gpu_kernels.run(
                results,
                Deadline(cfg["kernels_cap"], total),
                device,
                smoke=device.type == "cpu",
                matmul_tflops=matmul_tflops,
                datasheet_tflops=H200_DATASHEET_TFLOPS,
                parts=[p for p in args.kernel_parts.split(",") if p] or None,
                log_path=args.log,
            )
        except Exception as e:
            results.error("kernels", f"{type(e).__name__}: {e}")

    if "training" in sections:
        try:
            from dsv4_bench import gpu_training

            gpu_training.run(
                results,
                Deadline(cfg["training_cap"], total),
                cfg["runs"],
                seq_len=cfg["seq_len"],
                batch=cfg["batch"],
                steps=cfg["steps"],
                warmup=cfg["warmup"],
                run_cap_s=cfg["run_cap"],
                matmul_tflops=matmul_tflops,
                datasheet_tflops=H200_DATASHEET_TFLOPS,
                log_path=args.log,
            )
        except Exception as e:
            results.error("training", f"{type(e).__name__}: {e}")

    if "attention" in sections:
        try:
            from dsv4_bench import gpu_attention

            dim_sets = [(name, gpu_attention.flavor_dims(name)) for name in cfg["attention_dims"]]
            gpu_attention.run(
                results, Deadline(cfg["attention_cap"], total), device, dtype, cfg["lengths"], dim_sets
            )
            for row in gpu_attention.ratios(results.data["sections"].get("attention", [])):
                results.add("attention_ratios", row)
        except Exception as e:
            results.error("attention", f"{type(e).__name__}: {e}")

    if "experts" in sections:
        try:
            from dsv4_bench import gpu_experts

            configs = gpu_experts.SMOKE_CONFIGS if device.type == "cpu" else gpu_experts.CONFIGS
            gpu_experts.run(results, Deadline(cfg["experts_cap"], total), device, dtype, configs)
        except Exception as e:
            results.error("experts", f"{type(e).__name__}: {e}")

    wall = time.monotonic() - wall_start
    results.set("wall_s", wall)
    say(f"total wall time {wall:.1f} s; results in {args.out}; errors: {len(results.data['errors'])}")


if __name__ == "__main__":
    main()
