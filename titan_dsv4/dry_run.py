"""Dry run at scale: ``COMM_MODE=fake_backend NGPU=64 ./run_train.sh --model deepseek_v4 --config ...``.

One process, TorchTitan's fake backend standing in for NGPU ranks: builds Titan's meshes, the model on
the meta device and runs ``parallelize_deepseek_v4`` (under pipeline parallelism: the train spec's
``pipelining_fn``, which splits the model into stages and parallelizes this rank's), then prints the FSDP unit
plan (units by kind and compute dtype, parameters and bytes per rank, resharding, HCA alignment) and one
rank's memory and traffic per step (``infra/planning/``): parameter, gradient and AdamW bytes and the largest
unsharded unit from the built plan, activations at the config's seq_len and AC mode, all-gather /
reduce-scatter / all-to-all bytes, and whether the layout fits a device of ``--deepseek_v4.gpu_memory_gib``
GiB (80 when unset: an 80 GB GPU), with a layout that would fit when it does not. The analytic estimate,
which the trainer checks before it allocates, is printed beside the built plan's figures. Under pipeline
parallelism the process is pipeline rank 0: its stages are built; the memory printed is the pipeline rank
with the highest peak (analytic), with the schedule, bubble and stage-to-stage (p2p) bytes, and the
cross-check is rank 0's. Nothing is allocated, so Flash and Pro plans run on a laptop;
``--parallelism.expert_parallel_degree``, ``--parallelism.data_parallel_replicate_degree`` and
``--parallelism.pipeline_parallel_degree`` choose the layout.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import replace

import torch
from torchtitan.config import ConfigManager, JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.utils import init_fake_mode
from torchtitan.protocols.train_spec import get_train_spec

import titan_dsv4  # noqa: F401  (registers the deepseek_v4 train spec)
from titan_dsv4.cpu import apply_cpu_support
from titan_dsv4.infra.planning import (
    GIB,
    Layout,
    Training,
    built_units,
    dry_run_device,
    estimate,
    fitting_layout,
    format_memory,
    format_traffic,
)
from titan_dsv4.infra.unit_plan import fsdp_units
from titan_dsv4.job_config import parallel_dims_of
from titan_dsv4.model.sequence_shard import check_context_parallel
from titan_dsv4.refusals import refusals_exit, shut_down_process_groups


def build_plan(job: JobConfig, world_size: int) -> dict:
    dims = parallel_dims_of(job, world_size)
    dims.build_mesh()
    spec = get_train_spec(job.model.name)
    args = spec.model_args[job.model.flavor].replace()
    args.update_from_config(job)
    check_context_parallel(job, args)  # a seq_len the cp chunks cannot split is refused here too
    with torch.device("meta"):
        model = spec.model_cls(args)
    job.comm.mode = "fake_backend"  # parallelize's fit check guards real runs; the dry run reports the fit
    if dims.pp_enabled:  # this process is pipeline rank 0: its stages, each parallelized
        device = torch.device("cpu")
        _, parts, _, _ = spec.pipelining_fn(
            model, dims, job, device, args, spec.parallelize_fn, spec.build_loss_fn(job)
        )
    else:
        parts = [spec.parallelize_fn(model, dims, job)]
    plan = summarize(parts, dims, job, world_size)
    plan["memory"] = memory_plan(parts, args, dims, job)
    return plan


def memory_plan(parts, args, dims: ParallelDims, job: JobConfig) -> dict:
    """One rank's memory and traffic from the built units (MTP from shapes until the model has it), the fit
    against the dry run's device, and the analytic estimate (the trainer's check) beside them.

    Under pipeline parallelism: "estimate" is the pipeline rank with the highest peak (analytic: the other
    ranks' stages are not built here), "built" and "analytic" are pipeline rank 0's, built and from shapes.
    """
    layout = Layout.of(dims)
    training = Training.of(job, layout)
    device, source = dry_run_device(job)
    units = [u for part in parts for u in built_units(part)]
    if layout.pp > 1:
        built = estimate(args, layout, training, units=units, pp_rank=0)
        analytic = estimate(args, layout, training, pp_rank=0)
        reported = estimate(args, layout, training)
    else:
        built = reported = estimate(args, layout, training, units=units)
        analytic = estimate(args, layout, training)
    fits = reported.fits(device)
    base = replace(training, local_batch_size=max(1, training.local_batch_size // layout.pp))
    return {
        "device_gib": device / GIB,
        "device_source": source,
        "fits": fits,
        "fitting_layout": None if fits else fitting_layout(args, base, device),
        "estimate": reported.figures(),
        **({"built": built.figures()} if layout.pp > 1 else {}),
        "analytic": analytic.figures(),
    }


def summarize(parts: list, dims: ParallelDims, job: JobConfig, world_size: int) -> dict:
    units = [u for part in parts for u in fsdp_units(part)]
    by_kind: dict[str, dict] = defaultdict(lambda: defaultdict(int))
    per_rank: dict[str, dict] = defaultdict(lambda: {"params": 0, "bytes": 0})
    for u in units:
        compute = "/".join(sorted(str(d).replace("torch.", "") for d in u.compute_dtypes))
        k = by_kind[u.kind]
        k["units"] += 1
        k[f"units_computing_{compute}"] += 1
        k["reshard_after_forward"] += int(u.reshard_after_forward)
        gathered = u.numel // dims.ep if u.kind == "experts" else u.numel  # an EP rank's own experts
        k["max_unsharded_bytes"] = max(
            k["max_unsharded_bytes"], gathered * (2 if compute == "bfloat16" else 4)
        )
        storage = "/".join(sorted(str(d).replace("torch.", "") for d in u.storage_dtypes))
        per_rank[storage]["params"] += u.local_numel
        per_rank[storage]["bytes"] += u.local_bytes
    hca = [c for part in parts for c in part.hca_compressors()]
    groups = {id(c.hca_param_sync_group): c.hca_param_sync_group for c in hca}
    group = next(iter(groups.values())) if len(groups) == 1 else None
    mesh = _fsdp_mesh_description(dims)
    return {
        "world_size": world_size,
        "flavor": job.model.flavor,
        "fsdp_mesh": mesh,
        "mixed_precision_param": job.training.mixed_precision_param,
        "units_total": len(units),
        "units_by_kind": {k: dict(v) for k, v in by_kind.items()},
        "per_rank_by_storage_dtype": {k: dict(v) for k, v in per_rank.items()},
        "hca_alignment": {
            "hca_layers": len(hca),
            "enabled": group is not None,
            "group_size": None if group is None else torch.distributed.get_world_size(group),
        },
    }


def _fsdp_mesh_description(dims: ParallelDims) -> str:
    from titan_dsv4.infra.parallelize import data_parallel_mesh

    mesh = data_parallel_mesh(dims)
    return "none" if mesh is None else f"{mesh.mesh_dim_names} {tuple(mesh.shape)}"


def format_plan(plan: dict) -> str:
    gib = 1024**3
    lines = [
        f"DeepSeek-V4 '{plan['flavor']}' FSDP unit plan on {plan['world_size']} ranks "
        f"(mesh {plan['fsdp_mesh']}, blocks compute in {plan['mixed_precision_param']})",
        f"  units: {plan['units_total']}",
    ]
    for kind, v in sorted(plan["units_by_kind"].items()):
        dtypes = ", ".join(
            f"{k.removeprefix('units_computing_')} x{n}"
            for k, n in v.items()
            if k.startswith("units_computing_")
        )
        largest = v["max_unsharded_bytes"] / gib
        lines.append(
            f"    {kind:7s} {v['units']:5d} units ({dtypes}); reshard after forward: "
            f"{v['reshard_after_forward']}/{v['units']}; largest unsharded {largest:.3f} GiB"
        )
    for dtype, v in plan["per_rank_by_storage_dtype"].items():
        lines.append(f"  per rank, {dtype} storage: {v['params']:,} params, {v['bytes'] / gib:.2f} GiB")
    h = plan["hca_alignment"]
    state = f"enabled, group size {h['group_size']}" if h["enabled"] else "disabled"
    lines.append(
        f"  HCA alignment: {state} ({h['hca_layers']} HCA layers; one all-reduce per step when enabled)"
    )
    if "memory" in plan:
        lines += format_memory_plan(plan["memory"])
    return "\n".join(lines)


def format_memory_plan(memory: dict) -> list[str]:
    """The per-rank memory and traffic tables, the verdict, and the analytic cross-check."""
    device_gib, reported, analytic = memory["device_gib"], memory["estimate"], memory["analytic"]
    built = memory.get("built", reported)
    lines = [format_memory(reported, int(device_gib * GIB), f"; {memory['device_source']}")]
    if not memory["fits"]:
        lines.append(f"  a layout that fits {device_gib:g} GiB: {memory['fitting_layout']}")
    lines.append(format_traffic(reported))
    pairs = [
        ("parameters", built["memory_gib"]["parameters"], analytic["memory_gib"]["parameters"]),
        ("largest unit", built["memory_gib"]["largest_unit"], analytic["memory_gib"]["largest_unit"]),
        ("peak", built["memory_gib"]["peak"], analytic["memory_gib"]["peak"]),
        (
            "all-gather",
            built["communication_gib_per_step"]["all_gather"],
            analytic["communication_gib_per_step"]["all_gather"],
        ),
        (
            "reduce-scatter",
            built["communication_gib_per_step"]["reduce_scatter"],
            analytic["communication_gib_per_step"]["reduce_scatter"],
        ),
    ]
    checks = ", ".join(f"{name} {b:.2f} / {a:.2f}" for name, b, a in pairs)
    rank = " (pipeline rank 0)" if "built" in memory else ""
    lines.append(f"  built plan / analytic estimate{rank} (the trainer's check), GiB: {checks}")
    return lines


def main() -> None:
    apply_cpu_support()  # the fake backend's meshes live on the CPU when there is no GPU
    job = ConfigManager().parse_args()
    world_size = int(os.environ.get("NGPU", "8"))
    init_fake_mode(world_size, "fake_backend")
    with refusals_exit():
        plan = build_plan(job, world_size)
    print(format_plan(plan), flush=True)
    out = os.path.join(job.job.dump_folder, f"unit_plan_{job.model.flavor}_{world_size}.json")
    os.makedirs(job.job.dump_folder, exist_ok=True)
    with open(out, "w") as f:
        json.dump(plan, f, indent=2)
    print(f"  written to {out}")
    shut_down_process_groups()


if __name__ == "__main__":
    main()
