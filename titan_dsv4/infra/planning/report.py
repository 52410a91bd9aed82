"""The planner's text tables: per-rank memory by part against a device, and traffic by collective."""

from __future__ import annotations

from .estimate import usable_bytes
from .layout import GIB


def _rows(rows: list[tuple[str, float, str]]) -> list[str]:
    return [f"    {label:<38s}{value:10.2f}" + (f"  {note}" if note else "") for label, value, note in rows]


def format_memory(figures: dict, device_bytes: int | None = None, device_note: str = "") -> str:
    """Per-rank memory by part and the peak (``Estimate.figures()``); the verdict for ``device_bytes``."""
    m, t = figures["memory_gib"], figures["training"]
    mtp = f"; {figures['mtp_layers']} MTP depth" if figures["mtp_layers"] else ""
    mtp += " (from shapes: not in the built model)" if figures["mtp_from_shapes"] else ""
    storage = t["storage_dtype"]
    lines = [f"  per-rank memory, GiB ({figures['layout']['describe']}; {t['describe']}{mtp}):"]
    if "pipeline" in figures:
        lines.append(_pipeline_line(figures["pipeline"]))
    lines += _rows(
        [
            (f"parameters ({storage} shards)", m["parameters"], ""),
            (f"gradients ({storage} shards)", m["gradients"], ""),
            (f"AdamW state (2 x {storage})", m["adamw_state"], ""),
            ("buffers", m["buffers"], "hash tables, rotary tables, expert loads"),
            ("largest unsharded unit", m["largest_unit"], m["largest_unit_name"]),
            ("FSDP unsharded, forward", m["fsdp_forward"], "kept units + largest unit + prefetch"),
            ("FSDP unsharded, backward", m["fsdp_backward"], _backward_note(figures)),
            ("activations kept for backward", m["activations_saved"], ""),
            ("activations on top, worst moment", m["activations_transient"], ""),
            ("peak", m["peak"], ""),
        ]
    )
    if device_bytes is not None:
        verdict = "fits" if m["peak"] * GIB <= usable_bytes(device_bytes) else "does NOT fit"
        usable = usable_bytes(device_bytes) / GIB
        lines += _rows([("device", device_bytes / GIB, f"{verdict} ({usable:.2f} usable{device_note})")])
    return "\n".join(lines)


def _pipeline_line(p: dict) -> str:
    in_flight = " + ".join(str(n) for n in p["in_flight"])
    if len(p["in_flight"]) > 1:
        in_flight += f" (at most {p['in_flight_total']} together)"
    return (
        f"    pipeline: {p['rank_stages']} (the highest peak); microbatches in flight {in_flight}; "
        f"bubble {p['bubble']:.1%}"
    )


def _backward_note(figures: dict) -> str:
    note = "+ its gradient and reduce-scatter buffer"
    if "pipeline" in figures:
        held = figures["pipeline"]["fsdp_accumulated_gradients"] / GIB
        note += f"; {held:.2f} of gradients held to the step's end"
    return note


# Each collective of ``Estimate.collectives``: its label and note (a new traffic term adds its row here).
_COLLECTIVE_ROWS = {
    "all_gather": ("all-gather (forward + backward)", ""),
    "reduce_scatter": ("reduce-scatter ({reduce})", ""),
    "all_reduce": ("all-reduce (HSDP replicas)", ""),
    "all_to_all": ("all-to-all (EP dispatch + combine)", "forward, backward, AC recompute"),
    "cp_exchange": ("CP exchange (entries + halo)", "all-gather, reduce-scatter, halo sends"),
    "p2p": ("pipeline p2p (stage boundaries)", "sent: streams, ids, embeddings ahead; gradients back"),
}


def format_traffic(figures: dict) -> str:
    """Per-rank communication per step by collective (``Estimate.figures()``)."""
    c, reduce = figures["communication_gib_per_step"], figures["training"]["reduce_dtype"]
    rows = [
        (_COLLECTIVE_ROWS[name][0].format(reduce=reduce), gib, _COLLECTIVE_ROWS[name][1])
        for name, gib in c.items()
    ]
    return "\n".join(["  per-rank communication per step, GiB:"] + _rows(rows))
