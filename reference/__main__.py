"""`python -m reference`: FlashPrefill's selection on a small synthetic example, drawn as one PNG.

    python -m reference [--out PATH] [--length L] [--alpha A] [--block-size BS] [--seed S]

One head of planted-pattern Q/K/V (attention sinks, a local band, a vertical stripe, a slash; see
`viz.walkthrough`) goes through stages 1-5; the figure shows the block scores (Eq. 1-2), the alpha * max
threshold (Eq. 3), the kept blocks by reason, the compacted lists and the logical vs physical block visits.
A block size of 64 keeps the block grid small enough to read.

This script is the one file of reference/ that imports outside it: the pictures live in viz/ (docs/ARCHITECTURE.md),
so that `import reference` stays the paper's listing and needs no matplotlib.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib
import torch

from viz.panels import REASON_LABELS, draw_walkthrough
from viz.walkthrough import run_toy



def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m reference", description="Draw FlashPrefill's selection on a small synthetic example as one PNG.")
    parser.add_argument("--out", type=Path, default=None,
                        help="PNG to write (default: walkthrough_toy.png in the run folder "
                             "repro/runs/<date>-<device>/walkthrough/; the committed figure is "
                             "repro/results/walkthrough/walkthrough_toy.png)")
    parser.add_argument("--length", type=int, default=2048, help="sequence length L (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=0.12, help="threshold alpha of Eq. 3 (default: %(default)s)")
    parser.add_argument("--block-size", type=int, default=64, help="block size Bs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic input (default: %(default)s)")
    parser.add_argument("--sink-blocks", type=int, default=2, help="(default: %(default)s)")
    parser.add_argument("--window-blocks", type=int, default=4, help="(default: %(default)s)")
    parser.add_argument("--last-dense-blocks", type=int, default=2, help="(default: %(default)s)")
    args = parser.parse_args(argv)
    if args.out is None:
        from repro.common import run_dir  # the repository's scripts decide where runs write

        args.out = run_dir("walkthrough") / "walkthrough_toy.png"
    matplotlib.use("Agg")  # headless; the figure is a pyplot-free Figure, saved straight to PNG

    start = time.perf_counter()
    torch.set_grad_enabled(False)
    net = dict(sink_blocks=args.sink_blocks, window_blocks=args.window_blocks,
               last_dense_blocks=args.last_dense_blocks)
    r = run_toy(args.length, args.alpha, args.block_size, args.seed, **net)
    M = r["counts"].shape[-1]
    logical, physical = int(r["visits_logical"].sum()), int(r["visits_physical"].sum())
    mass = r["kept_mass"]
    suptitle = (
        f"FlashPrefill block selection on a synthetic planted-pattern toy (one head, L = {args.length}, "
        f"Bs = {args.block_size}, M = {M} blocks, alpha = {args.alpha:g}, safety net: sink {args.sink_blocks}, "
        f"window {args.window_blocks}, last-dense {args.last_dense_blocks} blocks)\n"
        f"density {r['density']:.1%} of the causal blocks  |  key-block visits: logical skip {logical}, physical "
        f"jump {physical} ({physical / logical:.0%})  |  exact attention mass inside the kept blocks: mean "
        f"{float(mass.mean()):.1%}, worst query {float(mass.min()):.1%}"
    )
    fig = draw_walkthrough(r["scores"][0, 0], args.alpha, r["counts"][0, 0], r["indices"][0, 0], **net,
                           visits_logical=r["visits_logical"][0, 0], visits_physical=r["visits_physical"][0, 0],
                           suptitle=suptitle)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)

    kept = {label: int((r["reasons"] == code).sum()) for code, label in REASON_LABELS.items()}
    print(f"synthetic toy: L={args.length} Bs={args.block_size} M={M} alpha={args.alpha:g} seed={args.seed}")
    print(f"  density {r['density']:.1%} of {M * (M + 1) // 2} causal blocks; blocks by reason: "
          + ", ".join(f"{k} {v}" for k, v in kept.items()))
    print(f"  key-block visits: logical skip {logical}, physical jump {physical} ({physical / logical:.0%})")
    print(f"  attention mass inside the kept blocks: mean {float(mass.mean()):.1%}, worst query "
          f"{float(mass.min()):.1%}; max |physical - logical| = {r['logical_vs_physical']:.1e}, "
          f"max |sparse - dense| = {r['sparse_vs_dense']:.1e}")
    print(f"  wrote {args.out} in {time.perf_counter() - start:.1f} s")
    return args.out


if __name__ == "__main__":
    main()
