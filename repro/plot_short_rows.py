"""The per-block cost of short rows, drawn from a `python -m repro.tune_kernels --short-rows` CSV (no GPU needed).

    python -m repro.plot_short_rows [--csv repro/results/kernel_tuning/short_rows_band_fit_h200.csv] [--out PNG]

x: kept blocks per row (a program walks one row of one head); y: ns per kept block-head of the whole GPU. Per
length: the banded lists as measured (dots), the fit `a + b / x` of `tune_kernels.row_length_fit` (line: a per
kept block, b per program), the random lists at 3.5% and 10% independent per head (crosses, at their mean row
length) and cuDNN's dense time per causal block (dashed). Operator only, synthetic planted inputs. Writes --out
(default: <csv stem>.png in the run folder repro/runs/<date>-<device>/kernel_tuning/, never beside a committed CSV).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from repro.common import RESULTS_DIR, length_label, read_long_csv, run_dir, stamp_of  # noqa: E402
from repro.plot_speed import save  # noqa: E402

DEFAULT_CSV = RESULTS_DIR / "kernel_tuning" / "short_rows_band_fit_h200.csv"
HQ, BLOCK = 32, 128  # tune_kernels' standard shape: programs = Hq x L / Bs


def by_length(rows: list[dict]) -> dict[int, dict]:
    """{L: dict(band=[(blocks per row, ns)], random=[(label, blocks per row, ns)], a, b, cudnn)} for the lengths
    with a fit, from the default configuration's rows."""
    out = {}
    for r in rows:
        if r.get("config", "default") != "default":
            continue
        L = int(r["L"])
        entry = out.setdefault(L, dict(band=[], random=[], a=None, b=None, cudnn=None))
        programs = HQ * L // BLOCK
        what, ns = r["what"], float(r["ns_per_block"])
        if what == "fit: ns per kept block-head":
            entry["a"] = ns
        elif what == "fit: ns per program":
            entry["b"] = ns
        else:
            per_row = int(r["blocks"]) / programs
            (entry["band"].append((per_row, ns)) if what.startswith("band of")
             else entry["random"].append((what.replace(" independent", ""), per_row, ns)))
            entry["cudnn"] = ns / float(r["ratio_to_cudnn"])
    return {L: e for L, e in sorted(out.items()) if e["a"] is not None}


def plot(rows: list[dict], path: Path) -> Path:
    lengths = by_length(rows)
    if not lengths:
        raise SystemExit("no fit rows in the CSV (run tune_kernels --short-rows with a length <= 64K)")
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for colour, (L, e) in zip(colours, lengths.items()):
        xs = [x for x, _ in e["band"]]
        grid = [min(xs) * (max(xs) / min(xs)) ** (i / 99) for i in range(100)]
        ax.plot(grid, [e["a"] + e["b"] / x for x in grid], color=colour, lw=1,
                label=f"{length_label(L)}: fit {e['a']:.1f} ns per block + {e['b']:.0f} ns per program")
        ax.plot(xs, [ns for _, ns in e["band"]], "o", color=colour, ms=4)
        labels = {}  # lists that come out the same (16K: the forced blocks alone pass 10%) share one label
        for label, x, ns in e["random"]:
            ax.plot([x], [ns], "x", color=colour, ms=7, mew=1.5)
            labels.setdefault((round(x, 1), round(ns, 1)), []).append(label)
        for (x, ns), names in labels.items():
            ax.annotate(" / ".join(names), (x, ns), textcoords="offset points", xytext=(5, 4), fontsize=7,
                        color=colour)
        ax.axhline(e["cudnn"], color=colour, ls="--", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("kept blocks per row (dots: banded lists; crosses: random lists, mean row)")
    ax.set_ylabel("ns per kept block-head (whole GPU)")
    ax.set_title("Physical-skip attention, operator only, synthetic (bf16, Hq 32, Hkv 4, D 128, Bs 128):\n"
                 "a program costs ~3 blocks (dashed: cuDNN dense per causal block)", fontsize=9)
    ax.legend(fontsize=7)
    save(fig, path, stamp_of(rows[0]))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m repro.plot_short_rows", description=__doc__.split("\n")[0])
    p.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    out = args.out or run_dir("kernel_tuning") / f"{args.csv.stem}.png"
    print(f"wrote {plot(read_long_csv(args.csv), out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
