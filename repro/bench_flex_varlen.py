"""FlexAttention against our varlen kernel on a packed batch of mixed lengths (GPU): operator only, interleaved.

    python -m repro.bench_flex_varlen [--lengths 8192 32768 102400 3072] [--densities 0.035 0.1] [--repeats 3]

The packed batch (FlashAttention's layout, lengths multiples of the block size so that a flex block never spans
two sequences) gets one random block mask per sequence (repro.masks.controlled_mask: forced blocks plus random
causal blocks at the target density, independent per query head). Three calls compute the same attention:

    ours         the varlen attention kernel (triton_impl.attention.launch_attention with the packed layout of
                 triton_impl.varlen.varlen_layout), each sequence's lists in its own block numbers: what
                 `flash_prefill_varlen` runs after its selection
    ours_packed  triton_impl.block_sparse_attention on the packed batch as one sequence, with the lists on the
                 block diagonal (documents packed without varlen; the one-sequence kernel)
    flex         torch.compile(flex_attention) on the packed batch with interop.to_block_mask of those lists
                 (causal and listed: with block-aligned sequences that is per-sequence causal attention)

Lists, BlockMask, layout and compilation are outside the timing; before timing the outputs are compared with
ours (tools.oracle's ATOL[bfloat16], otherwise MISMATCH). Standard shape: bf16, Hq = 32, Hkv = 4, D = 128,
Bs = 128, planted synthetic q/k/v. Medians of --repeats round-robin repro.timing.bench_ms rounds.

Writes <tag>.csv, <tag>.md and <tag>.json into --out-dir (default: the run folder repro/runs/<date>-<gpu>/flex/).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from interop import flex_block_sparse_attention, to_block_mask
from reference import compact_blocks
from repro.bench_flex import BLOCK, DEFAULT_DENSITIES, TOLERANCE, run_and_write
from repro.common import length_label, markdown_table, stamp_line
from repro.masks import controlled_mask
from repro.timing import bench_ms, interleaved

DEFAULT_LENGTHS = (8192, 32768, 102400, 3072)  # the mixed batch (100K and 3K rounded to whole blocks)
CALLS = ("ours", "ours_packed", "flex")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m repro.bench_flex_varlen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS),
                        help=f"the packed sequences' lengths, multiples of {BLOCK}")
    parser.add_argument("--densities", type=float, nargs="+", default=list(DEFAULT_DENSITIES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--tag", default=None, help="file name stem (default: flex_varlen_<gpu>)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or not all(0 < d <= 1 for d in args.densities):
        parser.error("--repeats must be >= 1 and --densities in (0, 1]")
    if not args.lengths or any(L < BLOCK or L % BLOCK for L in args.lengths):
        parser.error(f"--lengths must be positive multiples of the block size {BLOCK}")
    return args


def packed_lists(Hq: int, lengths: list[int], target: float, seed: int, device="cuda"):
    """The lists of one random mask per sequence, twice.

    varlen: (counts (B, Hq, R), indices (B, Hq, R, N)) with R = N = the longest sequence's blocks, row t of
    sequence b its query block t, block numbers of the sequence, -1 / 0 past its blocks (launch_attention's varlen
    layout). packed: (counts (1, Hq, M), indices (1, Hq, M, M)) of the whole batch as one sequence of M blocks,
    each sequence's mask on the block diagonal. Also the realised causal density over the sequences."""
    blocks = [L // BLOCK for L in lengths]
    N, M = max(blocks), sum(blocks)
    counts_v = torch.zeros(len(blocks), Hq, N, dtype=torch.int32, device=device)
    indices_v = torch.full((len(blocks), Hq, N, N), -1, dtype=torch.int32, device=device)
    diagonal = torch.zeros(1, Hq, M, M, dtype=torch.bool, device=device)
    kept = causal = 0
    offset = 0
    for b, n in enumerate(blocks):
        mask = controlled_mask(1, Hq, n, target, seed + b, device=device)
        counts, indices = compact_blocks(mask)
        counts_v[b, :, :n], indices_v[b, :, :n, :n] = counts[0], indices[0]
        diagonal[:, :, offset:offset + n, offset:offset + n] = mask
        kept, causal, offset = kept + int(counts.sum()), causal + Hq * n * (n + 1) // 2, offset + n
    return (counts_v, indices_v), compact_blocks(diagonal), kept / causal


def measure(args) -> tuple[list[dict], dict]:
    """One row per (target density, call)."""
    import triton_impl
    from torch.nn.attention.flex_attention import flex_attention
    from triton_impl.attention import PHYSICAL, launch_attention
    from triton_impl.varlen import varlen_layout

    from reference.synthetic import planted_qkv

    compiled = torch.compile(flex_attention, dynamic=False)
    Hq, Hkv, D = args.q_heads, args.kv_heads, args.head_dim
    total, longest = sum(args.lengths), max(args.lengths)
    label = "+".join(length_label(L) for L in args.lengths)
    q, k, v = planted_qkv(1, total, Hq, Hkv, D, seed=args.seed, dtype=torch.bfloat16, device="cuda")
    cu = torch.tensor([0] + args.lengths, device="cuda").cumsum(0).to(torch.int32)
    layout = varlen_layout(q[0], k[0], cu, cu, longest, longest, BLOCK, None, [0] * len(args.lengths))
    scale = D ** -0.5
    base = dict(B=len(args.lengths), Hq=Hq, Hkv=Hkv, D=D, dtype="bfloat16", block_size=BLOCK, lengths=label,
                total=total, scope="operator", input="synthetic, random mask per sequence")
    rows, compile_s = [], None
    for target in args.densities:
        (counts_v, indices_v), (counts_p, indices_p), density = packed_lists(Hq, args.lengths, target, args.seed + 1)
        block_mask = to_block_mask((counts_p, indices_p), total, BLOCK)
        fns = {"ours": lambda: launch_attention(q[0], k[0], v[0], BLOCK, scale, PHYSICAL, counts=counts_v,
                                                indices=indices_v, varlen=layout),
               "ours_packed": lambda: triton_impl.block_sparse_attention(q, k, v, counts_p, indices_p, BLOCK),
               "flex": lambda: flex_block_sparse_attention(q, k, v, block_mask, flex_fn=compiled)}
        ours = fns["ours"]()
        start = time.perf_counter()
        outputs = {name: fn() for name, fn in fns.items() if name != "ours"}
        torch.cuda.synchronize()
        compile_s = compile_s or round(time.perf_counter() - start, 1)
        diffs = {name: (out.reshape(ours.shape).float() - ours.float()).abs().max().item()
                 for name, out in outputs.items()}
        del ours, outputs
        print(f"{label} target {target:.1%}: density {density:.2%}, max |x - ours| "
              + ", ".join(f"{n} {d:.3g}" + ("" if d <= TOLERANCE else " MISMATCH") for n, d in diffs.items()),
              flush=True)
        # Every call ran once above (compiled, checked): no further warm-up.
        for name, runs in interleaved(fns, args.repeats, bench_ms, warm_up=False).items():
            diff = diffs.get(name, 0.0)
            rows.append(dict(base, what=name, target_density=target, density=density, ms=statistics.median(runs),
                             runs=" ".join(f"{t:.3f}" for t in runs), max_abs_diff_vs_ours=diff,
                             matches=diff <= TOLERANCE))
        print("  " + ", ".join(f"{r['what']} {r['ms']:.3f} ms" for r in rows[-len(fns):]), flush=True)
    return rows, {"compile_s": compile_s}


def summary_table(rows) -> str:
    """One line per target density: realised density, the three calls in ms, flex / ours and ours_packed / ours."""
    cells = {}
    for r in rows:
        cells.setdefault(float(r["target_density"]), {})[r["what"]] = r
    table = []
    for target, cell in sorted(cells.items()):
        ms = {name: float(cell[name]["ms"]) for name in CALLS if name in cell}
        worst = max(float(r["max_abs_diff_vs_ours"]) for r in cell.values())
        table.append([f"{target:.1%}", f"{float(next(iter(cell.values()))['density']):.2%}",
                      *(f"{ms[n]:.3f}" if n in ms else "-" for n in CALLS),
                      *(f"{ms[n] / ms['ours']:.2f}" if n in ms and "ours" in ms else "-"
                        for n in ("flex", "ours_packed")),
                      f"{worst:.2g}" + ("" if worst <= TOLERANCE else " MISMATCH")])
    return markdown_table(["target", "density", "ours ms", "ours_packed ms", "flex ms", "flex / ours",
                           "ours_packed / ours", "max abs diff"], table)


def markdown(table: str, stamp, args) -> str:
    """<tag>.md: the summary table with the batch, what was timed and the environment stamp."""
    label = "+".join(length_label(L) for L in args.lengths)
    return (f"# FlexAttention vs our varlen kernel, packed batch {label} ({stamp['device_name']})\n\n"
            f"bf16, Hq={args.q_heads}, Hkv={args.kv_heads}, D={args.head_dim}, causal per sequence, Bs={BLOCK}; "
            "synthetic inputs, one random block mask per sequence with the forced blocks (operator only). `ours`: "
            "the varlen attention kernel; `ours_packed`: the one-sequence kernel on the block-diagonal lists; "
            "`flex`: torch.compile(flex_attention) with interop.to_block_mask. Ratios > 1: ours is faster. Medians "
            f"of {args.repeats} interleaved do_bench rounds.\n\n{table}\n\n{stamp_line(stamp)}\n")


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_flex_varlen needs a CUDA GPU (torch.compile'd flex_attention and the Triton "
                         "kernels); `python -m pytest tests/test_bench_flex.py` checks its CPU parts")
    run_and_write(args, argv, "bench_flex_varlen", measure, summary_table, markdown)


if __name__ == "__main__":
    main()
