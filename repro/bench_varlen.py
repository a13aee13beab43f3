"""Varlen batches and chunked prefill in Triton against one-sequence flash_prefill calls (GPU): issue 13's goals.

    python -m repro.bench_varlen [--lengths 8192 32768 102400 3072] [--chunked-length 262144] [--chunk 16384]
                                 [--repeats 3] [--parts batch chunked] [--out-dir DIR]
    python -m repro.bench_varlen --quick      # tiny sizes; on a CPU under the Triton interpreter (CI)

What is timed is the operator with its selection (`triton_impl.flash_prefill_varlen` and `triton_impl.flash_prefill`
at alpha 0.12: pooling, scoring, selection, attention), on planted synthetic inputs (`reference.synthetic.
planted_qkv`, one seed per sequence), not a model. Standard shape: bf16, Hq = 32, Hkv = 4, D = 128, Bs = 128.

A. batch     one packed batch of mixed lengths (--lengths) prefilled in one `flash_prefill_varlen` call
             (`varlen`: validate=False, no host sync, the serving path; `varlen_validate`: validate=True, one host
             sync to read cu_seqlens) vs `flash_prefill` on each sequence, back to back (`per_sequence`). Kept
             blocks (summed over heads and sequences) come from a separate untimed call with return_stats; time per
             kept block of each and the ratio varlen / per_sequence. Goal: <= 1.10.
B. chunked   one sequence of --chunked-length tokens prefilled in chunks of --chunk (block-aligned): chunk c is one
             `flash_prefill_varlen` call on (q chunk, k/v prefix + chunk, cu_seqlens [0, q_len] / [0, k_len]),
             is_last_chunk only for the last, kbar_cache the whole sequence's `triton_impl.mean_pool_keys` sliced to
             the prefix's complete blocks (made outside the timing); the time is the whole loop of chunks, vs one
             `flash_prefill` on the whole sequence (`one_shot`). Density of the chunks: kept / causal blocks summed
             over chunks (each chunk's density weighted by its causal blocks). Peak memory of one run of each
             (torch.cuda.max_memory_allocated beyond the inputs, the outputs included: the chunked loop holds one
             chunk's output at a time). Goal: chunked / one_shot time <= 1.15.

Correctness first, untimed: every sequence's rows of the varlen output (both validate settings) against its
`flash_prefill` output, and the concatenated chunk outputs against the one-shot output (block-aligned chunks select
the same blocks, so the same output is expected, unless the last chunk is shorter than the 2 dense last blocks);
above tools.oracle's ATOL of the dtype the row and the table say MISMATCH. Each call of a part runs round-robin
--repeats times, each a repro.timing.bench_ms median (do_bench, cold L2); the median of the rounds is reported. On a
CPU (--quick) each "time" is one wall-clock call under the interpreter: the code path, not a timing.

Writes <tag>.csv (one row per measurement and per chunk, environment stamp on every row), <tag>.md (both tables and
the goals) and <tag>.json (command, wall time, goals) into --out-dir (default: the run folder
repro/runs/<date>-<device>/varlen/).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

from reference.synthetic import planted_qkv
from repro.common import (device_slug, environment_stamp, fill_defaults, length_label, markdown_table, run_dir,
                          stamp_line, write_long_csv, write_run_json)
from repro.timing import bench_device, interleaved, make_timer
from tools.oracle import ATOL, max_abs_diff

EXPERIMENT = "varlen"
PARTS = ("batch", "chunked")
LAST_DENSE_BLOCKS = 2  # flash_prefill's default, which every call here uses
BATCH_GOAL, CHUNKED_GOAL = 1.10, 1.15  # varlen / per-sequence time per kept block; chunked / one-shot time
FULL = dict(lengths=[8192, 32768, 102400, 3072], chunked_length=262144, chunk=16384, repeats=3, q_heads=32,
            kv_heads=4, head_dim=128, block_size=128)
# The kernels take head dims 64 and 128 only (triton_impl.common.HEAD_DIMS), so the quick shape has D = 64.
QUICK = dict(lengths=[64, 96, 40], chunked_length=192, chunk=64, repeats=1, q_heads=4, kv_heads=2, head_dim=64,
             block_size=32)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m repro.bench_varlen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help=f"the sequences of the packed batch (part A; default {FULL['lengths']})")
    parser.add_argument("--chunked-length", type=int, default=None,
                        help=f"the chunked sequence's length (part B; default {FULL['chunked_length']})")
    parser.add_argument("--chunk", type=int, default=None,
                        help=f"query rows per chunk, a multiple of the block size (default {FULL['chunk']})")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--repeats", type=int, default=None, help="round-robin rounds of do_bench (default 3)")
    parser.add_argument("--alpha", type=float, default=0.12)
    parser.add_argument("--q-heads", type=int, default=None)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--head-dim", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (Hq 4, Hkv 2, D 64, Bs 32, fp16 on a CPU), one round: the code path")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help=f"(default: the run folder repro/runs/<date>-<device>/{EXPERIMENT}/)")
    parser.add_argument("--tag", default=None, help="file name stem (default: varlen_<gpu>, e.g. varlen_h200)")
    args = parser.parse_args(argv)
    fill_defaults(args, QUICK if args.quick else FULL)
    if args.repeats < 1 or min(args.lengths) < 1 or args.chunked_length < 1:
        parser.error("--repeats, --lengths and --chunked-length must be >= 1")
    if args.chunk < 1 or args.chunk % args.block_size or args.chunk > args.chunked_length:
        parser.error(f"--chunk must be a multiple of the block size ({args.block_size}) and at most --chunked-length")
    if args.q_heads % args.kv_heads:
        parser.error("--q-heads must be a multiple of --kv-heads")
    return args


def peak_mib(fn, device: str):
    """MiB that one call of fn allocates at its peak beyond what was allocated before it (None on a CPU)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def causal_blocks(Hq: int, q_len: int, k_len: int, block_size: int) -> int:
    """Causal (head, query block, key block) triples of a chunk's query blocks I0 .. N - 1: Hq sum of (I + 1)."""
    N, I0 = -(-k_len // block_size), (k_len - q_len) // block_size
    return Hq * (N * (N + 1) - I0 * (I0 + 1)) // 2


def packed_batch(lengths, args, dtype, device):
    """q (total, Hq, D), k, v (total, Hkv, D): one planted prompt per length (seed + b), packed; cu_seqlens int32."""
    parts = [planted_qkv(1, L, args.q_heads, args.kv_heads, args.head_dim, seed=args.seed + b, dtype=dtype,
                         device=device) for b, L in enumerate(lengths)]
    q, k, v = (torch.cat([p[i][0] for p in parts]) for i in range(3))
    del parts
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    return q, k, v, cu


def measure_batch(args, dtype, device, timer) -> list[dict]:
    """Part A: rows varlen, varlen_validate and per_sequence for the packed batch of args.lengths."""
    import triton_impl

    lengths, Hq, bs = list(args.lengths), args.q_heads, args.block_size
    q, k, v, cu = packed_batch(lengths, args, dtype, device)
    longest = max(lengths)
    spans = list(zip(cu.tolist()[:-1], cu.tolist()[1:]))
    seqs = [(q[s:e][None], k[s:e][None], v[s:e][None]) for s, e in spans]  # views of the packed tensors
    select = dict(alpha=args.alpha, block_size=bs)

    def varlen(validate, **extra):
        return triton_impl.flash_prefill_varlen(q, k, v, cu, cu, longest, longest, validate=validate, **select,
                                                **extra)

    def per_sequence():
        return [triton_impl.flash_prefill(*seq, **select) for seq in seqs]

    # Untimed: the lists and outputs of both paths, compared sequence by sequence.
    singles = [triton_impl.flash_prefill(*seq, **select, return_stats=True) for seq in seqs]
    kept = {"per_sequence": sum(int(st.counts.sum()) for _, st in singles)}
    out, stats = varlen(True, return_stats=True)
    kept["varlen"] = kept["varlen_validate"] = sum(int(c.sum()) for c in stats.counts)
    same_lists = all(torch.equal(c, st.counts[0]) and torch.equal(i, st.indices[0])
                     for c, i, (_, st) in zip(stats.counts, stats.indices, singles))
    fast = varlen(False)
    diff = {"per_sequence": 0.0}
    diff["varlen_validate"] = max(max_abs_diff(out[s:e], o[0]) for (s, e), (o, _) in zip(spans, singles))
    diff["varlen"] = max(max_abs_diff(fast[s:e], o[0]) for (s, e), (o, _) in zip(spans, singles))
    del singles, out, stats, fast
    causal = sum(causal_blocks(Hq, L, L, bs) for L in lengths)
    tol = ATOL[dtype]
    label = "+".join(length_label(L) for L in lengths)
    print(f"batch {label}: kept blocks varlen {kept['varlen']}, per-sequence {kept['per_sequence']} (same lists: "
          f"{same_lists}); max |varlen - per-sequence| {diff['varlen']:.3g} (validate=True: "
          f"{diff['varlen_validate']:.3g})" + ("" if max(diff.values()) <= tol else "  MISMATCH"), flush=True)

    fns = {"varlen": lambda: varlen(False), "varlen_validate": lambda: varlen(True), "per_sequence": per_sequence}
    times = interleaved(fns, args.repeats, timer, warm_up=device == "cuda")
    ms = {name: statistics.median(runs) for name, runs in times.items()}
    per_kept = {name: ms[name] / max(kept[name], 1) for name in fns}
    rows = []
    for name, runs in times.items():
        rows.append(dict(part="batch", what=name, lengths=" ".join(map(str, lengths)), batch=len(lengths),
                         tokens=sum(lengths), ms=ms[name], runs=" ".join(f"{t:.3f}" for t in runs),
                         kept_blocks=kept[name], causal_blocks=causal, density=kept[name] / causal,
                         ns_per_kept_block=1e6 * per_kept[name],
                         per_kept_vs_per_sequence=per_kept[name] / per_kept["per_sequence"],
                         same_lists=same_lists, max_abs_diff=diff[name], matches=diff[name] <= tol))
        print(f"  {name:<16} {ms[name]:9.3f} ms  {1e6 * per_kept[name]:8.2f} ns per kept block", flush=True)
    del q, k, v, seqs
    return rows


def measure_chunked(args, dtype, device, timer) -> list[dict]:
    """Part B: rows one_shot and chunked (times, densities, peak memory), and one row per chunk (its density)."""
    import triton_impl

    L, C, Hq, bs = args.chunked_length, args.chunk, args.q_heads, args.block_size
    q, k, v = planted_qkv(1, L, Hq, args.kv_heads, args.head_dim, seed=args.seed, dtype=dtype, device=device)
    select = dict(alpha=args.alpha, block_size=bs)
    kbar = triton_impl.mean_pool_keys(k, bs)[0]  # (N, Hkv, D) float32: sliced into each chunk's kbar_cache
    calls = []  # each chunk's (positional, keyword) arguments, made once, outside the timing
    for start in range(0, L, C):
        end = min(start + C, L)
        calls.append(((q[0, start:end], k[0, :end], v[0, :end],
                       torch.tensor([0, end - start], dtype=torch.int32, device=device),  # cu_seqlens_q
                       torch.tensor([0, end], dtype=torch.int32, device=device), end - start, end),  # cu_seqlens_k
                      dict(kbar_cache=[kbar[: start // bs]] if start >= bs else None, is_last_chunk=end == L,
                           **select)))

    def one_shot():
        return triton_impl.flash_prefill(q, k, v, **select)

    def chunked():
        for positional, keywords in calls:  # each chunk's output is dropped before the next chunk runs
            triton_impl.flash_prefill_varlen(*positional, **keywords, validate=False)

    # Untimed: the one-shot lists and output, then every chunk's (validate=True) against its rows of it.
    whole, stats = triton_impl.flash_prefill(q, k, v, **select, return_stats=True)
    one_kept, one_density = int(stats.counts.sum()), float(stats.density)
    del stats
    tol = ATOL[dtype]
    rows, kept, causal, weighted, diff = [], 0, 0, 0.0, 0.0
    for c, (positional, keywords) in enumerate(calls):
        out, st = triton_impl.flash_prefill_varlen(*positional, **keywords, return_stats=True)
        q_len, k_len = positional[5:7]
        c_kept, c_causal, c_density = int(st.counts[0].sum()), causal_blocks(Hq, q_len, k_len, bs), float(st.density)
        c_diff = max_abs_diff(out, whole[0, k_len - q_len : k_len])
        kept, causal, diff = kept + c_kept, causal + c_causal, max(diff, c_diff)
        weighted += c_density * c_causal
        rows.append(dict(part="chunked", what="chunk", L=L, chunk=C, index=c, q_start=k_len - q_len, q_len=q_len,
                         k_len=k_len, kept_blocks=c_kept, causal_blocks=c_causal, density=c_density,
                         max_abs_diff=c_diff, matches=c_diff <= tol))
        del out, st
    del whole
    out_mib = {"one_shot": L * Hq * args.head_dim * q.element_size() / 2**20,
               "chunked": C * Hq * args.head_dim * q.element_size() / 2**20}
    peaks = {"one_shot": peak_mib(one_shot, device), "chunked": peak_mib(chunked, device)}
    density = weighted / causal  # each chunk's density weighted by its causal blocks (= kept / causal)
    print(f"chunked {length_label(L)} in {len(calls)} chunks of {length_label(C)}: density {density:.2%} vs one-shot "
          f"{one_density:.2%}; max |chunks - one-shot| {diff:.3g}" + ("" if diff <= tol else "  MISMATCH"), flush=True)

    times = interleaved({"one_shot": one_shot, "chunked": chunked}, args.repeats, timer, warm_up=device == "cuda")
    ms = {name: statistics.median(runs) for name, runs in times.items()}
    facts = {"one_shot": (1, one_kept, one_density, 0.0), "chunked": (len(calls), kept, density, diff)}
    for name, runs in times.items():
        n_chunks, n_kept, rho, d = facts[name]
        rows.append(dict(part="chunked", what=name, L=L, chunk=C, chunks=n_chunks, ms=ms[name],
                         runs=" ".join(f"{t:.3f}" for t in runs), kept_blocks=n_kept,
                         causal_blocks=causal_blocks(Hq, L, L, bs), density=rho, ms_vs_one_shot=ms[name] /
                         ms["one_shot"], density_vs_one_shot=rho / one_density, peak_mib=peaks[name],
                         output_mib=out_mib[name], max_abs_diff=d, matches=d <= tol))
        peak = "" if peaks[name] is None else f", peak {peaks[name]:.0f} MiB"
        print(f"  {name:<9} {ms[name]:9.3f} ms{peak}", flush=True)
    del q, k, v, kbar, calls
    return rows


def _f(value, spec: str) -> str:
    """A CSV cell (str or number, empty for none) formatted, "-" when empty."""
    return "-" if value in ("", None) else format(float(value), spec)


def _flag(diff, tol: float) -> str:
    return f"{float(diff):.2g}" + ("" if float(diff) <= tol else " MISMATCH")


def batch_table(rows, tol: float) -> str:
    """Part A: one line per call (varlen, varlen_validate, per_sequence)."""
    body = [[r["what"], _f(r["ms"], ".3f"), r["kept_blocks"], _f(r["density"], ".2%"),
             _f(r["ns_per_kept_block"], ".2f"), _f(r["per_kept_vs_per_sequence"], ".3f"), _flag(r["max_abs_diff"], tol)]
            for r in rows if r["part"] == "batch"]
    return markdown_table(["call", "ms", "kept blocks", "density", "ns / kept block", "per kept block vs per-sequence",
                           "max abs diff vs per-sequence"], body)


def chunked_table(rows, tol: float) -> str:
    """Part B: one line per call (one_shot, chunked)."""
    body = [[r["what"], r["chunks"], _f(r["ms"], ".3f"), _f(r["density"], ".2%"), _f(r["ms_vs_one_shot"], ".3f"),
             _f(r["density_vs_one_shot"], ".3f"), _f(r["peak_mib"], ".0f"), _f(r["output_mib"], ".0f"),
             _flag(r["max_abs_diff"], tol)] for r in rows if r["part"] == "chunked" and r["what"] != "chunk"]
    return markdown_table(["call", "chunks", "ms", "density", "time vs one-shot", "density vs one-shot", "peak MiB",
                           "of which output MiB", "max abs diff vs one-shot"], body)


def chunk_table(rows, tol: float) -> str:
    """Part B, per chunk: its rows, keys, density (untimed call with stats) and difference from the one-shot rows."""
    body = [[r["index"], f"{r['q_start']}..{int(r['k_len']) - 1}", r["k_len"], r["kept_blocks"],
             _f(r["density"], ".2%"), _flag(r["max_abs_diff"], tol)] for r in rows if r["what"] == "chunk"]
    return markdown_table(["chunk", "query rows", "k_len", "kept blocks", "density", "max abs diff vs one-shot"], body)


def goals(rows) -> dict:
    """The two ratios issue 13 sets goals on (None where the part did not run) and whether each is met."""
    found = {}
    for r in rows:
        if r["part"] == "batch" and r["what"] == "varlen":
            found["batch_per_kept_ratio"] = float(r["per_kept_vs_per_sequence"])
        if r["part"] == "chunked" and r["what"] == "chunked":
            found["chunked_time_ratio"] = float(r["ms_vs_one_shot"])
    out = {}
    for part, key, goal in (("batch", "batch_per_kept_ratio", BATCH_GOAL),
                            ("chunked", "chunked_time_ratio", CHUNKED_GOAL)):
        value = found.get(key)
        out[key], out[f"{part}_goal_met"] = value, None if value is None else value <= goal
    return out


def markdown(rows, stamp, args, dtype) -> str:
    """<tag>.md: the goals, then each part's table, the shape, what was timed and the environment stamp."""
    tol, name = ATOL[dtype], str(dtype).replace("torch.", "")
    quick = " (--quick: the code path, not a timing)" if args.quick else ""
    g = goals(rows)
    timing = (f"Medians of {args.repeats} interleaved do_bench rounds." if stamp["device"] == "cuda" else
              "Times: one wall-clock call each under the Triton interpreter (the code path, not a timing).")
    lines = [f"# Varlen and chunked prefill: operator + selection, synthetic planted inputs, {stamp['device_name']}"
             f"{quick}", "",
             f"{name}, Hq={args.q_heads}, Hkv={args.kv_heads}, D={args.head_dim}, Bs={args.block_size}, alpha "
             f"{args.alpha}; planted synthetic q/k/v (`reference.synthetic.planted_qkv`), not a model. Whole calls "
             f"(pooling, scoring, selection, attention). {timing} Differences above ATOL[{name}] = {tol} say "
             "MISMATCH.", "", "## Goals (issue 13)" + (" (no timings here: the verdicts mean nothing)" if quick
                                                      else ""), ""]
    if g["batch_per_kept_ratio"] is not None:
        lines.append(f"- Varlen batch (validate=False) time per kept block / per-sequence calls': "
                     f"{g['batch_per_kept_ratio']:.3f} (goal <= {BATCH_GOAL:.2f}: "
                     f"{'met' if g['batch_goal_met'] else 'missed'})")
    if g["chunked_time_ratio"] is not None:
        lines.append(f"- Chunked prefill total / one-shot time: {g['chunked_time_ratio']:.3f} (goal <= "
                     f"{CHUNKED_GOAL:.2f}: {'met' if g['chunked_goal_met'] else 'missed'})")
    if "batch" in args.parts:
        lines += ["", f"## A. Packed batch of {' + '.join(map(str, args.lengths))} tokens: one varlen call vs "
                  "per-sequence flash_prefill", "",
                  "`varlen`: `triton_impl.flash_prefill_varlen(validate=False)` (no host sync); `varlen_validate`: "
                  "validate=True; `per_sequence`: `triton_impl.flash_prefill` on each sequence, back to back. Kept "
                  "blocks: counts of an untimed call with return_stats, summed over heads and sequences.", "",
                  batch_table(rows, tol)]
    if "chunked" in args.parts:
        lines += ["", f"## B. Chunked prefill of {length_label(args.chunked_length)} tokens in chunks of "
                  f"{length_label(args.chunk)} vs one-shot flash_prefill", "",
                  "`chunked`: one `flash_prefill_varlen(validate=False)` call per chunk (prefix + chunk keys, "
                  "kbar_cache sliced from the whole sequence's mean_pool_keys outside the timing, is_last_chunk on "
                  "the last), the whole loop timed; `one_shot`: `triton_impl.flash_prefill` on the sequence. "
                  "Density: kept / causal blocks of untimed calls with stats. Peak: "
                  "torch.cuda.max_memory_allocated of one run beyond the inputs, outputs included (the loop holds "
                  "one chunk's output at a time).", "", chunked_table(rows, tol), "", "Per chunk:", "",
                  chunk_table(rows, tol)]
        last_rows = args.chunked_length - (args.chunked_length - 1) // args.chunk * args.chunk
        if args.chunk < args.chunked_length and -(-last_rows // args.block_size) < LAST_DENSE_BLOCKS:
            lines += ["", f"The last chunk holds fewer than last_dense_blocks = {LAST_DENSE_BLOCKS} query blocks: the "
                      "one-shot call's dense last blocks fall partly in the chunk before it, which has none "
                      "(docs/DESIGN.md section 9), so that chunk's rows may differ from the one-shot output."]
    lines += ["", stamp_line(stamp)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    device = bench_device(args.quick, "bench_varlen")  # before triton is imported (inside the measurements)
    dtype = torch.bfloat16 if device == "cuda" else torch.float16  # the interpreter computes bf16 dots wrongly
    args.out_dir = args.out_dir or run_dir(EXPERIMENT, device)
    stamp = environment_stamp(device)
    args.tag = args.tag or (f"{EXPERIMENT}_{device_slug(stamp['device_name']) if device == 'cuda' else 'cpu'}"
                            + ("_quick" if args.quick else ""))
    timer = make_timer(device)
    rows = []
    with torch.no_grad():
        if "batch" in args.parts:
            rows += measure_batch(args, dtype, device, timer)
            if device == "cuda":
                torch.cuda.empty_cache()
        if "chunked" in args.parts:
            rows += measure_chunked(args, dtype, device, timer)
    csv_path = write_long_csv(args.out_dir / f"{args.tag}.csv", rows, stamp)
    text = markdown(rows, stamp, args, dtype)
    (args.out_dir / f"{args.tag}.md").write_text(text, encoding="utf-8")
    command = " ".join(["python -m repro.bench_varlen", *(sys.argv[1:] if argv is None else argv)])
    write_run_json(args.out_dir / f"{args.tag}.json",
                   dict(command=command, wall_s=round(time.perf_counter() - started, 1), quick=args.quick,
                        dtype=str(dtype), parts=args.parts, lengths=args.lengths, chunked_length=args.chunked_length,
                        chunk=args.chunk, repeats=args.repeats, alpha=args.alpha,
                        shape=dict(Hq=args.q_heads, Hkv=args.kv_heads, D=args.head_dim, block_size=args.block_size),
                        goals=dict(goals(rows), batch_goal=BATCH_GOAL, chunked_goal=CHUNKED_GOAL)))
    print(text)
    print(f"wrote {csv_path}")


if __name__ == "__main__":
    main()
