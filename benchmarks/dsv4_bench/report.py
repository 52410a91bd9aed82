"""Targets and the printed report, computed only from the results of this run (no torch import)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .shapes import MID

FWD_GATHERS_PER_BLOCK_MAX = 3.0
SPARSE_EXPONENT_MAX = 1.2
DENSE_EXPONENT_MIN = (
    1.7  # "dense ~2": quadratic; above 2 at large S where the [S x S] tensors leave the caches
)
HF_SPEEDUP_MIN = 2.0
TPS_RATIO_MIN = 0.8
ACTIVE_PARAMS_TOLERANCE = 0.10
EP_STEP1_LOSS_TOLERANCE = 1e-3  # before any update EP and FSDP compute the same forward (bf16 rounding aside)
A2A_BYTES_TOLERANCE = 0.01  # the per-expert count exchange is the only all-to-all traffic besides the rows
BUSY_CORES = 0.3  # CPU use by other processes just before a section: the two cores were shared


@dataclass
class Target:
    section: str
    name: str
    measured: float | None
    threshold: float
    at_least: bool  # PASS when measured >= threshold (else when measured <= threshold)
    detail: str = ""

    @property
    def status(self) -> str:
        if self.measured is None:
            return "N/A"
        ok = self.measured >= self.threshold if self.at_least else self.measured <= self.threshold
        return "PASS" if ok else "MISS"

    def line(self) -> str:
        op = ">=" if self.at_least else "<="
        value = "n/a" if self.measured is None else f"{self.measured:.3g}"
        text = f"[{self.status}] {self.section}  {self.name} {op} {self.threshold:g}: measured {value}"
        if self.status == "MISS":
            if self.at_least:
                text += f"  -> short by {100 * (1 - self.measured / self.threshold):.0f}%"
            else:
                text += f"  -> over by {100 * (self.measured / self.threshold - 1):.0f}%"
        return text + (f"  ({self.detail})" if self.detail else "")

    def as_dict(self) -> dict:
        return {**asdict(self), "status": self.status}


# ---- helpers ---------------------------------------------------------------------------------------
def _result(sections: dict, name: str) -> dict | None:
    return (sections.get(name) or {}).get("result")


def _m(n: float) -> str:
    return f"{n / 1e6:.2f}M"


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def _x(a: float | None, b: float | None) -> str:
    return "n/a" if not a or not b else f"{a / b:.2f}x"


def _table(header: list[str], rows: list[list], indent: str = "  ") -> list[str]:
    """Aligned text table: first column left-aligned, the rest right-aligned, a rule under the header."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return indent + "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
        )

    return [fmt(cells[0]), indent + "-" * (sum(widths) + 2 * (len(widths) - 1))] + [fmt(r) for r in cells[1:]]


def _section_error(sections: dict, name: str) -> list[str]:
    rec = sections.get(name) or {}
    if "error" in rec:
        return [
            "  ERROR: section failed:",
            *("    " + line for line in rec["error"].strip().splitlines()[-6:]),
        ]
    return ["  (not run)"] if not rec else []


# ---- targets -----------------------------------------------------------------------------------------
def evaluate_targets(sections: dict) -> list[Target]:
    targets: list[Target] = []
    training = _result(sections, "training") or {}
    ours, base = training.get("debugmodel/grouped"), training.get("debugmodel/per_island")
    if ours and base:
        o, b = ours["comms_per_rank"][0], base["comms_per_rank"][0]
        targets.append(
            Target(
                "b",
                "forward all-gathers per block, ours (grouped)",
                o["forward_all_gathers_per_block"],
                FWD_GATHERS_PER_BLOCK_MAX,
                at_least=False,
                detail=f"per-island baseline {b['forward_all_gathers_per_block']:.2f}, ratio ours/baseline "
                f"{_x(o['forward_all_gathers_per_block'], b['forward_all_gathers_per_block'])}; counting the "
                f"root-level gathers too, all forward all-gathers / n_layers = "
                f"{o['forward_all_gathers_over_n_layers']:.2f}",
            )
        )
    attention = _result(sections, "attention") or {}
    fits = attention.get("exponents", {})
    for case in ("kernel_hca", "kernel_csa"):
        for quantity in ("time", "memory"):
            sparse = (fits.get(f"{case}/sparse") or {}).get(quantity)
            dense = (fits.get(f"{case}/dense") or {}).get(quantity)
            rng = (fits.get(f"{case}/sparse") or {}).get("fit_range")
            detail = f"fit over S={rng[0]}..{rng[1]}" if rng else ""
            if rng and rng[1] <= 2 * rng[0]:
                detail += "; only two lengths (--quick): indicative"
            targets.append(
                Target(
                    "c",
                    f"sparse {case} {quantity} exponent",
                    sparse,
                    SPARSE_EXPONENT_MAX,
                    False,
                    detail=detail,
                )
            )
            targets.append(
                Target("c", f"dense  {case} {quantity} exponent (~2)", dense, DENSE_EXPONENT_MIN, True)
            )
    hf = _result(sections, "hf")
    targets.append(
        Target(
            "d",
            "speedup vs transformers eager (fwd+bwd)",
            hf and hf["speedup"],
            HF_SPEEDUP_MIN,
            True,
            detail=hf and f"{hf['hf_s']:.3f} s / {hf['ours_s']:.3f} s at {hf['seq_len']} tokens",
        )
    )
    titan = _result(sections, "titan")
    targets.append(
        Target("e", "tokens/s ours / deepseek_v3", titan and titan["tps_ratio"], TPS_RATIO_MIN, True)
    )
    dev = titan and abs(titan["active_param_ratio"] - 1)
    targets.append(
        Target(
            "e",
            "|active params ours/theirs - 1|",
            dev,
            ACTIVE_PARAMS_TOLERANCE,
            False,
            detail=titan and f"ratio {titan['active_param_ratio']:.3f}",
        )
    )
    targets += ep_targets(_result(sections, "ep"))
    return targets


def ep_targets(ep: dict | None) -> list[Target]:
    """Section f's checks that EP and FSDP ran the same computation and that the counter saw EP's traffic."""
    loss = ep and ep["losses"]
    expected, counted = (
        (ep["all_to_all_mib_expected_from_routing"], ep["all_to_all_mib_measured"]) if ep else (0, 0)
    )
    return [
        Target(
            "f",
            "|step-1 loss EP2 - FSDP| (same seed, data, weights)",
            loss and loss["step1_abs_diff"],
            EP_STEP1_LOSS_TOLERANCE,
            False,
            detail=loss and f"losses {loss['ep2'][0]:.5f} vs {loss['fsdp'][0]:.5f}",
        ),
        Target(
            "f",
            "|all-to-all bytes counted / from routing - 1|",
            ep and abs(counted / expected - 1),
            A2A_BYTES_TOLERANCE,
            False,
            detail=ep and f"{counted:.2f} MiB counted vs {expected:.2f} MiB from the routing",
        ),
    ]


# ---- sections ----------------------------------------------------------------------------------------
def _runs_label(run: dict) -> str:
    return (
        f"{run['warmup_steps']} untimed steps (the config's {run['indexer_warmup_steps']} dense indexer "
        f"warm-up steps included), {len(run['step_s_all'])} timed"
    )


def section_a(sections: dict) -> list[str]:
    out = [
        "[a] Training step through TorchTitan's Trainer: ./run_train.sh --model deepseek_v4 (2 CPU ranks "
        "over gloo, 1 thread",
        "    each), train_configs/debug_model.toml (embedded corpus, seq 512 x local batch 2 per rank, bf16 "
        "params / fp32 reduce,",
        "    AC none), --debug.seed 0. Timed: the Trainer's own train_step (data, forward, loss, backward, "
        "clip, AdamW, metrics),",
        "    slower rank",
    ]
    training = _result(sections, "training")
    if not training:
        return out + _section_error(sections, "training")
    runs = {"debugmodel": training["debugmodel/grouped"], MID: training[f"{MID}/grouped"]}
    out[-1] += f" per step; {_runs_label(runs['debugmodel'])}"
    rows = []
    for name, r in runs.items():
        rows.append(
            [
                name,
                _m(r["params_total"]),
                _m(r["params_active"]),
                f"{r['step_s_median']:.3f}",
                f"{min(r['step_s_all']):.3f}-{max(r['step_s_all']):.3f}",
                f"{r['tokens_per_s_per_rank']:.0f}",
                f"{r['tokens_per_s_global']:.0f}",
                " / ".join(f"{t:.0f}" for t in r["titan_tps_per_rank_mean_timed"]),
                " / ".join(f"{m:.0f}" for m in r["peak_rss_mib_per_rank"]),
                f"{r['rss_before_build_mib_per_rank'][0]:.0f}",
            ]
        )
    d, m = runs["debugmodel"], runs[MID]
    rows.append(
        [
            f"ratio {MID}/debugmodel",
            _x(m["params_total"], d["params_total"]),
            _x(m["params_active"], d["params_active"]),
            _x(m["step_s_median"], d["step_s_median"]),
            "",
            _x(m["tokens_per_s_per_rank"], d["tokens_per_s_per_rank"]),
            _x(m["tokens_per_s_global"], d["tokens_per_s_global"]),
            _x(m["titan_tps_per_rank_mean_timed"][0], d["titan_tps_per_rank_mean_timed"][0]),
            _x(m["peak_rss_mib_per_rank"][0], d["peak_rss_mib_per_rank"][0]),
            "",
        ]
    )
    header = [
        "shape",
        "params",
        "active",
        "step s (med)",
        "min-max",
        "tok/s/rank",
        "tok/s (2 ranks)",
        "Titan tps r0 / r1",
        "peak RSS MiB r0 / r1",
        "RSS before build",
    ]
    out += _table(header, rows)
    out.append(
        "  Titan tps: the Trainer's own logged tokens/s per rank, mean over the timed steps (it also counts "
        "the time between steps)."
    )
    return out


def section_b(sections: dict) -> list[str]:
    out = [
        "[b] Collectives per training step (rank 0), debugmodel, through the Trainer as in [a]; bytes = full "
        "buffer (gathered /",
        "    unreduced), sent = what leaves the rank for the other rank",
    ]
    training = _result(sections, "training")
    if not training:
        return out + _section_error(sections, "training")
    runs = [training[k] for k in ("debugmodel/grouped", "debugmodel/per_island", "debugmodel/fp32")]
    rows = []
    for r in runs:
        c = r["comms_per_rank"][0]
        n, by = c["per_step"], c["bytes_per_step"]
        dtypes = "+".join(
            f"{v:g} {k.replace('bfloat16', 'bf16').replace('float32', 'fp32')}"
            for k, v in c["forward_all_gather_dtypes_per_block"].items()
        )
        rows.append(
            [
                r["layout"],
                f"{n['all-gather']:g}",
                _mib(by["all-gather"]),
                f"{n['reduce-scatter']:g}",
                _mib(by["reduce-scatter"]),
                f"{n['all-reduce']:g}",
                f"{c['forward_all_gathers_per_block']:.2f} ({dtypes})",
                f"{c['forward_all_gathers_root_level']:g}",
                f"{c['forward_all_gathers_over_n_layers']:.2f}",
                _mib(c["sent_bytes_per_step_total"]),
                f"{r['step_s_median']:.3f}",
                f"{r['peak_rss_mib_per_rank'][0]:.0f}",
            ]
        )
    (o, b) = runs[0], runs[1]
    oc, bc = o["comms_per_rank"][0], b["comms_per_rank"][0]
    rows.append(
        [
            "ratio (2)/(1)",
            _x(bc["per_step"]["all-gather"], oc["per_step"]["all-gather"]),
            _x(bc["bytes_per_step"]["all-gather"], oc["bytes_per_step"]["all-gather"]),
            _x(bc["per_step"]["reduce-scatter"], oc["per_step"]["reduce-scatter"]),
            _x(bc["bytes_per_step"]["reduce-scatter"], oc["bytes_per_step"]["reduce-scatter"]),
            "",
            _x(bc["forward_all_gathers_per_block"], oc["forward_all_gathers_per_block"]),
            "",
            _x(bc["forward_all_gathers_over_n_layers"], oc["forward_all_gathers_over_n_layers"]),
            _x(bc["sent_bytes_per_step_total"], oc["sent_bytes_per_step_total"]),
            _x(b["step_s_median"], o["step_s_median"]),
            _x(b["peak_rss_mib_per_rank"][0], o["peak_rss_mib_per_rank"][0]),
        ]
    )
    header = [
        "layout",
        "AG",
        "AG MiB",
        "RS",
        "RS MiB",
        "AR",
        "fwd AG in each block",
        "fwd AG root",
        "all fwd AG / n_layers",
        "sent MiB",
        "step s",
        "peak MiB r0",
    ]
    out += _table(header, rows)
    by_api = ", ".join(f"{k} {v:g}" for k, v in oc["per_step_by_api"].items())
    out += [
        "  AG / RS / AR: all-gathers / reduce-scatters / all-reduces per step; 'fwd AG in each block': "
        "forward all-gathers",
        "  issued inside a block's forward, per block; 'root': the root unit and its fp32 island. AR counts "
        "torch.distributed's",
        "  (HCA alignment flag, expert loads) and the functional ones (grad-norm clipping, Titan's "
        "token-count and loss",
        f"  reductions). (1) by API and kind: {by_api}",
    ]
    out += [f"  {r['layout']}: {r['layout_description']}" for r in runs]
    same_ranks = all(r["comms_per_rank"][0] == r["comms_per_rank"][1] for r in runs)
    faster, slower = (o, b) if o["step_s_median"] <= b["step_s_median"] else (b, o)
    spread = max(max(r["step_s_all"]) - min(r["step_s_all"]) for r in (o, b))
    gap = slower["step_s_median"] - faster["step_s_median"]
    out.append(
        f"  faster: {faster['layout']} by {100 * gap / slower['step_s_median']:.1f}% "
        f"({faster['step_s_median']:.3f} s vs {slower['step_s_median']:.3f} s per step"
        + ("" if gap > spread else f"; within the step-to-step spread of {spread:.3f} s, so not significant")
        + ")"
    )
    same_loss = o["global_losses"] == b["global_losses"]
    out.append(
        f"  same seed/data: losses of (1) and (2) identical at every step: {'yes' if same_loss else 'no'}; "
        f"counts identical on both ranks: {'yes' if same_ranks else 'no'}"
    )
    return out


def section_c(sections: dict) -> list[str]:
    attention = _result(sections, "attention")
    timed = [p for p in (attention or {}).get("points", []) if "threads" in p]
    threads = "/".join(map(str, sorted({p["threads"] for p in timed}))) or "?"
    dims = ", ".join(f"{k}={v}" for k, v in timed[0]["dims"].items()) if timed else "?"
    out = [
        f"[c] Attention forward+backward vs sequence length; debugmodel dims ({dims});",
        f"    {threads} thread(s). Time = median of a few calls; memory = ru_maxrss growth of one call over "
        f"a",
        "    baseline; each point's memory and its time measured in their own fresh processes",
    ]
    if not attention:
        return out + _section_error(sections, "attention")
    points, fits = attention["points"], attention["exponents"]
    lengths = sorted({p["seq_len"] for p in points})
    by = {(p["case"], p["impl"], p["seq_len"]): p for p in points}
    for quantity, key, fmt in (("time s", "time_s", "{:.4f}"), ("peak MiB", "peak_mib", "{:.1f}")):
        rows = []
        for case in attention["cases"]:
            for impl in ("dense", "sparse"):
                cells = []
                for s in lengths:
                    p = by.get((case, impl, s))
                    cells.append("err" if p is None or "error" in p else fmt.format(p[key]))
                exp = fits[f"{case}/{impl}"]["time" if key == "time_s" else "memory"]
                rows.append([f"{case} {impl}", *cells, "n/a" if exp is None else f"{exp:.2f}"])
            top = lengths[-1]
            d, s_ = by.get((case, "dense", top)), by.get((case, "sparse", top))
            ok = d and s_ and "error" not in d and "error" not in s_
            rows.append(
                ["  dense/sparse", *([""] * (len(lengths) - 1)), _x(d[key], s_[key]) if ok else "n/a", ""]
            )
        out += [f"  {quantity}:"] + _table(
            ["case / path", *map(str, lengths), f"exponent {attention['fit_from']}+"], rows
        )
    errors = [p for p in points if "error" in p]
    out += [f"  point {p['case']}/{p['impl']}/{p['seq_len']} failed: {p['error']}" for p in errors]
    return out


def section_d(sections: dict) -> list[str]:
    out = [
        "[d] Ours vs transformers DeepseekV4ForCausalLM (eager): debugmodel, same weights, fp32, batch 1, 2 "
        "threads"
    ]
    hf = _result(sections, "hf")
    if not hf:
        return out + _section_error(sections, "hf")
    rows = [
        ["ours", f"{hf['ours_s']:.3f}", "1.00x"],
        ["transformers eager", f"{hf['hf_s']:.3f}", f"{1 / hf['speedup']:.2f}x"],
    ]
    out += _table([f"model (fwd+loss+bwd, {hf['seq_len']} tokens)", "median s", "speed vs ours"], rows)
    out.append(
        f"  speedup ours vs transformers: {hf['speedup']:.2f}x; max |logit difference| "
        f"{hf['max_abs_logit_diff']:.2e}"
    )
    return out


def section_e(sections: dict) -> list[str]:
    titan = _result(sections, "titan")
    head = (
        "[e] Ours vs TorchTitan deepseek_v3 debugmodel through the same Trainer (run_train.sh, 2 ranks, "
        "seq 512, local batch 2"
    )
    if not titan:
        return [head + ")"] + _section_error(sections, "titan")
    out = [
        head + f", {titan['steps']} steps, tps = Titan's per-rank tps averaged over the last "
        f"{titan['averaged_last_steps']})"
    ]
    ours, theirs = titan["models"]["ours"], titan["models"]["deepseek_v3"]
    rows = [
        [
            "deepseek_v3 debugmodel",
            _m(theirs["params_total"]),
            _m(theirs["params_active"]),
            f"{theirs['tps']:.0f}",
            f"{theirs['peak_memory_gib_rank0']:.2f}",
        ],
        [
            f"ours ({titan['ours_flavor']})",
            _m(ours["params_total"]),
            _m(ours["params_active"]),
            f"{ours['tps']:.0f}",
            f"{ours['peak_memory_gib_rank0']:.2f}",
        ],
        [
            "ratio ours/theirs",
            _x(ours["params_total"], theirs["params_total"]),
            _x(ours["params_active"], theirs["params_active"]),
            _x(ours["tps"], theirs["tps"]),
            _x(ours["peak_memory_gib_rank0"], theirs["peak_memory_gib_rank0"]),
        ],
    ]
    out += _table(["model", "params", "active", "tokens/s/rank", "peak GiB r0"], rows)
    warmup = titan.get("ours_indexer_warmup_steps", 0)
    if warmup:
        after = "all after" if titan["steps"] - titan["averaged_last_steps"] >= warmup else "NOT all after"
        out.append(
            f"  ours trains the Lightning Indexer as the shipped config does (KL distillation after {warmup} "
            f"dense warm-up steps); the averaged steps are {after} the warm-up"
        )
    mid = (_result(sections, "training") or {}).get(f"{MID}/grouped")
    if mid:
        same = "matches" if mid["params_active"] == ours["params_active"] else "DIFFERS from"
        out.append(
            f"  ours' active params by count_params in section a: {mid['params_active']:,} ({same} the "
            f"Trainer's log)"
        )
    return out


def _range(values: list[float], fmt: str) -> str:
    """'lo-hi' over runs (one value when they agree at this precision)."""
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo}-{hi}"


EP_FORMATS = {"step_s": "{:.3f}", "tokens_per_s": "{:.0f}", "peak_rss_mib": "{:.0f}", "collectives": "{:g}"}


def section_f(sections: dict) -> list[str]:
    ep = _result(sections, "ep")
    head = (
        f"[f] Expert parallelism: EP 2 vs FSDP alone, {MID}, 2 CPU ranks over gloo, through the Trainer as "
        "in [a]; only"
    )
    if not ep:
        return [head, "    --parallelism.expert_parallel_degree differs"] + _section_error(sections, "ep")
    n = len(ep["runs"]["fsdp"])
    out = [
        head,
        f"    --parallelism.expert_parallel_degree differs (2 vs 1). {n} runs each, interleaved in the order "
        f"{', '.join(ep['order'])};",
        f"    each {ep['untimed_steps']} untimed (indexer warm-up included) + {ep['timed_steps']} timed "
        "steps. Ranges are over runs;",
        "    EP2/FSDP is the ratio of the medians, 'pairs' its range over the runs made back to back",
    ]
    labels = {name: cfg["label"] for name, cfg in ep["configs"].items()}
    rows = []
    for key, f in ep["figures"].items():
        fmt = EP_FORMATS.get(key, "{:.2f}")
        pairs = [r for r in f["ratio_pairs"] if r is not None]
        rows.append(
            [
                f["label"],
                _range(f["fsdp"], fmt),
                _range(f["ep2"], fmt),
                "n/a" if f["ratio_of_medians"] is None else f"{f['ratio_of_medians']:.2f}x",
                _range(pairs, "{:.2f}x") if pairs else "n/a",
            ]
        )
    out += _table(["figure (per step)", labels["fsdp"], labels["ep2"], "EP2/FSDP", "pairs"], rows)
    loss = ep["losses"]
    same = ", ".join(f"{labels[k]} {'yes' if v else 'no'}" for k, v in loss["repeatable"].items())
    out += [
        "  Collective figures are per rank, the mean of the two ranks (under EP each rank's all-to-all "
        "volume follows the routing);",
        "  MiB = full buffers as in [b]; 'sent' = bytes leaving the rank. Under EP the experts' FSDP mesh "
        "(efsdp) has one rank:",
        "  their parameters are never gathered, their tokens travel instead.",
        f"  all-to-all: {ep['all_to_all_mib_measured']:.2f} MiB counted vs "
        f"{ep['all_to_all_mib_expected_from_routing']:.2f} MiB from the routing (MoE blocks x "
        "dispatch/combine x fwd/bwd x tokens x top-k x dim x 2 bytes)",
        f"  losses (first runs): step 1 {loss['ep2'][0]:.5f} (EP 2) vs {loss['fsdp'][0]:.5f} (FSDP); largest "
        f"relative difference over the {len(loss['fsdp'])} steps {loss['max_rel_diff']:.2e}",
        f"  (bf16 rounding differs once experts compute per source rank; Adam's first steps amplify it); "
        f"losses identical across a configuration's runs: {same}",
    ]
    return out


def section_profile(sections: dict) -> list[str]:
    training = _result(sections, "training")
    run = training and training.get(f"{MID}/grouped")
    prof = run and run.get("profile")
    if not prof:
        return ["[profile] no step profile (training section failed)"]
    phases = ", ".join(f"{k} {v:.0f} ms" for k, v in prof["phases_ms"].items())
    total = prof["total_self_cpu_ms"]
    where = "; ".join(f"{k} {100 * v / total:.0f}%" for k, v in prof["self_cpu_ms_by_where"].items())
    out = [
        f"[profile] One train_step of TorchTitan's Trainer on ours ({MID}, rank 0 of 2, the last step, after "
        f"the timed ones),",
        "  torch.profiler CPU:",
        f"  phases (wall): {phases}; step {prof['step_ms']:.0f} ms; total self CPU {total:.0f} ms",
        f"  self CPU by where: {where}",
    ]
    rows = [
        [
            op["name"][:70],
            f"{op['self_cpu_ms']:.1f}",
            f"{100 * op['self_cpu_ms'] / prof['total_self_cpu_ms']:.1f}%",
            op["calls"],
        ]
        for op in prof["top_ops"]
    ]
    return out + _table(["op (top by self CPU)", "self ms", "share", "calls"], rows)


def section_targets(targets: list[Target], sections: dict) -> list[str]:
    out = ["Targets"] + ["  " + t.line() for t in targets]
    misses = [t for t in targets if t.status == "MISS"]
    prof = ((_result(sections, "training") or {}).get(f"{MID}/grouped") or {}).get("profile")
    if misses and prof:
        top = ", ".join(
            f"{op['name']} {100 * op['self_cpu_ms'] / prof['total_self_cpu_ms']:.0f}%"
            for op in prof["top_ops"][:5]
        )
        out.append(f"  {len(misses)} target(s) missed; where a step's CPU time goes (see [profile]): {top}")
    return out


def load_notes(sections: dict) -> list[str]:
    """How much other processes used the two cores around each section (their noise is in its timings)."""
    parts = [
        f"{name} {rec.get('busy_cores_before', 0):.1f} before / {rec.get('other_cores_during', 0):.1f} during"
        for name, rec in sections.items()
    ]
    line = "Other processes' CPU use (cores; this machine has 2): " + ", ".join(parts)
    noisy = [
        name
        for name, rec in sections.items()
        if max(rec.get("busy_cores_before", 0), rec.get("other_cores_during", 0)) > BUSY_CORES
    ]
    if not noisy:
        return [line, "  -> the machine was otherwise idle: timings are clean."]
    return [
        line,
        f"  -> NOTE: {', '.join(noisy)} shared the cores with other work; their absolute timings carry",
        "     that noise (ratios measured back to back are less affected).",
    ]


def render(sections: dict, targets: list[Target], header: list[str]) -> str:
    blocks = [
        header,
        section_a(sections),
        section_b(sections),
        section_c(sections),
        section_d(sections),
        section_e(sections),
        section_f(sections),
        section_profile(sections),
        section_targets(targets, sections),
        load_notes(sections),
    ]
    return "\n\n".join("\n".join(b) for b in blocks if b)
