"""The powered evaluation's figures: accuracy against density per arm (the Pareto figure) and the needle family's
score by needle depth."""

from __future__ import annotations

from pathlib import Path

from .arms import ARMS
from .summary import arms_in, compare, depth_profile, splits_in

MARKERS = {"flashprefill": "o", "flexprefill": "s", "xattention": "^"}
SELECTOR_COLOURS = {"flashprefill": "C0", "flexprefill": "C2", "xattention": "C3"}
NAMES = {"flashprefill": "FlashPrefill (alpha)", "flexprefill": "FlexPrefill (gamma)", "xattention": "XAttention (threshold)"}


def _pyplot():
    # The caller's backend: a notebook keeps its inline one (forcing Agg here blanked its later figures); headless
    # runs get Agg from matplotlib itself or from MPLBACKEND (run_all.sh sets it).
    import matplotlib.pyplot as plt

    return plt


def pareto(rows, path: Path, split: str = "test") -> Path | None:
    """Difference from Full (points, 95% interval) against density, one panel per length: one colour per selector,
    its knob sweep joined by a line and each point labelled with its knob value; open markers: mean correction;
    diamond: FlashPrefill with its first layers dense; grey: the dense noise floor."""
    if split not in splits_in(rows):
        return None
    plt = _pyplot()
    lengths = sorted({int(r["length"]) for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.4 * len(lengths), 4.6), squeeze=False, sharey=True)
    points = []  # (arm info, {length: comparison})
    for arm in arms_in(rows):
        if arm != "full":
            per = {c.group["length"]: c for c in compare(rows, arm, split, by=("length",), n_boot=2000)}
            points.append((ARMS.get(arm), arm, per))
    for ax, L in zip(axes[0], lengths):
        for selector, colour in SELECTOR_COLOURS.items():
            line = sorted((p[2][str(L)].density, p[2][str(L)].result.diff) for p in points
                          if p[0] and p[0].selector == selector and p[0].group in ("default", "sweep", "peer")
                          and not p[0].knobs)
            if len(line) > 1:
                ax.plot(*zip(*line), color=colour, lw=0.8, alpha=0.6)
        for info, arm, per in points:
            c, r = per[str(L)], per[str(L)].result
            floor = info is not None and info.group == "floor"
            colour = "grey" if floor else SELECTOR_COLOURS.get(info.selector if info else "", "black")
            marker = "D" if info and info.knobs.get("dense_layers") else MARKERS.get(info.selector if info else "", "o")
            ax.errorbar(c.density, r.diff, yerr=[[r.diff - r.low], [r.high - r.diff]], fmt=marker, color=colour,
                        mfc="white" if info and info.knobs.get("mean_correction") else colour, capsize=2, ms=5,
                        mec="black" if info and info.group == "default" else colour)
            if info is not None and not floor:
                ax.annotate(f"{info.value:g}", (c.density, r.diff), textcoords="offset points", xytext=(4, 3),
                            fontsize=6, color=colour)
        ax.axhline(0, color="black", lw=0.8)
        ax.axhspan(-1, 1, color="green", alpha=0.08, lw=0)
        ax.set_title(f"{L // 1024}K tokens ({split} split)")
        ax.set_xlabel("density (kept causal blocks)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("score - Full score (points, 95% CI)")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker=MARKERS[s], ls="-", label=NAMES[s]) for s, c in SELECTOR_COLOURS.items()]
    handles += [Line2D([], [], color="C0", marker="o", mfc="white", ls="", label="FlashPrefill + mean correction"),
                Line2D([], [], color="C0", marker="D", ls="", label="FlashPrefill, first 4 layers dense"),
                Line2D([], [], color="grey", marker="o", ls="", label="dense through the backend (noise floor)")]
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=7, frameon=False)
    fig.suptitle("Accuracy against density on the same prompts (labels: knob values; black edge: the default; "
                 "band: +-1 point)")
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def depth(rows, path: Path, split: str = "test", bins: int = 5) -> Path | None:
    """Mean score of the needle family by needle depth, Full against the other arms of interest."""
    arms = [a for a in ("full", "dense_kernels", "fp", "fp+mc") if a in arms_in(rows)]
    if split not in splits_in(rows) or not any(r["family"] == "needle" for r in rows):
        return None
    plt = _pyplot()
    prof = depth_profile(rows, arms, split, bins)
    centers = [(i + 0.5) / bins for i in range(bins)]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for arm in arms:
        ax.plot(centers, prof[arm], marker="o", label=ARMS[arm].label if arm in ARMS else arm)
    ax.set_xlabel("needle depth (fraction of the context)")
    ax.set_ylabel("score (needle family, all lengths)")
    ax.set_title(f"Needle family by depth ({split} split)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_figures(rows, pareto_path: Path, depth_path: Path) -> list[Path]:
    return [p for p in (pareto(rows, pareto_path), depth(rows, depth_path)) if p is not None]
