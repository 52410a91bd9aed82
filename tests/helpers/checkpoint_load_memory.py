"""Peak memory per rank while Titan loads a Hugging Face checkpoint, against the checkpoint's size.

    python -m tests.helpers.checkpoint_load_memory [--root DIR] [--dim 1024] [--experts 32] [--layers 4]

Writes a random DeepSeek-V4 checkpoint (transformers names, fp32) and its released FP8/FP4 twin, then on
2 CPU ranks over gloo builds the model on the meta device, shards it with FSDP2 (fp32), materialises it,
and runs Titan's own ``CheckpointManager.load()`` with ``initial_load_in_hf`` (adapter ``to_hf`` -> our
storage reader -> ``dcp.load`` -> ``from_hf`` -> ``set_model_state_dict``). Peak RSS is the kernel's VmHWM,
reset just before the load (``/proc/self/clear_refs``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from titan_dsv4.model.hf_config import hf_config_from_args


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def model_args(dim: int, experts: int, layers: int):
    from tests.helpers.checkpoint_fixtures import debug_args

    args = debug_args().replace(
        dim=dim,
        n_layers=layers,
        moe_inter_dim=dim,
        vocab_size=8192,
        compress_ratios=[0, 4, 128, 4][:layers] + [4] * max(0, layers - 4),
    )
    args.moe_args.num_experts = experts
    return args


def write_checkpoints(root: str, args) -> dict[str, str]:
    """transformers-named fp32 shards, and the released FP8/FP4 twin (random values, valid formats)."""
    from safetensors.torch import save_file

    from tests.helpers.checkpoint_fixtures import quantize_released, released_tensors, write_shards
    from titan_dsv4.checkpoint.adapter import DeepSeekV4CheckpointAdapter
    from titan_dsv4.model import DeepSeekV4Model

    model = DeepSeekV4Model(args)
    model.init_weights()
    hf = {
        k: v.contiguous()
        for k, v in DeepSeekV4CheckpointAdapter(args, None).to_hf(model.state_dict()).items()
    }
    del model
    folders = {"fp32": os.path.join(root, "fp32"), "fp8_fp4": os.path.join(root, "fp8_fp4")}
    os.makedirs(folders["fp32"], exist_ok=True)
    names = sorted(hf)
    for i in range(4):
        save_file(
            {k: hf[k] for k in names[i::4]},
            os.path.join(folders["fp32"], f"model-{i + 1:05d}-of-00004.safetensors"),
            metadata={"format": "pt"},
        )
    with open(os.path.join(folders["fp32"], "config.json"), "w") as f:
        json.dump(hf_config_from_args(args), f)
    stored, _ = quantize_released(released_tensors(hf, args.moe_args.num_experts))
    write_shards(folders["fp8_fp4"], stored, hf_config_from_args(args), n_shards=4)
    return folders


def _load_on_rank(rank: int, world: int, folder: str, args) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.config import Checkpoint

    from titan_dsv4.checkpoint.adapter import DeepSeekV4CheckpointAdapter
    from titan_dsv4.model import DeepSeekV4Model

    with torch.device("meta"):
        model = DeepSeekV4Model(args)
    for block in model.layers.values():
        fully_shard(block)
    fully_shard(model)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # touch every page: the shard is really resident before the load
    adapter = DeepSeekV4CheckpointAdapter(args, None)
    with tempfile.TemporaryDirectory() as dump:
        cfg = Checkpoint(enable=True, initial_load_path=folder, initial_load_in_hf=True)
        manager = CheckpointManager(
            dataloader=None,
            model_parts=[model],
            optimizers=None,
            lr_schedulers=None,
            states={},
            checkpoint_config=cfg,
            sd_adapter=adapter,
            base_folder=dump,
        )
        before = _status_kib("VmRSS")
        _reset_peak_rss()
        start = time.perf_counter()
        assert manager.load()
        seconds = time.perf_counter() - start
        peak = _status_kib("VmHWM")
    shard = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    return {
        "rss_before_mib": before / 1024,
        "peak_mib": peak / 1024,
        "increase_mib": (peak - before) / 1024,
        "model_shard_mib": shard / 2**20,
        "seconds": seconds,
    }


def folder_mib(folder: str) -> float:
    return (
        sum(
            os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors")
        )
        / 2**20
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default=None)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    ns = parser.parse_args()
    from titan_dsv4.cpu import apply_cpu_support
    from titan_dsv4.multiprocess import run_on_ranks

    apply_cpu_support()

    args = model_args(ns.dim, ns.experts, ns.layers)
    with tempfile.TemporaryDirectory(dir=ns.root) as root:
        folders = write_checkpoints(root, args)
        for name, folder in folders.items():
            results = run_on_ranks(_load_on_rank, 2, folder, args, timeout=900)
            print(f"{name}: checkpoint {folder_mib(folder):.0f} MiB on disk")
            for rank, r in enumerate(results):
                print(
                    f"  rank {rank}: model shard {r['model_shard_mib']:.0f} MiB, RSS before load "
                    f"{r['rss_before_mib']:.0f} MiB, "
                    f"peak RSS during load {r['peak_mib']:.0f} MiB (+{r['increase_mib']:.0f} MiB), "
                    f"{r['seconds']:.1f} s"
                )


if __name__ == "__main__":
    main()
