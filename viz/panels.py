"""Pictures of FlashPrefill's selection on one head, drawn by `python -m reference` and notebook 01.

Every function draws one panel into a matplotlib Axes and takes plain 2-D data of one (batch, head) pair:
scores (M, N), a reason map (M, N), counts (M,) and indices (M, N), as torch tensors or numpy arrays. Rows are
query blocks I (top to bottom), columns key blocks J, so that every panel lines up with the block grid.

    plot_block_scores      Score_IJ on a log colour scale, the non-causal upper triangle blank     (Eq. 1-2)
    plot_relative_scores   Score_IJ / max_J Score_IJ with the alpha outline                        (Eq. 3)
    plot_row_threshold     one row's scores as bars against its alpha * max line                   (Eq. 3)
    plot_kept_blocks       the kept blocks, coloured by why they were kept                 (threshold + safety net)
    plot_block_lists       counts and the ascending index lists, packed to the left like CSR rows   (compaction)
    plot_visits            key blocks visited per row: logical skip (I + 1) vs physical jump (counts)
    draw_walkthrough       all six panels in one figure

This module imports numpy, torch and matplotlib only: it draws plain arrays, so any selector's output can be shown.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import torch
from matplotlib import colors
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

# Why a block is kept. The safety net is tested first, so THRESHOLD marks blocks that only the dynamic threshold
# keeps: the data-dependent part of the selection (stripes, slashes), on top of the fixed geometry.
NONCAUSAL, DROPPED, SINK, WINDOW, LAST_DENSE, THRESHOLD = -1, 0, 1, 2, 3, 4
REASON_LABELS = {
    DROPPED: "dropped",
    SINK: "sink (forced)",
    WINDOW: "window (forced)",
    LAST_DENSE: "last-dense (forced)",
    THRESHOLD: "Score >= alpha*max only",
}
REASON_COLORS = {
    DROPPED: "#ebebeb",
    SINK: "#e08a3c",
    WINDOW: "#5aa469",
    LAST_DENSE: "#9b72c4",
    THRESHOLD: "#2f6db5",
}
THRESHOLD_COLOR = "#d62728"  # the alpha * max line and outline


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _causal(M: int, N: int) -> np.ndarray:
    return np.arange(N)[None, :] <= np.arange(M)[:, None]


def _block_ticks(ax, M: int, N: int) -> None:
    step = max(1, 2 ** int(np.ceil(np.log2(max(M, N) / 8))))  # about 8 ticks, at powers of two
    ax.set_xticks(np.arange(0, N, step))
    ax.set_yticks(np.arange(0, M, step))
    ax.set_xlabel("key block J")
    ax.set_ylabel("query block I")


def _outline(ax, region: np.ndarray, **line_kw) -> None:
    """Draw the boundary of a boolean cell region (cell (I, J) spans [J-0.5, J+0.5] x [I-0.5, I+0.5])."""
    padded = np.pad(region, 1)
    segments = []
    # Vertical edges: where a cell differs from its left neighbour.
    rows, cols = np.nonzero(padded[1:-1, 1:] != padded[1:-1, :-1])
    segments += [((c - 0.5, r - 0.5), (c - 0.5, r + 0.5)) for r, c in zip(rows, cols)]
    # Horizontal edges: where a cell differs from the one above.
    rows, cols = np.nonzero(padded[1:, 1:-1] != padded[:-1, 1:-1])
    segments += [((c - 0.5, r - 0.5), (c + 0.5, r - 0.5)) for r, c in zip(rows, cols)]
    ax.add_collection(LineCollection(segments, **line_kw))


def relative_scores(scores) -> np.ndarray:
    """Score_IJ / max_J' Score_IJ' (rows whose max is 0 give 0)."""
    s = _np(scores).astype(np.float64)
    row_max = s.max(axis=-1, keepdims=True)
    return np.divide(s, row_max, out=np.zeros_like(s), where=row_max > 0)


def forced_blocks(M: int, sink_blocks: int, window_blocks: int, last_dense_blocks: int) -> dict[int, np.ndarray]:
    """The safety net of `select_blocks` as (M, M) bool masks (causal only), keyed by SINK, WINDOW, LAST_DENSE."""
    I, J = np.arange(M)[:, None], np.arange(M)[None, :]
    causal = J <= I
    return {
        SINK: causal & (J < sink_blocks),
        WINDOW: causal & (I - J < window_blocks),
        LAST_DENSE: causal & (I >= M - last_dense_blocks),
    }


def keep_reasons(scores, alpha: float, sink_blocks: int, window_blocks: int, last_dense_blocks: int) -> np.ndarray:
    """Reason map (M, N) int: NONCAUSAL, DROPPED, or the first of SINK, WINDOW, LAST_DENSE, THRESHOLD that holds.

    Restates `select_blocks` for one head so that the picture can say *why*; `reasons > DROPPED` equals its mask
    (callers should check that).
    """
    s = _np(scores)
    M, N = s.shape
    causal = _causal(M, N)
    reasons = np.where(causal, DROPPED, NONCAUSAL)
    row_max = np.where(causal, s, -np.inf).max(axis=-1, keepdims=True)  # over causal blocks; NaN propagates
    not_below = ~(s < alpha * row_max)
    # Fill in reverse priority so that the earlier reasons overwrite the later ones.
    reasons[causal & not_below] = THRESHOLD
    for reason, mask in reversed(forced_blocks(M, sink_blocks, window_blocks, last_dense_blocks).items()):
        reasons[mask] = reason
    return reasons


def plot_block_scores(ax, scores, *, title: str = "(a) block scores Score_IJ (Eq. 1-2)", dynamic_range: float = 1e6,
                      colorbar: bool = True, label: str = "Score_IJ (row sums to 1)"):
    """Score_IJ on a log scale; the upper triangle (J > I, score 0 by construction) is left blank."""
    s = _np(scores).astype(np.float64)
    M, N = s.shape
    shown = np.where(_causal(M, N), s, np.nan)
    vmax = np.nanmax(shown) if np.any(shown > 0) else 1.0
    cmap = colors.ListedColormap(matplotlib.colormaps["magma_r"](np.linspace(0.02, 1, 256)))
    cmap.set_bad("white")
    # Scores span many decades (exp(m_IJ - M_I)); clip the bottom so the colour bar stays readable.
    image = ax.imshow(np.clip(shown, vmax / dynamic_range, None), cmap=cmap,
                      norm=colors.LogNorm(vmin=vmax / dynamic_range, vmax=vmax), interpolation="nearest")
    _block_ticks(ax, M, N)
    ax.set_title(title)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.03, extend="min", label=label)
    return image


def plot_relative_scores(ax, scores, alpha: float, *, title: str | None = None, dynamic_range: float = 1e4,
                         colorbar: bool = True, highlight_row: int | None = None):
    """Score_IJ / max_J Score_IJ (log colour) with the outline of the cells at or above alpha (Eq. 3)."""
    rel = relative_scores(scores)
    M, N = rel.shape
    causal = _causal(M, N)
    shown = np.where(causal, np.clip(rel, 1 / dynamic_range, None), np.nan)
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("white")
    image = ax.imshow(shown, cmap=cmap, norm=colors.LogNorm(vmin=1 / dynamic_range, vmax=1), interpolation="nearest")
    _outline(ax, causal & (rel >= alpha), colors=THRESHOLD_COLOR, linewidths=1.6)
    if highlight_row is not None:
        ax.add_patch(Rectangle((-0.5, highlight_row - 0.5), N, 1, fill=False, ec="black", lw=1.0, ls="--"))
    _block_ticks(ax, M, N)
    ax.set_title(title or f"(b) Score / row max; red outline: >= alpha = {alpha:g} (Eq. 3)")
    if colorbar:
        cbar = ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.03, extend="min",
                                  label="Score_IJ / max_J Score_IJ")
        cbar.ax.axhline(alpha, color=THRESHOLD_COLOR, lw=2)
    return image


def plot_row_threshold(ax, scores, row: int, alpha: float, *, reasons=None, floor: float = 1e-8,
                       title: str | None = None) -> None:
    """Bars Score_{row, J} for J = 0..row (log scale) against the line alpha * max_J Score_{row, J}."""
    s = _np(scores)[row, : row + 1].astype(np.float64)
    J = np.arange(row + 1)
    threshold = alpha * s.max()
    if reasons is None:
        bar_colors = np.where(s >= threshold, REASON_COLORS[THRESHOLD], REASON_COLORS[DROPPED])
    else:
        bar_colors = [REASON_COLORS[int(r)] for r in _np(reasons)[row, : row + 1]]
    # Bars start at `floor` so that a log axis can show scores that are tiny or exactly 0.
    ax.bar(J, np.maximum(s, floor) - floor, bottom=floor, color=bar_colors, edgecolor="#555555", linewidth=0.4,
           width=0.85)
    ax.axhline(threshold, color=THRESHOLD_COLOR, lw=1.8, ls="--", label=f"alpha * max = {alpha:g} x {s.max():.3g}")
    ax.set_yscale("log")
    ax.set_ylim(floor, 1.5)
    ax.set_xlim(-0.6, row + 0.6)
    ax.set_xlabel("key block J")
    ax.set_ylabel(f"Score_{{{row}, J}}")
    ax.set_title(title or f"(b') row I = {row}: keep iff Score >= alpha * row max")
    ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    ax.grid(axis="y", which="major", alpha=0.3)


def _reason_cmap():
    codes = [DROPPED, SINK, WINDOW, LAST_DENSE, THRESHOLD]
    cmap = colors.ListedColormap([REASON_COLORS[c] for c in codes])
    cmap.set_bad("white")
    return cmap, colors.BoundaryNorm(np.arange(-0.5, THRESHOLD + 1), cmap.N)


def reason_legend(ax, reasons=None, *, loc="lower left", **legend_kw):
    """Legend of the reason colours, with block counts when a reason map is given."""
    handles = []
    for code, label in REASON_LABELS.items():
        if reasons is not None:
            label = f"{label}: {int((_np(reasons) == code).sum())}"
        handles.append(Patch(facecolor=REASON_COLORS[code], edgecolor="#555555", label=label))
    return ax.legend(handles=handles, loc=loc, fontsize=8, framealpha=0.95, **legend_kw)


def plot_kept_blocks(ax, reasons, *, title: str = "(c) kept blocks, by why they were kept", legend: bool = True):
    """The reason map from `keep_reasons`: forced blocks (sink, window, last-dense) first, then the threshold."""
    r = _np(reasons)
    M, N = r.shape
    cmap, norm = _reason_cmap()
    ax.imshow(np.ma.masked_equal(r, NONCAUSAL), cmap=cmap, norm=norm, interpolation="nearest")
    # Thin white grid lines so that single blocks stay countable.
    ax.set_xticks(np.arange(-0.5, N), minor=True)
    ax.set_yticks(np.arange(-0.5, M), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    _block_ticks(ax, M, N)
    ax.set_title(title)
    if legend:
        # The empty upper-right triangle is the natural place for the legend.
        reason_legend(ax, r, loc="upper right")


def plot_block_lists(ax, counts, indices, *, reasons=None, title: str | None = None, label_cells: bool | None = None):
    """Row I: counts[I], then indices[I, :counts[I]] as a row of cells packed to the left (a CSR-like layout).

    The entries of indices past counts are unspecified and are not drawn: kernels never read them.
    """
    counts, indices = _np(counts).astype(int), _np(indices)
    M = counts.shape[0]
    width = max(1, int(counts.max()))
    label_cells = M <= 48 if label_cells is None else label_cells
    fontsize = float(np.clip(190 / max(M, width), 4, 8))
    for I in range(M):
        for t in range(counts[I]):
            J = int(indices[I, t])
            face = REASON_COLORS[int(_np(reasons)[I, J])] if reasons is not None else REASON_COLORS[THRESHOLD]
            ax.add_patch(Rectangle((t - 0.5, I - 0.5), 1, 1, facecolor=face, edgecolor="white", linewidth=0.6))
            if label_cells:
                ax.text(t, I, str(J), ha="center", va="center", fontsize=fontsize, color="white")
        # The count column, left of the list (the CSR row length; its running sum is the row pointer).
        ax.text(-2.3, I, str(counts[I]), ha="center", va="center", fontsize=fontsize, color="black")
    ax.axvline(-0.75, color="#888888", lw=0.8)
    ax.set_xlim(-3.4, width - 0.5)
    ax.set_ylim(M - 0.5, -0.5)
    ax.set_aspect("equal" if width >= M / 2 else "auto")
    positions = list(range(0, width, max(1, 2 ** int(np.ceil(np.log2(width / 8))))))
    ax.set_xticks([-2.3] + positions)
    ax.set_xticklabels(["count"] + [str(t) for t in positions])
    ax.set_yticks(np.arange(0, M, max(1, 2 ** int(np.ceil(np.log2(M / 8))))))
    ax.set_xlabel("list position t  (cell text = key block J = indices[I, t])")
    ax.set_ylabel("query block I")
    ax.set_title(title or "(d) compacted lists: counts[I], indices[I, :counts[I]]")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def plot_visits(ax, logical, physical, *, title: str | None = None) -> None:
    """Key blocks visited per query block: logical skip visits all I + 1 causal blocks, physical jump counts[I]."""
    logical, physical = _np(logical).astype(int), _np(physical).astype(int)
    M = logical.shape[0]
    I = np.arange(M)
    ax.barh(I, logical, height=0.85, color="#d0d0d0", label=f"logical skip (I + 1): {logical.sum()}")
    ax.barh(I, physical, height=0.55, color="#2f6db5", label=f"physical jump (counts): {physical.sum()}")
    ax.set_ylim(M - 0.5, -0.5)
    ax.set_xlabel("key blocks visited")
    ax.set_ylabel("query block I")
    ax.set_yticks(np.arange(0, M, max(1, 2 ** int(np.ceil(np.log2(M / 8))))))
    ax.set_title(title or "(e) key-block visits per row")
    ax.legend(loc="upper right", fontsize=8, framealpha=0.95)  # the short early rows leave that corner empty
    ax.grid(axis="x", alpha=0.3)


def draw_walkthrough(scores, alpha: float, counts, indices, *, sink_blocks: int, window_blocks: int,
                     last_dense_blocks: int, visits_logical=None, visits_physical=None, row: int | None = None,
                     suptitle: str | None = None) -> Figure:
    """The whole selection of one head in six panels (a)-(e); returns the Figure (not attached to pyplot)."""
    s = _np(scores)
    M = s.shape[0]
    reasons = keep_reasons(s, alpha, sink_blocks, window_blocks, last_dense_blocks)
    if row is None:
        row = max(0, M - last_dense_blocks - 1)  # the longest row that the threshold still decides
    counts = _np(counts)
    visits_logical = np.arange(1, M + 1) if visits_logical is None else visits_logical
    visits_physical = counts if visits_physical is None else visits_physical

    fig = Figure(figsize=(19, 12), layout="constrained")
    axes = fig.subplots(2, 3)
    plot_block_scores(axes[0, 0], s)
    plot_relative_scores(axes[0, 1], s, alpha, highlight_row=row)
    plot_row_threshold(axes[0, 2], s, row, alpha, reasons=reasons)
    plot_kept_blocks(axes[1, 0], reasons)
    plot_block_lists(axes[1, 1], counts, indices, reasons=reasons)
    plot_visits(axes[1, 2], visits_logical, visits_physical)
    if suptitle:
        fig.suptitle(suptitle, fontsize=14)
    return fig
