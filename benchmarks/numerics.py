#!/usr/bin/env python
"""Numerics report, bf16 against fp32 part by part: ``python benchmarks/numerics.py [--steps 300] [--quick]``.

1. trains the debug model (bf16, ``--debug.seed 42``) with ./run_train.sh and exports it in float32,
   or reuses an export given by ``--checkpoint DIR``;
2. evaluates those weights on the embedded validation corpus (Titan's own 512-token rows): fp32 (the
   reference); bf16 as training computes it (FSDP2 with the bf16 policy and the fp32 islands, on one
   gloo rank, checked to build the same unit plan as 2-rank training) with no ``fp32_compute`` part
   ("before"), with each part alone, with all four and with the recommended set ("after"); bf16
   without islands; transformers' DeepseekV4ForCausalLM entirely in bf16 (and in fp32, a parity check).
   Each against the reference: logit RMS error / logit RMS, top-1 agreement, loss difference, tokens
   whose routed expert set changes (learned and hash layers) and CSA top-k picks that change;
3. times Titan's training step (./run_train.sh, 2 ranks) with no part, each part, all four and the
   candidate set, in interleaved rounds, as ratios to the no-part step of the same round;
4. prints the tables and the parts that pay, and writes benchmarks/results/numerics.json (the
   subprocess logs go to benchmarks/results/logs/numerics.log).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from titan_dsv4.cpu import apply_cpu_support
from titan_dsv4.launch import ROOT, IdleWait, OtherCores, losses, run_train, step_lines, step_metrics
from titan_dsv4.model.args import CSA, FP32_COMPUTE_PARTS
from titan_dsv4.model.hf_config import args_from_hf_config

RESULTS = ROOT / "benchmarks" / "results"
LOG = RESULTS / "logs" / "numerics.log"
SEQ_LEN, LOCAL_BATCH, SEED = 512, 2, 42  # train_configs/debug_model.toml, and the seed of every run
PARTS = FP32_COMPUTE_PARTS
# A part pays when it cuts an error measure by ERROR_GAIN (relative to "before") and costs at most COST_LIMIT
# of the step (median over rounds of its fastest step over the no-part run's fastest step). Flip counts
# must also fall by more than FLIP_SIGMAS Poisson standard errors of the "before" count, so that a handful
# of flips is not read as a gain, and the logit error must fall on enough rows that chance is unlikely
# (one-sided sign test, p < SIGN_TEST_P).
ERROR_GAIN, COST_LIMIT, FLIP_SIGMAS, SIGN_TEST_P = 0.10, 0.05, 2.0, 0.05
IDLE_CORES, IDLE_WAIT_S = 0.3, 600.0  # before each timing run: wait for others to go quiet (shared budget)
MODES = {  # training steps, eval rows, timing warm-up + timed steps, timing rounds
    "full": dict(steps=300, rows=8, warmup=2, timed=12, rounds=3),
    "quick": dict(steps=20, rows=2, warmup=1, timed=3, rounds=2),
}


# ---- subprocesses: training, export, step timing --------------------------------------------------


def log_section(title: str, text: str) -> None:
    """Append one subprocess's output to the report's log, so that every figure can be traced."""
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with open(LOG, "a") as f:
        f.write(f"\n===== {title} ({datetime.datetime.now().isoformat(timespec='seconds')}) =====\n{text}")


def logged_run(args: list[str], title: str, keep_log: bool, timeout: float) -> tuple[str, float]:
    """(log, cores other processes used meanwhile) of ``./run_train.sh --model deepseek_v4 ARGS``, logged to
    LOG; raises on failure. Timing runs log only their step lines: a noisy machine is what their spread
    must show."""
    with OtherCores() as others:
        code, text = run_train(args, timeout)
    kept = text if keep_log or code else step_lines(text)
    log_section(
        f"{title}: ./run_train.sh {' '.join(args)} -> exit {code}, {others.wall_s:.0f} s", kept + "\n"
    )
    if code:
        raise RuntimeError(f"{title} failed (exit {code}); see {LOG}:\n{text[-3000:]}")
    return text, others.cores


def train_and_export(steps: int, dump: Path) -> tuple[Path, dict]:
    """Train ``steps`` bf16 steps from the fixed seed, export float32 HF weights; (export folder, record)."""
    if (dump / "checkpoint").exists():
        shutil.rmtree(dump / "checkpoint")  # this script's own folder; Titan would resume from it
    args = [
        "--training.steps", str(steps), "--debug.seed", str(SEED), "--job.dump_folder", str(dump),
        "--checkpoint.enable", "--checkpoint.interval", str(steps), "--checkpoint.last_save_model_only",
        "--checkpoint.last_save_in_hf", "--checkpoint.export_dtype", "float32",
        "--deepseek_v4.fp32_compute", "",  # the weights the report was made on were trained with no part
    ]  # fmt: skip
    start = time.perf_counter()
    log, others = logged_run(args, f"train {steps} steps", keep_log=True, timeout=3 * 3600)
    logged = losses(log)
    record = {
        "steps": steps,
        "wall_s": time.perf_counter() - start,
        "other_cores_during": others,
        "loss_first": logged.get(1),
        "loss_last": logged.get(steps),
        "command": "./run_train.sh --model deepseek_v4 " + " ".join(args),
    }
    return dump / "checkpoint" / f"step-{steps}", record


def timing_run(parts: tuple[str, ...], warmup: int, timed: int, idle: IdleWait) -> dict:
    """One 2-rank Trainer run: per-step time from Titan's ``tps`` (the slower rank), warm-up dropped."""
    args = ["--training.steps", str(warmup + timed), "--debug.seed", str(SEED)]
    args += ["--deepseek_v4.fp32_compute", ",".join(parts)]  # "" for none (the default is the pair)
    others_before = idle.wait()
    with tempfile.TemporaryDirectory(dir=ROOT / "outputs") as dump:
        log, others = logged_run(
            args + ["--job.dump_folder", dump], f"timing {label(parts)}", keep_log=False, timeout=900
        )
    by_step: dict[int, float] = {}
    for per_rank in step_metrics(log).values():
        for step, figures in per_rank.items():
            by_step[step] = max(by_step.get(step, 0.0), LOCAL_BATCH * SEQ_LEN / figures["tps"])
    step_s = [by_step[s] for s in sorted(by_step) if s > warmup]
    return {
        "step_s": step_s,
        "median_s": statistics.median(step_s),
        "min_s": min(step_s),
        "losses_rank0": [loss for _, loss in sorted(losses(log).items())],
        "other_cores_before": others_before,
        "other_cores_during": others,
    }


def ratios(runs: list[dict], base: list[dict], key: str) -> dict:
    """Per round, this configuration's ``key`` step over the no-part run's: median, min and max."""
    values = [run[key] / b[key] for run, b in zip(runs, base)]
    return {"ratio": statistics.median(values), "ratio_min": min(values), "ratio_max": max(values)}


def time_configs(configs: list[tuple[str, ...]], rounds: int, warmup: int, timed: int) -> dict[str, dict]:
    """Each configuration once per round, the order rotated every round, no part included in every round.
    A configuration's ratio in a round is to that round's no-part run: of the least-disturbed (fastest)
    step, the primary figure on a shared machine, and of the median step."""
    configs = [()] + [c for c in configs if c]
    runs: dict[str, list[dict]] = {label(c): [] for c in configs}
    idle = IdleWait(IDLE_WAIT_S, IDLE_CORES)
    for r in range(rounds):
        shift = r % len(configs)
        for parts in configs[shift:] + configs[:shift]:
            print(f"[numerics] timing round {r + 1}/{rounds}: {label(parts)}", file=sys.stderr, flush=True)
            runs[label(parts)].append(timing_run(parts, warmup, timed, idle))
    base = runs[label(())]
    return {
        name: {
            "rounds": rs,
            "min_s": statistics.median(run["min_s"] for run in rs),
            "median_s": statistics.median(run["median_s"] for run in rs),
            **ratios(rs, base, "min_s"),
            "median_step": ratios(rs, base, "median_s"),
        }
        for name, rs in runs.items()
    }


def merge_timing(timing: dict[str, dict], batch: dict[str, dict]) -> None:
    """Add a batch of rounds; its own no-part runs (its ratios' base) keep a name of their own."""
    others = [name for name in batch if name != "none"]
    for name, record in batch.items():
        if name == "none" and "none" in timing:
            name = f"none (rounds with {', '.join(others)})"
        timing[name] = record


def label(parts: tuple[str, ...]) -> str:
    return "+".join(parts) if parts else "none"


# ---- evaluation data and models ---------------------------------------------------------------------


def validation_rows(n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) [n, 512]: the first rows Titan's text dataset builds from the validation corpus."""
    from torchtitan.components.tokenizer import HuggingFaceTokenizer
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataset

    from titan_dsv4.data import register_datasets

    register_datasets()  # the packaged corpus in Titan's dataset table (the train spec's builders do this)
    tokenizer = HuggingFaceTokenizer(str(ROOT / "titan_dsv4" / "assets" / "tokenizer"))
    dataset = HuggingFaceTextDataset("dsv4_corpus_validation", None, tokenizer, seq_len=SEQ_LEN)
    rows = []
    for x, y in dataset:
        rows.append((x["input"], y))
        if len(rows) == n_rows:
            break
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def load_reference(folder: Path):
    """(fp32 model, its args, its state dict): the export read through the package's own loader."""
    import torch.distributed.checkpoint as dcp

    from titan_dsv4.checkpoint.adapter import DeepSeekV4CheckpointAdapter
    from titan_dsv4.model import DeepSeekV4Model

    args = args_from_hf_config(str(folder)).replace(max_seq_len=SEQ_LEN, fp32_compute=[])
    model = DeepSeekV4Model(args)
    adapter = DeepSeekV4CheckpointAdapter(args, None)
    hf_state = adapter.to_hf(model.state_dict())
    dcp.load(hf_state, storage_reader=adapter.get_hf_storage_reader(str(folder)), no_dist=True)
    model.load_state_dict(adapter.from_hf(hf_state))
    return model.eval(), args, model.state_dict()


def single_rank_mesh():
    """A 1-rank gloo group and 1-D ('fsdp',) mesh: FSDP2's bf16 numerics without a second process."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=0, world_size=1)
    return init_device_mesh("cpu", (1,), mesh_dim_names=("fsdp",))


def bf16_policy():
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def fresh_model(args, state: dict, parts: tuple[str, ...]):
    """A model with ``parts`` in fp32 and the reference's weights (fp32 storage, as training keeps them)."""
    from titan_dsv4.model import DeepSeekV4Model

    model = DeepSeekV4Model(args.replace(fp32_compute=tuple(parts)))
    model.load_state_dict(state)
    return model.eval()


def bf16_as_trained(args, state: dict, parts: tuple[str, ...], mesh):
    """The training path's FSDP2: bf16 blocks, fp32 island units (titan_dsv4.infra.parallelize.apply_fsdp)."""
    from titan_dsv4.infra.parallelize import apply_fsdp

    model = fresh_model(args, state, parts)
    apply_fsdp(model, mesh, mp_policy=bf16_policy(), reshard_after_forward=False)
    return model


def bf16_without_islands(args, state: dict, mesh):
    """What the islands buy: every block and the root one bf16 FSDP2 unit, no fp32 island split off."""
    from torch.distributed.fsdp import fully_shard

    model = fresh_model(args, state, ())
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, mp_policy=bf16_policy(), reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=bf16_policy(), reshard_after_forward=False)
    return model


def transformers_model(folder: Path, dtype: torch.dtype):
    """transformers' DeepseekV4ForCausalLM from the export, every weight and activation in ``dtype``."""
    from transformers import DeepseekV4ForCausalLM

    model = DeepseekV4ForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation="eager")
    return model.eval()


# ---- unit plan: one gloo rank here vs two-rank training ---------------------------------------------


def plan_signature(model) -> list[tuple]:
    """Per FSDP unit: name, members, kind, compute / output / reduce dtypes (not sizes or resharding)."""
    from titan_dsv4.infra.unit_plan import fsdp_units

    return [
        (u.name, u.members, u.kind, tuple(sorted(map(str, u.compute_dtypes))), str(u.output_dtype),
         str(u.reduce_dtype))
        for u in fsdp_units(model)
    ]  # fmt: skip


def _training_plan(rank: int, world_size: int) -> list[tuple]:
    """On each of 2 gloo ranks: debug_model.toml's job, a meta model and ``parallelize_deepseek_v4``."""
    from torchtitan.config import ConfigManager
    from torchtitan.distributed import ParallelDims

    from titan_dsv4.flavors import deepseek_v4_args
    from titan_dsv4.infra.parallelize import parallelize_deepseek_v4
    from titan_dsv4.model import DeepSeekV4Model

    os.chdir(ROOT)
    job = ConfigManager().parse_args(["--job.config_file", "train_configs/debug_model.toml"])
    args = deepseek_v4_args[job.model.flavor].replace()
    args.update_from_config(job)
    dims = ParallelDims(
        dp_replicate=1, dp_shard=world_size, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=world_size
    )
    dims.build_mesh()
    with torch.device("meta"):
        model = DeepSeekV4Model(args)
    parallelize_deepseek_v4(model, dims, job)
    return plan_signature(model)


def training_plan() -> list[tuple]:
    """The unit plan that 2-rank training builds (rank 0's; both ranks must agree)."""
    from titan_dsv4.multiprocess import run_on_ranks

    plans = run_on_ranks(_training_plan, 2, timeout=300)
    if plans[0] != plans[1]:
        raise RuntimeError("the two training ranks built different FSDP unit plans")
    return plans[0]


# ---- forward passes with routing and pick capture ----------------------------------------------------


@dataclass
class Outputs:
    """One variant's fp32 logits [R, S, V], routed experts [R*S, k] and CSA picks [R, S, k] per layer."""

    logits: torch.Tensor
    routes: dict[int, torch.Tensor] = field(default_factory=dict)
    picks: dict[int, torch.Tensor] = field(default_factory=dict)


def layer_of(name: str) -> int:
    return int(re.search(r"layers\.(\d+)\.", name + ".").group(1))


def capture_site(module, transformers: bool):
    """(store, reader) when ``module``'s output holds routed experts ("routes") or CSA picks ("picks")."""
    from titan_dsv4.model.attention import Compressor
    from titan_dsv4.model.moe import DeepSeekV4Router

    kind = type(module).__name__
    if transformers and kind in ("DeepseekV4TopKRouter", "DeepseekV4HashRouter"):
        return "routes", lambda output: output[2]
    if transformers and kind == "DeepseekV4Indexer":
        return "picks", lambda output: output
    if not transformers and isinstance(module, DeepSeekV4Router):
        return "routes", lambda output: output[1]
    if not transformers and isinstance(module, Compressor) and module.kind == CSA:
        return "picks", lambda output: output[1].picked
    return None


def keeper(store: dict, layer: int, read):
    """A forward hook appending what ``read`` takes from the output to ``store[layer]``."""

    def hook(module, inputs, output):
        store.setdefault(layer, []).append(read(output).detach().clone())

    return hook


def capture_hooks(model, stores: dict[str, dict], transformers: bool) -> list:
    """Forward hooks that keep each router's selection and each CSA indexer's picks, keyed by layer."""
    handles = []
    for name, module in model.named_modules():
        site = capture_site(module, transformers)
        if site is not None:
            store, read = site
            handles.append(module.register_forward_hook(keeper(stores[store], layer_of(name), read)))
    return handles


@torch.no_grad()
def run_model(model, inputs: torch.Tensor, batch: int, transformers: bool = False) -> Outputs:
    """Logits and captures over ``inputs`` in batches of ``batch`` rows."""
    routes, picks, logits = {}, {}, []
    handles = capture_hooks(model, {"routes": routes, "picks": picks}, transformers)
    try:
        for chunk in inputs.split(batch):
            out = model(input_ids=chunk).logits if transformers else model(chunk)[0]
            logits.append(out.float())
    finally:
        for h in handles:
            h.remove()
    return Outputs(
        torch.cat(logits),
        {k: torch.cat(v) for k, v in routes.items()},
        {k: torch.cat(v) for k, v in picks.items()},
    )


# ---- comparison against the fp32 reference ----------------------------------------------------------


def route_flips(ref: torch.Tensor, out: torch.Tensor) -> tuple[int, int]:
    """(tokens whose routed expert set differs, tokens): sets, so the order of the k experts is ignored."""
    changed = (ref.sort(dim=-1).values != out.sort(dim=-1).values).any(dim=-1)
    return int(changed.sum()), changed.numel()


def pick_flips(ref: torch.Tensor, out: torch.Tensor) -> tuple[int, int]:
    """(reference picks the variant does not pick, reference picks); -1 (no entry) is not a pick."""
    valid = ref >= 0
    kept = ((ref[..., :, None] == out[..., None, :]) & (out[..., None, :] >= 0)).any(dim=-1) & valid
    return int(valid.sum() - kept.sum()), int(valid.sum())


def flipped_tokens(ref: Outputs, out: Outputs) -> torch.Tensor:
    """[R*S] bool: the token's routed expert set or its CSA picks differ from the reference in some layer."""
    flipped = torch.zeros(ref.logits.shape[0] * ref.logits.shape[1], dtype=torch.bool)
    for i, sel in ref.routes.items():
        flipped |= (sel.sort(dim=-1).values != out.routes[i].sort(dim=-1).values).any(dim=-1)
    for i, picks in ref.picks.items():
        a, b = picks.flatten(0, 1).sort(dim=-1).values, out.picks[i].flatten(0, 1).sort(dim=-1).values
        flipped |= (a != b).any(dim=-1)
    return flipped


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")


def flip_totals(per_layer: dict[int, tuple[int, int]], layers) -> dict:
    changed = sum(per_layer[i][0] for i in layers if i in per_layer)
    total = sum(per_layer[i][1] for i in layers if i in per_layer)
    return {"changed": changed, "total": total, "fraction": changed / total if total else None}


def compare(ref: Outputs, out: Outputs, labels: torch.Tensor, hash_layers: set[int]) -> dict:
    """Every figure of one variant against the fp32 reference (the same tokens)."""
    diff = out.logits - ref.logits
    rms_ref = ref.logits.pow(2).mean().sqrt()
    per_row = diff.pow(2).mean(dim=(1, 2)).sqrt() / ref.logits.pow(2).mean(dim=(1, 2)).sqrt()
    ref_loss, loss = token_losses(ref.logits, labels), token_losses(out.logits, labels)
    routes = {i: route_flips(ref.routes[i], out.routes[i]) for i in ref.routes}
    picks = {i: pick_flips(ref.picks[i], out.picks[i]) for i in ref.picks}
    learned = [i for i in routes if i not in hash_layers]
    per_token = diff.flatten(0, 1).pow(2).mean(dim=-1)  # [R*S] squared error per token
    clean = ~flipped_tokens(ref, out)
    return {
        "logit_rms_rel_err": float(diff.pow(2).mean().sqrt() / rms_ref),
        "logit_rms_rel_err_no_flip_tokens": float(per_token[clean].mean().sqrt() / rms_ref),
        "no_flip_tokens": float(clean.float().mean()),
        "logit_rel_err_token_median": float(per_token.sqrt().median() / rms_ref),
        "logit_rms_rel_err_per_row": [float(v) for v in per_row],
        "logit_max_abs_err": float(diff.abs().max()),
        "top1_agreement": float((out.logits.argmax(-1) == ref.logits.argmax(-1)).float().mean()),
        "loss": float(loss.mean()),
        "loss_diff": float(loss.mean() - ref_loss.mean()),
        "loss_abs_diff_per_token": float((loss - ref_loss).abs().mean()),
        "expert_flips_learned": flip_totals(routes, learned),
        "expert_flips_hash": flip_totals(routes, sorted(hash_layers)),
        "csa_pick_flips": flip_totals(picks, sorted(picks)),
        "per_layer": {
            "expert_flips": {str(i): list(v) for i, v in sorted(routes.items())},
            "csa_pick_flips": {str(i): list(v) for i, v in sorted(picks.items())},
        },
    }


class Evaluation:
    """The reference outputs and what every variant needs, kept while the step timing runs."""

    def __init__(self, folder: Path, rows: int, batch: int):
        self.folder = folder
        self.inputs, self.labels = validation_rows(rows)
        self.batch = batch
        self.model, self.args, self.state = load_reference(folder)
        self.hash_layers = {i for i in range(self.args.n_layers) if i < self.args.n_hash_layers}
        self.ref = run_model(self.model, self.inputs, batch)
        self.mesh = single_rank_mesh()
        self.variants: dict[str, dict] = {}

    def record(self, name: str, out: Outputs, description: str) -> dict:
        result = compare(self.ref, out, self.labels, self.hash_layers)
        result["description"] = description
        self.variants[name] = result
        print(f"[numerics] evaluated {name}: rel err {result['logit_rms_rel_err']:.3e}", file=sys.stderr)
        return result

    def ours(self, parts: tuple[str, ...], attn_impl: str = "sparse") -> dict:
        """bf16 as training computes it, with ``parts`` in fp32; named "bf16 [parts]"."""
        model = bf16_as_trained(self.args.replace(attn_impl=attn_impl), self.state, parts, self.mesh)
        suffix = "" if attn_impl == "sparse" else f", {attn_impl} kernel"
        return self.record(
            f"bf16 [{label(parts)}]{suffix}",
            run_model(model, self.inputs, self.batch),
            f"FSDP2 bf16 policy + fp32 islands, {attn_impl} attention, fp32_compute="
            + (",".join(parts) or "()"),
        )

    def baselines(self) -> None:
        """A noise floor (the dense kernel: the same attention, another summation order), the islands' own
        contribution, and transformers in bf16 (and in fp32: the same weights, checked)."""
        self.ours((), attn_impl="dense")
        model = bf16_without_islands(self.args, self.state, self.mesh)
        self.record("bf16, no islands", run_model(model, self.inputs, self.batch), "FSDP2 bf16, no islands")
        for dtype, name in ((torch.bfloat16, "transformers bf16"), (torch.float32, "transformers fp32")):
            hf = transformers_model(self.folder, dtype)
            out = run_model(hf, self.inputs, self.batch, transformers=True)
            self.record(name, out, f"DeepseekV4ForCausalLM, eager, every tensor {dtype}")


# ---- what pays --------------------------------------------------------------------------------------


def relative_reduction(before: float, after: float) -> float | None:
    return None if before == 0 else (before - after) / before


def flips_fall_beyond_noise(before: dict, after: dict) -> bool:
    """The flip count falls by more than FLIP_SIGMAS Poisson standard errors of the "before" count."""
    return before["changed"] - after["changed"] > FLIP_SIGMAS * math.sqrt(before["changed"])


def rows_agree(improved: int, rows: int) -> bool:
    """Sign test across rows: P(at least ``improved`` of ``rows`` improve by chance) < SIGN_TEST_P."""
    return sum(math.comb(rows, k) for k in range(improved, rows + 1)) / 2**rows < SIGN_TEST_P


LOGIT_KEYS = ("logit_rms_rel_err", "logit_rms_rel_err_no_flip_tokens")


def noise_floor(before: dict, other_order: dict) -> dict[str, float]:
    """How much each logit error moves when only the summation order changes (the dense attention kernel
    instead of the sparse one): a part's reduction below this is indistinguishable from reordering."""
    return {key: abs(relative_reduction(before[key], other_order[key])) for key in LOGIT_KEYS}


def error_gains(before: dict, variant: dict, noise: dict[str, float]) -> dict:
    """Relative reductions against "before", and which count: a logit error (all tokens, or tokens with no
    flip anywhere) by >= ERROR_GAIN and beyond the noise floor, the all-token one with the rows agreeing
    (sign test); a flip count by >= ERROR_GAIN and beyond Poisson noise."""
    gains = {key: relative_reduction(before[key], variant[key]) for key in LOGIT_KEYS}
    for key in ("expert_flips_learned", "csa_pick_flips"):
        gains[key] = relative_reduction(before[key]["changed"], variant[key]["changed"])
    pairs = list(zip(before["logit_rms_rel_err_per_row"], variant["logit_rms_rel_err_per_row"]))
    improved = sum(a > b for a, b in pairs)
    counted = [key for key in LOGIT_KEYS if gains[key] >= max(ERROR_GAIN, noise[key])]
    if not rows_agree(improved, len(pairs)) and "logit_rms_rel_err" in counted:
        counted.remove("logit_rms_rel_err")
    for key in ("expert_flips_learned", "csa_pick_flips"):
        if (gains[key] or 0) >= ERROR_GAIN and flips_fall_beyond_noise(before[key], variant[key]):
            counted.append(key)
    return {**gains, "rows_improved": [improved, len(pairs)], "counted": counted}


def candidates(ev: Evaluation, noise: dict[str, float]) -> tuple[str, ...]:
    """Parts whose error reduction, alone, counts (before their cost is known)."""
    before = ev.variants["bf16 [none]"]
    return tuple(p for p in PARTS if error_gains(before, ev.variants[f"bf16 [{p}]"], noise)["counted"])


def attribution_row(before: dict, variant: dict, noise: dict, timing: dict | None) -> dict:
    gains = error_gains(before, variant, noise)
    return {"gains": gains, "timing": timing, "verdict": verdict(gains, timing)}


def paying_combination(ev: Evaluation, noise: dict, rows: dict, timing_of) -> tuple[str, ...]:
    """When no part pays alone: the smallest set that pays, adding parts in order of their own no-flip-token
    gain (only gains beyond the noise floor); its row joins ``rows``. () when no such set pays."""
    before, key = ev.variants["bf16 [none]"], "logit_rms_rel_err_no_flip_tokens"
    own = {p: error_gains(before, ev.variants[f"bf16 [{p}]"], noise)[key] for p in PARTS}
    ranked = sorted((p for p in PARTS if own[p] > noise[key]), key=lambda p: -own[p])
    for n in range(2, len(ranked) + 1):
        parts = tuple(p for p in PARTS if p in ranked[:n])
        if f"bf16 [{label(parts)}]" not in ev.variants:
            ev.ours(parts)
        variant = ev.variants[f"bf16 [{label(parts)}]"]
        if error_gains(before, variant, noise)["counted"]:  # the smallest set whose error gain counts
            rows[label(parts)] = attribution_row(before, variant, noise, timing_of(parts))
            return parts if rows[label(parts)]["verdict"] == "yes" else ()
    return ()


# ---- report -----------------------------------------------------------------------------------------


GAIN_KEYS = (
    "logit_rms_rel_err",
    "logit_rms_rel_err_no_flip_tokens",
    "expert_flips_learned",
    "csa_pick_flips",
)


def pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def flips_cell(f: dict) -> str:
    return "-" if f["total"] == 0 else f"{pct(f['fraction'])} ({f['changed']})"


def variant_table(variants: dict[str, dict]) -> list[str]:
    lines = [
        "| variant | logit RMS err / RMS | same, no-flip tokens (share) | top-1 agree | mean loss diff "
        "| mean abs loss diff/token | expert-set flips, learned (hash) | CSA pick flips |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, v in variants.items():
        lines.append(
            f"| {name} | {v['logit_rms_rel_err']:.3e} | {v['logit_rms_rel_err_no_flip_tokens']:.3e} "
            f"({pct(v['no_flip_tokens'], 1)}) | {pct(v['top1_agreement'])} | {v['loss_diff']:+.2e} "
            f"| {v['loss_abs_diff_per_token']:.2e} | {flips_cell(v['expert_flips_learned'])} "
            f"({flips_cell(v['expert_flips_hash'])}) | {flips_cell(v['csa_pick_flips'])} |"
        )
    return lines


def ratio_cell(t: dict | None) -> str:
    if t is None:
        return "not timed"
    m = t.get("median_step")
    median = f"; median step {m['ratio']:.3f} [{m['ratio_min']:.3f}-{m['ratio_max']:.3f}]" if m else ""
    return f"{t['ratio']:.3f} [{t['ratio_min']:.3f}-{t['ratio_max']:.3f}]{median}"


def attribution_table(rows: dict[str, dict]) -> list[str]:
    lines = [
        "| fp32 part(s) | logit err reduction (rows improved) | no-flip-token err reduction "
        "| learned expert-flip reduction | CSA pick-flip reduction "
        "| step time vs none, fastest step: median [min-max] of rounds | pays |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        g = r["gains"]
        cells = {k: pct(g[k], 1) + ("*" if k in g["counted"] else "") for k in GAIN_KEYS}
        improved = "{}/{}".format(*g["rows_improved"])
        lines.append(
            f"| {name} | {cells['logit_rms_rel_err']} ({improved}) "
            f"| {cells['logit_rms_rel_err_no_flip_tokens']} | {cells['expert_flips_learned']} "
            f"| {cells['csa_pick_flips']} | {ratio_cell(r['timing'])} | {r['verdict']} |"
        )
    return lines


def timing_table(timing: dict[str, dict]) -> list[str]:
    lines = [
        "| fp32_compute | fastest step s per round | median step s per round | other cores busy per round |",
        "|---|---|---|---|",
    ]
    for name, t in timing.items():
        fastest = ", ".join(f"{r.get('min_s', min(r['step_s'])):.3f}" for r in t["rounds"])
        steps = ", ".join(f"{r['median_s']:.3f}" for r in t["rounds"])
        others = ", ".join(f"{r['other_cores_during']:.2f}" for r in t["rounds"])
        lines.append(f"| {name} | {fastest} | {steps} | {others} |")
    return lines


def verdict(gains: dict, timing: dict | None) -> str:
    if not gains["counted"]:
        return "no (no reduction counts)"
    if timing is None:
        return "not timed"
    if timing["ratio"] > 1 + COST_LIMIT:
        return f"no (cost > {pct(COST_LIMIT, 0)})"
    return "yes"


# ---- main -------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps, rows and timed steps")
    parser.add_argument("--steps", type=int, help="training steps (default 300; quick 20)")
    parser.add_argument("--checkpoint", type=Path, help="reuse this float32 HF export instead of training")
    parser.add_argument("--rows", type=int, help="validation rows of 512 tokens (default 8; quick 2)")
    parser.add_argument("--rounds", type=int, help="timing rounds, each configuration once per round")
    parser.add_argument("--dump", type=Path, default=ROOT / "outputs" / "numerics", help="training output")
    parser.add_argument("--no-timing", action="store_true", help="numerics only (no step-time runs)")
    parser.add_argument(
        "--reuse-timing",
        type=Path,
        help="take the step timings a previous numerics.json holds; time the rest",
    )
    return parser.parse_args()


def main() -> None:
    opts = parse_args()
    apply_cpu_support()  # before anything builds a Titan mesh or model in this process
    mode = dict(MODES["quick" if opts.quick else "full"])
    for key in ("steps", "rows", "rounds"):
        if getattr(opts, key) is not None:
            mode[key] = getattr(opts, key)
    torch.set_num_threads(2)
    (ROOT / "outputs").mkdir(exist_ok=True)
    LOG.parent.mkdir(parents=True, exist_ok=True)
    reused = json.loads(opts.reuse_timing.read_text()) if opts.reuse_timing else {}
    last = RESULTS / "numerics.json"
    previous = reused or (json.loads(last.read_text()) if last.exists() else {})
    with open(LOG, "a" if reused else "w") as f:  # a reused report's logs stay: its timings come from them
        f.write(f"\nbenchmarks/numerics.py {' '.join(sys.argv[1:])}\n")
    start = time.perf_counter()

    training = {"reused": str(opts.checkpoint)} if opts.checkpoint else None
    if opts.checkpoint and previous.get("export") == str(opts.checkpoint):
        training = previous["training"]  # the run that trained this export, as the last report gave it
    folder = opts.checkpoint
    if folder is None:
        print(f"[numerics] training {mode['steps']} steps ...", file=sys.stderr, flush=True)
        folder, training = train_and_export(mode["steps"], opts.dump)

    print("[numerics] checking the unit plan against 2-rank training ...", file=sys.stderr, flush=True)
    plan_2 = training_plan()
    ev = Evaluation(folder, mode["rows"], batch=4)
    plan_1 = plan_signature(bf16_as_trained(ev.args, ev.state, (), ev.mesh))
    if plan_1 != plan_2:
        raise RuntimeError(f"1-rank FSDP plan differs from training's:\n{plan_1}\nvs\n{plan_2}")
    for parts in [(), *((p,) for p in PARTS), PARTS]:
        ev.ours(parts)
    ev.baselines()
    noise = noise_floor(ev.variants["bf16 [none]"], ev.variants["bf16 [none], dense kernel"])
    cands = candidates(ev, noise)

    timed_sets = [(p,) for p in PARTS] + [PARTS] + ([cands] if len(cands) > 1 and cands != PARTS else [])
    if len(cands) > 1 and cands != PARTS:
        ev.ours(cands)
    timing = dict(reused.get("timing", {}))
    if opts.reuse_timing:
        mode["timing_from"] = f"{opts.reuse_timing}, finished {reused.get('finished')}"

    def timing_of(parts: tuple[str, ...]) -> dict | None:
        """The step timing of ``parts`` (measured now if no report holds it yet), or None (--no-timing)."""
        if label(parts) not in timing and not opts.no_timing:
            timed = time_configs([parts], mode["rounds"], mode["warmup"], mode["timed"])
            merge_timing(timing, timed)
        return timing.get(label(parts))

    missing = [c for c in timed_sets if label(c) not in timing]
    if missing and not opts.no_timing:  # one batch of interleaved rounds for all of them
        timed = time_configs(missing, mode["rounds"], mode["warmup"], mode["timed"])
        merge_timing(timing, timed)
    before = ev.variants["bf16 [none]"]
    rows = {
        label(parts): attribution_row(
            before, ev.variants[f"bf16 [{label(parts)}]"], noise, timing.get(label(parts))
        )
        for parts in timed_sets
    }
    keep = tuple(p for p in PARTS if rows[p]["verdict"] == "yes") or paying_combination(
        ev, noise, rows, timing_of
    )
    if f"bf16 [{label(keep)}]" not in ev.variants:
        ev.ours(keep)
    after = ev.variants[f"bf16 [{label(keep)}]"]
    after_timing = timing_of(keep) if keep else timing.get("none")
    rows[f"after: {label(keep)}"] = {
        **attribution_row(before, after, noise, after_timing),
        "verdict": "recommended",
    }
    total_s = time.perf_counter() - start
    report = render(mode, training, ev, rows, timing, keep, total_s, noise)
    print(report)
    result = {
        "command": " ".join(["python", "benchmarks/numerics.py", *sys.argv[1:]]),
        "mode": "quick" if opts.quick else "full",
        "settings": mode,
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "total_wall_s": total_s,
        "cpu_count": os.cpu_count(),
        "versions": versions(),
        "training": training,
        "export": str(folder),
        "eval": {
            "rows": int(ev.inputs.shape[0]),
            "seq_len": SEQ_LEN,
            "tokens": int(ev.inputs.numel()),
            "reference_loss": float(token_losses(ev.ref.logits, ev.labels).mean()),
            "reference_logit_rms": float(ev.ref.logits.pow(2).mean().sqrt()),
            "unit_plan_matches_2_rank_training": True,
            "fsdp_units": len(plan_1),
        },
        "noise_floor": noise,
        "thresholds": {"error_gain": ERROR_GAIN, "cost_limit": COST_LIMIT, "flip_sigmas": FLIP_SIGMAS},
        "variants": ev.variants,
        "attribution": rows,
        "timing": timing,
        "timing_reused_from": str(opts.reuse_timing) if opts.reuse_timing else None,
        "recommended_fp32_compute": list(keep),
        "report": report,
    }
    (RESULTS / "numerics.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {(RESULTS / 'numerics.json').relative_to(ROOT)} and {LOG.relative_to(ROOT)}")


def versions() -> dict[str, str]:
    import torchtitan
    import transformers

    return {
        "torch": torch.__version__,
        "torchtitan": torchtitan.__version__,
        "transformers": transformers.__version__,
    }


def render(mode, training, ev: Evaluation, rows, timing, keep, total_s: float, noise: dict) -> str:
    ref_loss = float(token_losses(ev.ref.logits, ev.labels).mean())
    head = [
        f"titan_dsv4 numerics report - {datetime.datetime.now().isoformat(timespec='seconds')}, "
        f"total {total_s:.0f} s",
        (
            f"  model: trained {training['steps']} bf16 steps (seed {SEED}) in {training['wall_s']:.0f} s, "
            f"loss {training['loss_first']} -> {training['loss_last']}; export {ev.folder}"
            if "steps" in (training or {})
            else f"  model: export {ev.folder}"
        ),
        f"  eval: {ev.inputs.shape[0]} validation rows x {SEQ_LEN} tokens; fp32 reference loss "
        f"{ref_loss:.4f}, "
        f"logit RMS {float(ev.ref.logits.pow(2).mean().sqrt()):.3f}; the 1-rank FSDP2 model builds the same "
        "unit plan as 2-rank training",
        "",
        "Against the fp32 reference (expert-set flips: tokens whose routed set changes; CSA pick flips: "
        "reference picks that change):",
        *variant_table(ev.variants),
        "",
        "Noise floor (bf16 [none] with the dense kernel, i.e. another summation order only): the logit "
        f"error moves by {pct(noise['logit_rms_rel_err'], 1)} on all tokens and by "
        f"{pct(noise['logit_rms_rel_err_no_flip_tokens'], 1)} on tokens with no flip.",
        f"Per part, reductions against bf16 [none]. * counts: >= {pct(ERROR_GAIN, 0)} and beyond the noise "
        f"floor (all tokens: also on rows by a sign test, p < {SIGN_TEST_P:g}; flips: beyond {FLIP_SIGMAS:g} "
        f"Poisson errors). A part pays when a reduction counts and its step costs <= {pct(COST_LIMIT, 0)} "
        "(median over rounds of the fastest-step ratio):",
        *attribution_table(rows),
    ]
    if timing:
        head += [
            "",
            f"Training step time, ./run_train.sh 2 ranks, {mode['warmup']} warm-up + {mode['timed']} timed "
            f"steps, {mode['rounds']} interleaved rounds"
            + (f" (reused from {mode['timing_from']})" if mode.get("timing_from") else "")
            + ":",
            *timing_table(timing),
        ]
    alone = [p for p in PARTS if rows[p]["verdict"] == "yes"]
    why = (
        "the parts that pay alone"
        if alone
        else "no part pays alone; this is the smallest set, adding parts by their own no-flip-token gain, "
        "that pays"
        if keep
        else "nothing pays"
    )
    head += ["", f"Recommended default fp32_compute: {list(keep)} ({why})"]
    return "\n".join(head)


if __name__ == "__main__":
    main()
