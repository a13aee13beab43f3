"""Where a short prefill's time goes: the host's work per call, stage by stage, against the GPU's (GPU only).

    python -m repro.bench_host [--lengths 4096 8192] [--calls 200] [--repeats 5] [--out-dir DIR]

At 4K tokens the eager `triton_impl.flash_prefill` waits on the host (issue 14: 0.31-0.34 ms to enqueue against
0.19 ms of GPU work). Standard shape (bf16, B = 1, Hq = 32, Hkv = 4, D = 128, Bs = 128), planted inputs, alpha 0.12.
Per length, in one process:

* gpu    the whole call as a caller sees it (`bench_ms`: do_bench, CUDA events) with the cached launchers
         (triton_impl.common.launch) and with Triton's launch path (`kernel[grid](...)` every time), its CUDA-graph
         replay (no Python, no launch overhead) and the dense baselines (SDPA FlashAttention-2 and cuDNN); the
         issue's goal is the eager call <= 0.9x cuDNN. The three flash_prefill timings are interleaved, round by
         round (--repeats rounds, median and spread).
* host   CPU time to enqueue one call (`host_enqueue_ms`, GPU time excluded) of the whole call on both launch paths
         and of its parts: the argument checks alone, each stage's unchecked launcher (pool, score + select +
         compact, attention) on inputs made beforehand, and the output allocations; interleaved the same way. The
         parts do not sum exactly to the whole (Python call overhead between them), but show which launch or check
         dominates.
* profile  cProfile over --calls whole calls: the functions with the most own time (the markdown's last table).

Writes bench_host.csv (long format, environment stamp on every row), bench_host.md and run.json into --out-dir
(default: the run folder repro/runs/<date>-<device>/bench_host/).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

from block_selectors import SELECTORS
from reference.synthetic import planted_qkv
from repro.common import (cpu_model, environment_stamp, length_label, markdown_table, run_dir, stamp_line,
                          write_long_csv, write_run_json)
from repro.timing import bench_ms, dense_baselines, graphed, host_enqueue_ms, interleaved

EXPERIMENT = "bench_host"
SHAPE = dict(Hq=32, Hkv=4, D=128)
DEFAULTS = SELECTORS["flashprefill"].defaults  # alpha 0.12 and the safety net, as flash_prefill's defaults
ALPHA, BLOCK = DEFAULTS["alpha"], 128
NET = tuple(DEFAULTS[name] for name in ("sink_blocks", "window_blocks", "last_dense_blocks"))
GOAL_VS_CUDNN = 0.9


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m repro.bench_host", description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--calls", type=int, default=200, help="whole calls profiled by cProfile (default 200)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds of every timing (median, default 5)")
    p.add_argument("--out-dir", type=Path, default=None)
    args = p.parse_args(argv)
    if min(args.lengths) < BLOCK or args.calls < 1 or args.repeats < 1:
        p.error("lengths must be >= 128, --calls and --repeats >= 1")
    return args


def parts(q, k, v):
    """{name: zero-argument call}: the whole call and each piece of it, on inputs made once here."""
    import triton_impl
    from reference.flash_prefill import check_flash_prefill_args
    from triton_impl.attention import PHYSICAL, launch_attention
    from triton_impl.common import HEAD_DIMS, KERNEL_DTYPES, LOG2E, check_kernel_block_size, check_kernel_runs_on
    from triton_impl.pooling import launch_mean_pool
    from triton_impl.scoring import launch_scores_and_select

    B, L, Hq, D = q.shape
    M = -(-L // BLOCK)
    scale = D ** -0.5
    kbar = launch_mean_pool(k, BLOCK, out_scale=scale * LOG2E, split_dtype=q.dtype)
    counts = torch.empty(B, Hq, M, dtype=torch.int32, device=q.device)
    _, indices = launch_scores_and_select(q, kbar, BLOCK, ALPHA, *NET, rows=(0, M), counts=counts, pad_lists=False)
    out = torch.empty_like(q)

    def checks():
        check_flash_prefill_args(q, k, v, ALPHA, BLOCK, *NET, None, False, False, False, dtypes=KERNEL_DTYPES,
                                 head_dims=HEAD_DIMS)
        check_kernel_block_size(BLOCK)
        check_kernel_runs_on(q, k, v)

    return {
        "flash_prefill (whole call)": lambda: triton_impl.flash_prefill(q, k, v, alpha=ALPHA),
        "flash_prefill (whole call), Triton's launch path": launch_path(
            False, lambda: triton_impl.flash_prefill(q, k, v, alpha=ALPHA)),
        "argument checks": checks,
        "pool launch": lambda: launch_mean_pool(k, BLOCK, out_scale=scale * LOG2E, split_dtype=q.dtype),
        "score + select + compact launch": lambda: launch_scores_and_select(q, kbar, BLOCK, ALPHA, *NET,
                                                                            rows=(0, M), counts=counts,
                                                                            pad_lists=False),
        "attention launch": lambda: launch_attention(q, k, v, BLOCK, scale, PHYSICAL, counts=counts,
                                                     indices=indices, rows=(0, M), out=out),
        "output allocations": lambda: (torch.empty(B, Hq, M, dtype=torch.int32, device=q.device),
                                       torch.empty_like(q)),
    }


def launch_path(fast: bool, fn):
    """fn with the kernels launched through the cached launchers (fast) or through kernel[grid](...) every time
    (triton_impl.common.FAST_LAUNCH), restored afterwards: the A/B of the launch path in one process."""
    from triton_impl import common

    def call():
        before, common.FAST_LAUNCH = common.FAST_LAUNCH, fast
        try:
            return fn()
        finally:
            common.FAST_LAUNCH = before

    return call


def profile(fn, calls: int, top: int = 15) -> list[list]:
    """[[function, calls, own ms per whole call, cumulative ms per whole call]] of the `top` functions by own time."""
    fn()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(profiler, stream=io.StringIO()).sort_stats("tottime")
    rows = []
    for (path, line, name), (_, ncalls, tottime, cumtime, _) in list(stats.stats.items()):
        rows.append([f"{Path(path).name}:{line} {name}", ncalls // calls, 1e3 * tottime / calls,
                     1e3 * cumtime / calls])
    return sorted(rows, key=lambda r: -r[2])[:top]


def measure(L: int, calls: int, repeats: int) -> tuple[list[dict], list[list]]:
    import triton_impl

    q, k, v = planted_qkv(1, L, SHAPE["Hq"], SHAPE["Hkv"], SHAPE["D"], seed=0, dtype=torch.bfloat16, device="cuda")
    whole = lambda: triton_impl.flash_prefill(q, k, v, alpha=ALPHA)  # noqa: E731
    dense = dense_baselines(q, k, v)
    calls_gpu = {"flash_prefill eager": whole,
                 "flash_prefill eager, Triton's launch path": launch_path(False, whole),
                 "flash_prefill CUDA graph replay": graphed(whole)}
    times = interleaved(calls_gpu, repeats, bench_ms)  # the launch paths A/B, round by round
    rows = [dict(section="gpu", L=L, what=name, ms=ms) for name, ms in dense.items()]
    rows += [dict(section="gpu", L=L, what=name, ms=statistics.median(ms), spread=max(ms) - min(ms))
             for name, ms in times.items()]
    for row in rows:
        row["vs_cudnn"] = row["ms"] / dense["sdpa_cudnn"]
    host = interleaved(parts(q, k, v), repeats, host_enqueue_ms)
    rows += [dict(section="host", L=L, what=name, ms=statistics.median(ms), spread=max(ms) - min(ms))
             for name, ms in host.items()]
    return rows, profile(whole, calls)


def report(rows, profiles, stamp, info) -> str:
    lines = ["# Short prefills: host and GPU time per call (operator + selection, synthetic planted inputs)", "",
             stamp_line(stamp), f"Host CPU: {info['host_cpu']} (the eager timings depend on it as much as on the GPU).",
             "", f"Command: `{info['command']}`; standard shape, bf16, alpha {ALPHA}.", "",
             f"Goal (issue 14): the eager call <= {GOAL_VS_CUDNN}x cuDNN's dense time.", ""]
    for L in sorted({r["L"] for r in rows}):
        spread = lambda r: f"{r['spread']:.3f}" if r.get("spread") is not None else ""  # noqa: E731
        gpu = [[r["what"], f"{r['ms']:.3f}", f"{r['vs_cudnn']:.2f}", spread(r)] for r in rows if r["L"] == L
               and r["section"] == "gpu"]
        host = [[r["what"], f"{r['ms']:.3f}", spread(r)] for r in rows if r["L"] == L and r["section"] == "host"]
        rounds = info.get("repeats", 1)
        lines += [f"## {length_label(L)}", "",
                  f"GPU (do_bench: what a caller sees; the replay has no host work; median of {rounds} interleaved "
                  "rounds, spread = max - min):", "",
                  markdown_table(["call", "ms", "x cuDNN", "spread ms"], gpu), "",
                  f"Host (CPU ms to enqueue one call, GPU excluded; median of {rounds} interleaved rounds):", "",
                  markdown_table(["part", "ms", "spread ms"], host), "",
                  f"cProfile, {info['calls']} whole calls, the functions with the most own time (ms per call):", "",
                  markdown_table(["function", "calls per call", "own ms", "cumulative ms"],
                                 [[f, n, f"{own:.4f}", f"{cum:.4f}"] for f, n, own, cum in profiles[L]]), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("repro.bench_host needs a CUDA GPU (it times kernel launches)")
    out_dir = args.out_dir or run_dir(EXPERIMENT)
    out_dir.mkdir(parents=True, exist_ok=True)
    start, rows, profiles = time.time(), [], {}
    for L in args.lengths:
        length_rows, profiles[L] = measure(L, args.calls, args.repeats)
        rows += length_rows
    stamp = environment_stamp()
    command = " ".join(["python -m repro.bench_host", *(argv if argv is not None else sys.argv[1:])])
    info = dict(command=command, calls=args.calls, repeats=args.repeats, lengths=args.lengths, host_cpu=cpu_model(),
                wall_seconds=round(time.time() - start))
    for row in rows:
        row["host_cpu"] = info["host_cpu"]
    write_long_csv(out_dir / "bench_host.csv", rows, stamp)
    (out_dir / "bench_host.md").write_text(report(rows, profiles, stamp, info) + "\n", encoding="utf-8")
    write_run_json(out_dir / "run.json", info)
    print(f"wrote {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
