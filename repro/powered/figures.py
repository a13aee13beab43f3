"""The powered evaluation's figures: accuracy against density per arm (the Pareto figure) and the needle family's
score by needle depth."""

from __future__ import annotations

from pathlib import Path

from .arms import ARMS
from .summary import arms_in, compare, depth_profile, splits_in

MARKERS = {"flashprefill": "o", "flexprefill": "s", "xattention": "^"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto(rows, path: Path, split: str = "test") -> Path | None:
    """Difference from Full (points, 95% interval) against density, one panel per length, one point per arm."""
    if split not in splits_in(rows):
        return None
    plt = _pyplot()
    arms = [a for a in arms_in(rows) if a != "full"]
    lengths = sorted({int(r["length"]) for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.2 * len(lengths), 4.4), squeeze=False, sharey=True)
    for arm in arms:
        per = {c.group["length"]: c for c in compare(rows, arm, split, by=("length",), n_boot=2000)}
        info = ARMS.get(arm)
        method = info.selector if info else "flashprefill"
        corrected = bool(info and info.knobs.get("mean_correction"))
        for ax, L in zip(axes[0], lengths):
            c = per[str(L)]
            r = c.result
            ax.errorbar(c.density, r.diff, yerr=[[r.diff - r.low], [r.high - r.diff]], fmt=MARKERS.get(method, "o"),
                        mfc="white" if corrected else None, capsize=2, ms=5,
                        color={"floor": "grey", "default": "C3", "knob": "C1", "sweep": "C0", "peer": None}.get(
                            info.group if info else "", None), label=info.label if info else arm)
    for ax, L in zip(axes[0], lengths):
        ax.axhline(0, color="black", lw=0.8)
        ax.axhspan(-1, 1, color="green", alpha=0.08, lw=0)
        ax.set_title(f"{L // 1024}K tokens ({split} split)")
        ax.set_xlabel("density (kept causal blocks)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("score - Full score (points, 95% CI)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle("Accuracy against density on the same prompts (open markers: mean correction; band: +-1 point)")
    fig.tight_layout(rect=(0, 0.16, 1, 0.95))
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
