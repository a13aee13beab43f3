"""FlashPrefill V2's mean correction (arXiv 2608.19758, Eq. 6): attention-output error with and without it, at equal
density.

    python -m repro.mean_correction [--real-lengths 2048 4096 8192] [--synthetic-lengths 4096 8192]
                                    [--alphas ...] [--long-alphas ...] [--long-above 4096] [--out-dir DIR]

For each input, layer and length: scores once (reference stages 1-2), then for each alpha the selection (stages 3-4,
V1 safety net: block 128, sink 2, window 4, last-dense 2 blocks) and `reference.block_sparse_attention` twice on the
*same lists*, mean_correction=False and True. The selection does not depend on the option, so both outputs have the
same density by construction. Error = ||O - O_dense||_F / ||O_dense||_F against `reference.dense_attention`; ratio =
corrected / plain (< 1: the correction lowers the error).

Inputs:
  (a) real: SmolLM2-135M-Instruct q/k/v dumps (repro/activations/, a NIAH prompt, 5 layers, Hq=9, Hkv=3, D=64,
      stored in float16, computed in float32), truncated to each of --real-lengths; a length beyond the dump
      (default 8192) is capped to the dump's token count, i.e. the full dump (7554 tokens here). The all-layer
      aggregate is sqrt(sum of squared errors / sum of squared norms) over the layers, as in repro.sparsity.
      Skipped with a message when the dumps are absent (`python -m repro.dump_activations` makes them).
  (b) synthetic: `reference.synthetic.planted_qkv` (**synthetic**: planted sinks, local decay, slashes, stripes; no
      model), B=1, Hq=8, Hkv=2, D=64, float32, lengths --synthetic-lengths.

The grid (defaults): alphas 0.02 0.05 0.08 0.12 0.18 0.3 0.5 at lengths <= 4096; above 4096 (the full real dump and
synthetic 8K) only 0.05 0.12 0.3 0.5 (--long-alphas): the reference's block loop costs seconds per call there and
the low alphas keep the most blocks, so they cost the most. About 3 minutes on a 2-core CPU VM with one torch
thread (the default on a CPU: fastest for the reference's small tiles).

This is the PyTorch reference (float32; on the CPU unless --device cuda), operator level: attention-output error,
not task accuracy. The Triton kernels refuse the option for now, so neither they nor its cost on a GPU are measured.

Writes into --out-dir (default: the run folder repro/runs/<date>-<device>/mean_correction/; the committed run is in
repro/results/mean_correction/):

    mean_correction.csv    long format, one row per (input, layer, L, alpha), plus the all-layer rows (layer "all")
    mean_correction.md     the verdict (is the corrected error lower at every point?), a table per input, per layer
    mean_correction.png    error vs density, plain vs corrected, one panel per input (log y); with real
                           activations a third panel: the ratio per layer
    mean_correction.json   the run's metadata: command, grid, wall time, what was skipped
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from types import MappingProxyType

import matplotlib
import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from reference import (block_scores, block_sparse_attention, causal_block_density, compact_blocks, dense_attention,
                       mean_pool_keys, select_blocks)
from reference.synthetic import planted_qkv

from .common import (default_device, environment_stamp, error_sums, length_label, markdown_table, run_dir, stamp_line,
                     write_long_csv, write_run_json)

EXPERIMENT = "mean_correction"
ALPHAS = (0.02, 0.05, 0.08, 0.12, 0.18, 0.3, 0.5)
LONG_ALPHAS = (0.05, 0.12, 0.3, 0.5)  # above LONG_ABOVE tokens: the low alphas cost the most there
LONG_ABOVE = 4096
REAL_LENGTHS = (2048, 4096, 8192)  # 8192 is capped to the dump's length: the full dump
SYNTHETIC_LENGTHS = (4096, 8192)
SYNTHETIC_SHAPE = MappingProxyType(dict(batch=1, q_heads=8, kv_heads=2, head_dim=64))
SAFETY_NET = MappingProxyType(dict(sink_blocks=2, window_blocks=4, last_dense_blocks=2))
BLOCK = 128
REAL = "real SmolLM2-135M"
SYNTHETIC = "synthetic planted_qkv"
IMPL = "reference (PyTorch)"


# --------------------------------------------------------------------------------------------------------------
# Measure
# --------------------------------------------------------------------------------------------------------------
def alphas_at(L: int, alphas, long_alphas, long_above: int) -> tuple[float, ...]:
    return tuple(long_alphas) if L > long_above else tuple(alphas)


def measure_input(q, k, v, alphas, *, block_size: int, common: dict, bar) -> list[dict]:
    """One row per alpha on one (input, layer, L): density, and the error of the same lists without and with the
    correction (with the squared sums, so that layers can be aggregated)."""
    ref = dense_attention(q, k, v)
    scores = block_scores(q, mean_pool_keys(k, block_size), block_size)  # alpha-free: once per input
    M = scores.shape[-1]
    rows = []
    for alpha in alphas:
        counts, indices = compact_blocks(select_blocks(scores, alpha, **SAFETY_NET))
        density = float(causal_block_density(counts))
        errors, seconds = {}, {}
        for name, flag in (("plain", False), ("corrected", True)):
            start = time.perf_counter()
            out = block_sparse_attention(q, k, v, counts, indices, block_size, mean_correction=flag)
            seconds[name] = time.perf_counter() - start
            errors[name] = error_sums(out, ref)
            bar.update()
        rows.append(point_row(dict(common, M=M, alpha=alpha, density=density), errors, seconds))
    return rows


def point_row(head: dict, errors: dict, seconds: dict | None = None) -> dict:
    """A CSV row from {"plain": (err2, ref2), "corrected": (err2, ref2)}."""
    (p2, r2), (c2, _) = errors["plain"], errors["corrected"]
    plain, corrected = math.sqrt(p2 / r2), math.sqrt(c2 / r2)
    row = dict(what="error", **head, rel_error_plain=plain, rel_error_corrected=corrected,
               ratio=corrected / plain if plain > 0 else "", err2_plain=p2, err2_corrected=c2, ref2=r2)
    if seconds:
        row.update(plain_s=round(seconds["plain"], 3), corrected_s=round(seconds["corrected"], 3))
    return row


def aggregate_layers(rows: list[dict]) -> list[dict]:
    """Per (L, alpha) of the real rows: one layer='all' row, error over all layers together, density averaged."""
    out = []
    for L, alpha in sorted({(r["L"], r["alpha"]) for r in rows}):
        group = [r for r in rows if r["L"] == L and r["alpha"] == alpha]
        head = {k: group[0][k] for k in group[0] if k not in ("what", "density") and not k.startswith(
            ("rel_error", "ratio", "err2", "ref2", "plain_s", "corrected_s"))}
        head.update(layer="all", density=statistics.mean(r["density"] for r in group))
        ref2 = sum(r["ref2"] for r in group)
        errors = {n: (sum(r[f"err2_{n}"] for r in group), ref2) for n in ("plain", "corrected")}
        seconds = {n: sum(r[f"{n}_s"] for r in group) for n in ("plain", "corrected")} if "plain_s" in group[0] \
            else None
        out.append(point_row(head, errors, seconds))
    return out


def measure_real(acts: dict, lengths, alphas, long_alphas, long_above, *, block_size, device) -> list[dict]:
    """Per layer and length (capped to the dump), the alpha rows; then the all-layer rows."""
    avail = next(iter(acts.values()))[0].shape[1]
    lengths = sorted({min(L, avail) for L in lengths})
    total = 2 * len(acts) * sum(len(alphas_at(L, alphas, long_alphas, long_above)) for L in lengths)
    bar = tqdm(total=total, desc="real", unit="call", disable=None)
    rows, start = [], time.perf_counter()
    for L in lengths:
        per_layer = []
        for layer, (q8, k8, v8) in acts.items():
            q, k, v = (t[:, :L].to(device).contiguous() for t in (q8, k8, v8))
            common = dict(input=REAL, layer=layer, L=L, full_dump=L == avail, B=q.shape[0], Hq=q.shape[2],
                          Hkv=k.shape[2], D=q.shape[3], dtype=str(q.dtype).replace("torch.", ""),
                          block_size=block_size, impl=IMPL, **SAFETY_NET)
            per_layer += measure_input(q, k, v, alphas_at(L, alphas, long_alphas, long_above),
                                       block_size=block_size, common=common, bar=bar)
        rows += per_layer + aggregate_layers(per_layer)
        print(f"real L={L} ({time.perf_counter() - start:.0f} s): " + "; ".join(
            f"alpha {r['alpha']:g} {r['density']:.1%} {r['rel_error_plain']:.4f} -> {r['rel_error_corrected']:.4f}"
            for r in rows if r["L"] == L and r["layer"] == "all"), flush=True)
    bar.close()
    return rows


def measure_synthetic(lengths, alphas, long_alphas, long_above, *, block_size, device, seed) -> list[dict]:
    s = SYNTHETIC_SHAPE
    total = 2 * sum(len(alphas_at(L, alphas, long_alphas, long_above)) for L in lengths)
    bar = tqdm(total=total, desc="synthetic", unit="call", disable=None)
    rows, start = [], time.perf_counter()
    for L in sorted(lengths):
        q, k, v = planted_qkv(s["batch"], L, s["q_heads"], s["kv_heads"], s["head_dim"], seed=seed, device=device)
        common = dict(input=SYNTHETIC, layer="", L=L, full_dump="", B=s["batch"], Hq=s["q_heads"], Hkv=s["kv_heads"],
                      D=s["head_dim"], dtype=str(q.dtype).replace("torch.", ""), block_size=block_size, impl=IMPL,
                      seed=seed, **SAFETY_NET)
        new = measure_input(q, k, v, alphas_at(L, alphas, long_alphas, long_above), block_size=block_size,
                            common=common, bar=bar)
        rows += new
        print(f"synthetic L={L} ({time.perf_counter() - start:.0f} s): " + "; ".join(
            f"alpha {r['alpha']:g} {r['density']:.1%} {r['rel_error_plain']:.4f} -> {r['rel_error_corrected']:.4f}"
            for r in new), flush=True)
    bar.close()
    return rows


# --------------------------------------------------------------------------------------------------------------
# Report (one function per section, each returning its lines)
# --------------------------------------------------------------------------------------------------------------
def headline_points(rows) -> list[dict]:
    """The (input, L, alpha) points of the verdict: real activations over all layers, synthetic per length."""
    return [r for r in rows if r["what"] == "error" and (r["input"] == SYNTHETIC or str(r["layer"]) == "all")]


def compare(points) -> dict:
    """Split points into lowered (corrected < plain), exceptions (corrected >= plain) and unpruned (density 100%:
    nothing pruned, the outputs are identical, so there is nothing to compare)."""
    unpruned = [r for r in points if float(r["density"]) >= 1.0]
    compared = [r for r in points if float(r["density"]) < 1.0]
    lowered = [r for r in compared if float(r["rel_error_corrected"]) < float(r["rel_error_plain"])]
    exceptions = [r for r in compared if float(r["rel_error_corrected"]) >= float(r["rel_error_plain"])]
    return dict(compared=compared, lowered=lowered, exceptions=exceptions, unpruned=unpruned)


def point_name(r) -> str:
    kind = "**synthetic**" if r["input"] == SYNTHETIC else "real, all layers"
    return f"{kind} L={length_label(r['L'])} alpha={float(r['alpha']):g}"


def ratio_summary(points) -> str:
    ratios = sorted(float(r["ratio"]) for r in points if r["ratio"] != "")
    if not ratios:
        return "no ratio"
    return (f"corrected / plain error from {ratios[0]:.3f} to {ratios[-1]:.3f} (median {statistics.median(ratios):.3f})"
            f" at densities {min(float(r['density']) for r in points):.1%}-"
            f"{max(float(r['density']) for r in points):.1%}")


def title_section(stamp) -> list[str]:
    where = "the CPU" if stamp["device"] == "cpu" else stamp["device_name"]
    return ["# Mean correction (FlashPrefill V2, Eq. 6): attention-output error at equal density", "",
            f"The PyTorch reference (`reference.block_sparse_attention`, float32, on {where}), the same block lists "
            "with `mean_correction=False` and `True`: the selection does not depend on the option, so each pair has "
            "the same density. Error = ||O - O_dense||_F / ||O_dense||_F against `reference.dense_attention`; "
            "ratio = corrected / plain (below 1: the correction lowers the error). FlashPrefill selection, block "
            f"{BLOCK}, safety net sink {SAFETY_NET['sink_blocks']} / window {SAFETY_NET['window_blocks']} / "
            f"last-dense {SAFETY_NET['last_dense_blocks']} blocks.", "",
            "**Operator level**: attention-output error of one call, not task accuracy. The Triton kernels refuse the "
            "option for now: neither the kernel nor its cost on the H200 is measured here.", ""]


def verdict_section(rows) -> list[str]:
    points = headline_points(rows)
    if not points:
        return []
    c = compare(points)
    n, low, exc = len(c["compared"]), len(c["lowered"]), c["exceptions"]
    lines = ["## Is the corrected error lower at every measured point?", ""]
    if not n:
        lines += ["Nothing to compare: every point kept all blocks (density 100%).", ""]
    elif not exc:
        lines += [f"**Yes** at the (input, length, alpha) points: lower at all {n} measured points with pruned "
                  "blocks (real activations over all layers together, synthetic inputs per length); "
                  + ratio_summary(c["compared"]) + "."
                  + (" **Not in every layer**, though (below)." if compare(
                      [r for r in rows if r["input"] == REAL and str(r["layer"]) not in ("", "all")])["exceptions"]
                     else ""), ""]
    else:
        lines += [f"**No**: lower at {low} of {n} measured (input, length, alpha) points with pruned blocks; "
                  f"**{len(exc)} exception{'s' if len(exc) > 1 else ''}** (corrected error >= plain):", ""]
        lines += [f"- {point_name(r)}: density {float(r['density']):.1%}, error {float(r['rel_error_plain']):.4f} "
                  f"plain -> {float(r['rel_error_corrected']):.4f} corrected (ratio "
                  f"{float(r['ratio']) if r['ratio'] != '' else float('nan'):.3f})" for r in exc]
        lines.append("")
    for name in (REAL, SYNTHETIC):
        sub = [r for r in c["compared"] if r["input"] == name]
        if sub:
            low_n = sum(r in c["lowered"] for r in sub)
            label = "Real activations (all layers)" if name == REAL else "**Synthetic** inputs"
            lines.append(f"- {label}: lower at {low_n} of {len(sub)} points; {ratio_summary(sub)}.")
    lines += per_layer_verdict(rows)
    if c["unpruned"]:
        lines.append(f"- Not compared: {len(c['unpruned'])} point(s) at density 100% (nothing pruned, identical "
                     "outputs): " + ", ".join(point_name(r) for r in c["unpruned"]) + ".")
    lines += ["", "Points: real activations aggregated over the layers (per-layer counts below), synthetic inputs per "
              "length. \"Lower\" is strict and says nothing about significance: one prompt, one seed.", ""]
    return lines


def per_layer_verdict(rows) -> list[str]:
    """One line: how many real (layer, length, alpha) points the correction lowers, and the layers where it does not."""
    per = [r for r in rows if r["input"] == REAL and str(r["layer"]) not in ("", "all")]
    c = compare(per)
    if not c["compared"]:
        return []
    line = (f"- Per layer (real activations): lower at {len(c['lowered'])} of {len(c['compared'])} (layer, length, "
            "alpha) points")
    if not c["exceptions"]:
        return [line + "."]
    layers = sorted({int(r["layer"]) for r in c["exceptions"]})
    counts = ", ".join(f"layer {layer} at {sum(int(r['layer']) == layer for r in c['exceptions'])} of "
                       f"{sum(int(r['layer']) == layer for r in c['compared'])}" for layer in layers)
    return [line + f"; **higher in single layers**: {counts} (table \"Per layer\" below). The all-layer error is "
            "a ratio of sums of squares over the layers, so the layers with the largest outputs weigh the most: it "
            "can be lower while single layers get worse."]


def input_table(points, lengths=None) -> str:
    """Rows alpha, column groups per length: density, error plain, error corrected, ratio."""
    lengths = lengths or sorted({int(r["L"]) for r in points})
    alphas = sorted({float(r["alpha"]) for r in points})
    d = {(int(r["L"]), float(r["alpha"])): r for r in points}
    head = ["alpha"] + [f"{length_label(L)} {x}" for L in lengths for x in ("density", "plain", "corrected", "ratio")]
    body = []
    for a in alphas:
        cells = [f"{a:g}"]
        for L in lengths:
            r = d.get((L, a))
            cells += (["-"] * 4 if r is None else
                      [f"{float(r['density']):.1%}", f"{float(r['rel_error_plain']):.4f}",
                       f"{float(r['rel_error_corrected']):.4f}",
                       "-" if r["ratio"] == "" else f"{float(r['ratio']):.3f}"])
        body.append(cells)
    return markdown_table(head, body)


def real_section(rows, layers, real_note) -> list[str]:
    agg = [r for r in rows if r["input"] == REAL and str(r["layer"]) == "all"]
    if not agg:
        return ["## Real SmolLM2-135M activations", "", real_note, ""] if real_note else []
    full = sorted({int(r["L"]) for r in agg if str(r.get("full_dump")) == "True"})
    r0 = agg[0]
    return ["## Real SmolLM2-135M activations, all layers together", "",
            input_table(agg), "",
            f"q/k/v of SmolLM2-135M-Instruct on a NIAH prompt (Hq={r0['Hq']}, Hkv={r0['Hkv']}, D={r0['D']}; dumped "
            f"in float16, computed in {r0['dtype']}), layers {', '.join(map(str, layers))}, truncated to each length"
            + (f" ({', '.join(map(str, full))} = the full dump)" if full else "") + ". Density averaged over the "
            "layers; errors over all layers together: sqrt(sum of squared errors / sum of squared norms). "
            "\"-\": alpha not run at that length (the grid is in the module docstring).", ""]


def per_layer_section(rows) -> list[str]:
    per = [r for r in rows if r["input"] == REAL and str(r["layer"]) not in ("", "all")]
    if not per:
        return []
    body = []
    for layer in sorted({int(r["layer"]) for r in per}):
        c = compare([r for r in per if int(r["layer"]) == layer])
        ratios = [float(r["ratio"]) for r in c["compared"] if r["ratio"] != ""]
        body.append([layer, f"{len(c['lowered'])} of {len(c['compared'])}",
                     f"{min(ratios):.3f}" if ratios else "-", f"{statistics.median(ratios):.3f}" if ratios else "-",
                     f"{max(ratios):.3f}" if ratios else "-"])
    return ["### Per layer (real activations)", "",
            markdown_table(["layer", "corrected lower at", "ratio min", "ratio median", "ratio max"], body), "",
            "Over every (length, alpha) point of the layer with pruned blocks; ratio = corrected / plain error.", ""]


def synthetic_section(rows) -> list[str]:
    syn = [r for r in rows if r["input"] == SYNTHETIC]
    if not syn:
        return []
    r0 = syn[0]
    return ["## **Synthetic** planted-pattern inputs", "",
            input_table(syn), "",
            f"**Synthetic** `reference.synthetic.planted_qkv` (sinks, local decay, slashes, vertical stripes; no "
            f"model), B={r0['B']}, Hq={r0['Hq']}, Hkv={r0['Hkv']}, D={r0['D']}, {r0['dtype']}, seed {r0['seed']}. "
            "They show the mechanics, not a model's numbers.", ""]


def render_markdown(rows, stamp, *, layers=(), real_note="") -> str:
    parts = title_section(stamp) + verdict_section(rows) + real_section(rows, layers, real_note)
    parts += per_layer_section(rows) + synthetic_section(rows) + [stamp_line(stamp), ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------------------------------------------
def _log_density_axes(ax, ylabel, title) -> None:
    """The panels' shared axes: density on x, a log y, grid, legend and title."""
    ax.set_yscale("log")
    ax.set_xlabel("density (kept / causal blocks)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)


def error_panel(ax, points, title) -> None:
    """Error vs density, plain (solid, circles) vs corrected (dashed, crosses), one colour per length; log y. Points
    with zero error (density 100%) are left out of the log axis."""
    lengths = sorted({int(r["L"]) for r in points})
    cmap = matplotlib.colormaps["viridis"]
    for n, L in enumerate(lengths):
        color = cmap(n / max(1, len(lengths) - 1) * 0.85)
        sub = sorted((float(r["density"]), float(r["rel_error_plain"]), float(r["rel_error_corrected"]))
                     for r in points if int(r["L"]) == L)
        for col, style, name in ((1, "o-", "plain"), (2, "x--", "corrected")):
            xy = [(p[0], p[col]) for p in sub if p[col] > 0]
            if xy:
                ax.plot(*zip(*xy), style, color=color, label=f"L = {length_label(L)}, {name}")
    _log_density_axes(ax, "relative error vs dense", title)


def layer_ratio_panel(ax, rows, title) -> None:
    """Corrected / plain error vs density per real layer (every length and alpha with pruned blocks); 1 = no gain."""
    cmap = matplotlib.colormaps["tab10"]
    for n, layer in enumerate(sorted({int(r["layer"]) for r in rows})):
        xy = sorted((float(r["density"]), float(r["ratio"])) for r in rows
                    if int(r["layer"]) == layer and float(r["density"]) < 1 and r["ratio"] != "")
        if xy:
            ax.plot(*zip(*xy), "o", color=cmap(n), ms=4, label=f"layer {layer}")
    ax.axhline(1.0, color="black", lw=0.8)
    _log_density_axes(ax, "corrected / plain error (< 1: correction helps)", title)


def plot(path: Path, rows, stamp) -> None:
    panels = []
    real = [r for r in rows if r["input"] == REAL and str(r["layer"]) == "all"]
    if real:
        panels.append((error_panel, real, "real SmolLM2-135M activations (all layers together)"))
    syn = [r for r in rows if r["input"] == SYNTHETIC]
    if syn:
        panels.append((error_panel, syn, "synthetic planted_qkv inputs (no model)"))
    per_layer = [r for r in rows if r["input"] == REAL and str(r["layer"]) not in ("", "all")]
    if per_layer:
        panels.append((layer_ratio_panel, per_layer, "real activations per layer (every length and alpha)"))
    fig = Figure(figsize=(6 * max(1, len(panels)), 5), layout="constrained")
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    for ax, (draw, points, title) in zip(axes, panels):
        draw(ax, points, title)
    fig.suptitle("FlashPrefill mean correction (V2 Eq. 6): attention-output error at equal density, same lists\n"
                 f"PyTorch reference, float32, {stamp['device_name']}; commit {stamp['commit']}, {stamp['date']}",
                 fontsize=9)
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m repro.mean_correction", description=__doc__.split("\n\n")[0],
                                epilog="Default grid: alphas " + " ".join(map(str, ALPHAS)) + " at lengths <= "
                                f"{LONG_ABOVE}, " + " ".join(map(str, LONG_ALPHAS)) + " above (about 3 min on a "
                                "2-core CPU VM, one thread).")
    p.add_argument("--real-lengths", type=int, nargs="+", default=list(REAL_LENGTHS),
                   help="capped to the dump's length, so 8192 is the full dump (default: %(default)s)")
    p.add_argument("--synthetic-lengths", type=int, nargs="+", default=list(SYNTHETIC_LENGTHS),
                   help="(default: %(default)s)")
    p.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS), help="(default: %(default)s)")
    p.add_argument("--long-alphas", type=float, nargs="+", default=list(LONG_ALPHAS),
                   help="the alphas at lengths above --long-above (default: %(default)s)")
    p.add_argument("--long-above", type=int, default=LONG_ABOVE, help="(default: %(default)s)")
    p.add_argument("--activations", type=Path, default=None, help="dump folder (default: repro/activations/)")
    p.add_argument("--synthetic-only", action="store_true", help="skip the real activations")
    p.add_argument("--block-size", type=int, default=BLOCK, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="synthetic inputs' seed (default: %(default)s)")
    p.add_argument("--device", default=default_device(), help="(default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (default: %(default)s)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="(default: the run folder repro/runs/<date>-<device>/mean_correction/)")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    matplotlib.use("Agg")
    torch.set_grad_enabled(False)
    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)  # the reference's small tiles: one thread is fastest on a small VM
    start = time.perf_counter()
    stamp = environment_stamp(args.device)
    grid = dict(alphas=args.alphas, long_alphas=args.long_alphas, long_above=args.long_above)
    from .capture import NO_DUMPS, activations_or_reason  # lazily: it imports the accuracy tasks and the harness

    acts, real_note = activations_or_reason(args.activations, max_length=max(args.real_lengths),
                                            synthetic_only=args.synthetic_only,
                                            without_dumps=NO_DUMPS + "; synthetic inputs only.")
    rows = []
    if real_note:
        print(real_note)
    else:
        rows += measure_real(acts, args.real_lengths, **grid, block_size=args.block_size, device=args.device)
    rows += measure_synthetic(args.synthetic_lengths, **grid, block_size=args.block_size, device=args.device,
                              seed=args.seed)
    out_dir = args.out_dir or run_dir(EXPERIMENT, args.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = write_long_csv(out_dir / f"{EXPERIMENT}.csv", rows, stamp)
    md_path = out_dir / f"{EXPERIMENT}.md"
    text = render_markdown(rows, stamp, layers=list(acts), real_note=real_note)
    md_path.write_text(text)
    png_path = out_dir / f"{EXPERIMENT}.png"
    plot(png_path, rows, stamp)
    wall = time.perf_counter() - start
    json_path = write_run_json(out_dir / f"{EXPERIMENT}.json", dict(
        command="python -m repro.mean_correction " + " ".join(sys.argv[1:] if argv is None else argv),
        real_lengths=args.real_lengths, synthetic_lengths=args.synthetic_lengths, **grid, block_size=args.block_size,
        threads=torch.get_num_threads(), wall_s=round(wall, 1), real_skipped=real_note, stamp=stamp))
    print("\n".join(verdict_section(rows)))
    print(f"wrote {csv_path}, {md_path}, {png_path}, {json_path} in {wall:.1f} s")


if __name__ == "__main__":
    main()
