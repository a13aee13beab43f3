"""What the mean correction (FlashPrefill V2, Eq. 6; `mean_correction=True`) costs in the Triton kernels (GPU).

    python -m repro.bench_mean_correction [--lengths 16384 65536 131072 262144] [--densities 0.035 0.10]
                                          [--mean-chunks 128] [--repeats 3] [--out-dir DIR]
    python -m repro.bench_mean_correction --quick     # tiny sizes; on a CPU under the Triton interpreter (CI)

Measured, interleaved in one process (round-robin, `--repeats` rounds, the median of each version's rounds; GPU
timings are `repro.timing.bench_ms`: do_bench's median with a cold L2), on the standard shape of this comparison:
B = 1, Hq = 32, Hkv = 8, D = 128, bf16, Bs = 128, planted synthetic q/k/v (`reference.synthetic.planted_qkv`):

* attention   the attention kernel alone (`triton_impl.attention.launch_attention`, physical skip) on the same
              lists without ("plain") and with the correction ("corrected"; one row per --mean-chunks value besides
              the default 128), the block means made beforehand. Lists: `repro.masks.controlled_mask` at each target
              density (forced sinks / window / last rows plus random causal blocks, independent per head).
* pool        stage 1 alone: pooling K (what flash_prefill does without the option) vs K and V in one pass (with it).
* flash_prefill  the whole call at alpha 0.12, without and with the option (its own selection: the density is
              whatever the planted inputs give).

Each corrected row carries `overhead` (corrected / plain - 1) and `flop_ratio`, the FLOPs of the means walk over
those of the kept blocks: sum over rows of ceil(I / chunk) chunk tiles of one block's size, over the kept
(block, head) pairs; repro/NOTES.md ("Mean correction") has the prediction the measurement is judged against.

Correctness first: before anything is timed, the corrected kernel is compared with the float64 oracle
(FlashAttention's rule, tools.oracle.corrected_flash_rule) and with the reference at a small size, and at a length
whose rows walk several chunks of means, with K/V and means through TMA as at the timed lengths; the script exits
with an error if either fails.

Writes into --out-dir (default: the run folder repro/runs/<date>-<device>/bench_mean_correction/):
    bench_mean_correction.csv   long format, one row per (what, L, target, version), environment stamp on every row
    bench_mean_correction.md    the overhead per length and density, and the correctness check
    run.json                    command line, wall time, shape, what the time budget skipped
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from repro.common import (environment_stamp, length_label, markdown_table, run_dir, stamp_line, write_long_csv,
                          write_run_json)
from repro.timing import bench_device, interleaved, make_timer

EXPERIMENT = "bench_mean_correction"
SHAPE = dict(Hq=32, Hkv=8, D=128, block_size=128)
QUICK_SHAPE = dict(Hq=2, Hkv=1, D=64, block_size=16)
PREDICTION = ("Prediction (repro/NOTES.md, before the run): the means walk adds flop_ratio of the kept blocks' FLOPs "
              "(22-25% at 3.5%, 8-9% at 10% for 128K-256K) at roughly the dense walk's cost per tile (~15 vs ~18-19 "
              "ns per block-head for the random lists): +17-20% at 3.5% and +6-8% at 10% at 128K-256K.")


def chunk_tiles(M: int, chunk: int) -> int:
    """Chunk tiles one head's means walk runs over all query blocks: sum over I < M of ceil(I / chunk)."""
    return sum(-(-I // chunk) for I in range(M))


def random_case(B, L, Hq, Hkv, D, block_size, dtype, device, seed=0, keep=0.3):
    """Standard-normal q, k, v and a random causal block mask (diagonal kept), as the differential tests use."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, L, H, D, generator=gen).to(device, dtype) for H in (Hq, Hkv, Hkv))
    M = -(-L // block_size)
    mask = (torch.rand(B, Hq, M, M, generator=gen) < keep) | torch.eye(M, dtype=torch.bool)
    return q, k, v, (mask & torch.ones(M, M, dtype=torch.bool).tril()).to(device)


def check_correctness(device: str, dtype: torch.dtype, quick: bool) -> list[dict]:
    """The corrected kernel against the float64 oracle (FlashAttention's rule) and against the reference, on random
    lists: a small case, and one whose rows walk several chunks of means. SystemExit when either fails."""
    import reference
    from tools.oracle import FLASH_RULE_FACTOR, FLASH_RULE_SLACK, corrected_flash_rule, max_abs_diff
    from triton_impl.attention import PHYSICAL, attention_means, launch_attention

    if quick:  # the second case: chunks of 16 means over 19 blocks
        cases = [((1, 100, 2, 1, 64, 16), 128), ((1, 300, 1, 1, 64, 16), 16)]
    else:  # 141 blocks: two chunks of 128 means for the long rows
        cases = [((1, 1000, 4, 2, 128, 128), 128), ((1, 4500, 4, 2, 128, 32), 128)]
    rows = []
    for (B, L, Hq, Hkv, D, bs), chunk in cases:
        q, k, v, mask = random_case(B, L, Hq, Hkv, D, bs, dtype, device)
        counts, indices = reference.compact_blocks(mask)
        means = attention_means(k, v, bs, D ** -0.5, dtype)
        # K/V and means through TMA descriptors, as every timed length (>= 8K tokens) runs them
        out = launch_attention(q, k, v, bs, D ** -0.5, PHYSICAL, counts=counts, indices=indices, means=means,
                               config=dict(mean_chunk=chunk, kv_descriptors_min_length=1))
        ok, err, pt_err = corrected_flash_rule(out, q, k, v, mask, bs)
        expected = reference.block_sparse_attention(q, k, v, counts, indices, bs, mean_correction=True)
        ref_diff = max_abs_diff(out, expected)
        ok = ok and ref_diff <= 2 * (FLASH_RULE_FACTOR * pt_err + FLASH_RULE_SLACK)
        rows.append(dict(what="check", L=L, version=f"B{B} Hq{Hq} Hkv{Hkv} D{D} Bs{bs} chunk{chunk}",
                         error_vs_fp64=err, pytorch_error_vs_fp64=pt_err, diff_vs_reference=ref_diff, ok=ok))
        print(f"check L={L} Bs={bs} chunk={chunk}: error {err:.3g} (PyTorch in {dtype}: {pt_err:.3g}), "
              f"vs reference {ref_diff:.3g}: {'ok' if ok else 'FAILED'}", flush=True)
        if not ok:
            raise SystemExit(f"mean correction is wrong at L={L}, Bs={bs}, chunk {chunk}: error {err:.3g} > 2 x "
                             f"{pt_err:.3g} + 1e-5 or {ref_diff:.3g} from the reference; nothing was timed")
    return rows


def measure_length(L, shape, dtype, device, densities, mean_chunks, alpha, repeats, timer) -> list[dict]:
    """Rows for one length: attention A/B per density, pooling K vs K + V, flash_prefill with and without."""
    import triton_impl
    from reference.synthetic import planted_qkv
    from repro.masks import controlled_mask
    from triton_impl.attention import PHYSICAL, attention_means, launch_attention
    from triton_impl.common import LOG2E
    from triton_impl.pooling import launch_mean_pool

    Hq, Hkv, D, bs = shape["Hq"], shape["Hkv"], shape["D"], shape["block_size"]
    M = -(-L // bs)
    causal = Hq * M * (M + 1) // 2
    scale = D ** -0.5
    q, k, v = planted_qkv(1, L, Hq, Hkv, D, seed=0, dtype=dtype, device=device)
    means = attention_means(k, v, bs, scale, dtype)
    rows = []
    warm = device == "cuda"  # the interpreter compiles nothing: one call each is enough there

    def add(what, target, density, times, flop_ratio=None, chunks=None):
        plain = statistics.median(times["plain"])
        for version, runs in times.items():
            ms = statistics.median(runs)
            row = dict(what=what, L=L, target_density=target, density=density, version=version,
                       mean_chunk=(chunks or {}).get(version, ""), ms=ms, runs=" ".join(f"{t:.3f}" for t in runs),
                       overhead=ms / plain - 1 if version != "plain" else "",
                       flop_ratio=(flop_ratio or {}).get(version, ""))
            rows.append(row)
            print(f"L={length_label(L)} {what:<13} {str(target):<6} {version:<20} {ms:9.3f} ms"
                  + (f"  {row['overhead']:+.1%}" if version != "plain" else ""), flush=True)

    for target in densities:
        mask = controlled_mask(1, Hq, M, target, seed=1, device=device)
        counts, indices = triton_impl.compact_blocks(mask)
        del mask
        kept = int(counts.sum())
        chunks = {("corrected" if c == 128 else f"corrected (chunk {c})"): c for c in mean_chunks}
        fns = {"plain": lambda: launch_attention(q, k, v, bs, scale, PHYSICAL, counts=counts, indices=indices)}
        for name, c in chunks.items():
            fns[name] = (lambda c=c: launch_attention(q, k, v, bs, scale, PHYSICAL, counts=counts, indices=indices,
                                                      means=means, config=dict(mean_chunk=c)))
        ratios = {name: chunk_tiles(M, c) * c / bs * Hq / kept for name, c in chunks.items()}
        add("attention", target, kept / causal, interleaved(fns, repeats, timer, warm), ratios, chunks)
        del counts, indices

    pools = {"plain": lambda: launch_mean_pool(k, bs, out_scale=scale * LOG2E, split_dtype=dtype),
             "corrected": lambda: launch_mean_pool(k, bs, out_scale=scale * LOG2E, split_dtype=dtype, values=v)}
    add("pool", "", "", interleaved(pools, repeats, timer, warm))

    _, stats = triton_impl.flash_prefill(q, k, v, alpha=alpha, block_size=bs, return_stats=True)
    density = float(stats.density)
    del stats
    calls = {"plain": lambda: triton_impl.flash_prefill(q, k, v, alpha=alpha, block_size=bs),
             "corrected": lambda: triton_impl.flash_prefill(q, k, v, alpha=alpha, block_size=bs,
                                                            mean_correction=True)}
    add("flash_prefill", alpha, density, interleaved(calls, repeats, timer, warm))
    return rows


def summary(rows, stamp, info) -> str:
    """The markdown report: the check, then per what the plain and corrected times and the overhead."""
    def fmt(x, spec):
        return "" if x == "" else format(x, spec)

    quick = " (--quick: the code path, not a timing)" if info["quick"] else ""
    lines = [f"# Mean correction (V2, Eq. 6): what it costs in the Triton kernels{quick}",
             "", stamp_line(stamp), "",
             f"Shape: B=1, Hq={info['shape']['Hq']}, Hkv={info['shape']['Hkv']}, D={info['shape']['D']}, "
             f"Bs={info['shape']['block_size']}, {info['dtype']}, planted synthetic q/k/v; {info['repeats']} "
             "interleaved rounds, median. `overhead` = corrected / plain - 1; `flop ratio` = FLOPs of the means walk "
             "/ FLOPs of the kept blocks.", "",
             "## Correctness (before timing)", "",
             markdown_table(["case", "L", "error vs fp64", "PyTorch error", "vs reference", "ok"],
                            [[r["version"], r["L"], f"{r['error_vs_fp64']:.3g}", f"{r['pytorch_error_vs_fp64']:.3g}",
                              f"{r['diff_vs_reference']:.3g}", r["ok"]] for r in rows if r["what"] == "check"])]
    titles = {"attention": "Attention kernel alone, same lists (random, forced blocks included)",
              "pool": "Stage 1: pooling K (plain) vs K and V in one pass (corrected)",
              "flash_prefill": f"Whole flash_prefill, alpha {info['alpha']} (its own selection)"}
    for what, title in titles.items():
        body = [[length_label(r["L"]), fmt(r["target_density"], ".3g") if r["target_density"] != "" else "",
                 fmt(r["density"], ".2%"), r["version"], f"{r['ms']:.3f}", fmt(r["overhead"], "+.1%"),
                 fmt(r["flop_ratio"], ".1%")] for r in rows if r["what"] == what]
        if body:
            lines += ["", f"## {title}", "",
                      markdown_table(["L", "target", "density", "version", "ms", "overhead", "flop ratio"], body)]
    lines += ["", PREDICTION]
    if info["skipped"]:
        lines += ["", f"Skipped (time budget {info['budget_s']} s): {', '.join(map(str, info['skipped']))}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536, 131072, 262144])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.035, 0.10])
    parser.add_argument("--mean-chunks", type=int, nargs="+", default=[128, 64],
                        help="means per chunk tile of the corrected kernel (128 is the default; others: extra rows)")
    parser.add_argument("--alpha", type=float, default=0.12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=200.0, help="skip the remaining lengths after this long")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: the code path (CPU interpreter)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help=f"(default: the run folder repro/runs/<date>-<device>/{EXPERIMENT}/)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    device = bench_device(args.quick, "bench_mean_correction")  # before triton is imported (the imports below)
    from triton_impl.attention import MEAN_CHUNKS

    if args.quick:
        args.lengths, args.densities, args.mean_chunks, args.repeats = [128], [0.5], [128], 1
    if not set(args.mean_chunks) <= set(MEAN_CHUNKS):
        parser.error(f"--mean-chunks must be among {MEAN_CHUNKS}")
    if 128 not in args.mean_chunks:
        args.mean_chunks = [128, *args.mean_chunks]
    shape = QUICK_SHAPE if args.quick else SHAPE
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    out_dir = args.out_dir or run_dir(EXPERIMENT, device)
    torch.set_grad_enabled(False)
    timer = make_timer(device)

    rows = check_correctness(device, dtype, args.quick)
    skipped = []
    for L in args.lengths:
        if time.perf_counter() - start > args.budget_s:
            skipped.append(L)
            continue
        rows += measure_length(L, shape, dtype, device, args.densities, args.mean_chunks, args.alpha, args.repeats,
                               timer)
        if device == "cuda":
            torch.cuda.empty_cache()
    stamp = environment_stamp(device)
    info = dict(command="python -m repro.bench_mean_correction " + " ".join(sys.argv[1:] if argv is None else argv),
                wall_s=round(time.perf_counter() - start, 1), quick=args.quick, shape=shape, dtype=str(dtype),
                lengths=args.lengths, densities=args.densities, mean_chunks=args.mean_chunks, alpha=args.alpha,
                repeats=args.repeats, budget_s=args.budget_s, skipped=skipped, prediction=PREDICTION)
    write_long_csv(out_dir / f"{EXPERIMENT}.csv", rows, stamp)
    (out_dir / f"{EXPERIMENT}.md").write_text(summary(rows, stamp, info), encoding="utf-8")
    write_run_json(out_dir / "run.json", info)
    print(f"wrote {out_dir} in {info['wall_s']} s" + (f"; skipped {skipped}" if skipped else ""))


if __name__ == "__main__":
    main()
