"""Block density of FlashPrefill's selection as a function of alpha, on structured synthetic inputs.

    python -m repro.density_vs_alpha [--lengths 2048 4096 ...] [--alphas 0 0.05 ...] [--device cpu|cuda]

Stages 1-4 of the reference (mean_pool_keys, block_scores, select_blocks, compact_blocks) on planted-pattern
Q/K/V (`reference.synthetic.planted_qkv`: sinks, local decay, slashes, vertical stripes; **synthetic**, no model),
at the attention shape Hq=8, Hkv=2, D=64 and the default safety net (sink 2, window 4, last-dense 2 blocks of 128).
Density = kept causal blocks / all causal blocks, over the heads. Writes into --out-dir (default: the run folder
repro/runs/<date>-<device>/density_vs_alpha/; the committed run is in repro/results/density_vs_alpha/):

    density_vs_alpha.csv   long format, one row per (L, alpha) measurement, plus the safety-net floor per L
    density_vs_alpha.md    a table (alpha x L) beside the paper's V2 densities on NIAH prompts, labelled "paper"
    density_vs_alpha.png   density vs alpha, one line per length

The paper measured real models on NIAH prompts; the synthetic numbers show the mechanics (density falls with alpha
and with L, down to the safety-net floor), not the paper's values.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import MappingProxyType

import matplotlib
import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from reference import block_scores, causal_block_density, compact_blocks, mean_pool_keys, select_blocks
from reference.selection import safety_net_mask
from reference.synthetic import planted_qkv

from .common import default_device, environment_stamp, markdown_table, run_dir, stamp_line, write_long_csv
from .paper import PAPER_V2_ALPHA, PAPER_V2_NIAH_DENSITY, paper_range

DEFAULT_LENGTHS = (2048, 4096, 8192, 16384, 32768, 65536)  # selection only: 64K takes seconds on a CPU
# The requested grid, plus the V2 paper's alpha = 0.1 so that its quotes have a measured neighbour.
DEFAULT_ALPHAS = (0.0, 0.02, 0.05, 0.08, 0.1, 0.12, 0.18, 0.3, 0.5)
SHAPE = MappingProxyType(dict(batch=1, q_heads=8, kv_heads=2, head_dim=64))
SAFETY_NET = MappingProxyType(dict(sink_blocks=2, window_blocks=4, last_dense_blocks=2))
INPUT = "synthetic planted_qkv"


def measure(lengths, alphas, *, block_size: int = 128, seed: int = 0, device: str = "cpu") -> list[dict]:
    """One row per (L, alpha): overall density and the spread over heads; one 'forced_density' row per L."""
    rows = []
    common = dict(impl="reference", input=INPUT, seed=seed, B=SHAPE["batch"], Hq=SHAPE["q_heads"],
                  Hkv=SHAPE["kv_heads"], D=SHAPE["head_dim"], block_size=block_size, **SAFETY_NET)
    # disable=None: a bar on a terminal, nothing in a log file.
    progress = tqdm(total=len(lengths) * len(alphas), desc="density vs alpha", unit="point", disable=None)
    for L in lengths:
        q, k, _ = planted_qkv(SHAPE["batch"], L, SHAPE["q_heads"], SHAPE["kv_heads"], SHAPE["head_dim"],
                              seed=seed, device=device)
        # Scores do not depend on alpha: compute them once per length.
        scores = block_scores(q, mean_pool_keys(k, block_size), block_size)
        M = scores.shape[-1]
        causal_blocks = M * (M + 1) // 2
        forced = safety_net_mask(M, **SAFETY_NET)
        rows.append(dict(what="forced_density", L=L, M=M, alpha="", density=float(forced.sum()) / causal_blocks,
                         **common))
        for alpha in alphas:
            counts, _ = compact_blocks(select_blocks(scores, alpha, **SAFETY_NET))
            per_head = counts.sum(dim=-1).float() / causal_blocks  # (B, Hq)
            rows.append(dict(what="density", L=L, M=M, alpha=alpha, density=float(causal_block_density(counts)),
                             density_head_min=float(per_head.min()), density_head_max=float(per_head.max()),
                             **common))
            progress.update()
    progress.close()
    return rows


def write_markdown(path: Path, rows: list[dict], stamp: dict, block_size: int) -> str:
    lengths = sorted({r["L"] for r in rows})
    alphas = sorted({r["alpha"] for r in rows if r["what"] == "density"})
    density = {(r["L"], r["alpha"]): r for r in rows if r["what"] == "density"}
    floor = {r["L"]: r["density"] for r in rows if r["what"] == "forced_density"}

    def cell(r):
        lo, hi = round(100 * r["density_head_min"]), round(100 * r["density_head_max"])
        return f"{r['density']:.1%}" + ("" if lo == hi else f" ({lo}-{hi}%)")

    table = [[f"alpha = {a:g}"] + [cell(density[L, a]) for L in lengths] for a in alphas]
    table.append(["safety net alone"] + [f"{floor[L]:.1%}" for L in lengths])
    table.append([f"**paper** V2, NIAH prompts, real models, alpha = {PAPER_V2_ALPHA:g}"]
                 + [paper_range(PAPER_V2_NIAH_DENSITY[L]) if L in PAPER_V2_NIAH_DENSITY else "-" for L in lengths])
    text = "\n".join([
        "# Block density vs alpha (synthetic planted-pattern inputs)",
        "",
        f"FlashPrefill selection (reference stages 1-4) on **synthetic planted-pattern inputs** "
        f"(`reference.synthetic.planted_qkv`: attention sinks, local decay, slashes, vertical stripes; no model), "
        f"B={SHAPE['batch']}, Hq={SHAPE['q_heads']}, Hkv={SHAPE['kv_heads']}, D={SHAPE['head_dim']}, "
        f"Bs={block_size}, safety net sink {SAFETY_NET['sink_blocks']} / window {SAFETY_NET['window_blocks']} / "
        f"last-dense {SAFETY_NET['last_dense_blocks']} blocks. Density = kept causal blocks / all causal blocks over "
        f"the heads; in brackets the lowest and highest head where they differ.",
        "",
        markdown_table(["alpha \\ L"] + [f"{L // 1024}K" if L % 1024 == 0 else str(L) for L in lengths], table),
        "",
        "\"safety net alone\" is the floor no alpha goes below (sinks, local window, dense last rows). The **paper** "
        "row quotes the V2 paper's densities on NIAH prompts with real models (docs/DESIGN.md section 7); they are "
        "not measured here and not comparable in absolute terms with synthetic inputs.",
        "",
        stamp_line(stamp),
        "",
    ])
    path.write_text(text)
    return text


def plot(path: Path, rows: list[dict], stamp: dict) -> None:
    lengths = sorted({r["L"] for r in rows})
    fig = Figure(figsize=(10, 5), layout="constrained")
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"]
    for n, L in enumerate(lengths):
        color = cmap(n / max(1, len(lengths) - 1) * 0.9)
        points = sorted((r["alpha"], r["density"]) for r in rows if r["what"] == "density" and r["L"] == L)
        ax.plot(*zip(*points), "o-", color=color, label=f"L = {L // 1024}K (synthetic)")
        floor = next(r["density"] for r in rows if r["what"] == "forced_density" and r["L"] == L)
        ax.axhline(floor, color=color, lw=0.8, ls=":")
        if L in PAPER_V2_NIAH_DENSITY:
            lo, hi = PAPER_V2_NIAH_DENSITY[L]
            ax.errorbar(PAPER_V2_ALPHA, (lo + hi) / 2, yerr=[[(hi - lo) / 2 + 0.004]], color=color, marker="*",
                        markersize=12, capsize=4, ls="none", markeredgecolor="black",
                        label=f"paper V2 @ {L // 1024}K (NIAH, real models)")
    ax.set_xlabel("alpha (keep Score >= alpha * row max)")
    ax.set_ylabel("density (kept / causal blocks)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    ax.set_title("FlashPrefill block density vs alpha on synthetic planted-pattern inputs\n"
                 "(dotted: the safety-net floor of each length; stars: paper quotes at the paper's alpha)", fontsize=10)
    ax.text(1.03, 0.0, f"reference, Hq={SHAPE['q_heads']} Hkv={SHAPE['kv_heads']} D={SHAPE['head_dim']}\n"
            f"{stamp['device_name']}\ntorch {stamp['torch']}, commit {stamp['commit']}\n{stamp['date']}",
            transform=ax.transAxes, fontsize=7, color="#555555", va="bottom")
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m repro.density_vs_alpha", description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), help="(default: %(default)s)")
    parser.add_argument("--alphas", type=float, nargs="+", default=list(DEFAULT_ALPHAS), help="(default: %(default)s)")
    parser.add_argument("--block-size", type=int, default=128, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--device", default=default_device(), help="(default: %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="(default: the run folder repro/runs/<date>-<device>/density_vs_alpha/)")
    args = parser.parse_args(argv)
    matplotlib.use("Agg")  # headless; the figure is a pyplot-free Figure, saved straight to PNG
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    stamp = environment_stamp(args.device)
    rows = measure(args.lengths, args.alphas, block_size=args.block_size, seed=args.seed, device=args.device)
    args.out_dir = args.out_dir or run_dir("density_vs_alpha", args.device)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = write_long_csv(args.out_dir / "density_vs_alpha.csv", rows, stamp)
    md_path = args.out_dir / "density_vs_alpha.md"
    write_markdown(md_path, rows, stamp, args.block_size)
    png_path = args.out_dir / "density_vs_alpha.png"
    plot(png_path, rows, stamp)
    key = [r for r in rows if r["what"] == "density" and r["alpha"] == 0.12]
    if key:
        print("density at alpha = 0.12 (synthetic): " + ", ".join(f"{r['L'] // 1024}K {r['density']:.1%}" for r in key))
    print(f"wrote {csv_path}, {md_path}, {png_path} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
