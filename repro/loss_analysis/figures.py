"""The loss analysis's figure: four panels drawn from the CSV rows (strings or numbers).

(a) operator level: each layer's pooled relative error against dense attention, one line per alpha;
(b) in model: each layer's output drift against Full, last token (solid) and mean over tokens (dashed), per alpha;
(c) the needle key block's kept fraction per layer at the default alpha, flipped vs control prompts;
(d) each prompt's teacher-forced answer margin under Full against the one at the default alpha, by outcome.
"""

from __future__ import annotations

import math
from pathlib import Path

from .analysis import group_mean, num, pooled_error

GROUP_STYLE = {"flipped": dict(color="tab:red", marker="x"), "control": dict(color="tab:blue", marker="o"),
               "unknown": dict(color="tab:gray", marker="s")}


def _pyplot():
    # The caller's backend: a notebook keeps its inline one (forcing Agg here blanked its later figures); headless
    # runs get Agg from matplotlib itself or from MPLBACKEND (run_all.sh sets it).
    import matplotlib.pyplot as plt

    return plt


def _alpha_colors(alphas):
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return {a: cmap(i / max(1, len(alphas) - 1)) for i, a in enumerate(alphas)}


def operator_panel(ax, rows) -> None:
    pooled = pooled_error(rows)
    alphas = sorted({a for _, a in pooled})
    colors = _alpha_colors(alphas)
    for a in alphas:
        layers = sorted(layer for layer, b in pooled if b == a)
        ax.plot(layers, [pooled[(layer, a)] for layer in layers], "o-", ms=3, color=colors[a], label=f"alpha {a:g}")
    ax.set(yscale="log", xlabel="layer", ylabel="||out - dense|| / ||dense||",
           title="(a) operator level (teacher-forced): layer error")
    ax.legend(fontsize=7)


def drift_panel(ax, rows) -> None:
    last = group_mean(rows, ("layer", "alpha"), "drift_last")
    every = group_mean(rows, ("layer", "alpha"), "drift_tokens")
    alphas = sorted({a for _, a in last})
    colors = _alpha_colors(alphas)
    for a in alphas:
        layers = sorted(layer for layer, b in last if b == a)
        ax.plot(layers, [last[(layer, a)] for layer in layers], "-", color=colors[a], label=f"alpha {a:g}")
        ax.plot(layers, [every[(layer, a)] for layer in layers], "--", lw=0.8, color=colors[a])
    ax.set_yscale("log", nonpositive="mask")
    ax.set(xlabel="layer", ylabel="||h - h_Full|| / ||h_Full||",
           title="(b) in model: drift (solid: last token, dashed: per-token mean)")
    ax.legend(fontsize=7)


def needle_panel(ax, rows) -> None:
    kept = group_mean(rows, ("layer", "group"), "kept_between")
    alpha = num(rows[0]["alpha"]) if rows else float("nan")
    for group, style in GROUP_STYLE.items():
        layers = sorted(layer for layer, g in kept if g == group)
        if layers:
            ax.plot(layers, [kept[(layer, group)] for layer in layers], "-", ms=3, label=group, **style)
    if all(math.isnan(x) for x in kept.values()):
        ax.text(0.5, 0.5, "no decided pair: every needle block is in a sink block\nor within the window of the end",
                ha="center", va="center", transform=ax.transAxes, fontsize=9)
    ax.set(ylim=(-0.03, 1.03), xlabel="layer", ylabel="fraction of decided pairs kept",
           title=f"(c) needle key block kept, alpha {alpha:g} (mean over heads)")
    ax.legend(fontsize=7)


def margin_panel(ax, answers, alpha: float) -> None:
    for group, style in GROUP_STYLE.items():
        sel = [r for r in answers if r["setting"] == "flashprefill" and num(r["alpha"]) == alpha
               and r["group"] == group]
        if sel:
            ax.scatter([num(r["full_margin_answer_min"]) for r in sel], [num(r["margin_answer_min"]) for r in sel],
                       s=22, label=f"{group} ({len(sel)})", **style)
    lims = ax.get_xlim()
    ax.plot(lims, lims, ":", color="gray", lw=0.8)
    ax.axhline(0, color="black", lw=0.6)
    ax.axvline(0, color="black", lw=0.6)
    ax.set(xlabel="answer margin under Full (logits)", ylabel=f"answer margin at alpha {alpha:g}",
           title="(d) flips against Full's margin (teacher-forced)")
    ax.legend(fontsize=7)


def save_figure(tables: dict, path: Path) -> Path | None:
    """The four panels into `path` (PNG); None when no prompt was analysed."""
    if not tables.get("drift"):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    if tables.get("operator"):
        operator_panel(axes[0, 0], tables["operator"])
    drift_panel(axes[0, 1], tables["drift"])
    if tables.get("needle"):
        needle_panel(axes[1, 0], tables["needle"])
    default = num(tables["needle"][0]["alpha"]) if tables.get("needle") else max(
        num(r["alpha"]) for r in tables["drift"])
    margin_panel(axes[1, 1], tables["answers"], default)
    prompts = tables.get("prompts") or []
    device = prompts[0].get("device_name", "") if prompts else ""
    flipped = sum(p["group"] == "flipped" for p in prompts)
    fig.suptitle(f"FlashPrefill loss analysis: {len(prompts)} needle prompts ({flipped} flipped), {device}",
                 fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

