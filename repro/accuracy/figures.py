"""The accuracy study's figures, one function per figure: each takes the rows (run_samples' rows, or the CSVs as
`read_long_csv` returns them: strings, converted here with report.typed) and returns a matplotlib Figure, or None
when the rows hold nothing to draw; the notebooks call them directly. `save_figures` draws and writes the runner's
figures as the runner names them."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .experiments import mean
from .report import prompt_key, sweep_keys, typed

TASK_TITLES = {"passkey": "passkey", "niah_single": "single-needle NIAH"}


def _pyplot():
    import matplotlib.pyplot as plt  # the caller's backend (save_figures: Agg)

    return plt


def _from_rows(rows, key, given):
    """`given`, else the value of column `key` that the rows read back from a CSV carry (model, default_alpha)."""
    if given is not None:
        return given
    if key not in rows[0]:
        raise ValueError(f"the rows have no {key!r} column: pass it")
    return rows[0][key]


def niah_heatmap(rows, default_alpha=None, name=None, tasks=("niah_single",)):
    """NIAH score per needle depth and context length: one row of panels per task of `tasks` that has rows
    (passkey, niah_single), Full beside FlashPrefill at the default alpha. default_alpha and name (the model): by
    default the rows' default_alpha and model columns (the samples CSV has them). The runner's figure is the
    single-needle row alone."""
    rows = typed(rows)
    tasks = [t for t in tasks if any(r["experiment"] == "niah" and r["task"] == t for r in rows)]
    if not tasks:
        return None
    niah = [r for r in rows if r["experiment"] == "niah" and r["task"] in tasks]
    default_alpha = float(_from_rows(niah, "default_alpha", default_alpha))
    name = _from_rows(niah, "model", name)
    plt = _pyplot()
    lengths = sorted({r["length"] for r in niah})  # one grid for every panel: a cell a task lacks stays blank
    depths = sorted({r["depth"] for r in niah})
    methods = [("full", ""), ("flashprefill", default_alpha)]
    height = 3.6 * len(tasks)
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, height), sharex=True, sharey=True,
                             squeeze=False)
    for task, row_axes in zip(tasks, axes):
        for ax, (m, a) in zip(row_axes, methods):
            grid = torch.full((len(depths), len(lengths)), float("nan"))
            for i, d in enumerate(depths):
                for j, L in enumerate(lengths):
                    s = [r["score"] for r in niah if r["task"] == task and r["depth"] == d and r["length"] == L
                         and r["method"] == m and r["alpha"] == a]
                    if s:
                        grid[i, j] = mean(s)
            im = ax.imshow(grid.numpy(), cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
            ax.set_xticks(range(len(lengths)), [f"{L // 1024}K" if L >= 1024 else str(L) for L in lengths])
            ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
            title = "Full" if m == "full" else f"FlashPrefill (alpha {a})"
            if len(tasks) == 1:  # the suptitle names the task
                ax.set_title(title)
            else:
                ax.set_title(f"{TASK_TITLES.get(task, task)}: {title}", fontsize=10)
            for i in range(len(depths)):
                for j in range(len(lengths)):
                    if not math.isnan(grid[i, j]):
                        ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=7)
        row_axes[0].set_ylabel("needle depth")
    for ax in axes[-1]:
        ax.set_xlabel("context length (tokens)")
    if len(tasks) > 1:  # the default top margin grows with the figure's height: keep a one-row figure's inches
        fig.subplots_adjust(top=1 - 0.5 / height)
    fig.colorbar(im, ax=axes, label="score (%)")
    what = " and ".join(TASK_TITLES.get(t, t) for t in tasks)
    what = what[0].upper() + what[1:]
    fig.suptitle(f"{what}, {name} (ours; paper: near lossless 2K-256K on 7B-30B models)", fontsize=9,
                 **({} if len(tasks) == 1 else dict(y=1 - 0.07 / height)))
    return fig


def alpha_sweep(rows):
    """Score (dotted: Full) and realised density vs alpha per length, on the prompts of each length that ran at
    every alpha (the legend gives their count), with the paper's V2 densities on NIAH prompts (alpha 0.1)."""
    from repro.paper import PAPER_V2_NIAH_DENSITY

    rows = typed(rows)
    sweep = sorted({r["alpha"] for r in rows if r["method"] == "flashprefill"})
    if len(sweep) <= 1:
        return None
    plt = _pyplot()
    lengths = sorted({r["length"] for r in rows})
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for L in lengths:
        keys = sweep_keys(rows, L, sweep)
        if not keys:
            continue
        sc = [mean(r["score"] for r in rows if r["alpha"] == a and r["length"] == L and prompt_key(r) in keys)
              for a in sweep]
        de = [100 * mean(r["density"] for r in rows if r["alpha"] == a and r["length"] == L and prompt_key(r) in keys)
              for a in sweep]
        full = mean(r["score"] for r in rows if r["method"] == "full" and r["length"] == L and prompt_key(r) in keys)
        (line,) = a1.plot(sweep, sc, "o-", label=f"FlashPrefill {L} ({len(keys)} prompts)")
        a1.axhline(full, color=line.get_color(), ls=":", lw=1, label=f"Full {L}")
        a2.plot(sweep, de, "o-", color=line.get_color(), label=f"ours {L}")
        if L in PAPER_V2_NIAH_DENSITY:
            lo, hi = PAPER_V2_NIAH_DENSITY[L]
            a2.errorbar([0.1], [100 * (lo + hi) / 2], yerr=[[100 * (hi - lo) / 2]], fmt="s",
                        color=line.get_color(), mfc="white", capsize=3, label=f"paper (V2, 7B-30B) {L}")
    a1.set_xlabel("alpha")
    a1.set_ylabel("score (%)")
    a1.set_title("accuracy vs alpha (same prompts at every alpha)", fontsize=9)
    a1.legend(fontsize=7)
    a2.set_xlabel("alpha")
    a2.set_ylabel("realised density (%)")
    a2.set_title("density vs alpha", fontsize=9)
    a2.legend(fontsize=7)
    return fig


def layer_error(err_rows, name=None):
    """Relative error vs dense (log scale) and density per layer: one line per (length, alpha), the colour giving
    alpha and the line style the length. name (the model): by default the rows' model column (the CSV has it)."""
    if not err_rows:
        return None
    err_rows = typed(err_rows)
    name = _from_rows(err_rows, "model", name)
    plt = _pyplot()
    from matplotlib.lines import Line2D

    lengths = sorted({r["length"] for r in err_rows})
    alphas = sorted({r["alpha"] for r in err_rows})
    colours = plt.get_cmap("tab10" if len(alphas) <= 10 else "viridis")
    colour = {a: colours(i if len(alphas) <= 10 else i / max(1, len(alphas) - 1)) for i, a in enumerate(alphas)}
    style = {L: ("-", "--", ":", "-.")[i % 4] for i, L in enumerate(lengths)}
    marker = {L: "osD^v"[i % 5] for i, L in enumerate(lengths)}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for L in lengths:
        for a in alphas:
            rs = sorted((r for r in err_rows if r["alpha"] == a and r["length"] == L), key=lambda r: r["layer"])
            kw = dict(color=colour[a], ls=style[L], marker=marker[L], ms=3, lw=1.2)
            a1.plot([r["layer"] for r in rs], [r["rel_error"] for r in rs], **kw)
            a2.plot([r["layer"] for r in rs], [100 * r["density"] for r in rs], **kw)
    a1.set_yscale("log")
    a1.set_xlabel("layer")
    a1.set_ylabel("relative error vs dense")
    a2.set_xlabel("layer")
    a2.set_ylabel("density (%)")
    handles = ([Line2D([], [], color=colour[a], lw=2, label=f"alpha {a:g}" + (" (every block)" if a == 0 else ""))
                for a in alphas]
               + [Line2D([], [], color="0.3", ls=style[L], marker=marker[L], ms=3, label=f"L = {L}") for L in lengths])
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(0.91, 0.5), fontsize=7, frameon=False)
    fig.suptitle(f"Per-layer error of FlashPrefill attention on real {name} activations (ours)", fontsize=9)
    return fig


def save_figures(rows, err_rows, default_alpha, out_dir: Path, prefix: str, name: str) -> list[Path]:
    """Every figure the rows allow, as <prefix>{niah_heatmap, alpha_sweep, layer_error}.png in out_dir (the NIAH
    heatmap: single-needle NIAH only)."""
    import matplotlib

    matplotlib.use("Agg")
    paths = []
    for suffix, draw in (("niah_heatmap", lambda: niah_heatmap(rows, default_alpha, name)),
                         ("alpha_sweep", lambda: alpha_sweep(rows)),
                         ("layer_error", lambda: layer_error(err_rows, name))):
        fig = draw()
        if fig is None:
            continue
        paths.append(out_dir / f"{prefix}{suffix}.png")
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
        _pyplot().close(fig)
    return paths
