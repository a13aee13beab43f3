"""The figure of a sparsity_accuracy run: task score and agreement with Full vs realised density, per selector."""

from __future__ import annotations

from pathlib import Path

from block_selectors import FULL, PEERS

from .summary import selector_name, summarize

COLORS = {FULL: "black", "flashprefill": "tab:red", "flexprefill": "tab:blue", "xattention": "tab:green"}


def plot(rows: list[dict], path: Path, alpha: float) -> bool:
    """Draw into `path`; False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    lengths = sorted({int(r["length"]) for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    marks = {L: m for L, m in zip(lengths, "os^D")}
    for L in lengths:
        summary = summarize(rows, L)
        for ax, key, ylabel in ((axes[0], "score", "score (%)"), (axes[1], "same", "same answer as Full (%)")):
            for method in (FULL, "flashprefill", *PEERS):
                ss = sorted((s for s in summary if s["method"] == method), key=lambda s: s["density"])
                if not ss:
                    continue
                ax.plot([100 * s["density"] for s in ss], [s[key] * (100 if key == "same" else 1) for s in ss],
                        marker=marks[L], color=COLORS[method], ls="-" if len(ss) > 1 else "",
                        label=f"{selector_name(method)} {L}")
                for s in ss:
                    if s["value"] is not None:
                        ax.annotate(f"{s['value']:g}", (100 * s["density"], s[key] * (100 if key == "same" else 1)),
                                    fontsize=6, xytext=(2, 2), textcoords="offset points")
            ax.set_xlabel("realised density (%)")
            ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=7)
    axes[0].set_title(f"task score vs density (FlashPrefill alpha {alpha:g}; peers' knobs annotated)", fontsize=8)
    axes[1].set_title("agreement with Full vs density", fontsize=8)
    fig.suptitle(f"Selectors inside {rows[0]['model']} (real model), same prompts for every setting (ours) - "
                 f"{rows[0]['device_name']}, torch {rows[0]['torch']}, commit {rows[0]['commit']}", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True
