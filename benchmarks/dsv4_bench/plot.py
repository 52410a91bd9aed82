"""The attention scaling figure: log-log time and memory vs sequence length, dense vs sparse."""

from __future__ import annotations

COLORS = {"hca": "tab:blue", "csa": "tab:orange"}
STYLES = {"dense": dict(linestyle="--", marker="s"), "sparse": dict(linestyle="-", marker="o")}


def plot_attention_scaling(attention: dict, path: str) -> None:
    """2x2 panels (time / memory x kernel / module); a line per case and path, labelled with its exponent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9), sharex=True)
    quantities = (
        ("time_s", "time", "fwd+bwd time (s)"),
        ("peak_mib", "memory", "peak memory over baseline (MiB)"),
    )
    for row, (key, fit_key, ylabel) in enumerate(quantities):
        for col, scope in enumerate(("kernel", "module")):
            ax = axes[row][col]
            for case in (c for c in attention["cases"] if c.startswith(scope)):
                kind = case.split("_")[1]
                for impl in ("dense", "sparse"):
                    pts = sorted(
                        (
                            p
                            for p in attention["points"]
                            if p["case"] == case and p["impl"] == impl and "error" not in p and p[key] > 0
                        ),
                        key=lambda p: p["seq_len"],
                    )
                    if not pts:
                        continue
                    exp = attention["exponents"][f"{case}/{impl}"][fit_key]
                    label = f"{kind.upper()} {impl}" + ("" if exp is None else f" (slope {exp:.2f})")
                    ax.plot(
                        [p["seq_len"] for p in pts],
                        [p[key] for p in pts],
                        color=COLORS[kind],
                        label=label,
                        **STYLES[impl],
                    )
            _slope_guides(ax)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{'bare kernel' if scope == 'kernel' else 'Attention module'}: {fit_key}")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=8)
            if row == 1:
                ax.set_xlabel("sequence length (tokens)")
    fig.suptitle(
        f"DeepSeek-V4 attention scaling: dense reference vs sparse fast path "
        f"(slopes fitted from S={attention['fit_from']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _slope_guides(ax) -> None:
    """Faint O(S) and O(S^2) lines through the panel's lowest first point, to read slopes by eye."""
    starts = [(line.get_xdata()[0], line.get_ydata()[0]) for line in ax.get_lines()]
    ends = [line.get_xdata()[-1] for line in ax.get_lines()]
    if not starts:
        return
    x0, y0 = min(starts, key=lambda p: p[1])
    x1 = max(ends)
    for power, label, style in ((1, "O(S) guide", ":"), (2, "O(S²) guide", "-.")):
        ax.plot(
            [x0, x1], [y0, y0 * (x1 / x0) ** power], color="grey", linestyle=style, linewidth=1, label=label
        )
