"""The long-context run's figure: Full's dev score per RoPE method, each test arm's difference from Full and its
density against the length (continuing the committed 2K-8K powered run), and the default's density per layer."""

from __future__ import annotations

from pathlib import Path

from ..common import length_label
from ..paper import PAPER_V2_ALPHA, PAPER_V2_NIAH_DENSITY
from ..powered.arms import ARMS
from ..powered.summary import arms_in, compare, splits_in
from .rope import CONTROL, ROPE_METHODS
from .summary import choose_methods, full_dev_score, layer_density

ARM_COLOURS = {"dense_kernels": "grey", "fp": "C0", "fp_v2": "C2", "fp_a0.3": "C1", "fp+mc": "C4"}


def _pyplot():
    import matplotlib.pyplot as plt  # the caller's backend (a notebook keeps its inline one)

    return plt


def _label(arm: str) -> str:
    return ARMS[arm].label if arm in ARMS else arm


def rope_panel(ax, rows) -> None:
    lengths = sorted({int(r["length"]) for r in rows if r["split"] == "dev"})
    chosen = choose_methods(rows, lengths)
    methods = (CONTROL, *ROPE_METHODS)
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(lengths))]
        ys = [full_dev_score(rows, method, L) for L in lengths]
        bars = ax.bar(xs, ys, width, label=method, color=f"C{i + 5}" if method != CONTROL else "lightgrey")
        for bar, L in zip(bars, lengths):
            if chosen[L] == method:
                bar.set_edgecolor("black")
                bar.set_linewidth(1.5)
    ax.set_xticks(range(len(lengths)), [length_label(L) for L in lengths])
    ax.set_ylabel("Full score, dev (0-100)")
    ax.set_title("RoPE scaling, Full on dev (black edge: chosen)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")


def _per_length(rows, arm: str) -> dict[int, object]:
    if "test" not in splits_in(rows) or arm not in arms_in(rows):
        return {}
    return {int(c.group["length"]): c for c in compare(rows, arm, "test", by=("length",), n_boot=2000)[:-1]}


def difference_and_density_panels(ax_diff, ax_density, rows, powered_rows) -> None:
    for arm, colour in ARM_COLOURS.items():
        per = {**_per_length(powered_rows, arm), **_per_length(rows, arm)}
        if not per:
            continue
        Ls = sorted(per)
        diffs = [per[L].result.diff for L in Ls]
        errs = [[per[L].result.diff - per[L].result.low for L in Ls], [per[L].result.high - per[L].result.diff
                                                                         for L in Ls]]
        ax_diff.errorbar(Ls, diffs, yerr=errs, marker="o", color=colour, capsize=2, label=_label(arm))
        ax_density.plot(Ls, [per[L].density for L in Ls], marker="o", color=colour, label=_label(arm))
    lo, hi = zip(*(PAPER_V2_NIAH_DENSITY[L] for L in sorted(PAPER_V2_NIAH_DENSITY) if L <= 32768))
    paper_lengths = [L for L in sorted(PAPER_V2_NIAH_DENSITY) if L <= 32768]
    ax_density.fill_between(paper_lengths, lo, hi, color="black", alpha=0.12, lw=0,
                            label=f"paper: V2, NIAH, larger models, alpha {PAPER_V2_ALPHA:g}")
    ax_density.legend(fontsize=7, loc="upper right")
    scaled = sorted({int(r["length"]) for r in rows})
    ticks = sorted({int(r["length"]) for r in (*rows, *powered_rows)})
    for ax in (ax_diff, ax_density):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [length_label(L) for L in ticks])
        ax.minorticks_off()
        ax.axvspan(scaled[0] / 1.2, scaled[-1] * 1.2, color="orange", alpha=0.08, lw=0)
        ax.set_xlabel("prompt length (tokens; shaded: RoPE-scaled, this run)")
        ax.grid(alpha=0.3)
    ax_diff.axhline(0, color="black", lw=0.8)
    ax_diff.set_ylabel("score - Full (points, 95% CI, test)")
    ax_diff.set_title("Against Full on the same prompts")
    ax_diff.legend(fontsize=7)
    ax_density.set_ylabel("density (kept causal blocks)")
    ax_density.set_title("Density of real attention")


def layer_panel(ax, layers, arm: str = "fp") -> None:
    for L, per in layer_density(layers, arm).items():
        ax.plot(list(per), list(per.values()), marker=".", label=length_label(L))
    ax.set_xlabel("layer")
    ax.set_ylabel("density")
    ax.set_title(f"{_label(arm)}: density per layer (test)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def save_figure(rows, layers, powered_rows, path: Path) -> Path | None:
    if not rows:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    rope_panel(axes[0][0], rows)
    difference_and_density_panels(axes[0][1], axes[1][0], rows, powered_rows)
    layer_panel(axes[1][1], layers)
    fig.suptitle("SmolLM2-135M past its trained 8K context (bf16; 2K-8K points: the committed powered run)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
