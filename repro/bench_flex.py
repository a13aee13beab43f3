"""FlexAttention against our Triton kernel on the same block lists (GPU): operator only, interleaved in one process.

    python -m repro.bench_flex [--lengths 16384 32768 ...] [--densities 0.035 0.1] [--repeats 3] [--out-dir DIR]

On each random block mask (repro.masks.controlled_mask: the forced sinks, local window with the diagonal and dense
last rows, plus random causal blocks aiming at the target density, independent per query head), compacted into
lists, two calls compute the same attention:

    ours   triton_impl.block_sparse_attention(q, k, v, counts, indices): the physical skip over the lists
    flex   torch.compile(flex_attention) through interop.flex_block_sparse_attention, with the BlockMask of
           interop.to_block_mask(lists): listed J < I full blocks, the diagonal a partial block (mask_mod:
           causal and listed, or causal only with --mask-mod causal; docs/DESIGN.md section 3)

Lists, BlockMask and the compile warm-up (one compile per length: static shapes) are outside the timing. Before
timing, flex's output is compared with ours (max abs difference; bf16 outputs agree within tools.oracle's
ATOL[bfloat16] = 1.6e-2, otherwise the row and the summary say MISMATCH). Standard shape (docs/DESIGN.md section 5):
bf16, a batch of one (no varlen), Hq = 32, Hkv = 4, D = 128, Bs = 128, planted synthetic q/k/v. Per mask the two
calls run round-robin --repeats times, each a repro.timing.bench_ms median (triton.testing.do_bench); the median of
the repeats is reported. At 16K the forced blocks alone exceed 3.5% and 10%: the realised density is in every row.

Writes <tag>.csv (one row per measurement, environment stamp on every row), <tag>.md (flex / ours per cell) and
<tag>.json (command, wall time, compile times) into --out-dir (default: the run folder repro/runs/<date>-<gpu>/flex/).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from interop import flex_block_sparse_attention, to_block_mask
from reference import causal_block_density, compact_blocks
from repro.common import (device_slug, environment_stamp, length_label, markdown_table, run_dir, stamp_line,
                          write_long_csv, write_run_json)
from repro.masks import controlled_mask
from repro.paper import PAPER_DENSITY_256K
from repro.timing import bench_ms, interleaved
from tools.oracle import ATOL

DEFAULT_LENGTHS = (16384, 32768, 65536, 131072, 262144)
DEFAULT_DENSITIES = (PAPER_DENSITY_256K["FlashPrefill"], 0.1)  # the paper's 3.5% at 256K, and 10%
BLOCK = 128
TOLERANCE = ATOL[torch.bfloat16]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m repro.bench_flex", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS))
    parser.add_argument("--densities", type=float, nargs="+", default=list(DEFAULT_DENSITIES),
                        help="target causal block densities of the random masks")
    parser.add_argument("--repeats", type=int, default=3, help="round-robin rounds of do_bench per mask")
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--mask-mod", choices=["exact", "causal"], default="exact",
                        help="exact: causal and listed (to_block_mask's default); causal: causal only")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode for flex_attention (default: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="(default: the run folder repro/runs/<date>-<gpu>/flex/)")
    parser.add_argument("--tag", default=None, help="file name stem (default: flex_<gpu>, e.g. flex_h200)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or min(args.lengths) < 1 or not all(0 < d <= 1 for d in args.densities):
        parser.error("--repeats and --lengths must be >= 1 and --densities in (0, 1]")
    return args


def random_lists(Hq: int, M: int, target: float, seed: int, device="cuda"):
    """(counts (1, Hq, M) int32, indices (1, Hq, M, M) int32, realised causal density): a controlled_mask (forced
    blocks plus random causal blocks at `target`) compacted into lists."""
    counts, indices = compact_blocks(controlled_mask(1, Hq, M, target, seed, device=device))
    return counts, indices, float(causal_block_density(counts))


def measure(args) -> tuple[list[dict], dict]:
    """One row per (length, target density, call); and the compile time of each length."""
    import triton_impl
    from torch.nn.attention.flex_attention import flex_attention

    from reference.synthetic import planted_qkv

    # One compile per length (static shapes); past dynamo's recompile limit flex_attention would fall back to its
    # unfused eager path, which holds Hq L^2 scores.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(args.lengths))
    compiled = torch.compile(flex_attention, dynamic=False, mode=args.compile_mode)
    Hq, Hkv, D = args.q_heads, args.kv_heads, args.head_dim
    base = dict(B=1, Hq=Hq, Hkv=Hkv, D=D, dtype="bfloat16", block_size=BLOCK, mask_mod=args.mask_mod,
                scope="operator", input="synthetic, random mask")
    rows, compile_s = [], {}
    for L in args.lengths:
        M = -(-L // BLOCK)
        q, k, v = planted_qkv(1, L, Hq, Hkv, D, seed=args.seed, dtype=torch.bfloat16, device="cuda")
        for target in args.densities:
            counts, indices, density = random_lists(Hq, M, target, args.seed + 1)
            block_mask = to_block_mask((counts, indices), L, BLOCK, exact_mask_mod=args.mask_mod == "exact")
            fns = {"ours": lambda: triton_impl.block_sparse_attention(q, k, v, counts, indices, BLOCK),
                   "flex": lambda: flex_block_sparse_attention(q, k, v, block_mask, flex_fn=compiled)}
            ours = fns["ours"]()
            start = time.perf_counter()
            flex_out = fns["flex"]()  # the compile warm-up (first mask of a length) and the correctness check
            torch.cuda.synchronize()
            compile_s.setdefault(L, round(time.perf_counter() - start, 1))
            diff = (flex_out.float() - ours.float()).abs().max().item()
            del ours, flex_out
            print(f"L={length_label(L)} target {target:.1%}: density {density:.2%}, max |flex - ours| {diff:.3g}"
                  + ("" if diff <= TOLERANCE else "  MISMATCH"), flush=True)
            # Both calls ran once above (compiled, checked): no further warm-up.
            for name, runs in interleaved(fns, args.repeats, bench_ms, warm_up=False).items():
                rows.append(dict(base, what=name, L=L, target_density=target, density=density,
                                 ms=statistics.median(runs), runs=" ".join(f"{t:.3f}" for t in runs),
                                 max_abs_diff_vs_ours=diff, matches=diff <= TOLERANCE))
            print(f"  ours {rows[-2]['ms']:.3f} ms, flex {rows[-1]['ms']:.3f} ms", flush=True)
            del counts, indices, block_mask, fns
        del q, k, v
        torch.cuda.empty_cache()
    return rows, {"compile_s": compile_s}


def summary_table(rows) -> str:
    """One line per (L, target density): realised density, ours and flex in ms, flex / ours, the max difference."""
    cells = {}
    for r in rows:
        cell = cells.setdefault((int(r["L"]), float(r["target_density"])), {})
        cell[r["what"]] = r
    table = []
    for (L, target), cell in sorted(cells.items()):
        ours, flex = cell.get("ours"), cell.get("flex")
        ratio = f"{float(flex['ms']) / float(ours['ms']):.2f}" if ours and flex else "-"
        diff = float((flex or ours)["max_abs_diff_vs_ours"])
        table.append([length_label(L), f"{target:.1%}", f"{float((ours or flex)['density']):.2%}",
                      f"{float(ours['ms']):.3f}" if ours else "-", f"{float(flex['ms']):.3f}" if flex else "-",
                      ratio, f"{diff:.2g}" + ("" if diff <= TOLERANCE else " MISMATCH")])
    return markdown_table(["L", "target", "density", "ours ms", "flex ms", "flex / ours", "max abs diff"], table)


def markdown(table: str, stamp, args) -> str:
    """<tag>.md: the summary table with the shape, what was timed and the environment stamp."""
    return (f"# FlexAttention vs our Triton kernel, same block lists ({stamp['device_name']})\n\n"
            f"bf16, B=1, Hq={args.q_heads}, Hkv={args.kv_heads}, D={args.head_dim}, causal, Bs={BLOCK}; synthetic "
            f"inputs, random block masks with the forced blocks (operator only). `ours`: "
            f"triton_impl.block_sparse_attention; `flex`: torch.compile(flex_attention) with "
            f"interop.to_block_mask (mask_mod {args.mask_mod}; creation and compilation not timed). "
            f"flex / ours > 1: ours is faster. Medians of {args.repeats} interleaved do_bench rounds.\n\n"
            f"{table}\n\n{stamp_line(stamp)}\n")


def run_and_write(args, argv, module: str, measure_fn, summary_fn, markdown_fn) -> None:
    """A GPU run of bench_flex or bench_flex_varlen (`module`): measure_fn(args) -> (rows, info), then <tag>.csv
    (stamped rows), <tag>.md (markdown_fn(summary_fn(rows), stamp, args)) and <tag>.json (command, wall time, info)
    in --out-dir (default: the run folder's flex/); the tag defaults to the module's name after "bench_" and the
    GPU, e.g. flex_h200."""
    started = time.perf_counter()
    args.out_dir = args.out_dir or run_dir("flex", "cuda")
    stamp = environment_stamp("cuda")
    args.tag = args.tag or module.removeprefix("bench_") + "_" + device_slug(stamp["device_name"])
    with torch.no_grad():
        rows, info = measure_fn(args)
    csv_path = write_long_csv(args.out_dir / f"{args.tag}.csv", rows, stamp)
    table = summary_fn(rows)
    (args.out_dir / f"{args.tag}.md").write_text(markdown_fn(table, stamp, args))
    command = " ".join([f"python -m repro.{module}", *(sys.argv[1:] if argv is None else argv)])
    write_run_json(args.out_dir / f"{args.tag}.json",
                   dict(command=command, wall_s=round(time.perf_counter() - started, 1), **info))
    print(table)
    print(f"wrote {csv_path}")


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_flex needs a CUDA GPU (torch.compile'd flex_attention and the Triton kernel); "
                         "`python -m pytest tests/test_flex_interop.py` checks the interop on a CPU")
    run_and_write(args, argv, "bench_flex", measure, summary_table, markdown)


if __name__ == "__main__":
    main()
