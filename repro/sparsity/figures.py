"""The figures of repro.sparsity, from its rows: the numbers `measure` returns, or the strings its CSV reads back as
(`repro.common.read_long_csv`; a CSV row also carries the environment stamp's columns: device, device_name, commit).

Panels draw one run into a given Axes (notebook 03 lays several runs side by side):

    synthetic_density_panel  density vs L on the synthetic inputs, one line per setting, and the paper's 256K stars
    real_density_panel       density vs L on real activations (all layers), the default settings
    selection_time_panel     selection time vs L on the synthetic inputs, each setting labelled with its `impl`
    error_panel              attention-output error vs density at the longest real length: each selector's knob
                             sweep (points labelled with the knob's value), the default settings starred

`density_figure` (the first three panels) and `error_figure` return a matplotlib Figure (pyplot-free: nothing global
changes); `plot_density` / `plot_error` save them as the CLI's <tag>_density.png and <tag>_error.png.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from ..paper import PAPER_DENSITY_256K
from .settings import BLOCK, COLORS, SYNTHETIC, impl_of, line_style

LENGTH_LABEL = "sequence length L (tokens)"
DENSITY_LABEL = "density (kept / causal blocks)"


# --------------------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------------------
def _length(row) -> int:
    return int(float(row["L"]))


def is_sweep(row) -> bool:
    """A row of the error-matching sweep (`sweep_settings` labels them "... (sweep)")."""
    return row["setting"].endswith("(sweep)")


def synthetic_rows(rows) -> list:
    """A run's selection rows on the synthetic inputs."""
    return [r for r in rows if r["what"] == "selection" and r["input"] == SYNTHETIC]


def real_rows(rows) -> list:
    """A run's selection rows on real activations over all layers (the default settings and the sweep)."""
    return [r for r in rows if r["what"] == "selection" and r["input"] != SYNTHETIC and str(r["layer"]) == "all"]


def _shape(rows) -> str:
    r = rows[0]
    return f"Hq={r['Hq']}, Hkv={r['Hkv']}, D={r['D']}, {r['dtype']}"


def _title(ax, what, rows, run, detail=None) -> None:
    """`what — run`, then the device and `detail` (default: the input shape) on a second line."""
    head = f"{what} — {run}" if run else what
    tail = ", ".join(x for x in (rows[0].get("device_name"), _shape(rows) if detail is None else detail) if x)
    ax.set_title(f"{head}\n{tail}" if tail else head, fontsize=9)


# --------------------------------------------------------------------------------------------------------------
# Panels
# --------------------------------------------------------------------------------------------------------------
def _lines_by_setting(ax, rows, y, label=lambda r: r["setting"]) -> None:
    """One line of `y` vs L per setting, in the rows' order; colour by selector, style by `line_style`."""
    for s in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == s and r[y] != ""]
        if mine:
            pts = sorted((_length(r), float(r[y])) for r in mine)
            ax.plot(*zip(*pts), line_style(s), color=COLORS[mine[0]["selector"]], label=label(mine[0]))


def _length_axis(ax) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xlabel(LENGTH_LABEL)
    ax.grid(alpha=0.3, which="both")


def _not_measured(ax, what, why) -> None:
    ax.set_title(what, fontsize=9)
    ax.set_xticks([])
    ax.text(0.5, 0.5, f"not measured\n({why})", transform=ax.transAxes, ha="center", va="center")


def synthetic_density_panel(ax, rows, run: str | None = None) -> None:
    """Density vs L of each setting on the synthetic inputs of one run, with the paper's 256K densities as stars (a
    real model, not these inputs); `run` (e.g. the CSV's stem) goes into the title."""
    what = SYNTHETIC
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(DENSITY_LABEL)
    syn = [r for r in synthetic_rows(rows) if not is_sweep(r)]
    if not syn:
        _not_measured(ax, what, "no synthetic rows")
        return
    _lines_by_setting(ax, syn, "density")
    for sel, dens in PAPER_DENSITY_256K.items():
        ax.plot(262144, dens, "*", color=COLORS[sel], markersize=14, markeredgecolor="black",
                label=f"paper @256K {sel} {100 * dens:.1f}% (real model)")
    _length_axis(ax)
    ax.legend(fontsize=7)
    _title(ax, what, syn, run)


def real_density_panel(ax, rows, run: str | None = None) -> None:
    """Density vs L of the default settings on real activations (averaged over the layers) of one run; a
    'not measured' panel when the run has no real-activation rows."""
    what = "real SmolLM2-135M activations"
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(f"{DENSITY_LABEL}, mean over layers")
    real = [r for r in real_rows(rows) if not is_sweep(r)]
    if not real:
        _not_measured(ax, what, "no real-activation rows: --synthetic-only or no dumps")
        return
    layers = {str(r["layer"]) for r in rows if r["what"] == "selection" and r["input"] != SYNTHETIC} - {"all"}
    _lines_by_setting(ax, real, "density")
    _length_axis(ax)
    ax.legend(fontsize=7)
    _title(ax, what, real, run, detail=f"{len(layers)} layers, {_shape(real)}")


def selection_time_panel(ax, rows, run: str | None = None) -> None:
    """Selection time vs L of each setting on the synthetic inputs of one run (its device's timings), each labelled
    with the implementation that ran (`impl_of`: CSVs without an `impl` column ran the reference stages)."""
    what = "selection time, synthetic inputs"
    syn = [r for r in synthetic_rows(rows) if not is_sweep(r)]
    if not syn:
        _not_measured(ax, what, "no synthetic rows")
        return
    _lines_by_setting(ax, syn, "select_ms", label=lambda r: f"{r['setting']} [{impl_of(r)}]")
    _length_axis(ax)
    ax.set_yscale("log")
    device = syn[0].get("device")
    ax.set_ylabel(f"selection time (ms, {device})" if device else "selection time (ms)")
    ax.legend(fontsize=6)
    _title(ax, what, syn, run)


def error_panel(ax, rows, run: str | None = None) -> bool:
    """Attention-output error vs density on real activations at the longest real length of one run: each selector's
    knob sweep as a line (points labelled with the knob's value), its default settings as stars. False (a 'not
    measured' panel) without real-activation rows."""
    what = "Attention-output error vs density, real SmolLM2-135M activations"
    real = real_rows(rows)
    if not real:
        _not_measured(ax, what, "no real-activation rows")
        return False
    L = max(_length(r) for r in real)
    at_L = [r for r in real if _length(r) == L]
    for sel in dict.fromkeys(r["selector"] for r in at_L):
        sweep = [r for r in at_L if r["selector"] == sel and is_sweep(r)]
        if not sweep:
            continue
        pts = sorted((float(r["density"]), float(r["rel_error"]), float(r["value"])) for r in sweep)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=COLORS[sel],
                label=f"{sel} ({sweep[0]['param']} sweep)")
        for dens, err, val in pts:
            ax.annotate(f"{val:g}", (dens, err), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for r in at_L:
        if not is_sweep(r):
            ax.plot(float(r["density"]), float(r["rel_error"]), "*", color=COLORS[r["selector"]], markersize=14,
                    markeredgecolor="black", label=f"default: {r['setting']}")
    ax.set_xlabel(DENSITY_LABEL)
    ax.set_ylabel("relative output error vs dense (Frobenius)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    commit = at_L[0].get("commit")
    _title(ax, f"{what}, L = {L}", at_L, run, detail=f"commit {commit}" if commit else "")
    return True


# --------------------------------------------------------------------------------------------------------------
# Figures of one run (the CLI's PNGs)
# --------------------------------------------------------------------------------------------------------------
def _stamped(rows, stamp):
    """The rows as the CSV holds them: each with the environment stamp's columns (`write_long_csv`)."""
    return [dict(r, **stamp) for r in rows] if stamp else list(rows)


def density_figure(rows, stamp=None) -> Figure:
    """The run's synthetic_density_panel, real_density_panel and selection_time_panel side by side. `stamp`
    defaults to the rows' own columns (rows read from a CSV); the rows carry the settings and the shape."""
    rows = _stamped(rows, stamp)
    fig = Figure(figsize=(15, 4.8), layout="constrained")
    axes = fig.subplots(1, 3)
    synthetic_density_panel(axes[0], rows)
    real_density_panel(axes[1], rows)
    selection_time_panel(axes[2], rows)
    if rows:
        r = rows[0]
        fig.suptitle(f"Block density per selector (Bs={r.get('block_size') or BLOCK}) — {r.get('device_name')}, "
                     f"torch {r.get('torch')}, commit {r.get('commit')}", fontsize=10)
    return fig


def error_figure(rows, stamp=None) -> Figure | None:
    """The run's error_panel; None without real-activation rows. `stamp` as in density_figure."""
    rows = _stamped(rows, stamp)
    if not real_rows(rows):
        return None
    fig = Figure(figsize=(8, 5), layout="constrained")
    error_panel(fig.subplots(), rows)
    return fig


def plot_density(path: Path, rows, stamp=None) -> None:
    density_figure(rows, stamp).savefig(path, dpi=110)


def plot_error(path: Path, rows, stamp=None) -> bool:
    """Save error_figure to `path`; False (nothing written) without real-activation rows."""
    fig = error_figure(rows, stamp)
    if fig is None:
        return False
    fig.savefig(path, dpi=110)
    return True
