"""FP8 (e4m3) attention against the bf16 kernel, and the whole FP8 call against dense attention (GPU): issue 14's goals.

    python -m repro.bench_fp8 [--lengths 65536 131072 262144] [--densities 0.035 0.10] [--check-lengths 4096 16384]
                              [--stages 2 3 4] [--warps 4 8] [--imprecise-acc 32] [--block-m 64]
                              [--whole-lengths 262144] [--whole-density 0.035]
                              [--repeats 3] [--time-budget SECONDS] [--out-dir DIR]
    python -m repro.bench_fp8 --quick     # tiny sizes; on a CPU under the Triton interpreter (CI)

Standard shape: B = 1, Hq = 32, Hkv = 4, D = 128, bf16, Bs = 128, planted synthetic q/k/v
(`reference.synthetic.planted_qkv`, seed 0). Measured in one process, in this order:

1. check      before anything is timed, at --check-lengths (one >= 16K: several blocks per row): the Triton FP8
              path (`triton_impl.fp8.block_sparse_attention_fp8`) against the reference FP8 path
              (`reference.fp8.block_sparse_attention_fp8`, on the same GPU tensors and lists): max and mean abs
              difference within MAX_DIFF and MEAN_SHARE x the reference's own mean error against float64, else the
              script exits with an error and times nothing (each sweep config is checked and reported too).
              Also each path's error against exact attention over the same blocks (`tools.oracle.naive_attention`,
              float64), for the FP8 and the bf16 kernel (`triton_impl.block_sparse_attention`), and their ratio.
              Lists: `repro.masks.controlled_mask` at CHECK_DENSITY.
2. operator   operator only, per --lengths and --densities, on random lists (`repro.masks.controlled_mask`: forced
              sinks / window / last rows plus random causal blocks, independent per head; the same lists for every
              version): `bf16` (`triton_impl.attention.launch_attention`, physical skip), `fp8`
              (`triton_impl.fp8.launch_fp8_attention` on operands quantised beforehand), `fp8+quantize` (quantize_qkv
              and the launch), and with --stages / --warps / --block-m the FP8 kernel at each combination
              ("fp8 s3 m128"; the default config depends on the length: `triton_impl.fp8.fp8_config`). Per row:
              ms, kept (block, head) pairs, ns per kept block-head, speedup bf16 / version and, against the dense
              cuDNN time of that length, time / (density x cuDNN). Goal: fp8 >= 1.6x bf16 per kept block at 64K-256K.
   dense      once per length: SDPA FlashAttention-2 and cuDNN (`repro.timing.dense_baselines`).
3. whole      operator + selection at --whole-lengths: `triton_impl.flash_prefill` with alpha bisected
              (`repro.masks.alpha_for_density`) so that its own selection keeps --whole-density of the causal blocks
              (else --alpha, said in the row), fp8=False and fp8=True, against FA2 and cuDNN.
              Goal: fp8 >= 50x FA2 at 256K, 3.5%.

Timed versions run round-robin (`repro.timing.interleaved`), --repeats rounds of `repro.timing.bench_ms` (do_bench's
median, cold L2); the median of the rounds is reported. --quick (CPU, fp16, Hq 2, Hkv 1, D 64, Bs 64, Triton
interpreter): the code path, not a timing (no dense baselines there). --time-budget skips the lengths that would start
after it (run.json lists them).

Writes into --out-dir (default: the run folder repro/runs/<date>-<device>/bench_fp8/), rewritten after each length:
    bench_fp8.csv   long format, one row per (section, L, target, version), environment stamp on every row
    bench_fp8.md    the goals (goal vs measured), the check, operator speed per length, dense, whole call
    run.json        command line, wall time, shape, tolerances, goals, what the time budget skipped
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from reference.synthetic import planted_qkv
from reference.validation import num_blocks
from repro.common import (environment_stamp, fill_defaults, length_label, markdown_table, run_dir, stamp_line,
                          write_long_csv, write_run_json)
from repro.masks import alpha_for_density, controlled_mask
from repro.paper import PAPER_DENSITY_256K
from repro.timing import bench_device, dense_baselines, interleaved, make_timer
from tools.oracle import naive_attention

EXPERIMENT = "bench_fp8"
SHAPE = dict(Hq=32, Hkv=4, D=128, block_size=128)  # the standard shape (docs/DESIGN.md section 5)
QUICK_SHAPE = dict(Hq=2, Hkv=1, D=64, block_size=64)  # the FP8 kernel takes Bs 64 or 128 only
FULL = dict(lengths=[65536, 131072, 262144], densities=[0.035, 0.10], check_lengths=[4096, 16384],
            whole_lengths=[262144], repeats=3)
QUICK = dict(lengths=[256], densities=[0.5], check_lengths=[200, 320], whole_lengths=[256], repeats=1)
# Triton FP8 vs reference FP8 (the gate). The mean difference must stay a small fraction of the reference's own
# error against float64 (MEAN_SHARE): the kernel may differ from the emulation only by float32 rounding (the GPU's
# exp2 and FMAs, the e4m3 wgmma's accumulator), which moves P across an e4m3 rounding now and then; each such flip
# moves an output by up to 2^-4 of a weight x |v|, up to ~0.1 at the planted inputs' peaked rows, so the max bound
# (MAX_DIFF) only catches gross errors. A wrong scale, block or row would make the difference as large as the error.
MAX_DIFF, MEAN_SHARE = 0.25, 0.2
CHECK_DENSITY = 0.1  # target density of the check's random lists
SPEEDUP_GOAL, SPEEDUP_GOAL_LENGTHS = 1.6, (65536, 262144)  # fp8 vs bf16 per kept block, at these lengths
WHOLE_GOAL, WHOLE_GOAL_LENGTH, WHOLE_GOAL_DENSITY = 50.0, 262144, PAPER_DENSITY_256K["FlashPrefill"]  # vs FA2
OPERATOR, WHOLE = "operator only, same random lists", "operator + selection: flash_prefill"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m repro.bench_fp8", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help=f"(default {FULL['lengths']})")
    parser.add_argument("--densities", type=float, nargs="+", default=None, help=f"(default {FULL['densities']})")
    parser.add_argument("--check-lengths", type=int, nargs="+", default=None,
                        help=f"lengths of the correctness check (default {FULL['check_lengths']})")
    parser.add_argument("--stages", type=int, nargs="+", default=[], help="also the FP8 kernel at these num_stages")
    parser.add_argument("--warps", type=int, nargs="+", default=[], help="also the FP8 kernel at these num_warps")
    parser.add_argument("--block-m", type=int, nargs="+", default=[],
                        help="also the FP8 kernel with query tiles of this many rows (a divisor of Bs)")
    parser.add_argument("--imprecise-acc", type=int, nargs="+", default=[],
                        help="also the FP8 kernel promoting its e4m3 accumulator every this many K elements")
    parser.add_argument("--whole-lengths", type=int, nargs="*", default=None,
                        help=f"lengths of the whole call (default {FULL['whole_lengths']}; none: skip it)")
    parser.add_argument("--whole-density", type=float, default=PAPER_DENSITY_256K["FlashPrefill"],
                        help="the density the whole call's alpha is bisected for (default: the paper's 3.5%%)")
    parser.add_argument("--alpha", type=float, default=0.12, help="the whole call's alpha when the density is "
                        "out of reach (the forced blocks alone exceed it)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3)")
    parser.add_argument("--time-budget", type=float, default=420.0, metavar="SECONDS",
                        help="skip the lengths that would start after this many seconds (default 420)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round, fp16 on a CPU: the code path")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help=f"(default: the run folder repro/runs/<date>-<device>/{EXPERIMENT}/)")
    args = parser.parse_args(argv)
    fill_defaults(args, QUICK if args.quick else FULL)
    if args.repeats < 1 or min(args.lengths + args.check_lengths + args.whole_lengths, default=1) < 1:
        parser.error("--repeats and the lengths must be >= 1")
    if not all(0 < d <= 1 for d in [*args.densities, args.whole_density]):
        parser.error("densities must lie in (0, 1]")
    return args


def sweep_configs(stages, warps, imprecise_acc=(), block_m=()) -> dict[str, dict]:
    """{"fp8 s3 w8 m64": config of launch_fp8_attention} for every combination of the --stages, --warps and --block-m
    values asked for (a knob not asked for keeps the kernel's choice for the length), and one config "fp8 acc32" per
    --imprecise-acc value; {} for none."""
    configs = {}
    if stages or warps or block_m:
        for s in stages or [None]:
            for w in warps or [None]:
                for m in block_m or [None]:
                    knobs = {("s", "num_stages"): s, ("w", "num_warps"): w, ("m", "block_m"): m}
                    label = " ".join(["fp8", *(f"{tag}{v}" for (tag, _), v in knobs.items() if v)])
                    configs[label] = {key: v for (_, key), v in knobs.items() if v}
    for acc in imprecise_acc:
        configs[f"fp8 acc{acc}"] = dict(imprecise_acc=acc)
    return configs


def abs_errors(out: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max, mean) of |out - expected| in float64; NaN anywhere gives NaN (which fails every tolerance)."""
    diff = (out.double() - expected.double()).abs()
    return float(diff.max()), float(diff.mean())


def ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def check_correctness(lengths, shape, dtype, device, configs: dict) -> list[dict]:
    """Rows "check" (module docstring, 1), for the default kernel and every sweep config; SystemExit when the
    default leaves the reference's output (MAX_DIFF, MEAN_SHARE)."""
    import triton_impl
    from reference.fp8 import block_sparse_attention_fp8 as reference_fp8
    from triton_impl.fp8 import launch_fp8_attention, quantize_qkv

    Hq, Hkv, D, bs = shape["Hq"], shape["Hkv"], shape["D"], shape["block_size"]
    rows = []
    for L in lengths:
        q, k, v = planted_qkv(1, L, Hq, Hkv, D, seed=0, dtype=dtype, device=device)
        mask = controlled_mask(1, Hq, num_blocks(L, bs), CHECK_DENSITY, seed=1, device=device)
        counts, indices = triton_impl.compact_blocks(mask)
        base = dict(section="check", L=L, target_density=CHECK_DENSITY,
                    density=float(triton_impl.causal_block_density(counts)), kept_blocks=int(counts.sum()))
        exact = naive_attention(q, k, v, block_mask=mask, block_size=bs)  # float64, the same blocks
        emulated = reference_fp8(q, k, v, counts, indices, bs)
        ref_max, ref_mean = abs_errors(emulated, exact)
        max16, mean16 = abs_errors(triton_impl.block_sparse_attention(q, k, v, counts, indices, bs), exact)
        rows.append(dict(base, version="bf16", max_error_vs_fp64=max16, mean_error_vs_fp64=mean16))
        rows.append(dict(base, version="reference fp8", max_error_vs_fp64=ref_max, mean_error_vs_fp64=ref_mean))
        quantized = quantize_qkv(q, k, v, bs)
        for version, config in {"fp8": {}, **configs}.items():
            out = launch_fp8_attention(quantized, L, bs, D ** -0.5,
                                       counts, indices, out=torch.empty_like(q), config=config)
            max_diff, mean_diff = abs_errors(out, emulated)
            ok = max_diff <= MAX_DIFF and mean_diff <= MEAN_SHARE * ref_mean
            max8, mean8 = abs_errors(out, exact)
            rows.append(dict(base, version=version, config=str(config), max_diff_vs_reference=max_diff,
                             mean_diff_vs_reference=mean_diff, ok=ok, max_error_vs_fp64=max8,
                             mean_error_vs_fp64=mean8, max_error_ratio=ratio(max8, max16),
                             mean_error_ratio=ratio(mean8, mean16)))
            print(f"check L={length_label(L)} {version}: vs reference fp8 max {max_diff:.3g} (<= {MAX_DIFF}), mean "
                  f"{mean_diff:.3g} (<= {MEAN_SHARE} x {ref_mean:.3g}): {'ok' if ok else 'FAILED'}; vs fp64 "
                  f"max/mean {max8:.3g}/{mean8:.3g} (reference fp8 {ref_max:.3g}/{ref_mean:.3g}, bf16 "
                  f"{max16:.3g}/{mean16:.3g})", flush=True)
            if version == "fp8" and not ok:
                raise SystemExit(f"the Triton FP8 attention leaves the reference at L={L}: max abs diff "
                                 f"{max_diff:.3g} (tolerance {MAX_DIFF}), mean {mean_diff:.3g} (tolerance "
                                 f"{MEAN_SHARE} x the reference's mean error {ref_mean:.3g}); nothing was timed")
        del q, k, v, mask, counts, indices, exact, emulated, quantized
    return rows


def planted(L, shape, dtype, device, cache: dict):
    """The planted q, k, v of length L, kept in `cache` for the next part at the same length (one length at a time)."""
    if cache.get("L") != L:
        cache.clear()
        if device == "cuda":
            torch.cuda.empty_cache()
        cache.update(L=L, qkv=planted_qkv(1, L, shape["Hq"], shape["Hkv"], shape["D"], seed=0, dtype=dtype,
                                          device=device))
    return cache["qkv"]


def dense_rows(L, qkv, device, dense: dict) -> list[dict]:
    """Rows "dense" (FA2, cuDNN) for L, timed once per length into `dense`; none on a CPU (--quick)."""
    if L in dense:
        return []
    dense[L] = dense_baselines(*qkv) if device == "cuda" else {}
    return [dict(section="dense", scope="dense causal (SDPA)", L=L, density=1.0, version=name, ms=ms)
            for name, ms in dense[L].items()]


def per_kept(ms, kept, density, bf16_ms, dense: dict) -> dict:
    """ns per kept block-head, the speedup bf16 / this, and this / (density x cuDNN) (blank without cuDNN)."""
    cudnn = dense.get("sdpa_cudnn")
    return dict(ns_per_kept_block_head=ms * 1e6 / kept, speedup_vs_bf16=bf16_ms / ms,
                per_kept_vs_cudnn=ms / (density * cudnn) if cudnn else "")


def timed_rows(times, base: dict, reference: str, extra) -> list[dict]:
    """One row per timed version: base, its median and rounds, and extra(ms, reference's ms)."""
    ref_ms = statistics.median(times[reference])
    rows = []
    for version, runs in times.items():
        ms = statistics.median(runs)
        rows.append(dict(base, version=version, ms=ms, runs=" ".join(f"{t:.3f}" for t in runs), **extra(ms, ref_ms)))
        print(f"{base['section']:<8} L={length_label(base['L']):<5} density {base['density']:.2%} {version:<14} "
              f"{ms:9.3f} ms" + (f"  x{ref_ms / ms:.2f} vs {reference}" if version != reference else ""), flush=True)
    return rows


def measure_operator(L, qkv, shape, densities, configs, repeats, timer, device, dense) -> list[dict]:
    """Rows "operator" for one length (module docstring, 2)."""
    import triton_impl
    from triton_impl.attention import PHYSICAL, launch_attention
    from triton_impl.fp8 import launch_fp8_attention, quantize_qkv

    q, k, v = qkv
    Hq, bs = shape["Hq"], shape["block_size"]
    scale = shape["D"] ** -0.5
    quantized = quantize_qkv(q, k, v, bs)
    out = torch.empty_like(q)
    rows = []
    for target in densities:
        counts, indices = triton_impl.compact_blocks(controlled_mask(1, Hq, num_blocks(L, bs), target, seed=1,
                                                                     device=device))
        kept, density = int(counts.sum()), float(triton_impl.causal_block_density(counts))

        def fp8(config=None, operands=None):
            return launch_fp8_attention(operands or quantized, L, bs, scale, counts, indices, out=out, config=config)

        fns = {"bf16": lambda: launch_attention(q, k, v, bs, scale, PHYSICAL, counts=counts, indices=indices),
               "fp8": fp8, "fp8+quantize": lambda: fp8(operands=quantize_qkv(q, k, v, bs))}
        fns.update({label: (lambda c=config: fp8(config=c)) for label, config in configs.items()})
        times = interleaved(fns, repeats, timer, warm_up=device == "cuda")
        base = dict(section="operator", scope=OPERATOR, L=L, target_density=target, density=density,
                    kept_blocks=kept)
        rows += timed_rows(times, base, "bf16", lambda ms, ref: per_kept(ms, kept, density, ref, dense[L]))
        for row in rows[-len(fns):]:
            row["config"] = " ".join(f"{k}={v}" for k, v in configs.get(row["version"], {}).items())
        del counts, indices
    return rows


def measure_whole(L, qkv, shape, target, alpha, repeats, timer, device, dense) -> list[dict]:
    """Rows "whole" for one length (module docstring, 3)."""
    import triton_impl

    q, k, v = qkv
    bs = shape["block_size"]
    found = alpha_for_density(triton_impl.block_scores(q, triton_impl.mean_pool_keys(k, bs), bs), target)
    alpha = found[0] if found else alpha
    _, stats = triton_impl.flash_prefill(q, k, v, alpha=alpha, block_size=bs, return_stats=True)
    base = dict(section="whole", scope=WHOLE, L=L, target_density=target, density=float(stats.density),
                kept_blocks=int(stats.counts.sum()), alpha=alpha, alpha_bisected=found is not None)
    del stats
    calls = {"bf16": lambda: triton_impl.flash_prefill(q, k, v, alpha=alpha, block_size=bs),
             "fp8": lambda: triton_impl.flash_prefill(q, k, v, alpha=alpha, block_size=bs, fp8=True)}
    times = interleaved(calls, repeats, timer, warm_up=device == "cuda")
    fa2, cudnn = dense[L].get("sdpa_flash"), dense[L].get("sdpa_cudnn")
    return timed_rows(times, base, "bf16", lambda ms, ref: dict(speedup_vs_bf16=ref / ms,
                                                               speedup_vs_fa2=fa2 / ms if fa2 else "",
                                                               speedup_vs_cudnn=cudnn / ms if cudnn else ""))


def goals(rows) -> dict:
    """Issue 14's goals from the rows (in memory or read back from the CSV): the smallest fp8 speedup over bf16 at
    64K-256K (kernel alone; with its quantisation), and the whole call's speedup over FA2 at 256K; None: not
    measured. The whole-call goal is judged only where alpha was bisected to its density (3.5%)."""
    def speedups(version):
        return [float(r["speedup_vs_bf16"]) for r in rows if r["section"] == "operator" and r["version"] == version
                and SPEEDUP_GOAL_LENGTHS[0] <= int(r["L"]) <= SPEEDUP_GOAL_LENGTHS[1]]

    kernel, with_quantize = speedups("fp8"), speedups("fp8+quantize")
    whole = [r for r in rows if r["section"] == "whole" and r["version"] == "fp8" and int(r["L"]) == WHOLE_GOAL_LENGTH
             and float(r["target_density"]) == WHOLE_GOAL_DENSITY and r.get("speedup_vs_fa2") not in (None, "")]
    vs_fa2 = float(whole[0]["speedup_vs_fa2"]) if whole else None
    bisected = bool(whole) and str(whole[0]["alpha_bisected"]) == "True"
    return dict(operator_min_speedup=min(kernel, default=None),
                operator_goal_met=min(kernel) >= SPEEDUP_GOAL if kernel else None,
                operator_min_speedup_with_quantize=min(with_quantize, default=None),
                operator_goal_met_with_quantize=min(with_quantize) >= SPEEDUP_GOAL if with_quantize else None,
                whole_speedup_vs_fa2=vs_fa2, whole_density=float(whole[0]["density"]) if whole else None,
                whole_goal_met=vs_fa2 >= WHOLE_GOAL if vs_fa2 is not None and bisected else None)


def fmt(x, spec) -> str:
    return "" if x in ("", None) else format(float(x), spec)


def goal_lines(g: dict) -> list[str]:
    def verdict(met):
        return "not measured" if met is None else ("**met**" if met else "**not met**")

    lo, hi = (length_label(L) for L in SPEEDUP_GOAL_LENGTHS)
    return [f"- goal: fp8 >= {SPEEDUP_GOAL}x bf16 per kept block at {lo}-{hi} (operator only). Measured: smallest "
            f"speedup {fmt(g['operator_min_speedup'], '.2f') or '-'}x, kernel alone (operands quantised beforehand): "
            f"{verdict(g['operator_goal_met'])}"
            f"; {fmt(g['operator_min_speedup_with_quantize'], '.2f') or '-'}x with its quantisation: "
            f"{verdict(g['operator_goal_met_with_quantize'])}.",
            f"- goal: flash_prefill(fp8=True) >= {WHOLE_GOAL:g}x FA2 at {length_label(WHOLE_GOAL_LENGTH)}, "
            f"{WHOLE_GOAL_DENSITY:.1%} "
            f"(with selection). Measured: {fmt(g['whole_speedup_vs_fa2'], '.1f') or '-'}x at density "
            f"{fmt(g['whole_density'], '.2%') or '-'}: {verdict(g['whole_goal_met'])}."]


def section_table(rows, section, header, cells) -> str:
    return markdown_table(header, [cells(r) for r in rows if r["section"] == section])


def summary(rows, stamp, info) -> str:
    """The markdown report: goals, check, operator speed, dense baselines, whole call."""
    quick = " (--quick: the code path, not a timing; fp16 inputs, the bf16 rows are the 16-bit kernel)" \
        if info["quick"] else ""
    shape = info["shape"]
    check = section_table(rows, "check", ["L", "density", "version", "max vs ref fp8", "mean vs ref fp8",
                                          "max err vs fp64", "mean err vs fp64", "fp8/bf16 max", "fp8/bf16 mean",
                                          "ok"],
                          lambda r: [length_label(r["L"]), fmt(r["density"], ".1%"), r["version"],
                                     fmt(r.get("max_diff_vs_reference"), ".3g"),
                                     fmt(r.get("mean_diff_vs_reference"), ".3g"), fmt(r["max_error_vs_fp64"], ".3g"),
                                     fmt(r["mean_error_vs_fp64"], ".3g"), fmt(r.get("max_error_ratio"), ".2f"),
                                     fmt(r.get("mean_error_ratio"), ".2f"), r.get("ok", "")])
    speed = section_table(rows, "operator", ["L", "target", "density", "kept", "version", "ms",
                                             "ns / kept block-head", "bf16 / this", "this / (density x cuDNN)"],
                          lambda r: [length_label(r["L"]), fmt(r["target_density"], ".3g"), fmt(r["density"], ".2%"),
                                     r["kept_blocks"], r["version"], fmt(r["ms"], ".3f"),
                                     fmt(r["ns_per_kept_block_head"], ".1f"), fmt(r["speedup_vs_bf16"], ".2f"),
                                     fmt(r["per_kept_vs_cudnn"], ".2f")])
    dense = section_table(rows, "dense", ["L", "version", "ms"],
                          lambda r: [length_label(r["L"]), r["version"], fmt(r["ms"], ".3f")]) \
        if any(r["section"] == "dense" for r in rows) else "Not measured (no GPU)."
    whole = section_table(rows, "whole", ["L", "alpha", "bisected", "density", "version", "ms", "bf16 / this",
                                          "vs FA2", "vs cuDNN"],
                          lambda r: [length_label(r["L"]), fmt(r["alpha"], ".4g"), r["alpha_bisected"],
                                     fmt(r["density"], ".2%"), r["version"], fmt(r["ms"], ".3f"),
                                     fmt(r["speedup_vs_bf16"], ".2f"), fmt(r["speedup_vs_fa2"], ".1f"),
                                     fmt(r["speedup_vs_cudnn"], ".1f")])
    lines = [f"# FP8 (e4m3) vs bf16 attention: operator only and with selection, synthetic planted inputs, "
             f"{stamp['device_name']}{quick}", "", stamp_line(stamp), "",
             f"Shape: B=1, Hq={shape['Hq']}, Hkv={shape['Hkv']}, D={shape['D']}, Bs={shape['block_size']}, "
             f"{info['dtype']}, planted synthetic q/k/v (not a model); {info['repeats']} interleaved rounds, median.",
             "", "## Goals (issue 14)", "", *goal_lines(info["goals"]), "",
             "## Correctness (before timing)", "",
             f"Triton FP8 vs reference FP8 (same lists): max abs diff <= {MAX_DIFF}, mean <= {MEAN_SHARE} x the reference's mean error vs float64. Errors "
             f"against float64 attention over the same blocks, for the FP8 and the {info['dtype']} kernel.", "", check,
             "", f"## Operator speed ({OPERATOR})", "", speed, "", "## Dense baselines (SDPA, causal)", "", dense,
             "", f"## Whole call ({WHOLE}), alpha bisected to {info['whole_density']:.1%} where reachable", "",
             whole]
    if info["skipped"]:
        lines += ["", f"Skipped (time budget {info['time_budget_s']} s): {', '.join(info['skipped'])}."]
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, rows, stamp, info) -> None:
    info["goals"] = goals(rows)
    write_long_csv(out_dir / f"{EXPERIMENT}.csv", rows, stamp)
    (out_dir / f"{EXPERIMENT}.md").write_text(summary(rows, stamp, info), encoding="utf-8")
    write_run_json(out_dir / "run.json", info)


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    device = bench_device(args.quick, "bench_fp8")  # before triton is imported (the imports in the functions)
    shape = QUICK_SHAPE if args.quick else SHAPE
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    out_dir = args.out_dir or run_dir(EXPERIMENT, device)
    torch.set_grad_enabled(False)
    timer, configs = make_timer(device), sweep_configs(args.stages, args.warps, args.imprecise_acc, args.block_m)
    stamp = environment_stamp(device)
    info = dict(command="python -m repro.bench_fp8 " + " ".join(sys.argv[1:] if argv is None else argv),
                quick=args.quick, shape=shape, dtype=str(dtype).removeprefix("torch."), lengths=args.lengths,
                densities=args.densities, check_lengths=args.check_lengths, configs=configs,
                whole_lengths=args.whole_lengths, whole_density=args.whole_density, alpha=args.alpha,
                repeats=args.repeats, time_budget_s=args.time_budget, tolerances=dict(max=MAX_DIFF, mean_share=MEAN_SHARE),
                skipped=[])

    rows = check_correctness(args.check_lengths, shape, dtype, device, configs)
    cache, dense = {}, {}
    parts = [("operator", L) for L in args.lengths] + [("whole", L) for L in args.whole_lengths]
    for part, L in parts:
        if time.perf_counter() - start > args.time_budget:
            info["skipped"].append(f"{part} L={L}")
            continue
        qkv = planted(L, shape, dtype, device, cache)
        rows += dense_rows(L, qkv, device, dense)
        if part == "operator":
            rows += measure_operator(L, qkv, shape, args.densities, configs, args.repeats, timer, device, dense)
        else:
            rows += measure_whole(L, qkv, shape, args.whole_density, args.alpha, args.repeats, timer, device, dense)
        info["wall_s"] = round(time.perf_counter() - start, 1)
        write_outputs(out_dir, rows, stamp, info)  # after each length: a run cut short keeps what it measured
    info["wall_s"] = round(time.perf_counter() - start, 1)
    write_outputs(out_dir, rows, stamp, info)
    print("\n".join(goal_lines(info["goals"])))
    print(f"wrote {out_dir} in {info['wall_s']} s" + (f"; skipped {info['skipped']}" if info["skipped"] else ""))


if __name__ == "__main__":
    main()
