"""How this repository times things: every benchmark in repro/ takes its timer from here.

Four timers, each for what it measures:

* `bench_ms(fn)`         GPU time of one call: triton.testing.do_bench's median (25 ms of warm-up calls, then about
                         100 ms of calls, each between two CUDA events, with the L2 cache flushed before each call).
                         Used by the GPU operator benchmarks (bench_speed, ab_attention, tune_kernels,
                         bench_public_call): their calls take micro- to milliseconds, so many repetitions are cheap,
                         and a cold L2 is the honest state for a prefill that streams K and V once. CUDA only.
* `host_enqueue_ms(fn)`  CPU time to enqueue one call (Python, checks, kernel launches), GPU time excluded: the floor
                         of a short sequence's latency (bench_speed's `flash_prefill_host` row). CUDA only.
* `graphed(fn)`          fn captured in a CUDA graph; time its replay with bench_ms to see the call without Python or
                         launch overhead (bench_speed's `flash_prefill_cuda_graph` row). CUDA only.
* `measure_call(fn, device, repeats)`  one untimed warm-up call, whose result it returns, then the median of
                         `repeats` calls: CUDA events on a GPU, wall clock on a CPU; plus the warm-up call's peak
                         memory on CUDA. Used by repro.sparsity, whose selection calls run on a CPU too and take up
                         to seconds there (do_bench needs a GPU and would repeat them for 100 ms at least), and whose
                         measurements read the warm-up call's result (the lists whose density is reported).

`dense_baselines(q, k, v)` times the dense attention every speed comparison is measured against (torch SDPA's
FlashAttention-2 and cuDNN backends) with bench_ms.
"""

from __future__ import annotations

import statistics
import time

import torch

__all__ = ["bench_ms", "host_enqueue_ms", "graphed", "measure_call", "dense_baselines"]


def bench_device(quick: bool, script: str) -> str:
    """"cuda" when there is a GPU; else "cpu" for a --quick run, with the Triton interpreter switched on (before
    triton is imported: call this before anything imports triton_impl), and SystemExit without --quick."""
    if torch.cuda.is_available():
        return "cuda"
    if not quick:
        raise SystemExit(f"{script} needs a CUDA GPU; on a CPU run it with --quick (Triton interpreter)")
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")
    return "cpu"


def interleaved(fns: dict, repeats: int, timer, warm_up: bool = True) -> dict[str, list[float]]:
    """{name: [ms per round]}: every call once per round, rounds in a row (after one untimed call each, which
    compiles the kernels, unless warm_up is False)."""
    for fn in fns.values() if warm_up else ():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timer(fn))
    return times


def make_timer(device: str):
    """bench_ms on a GPU; on a CPU (a --quick run under the interpreter) one wall-clock call: the code path, not a
    timing."""
    if device == "cuda":
        return bench_ms

    def once(fn):
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)

    return once


def bench_ms(fn) -> float:
    """Median ms of fn on the GPU (triton.testing.do_bench, warm-up 25 ms, repetitions 100 ms)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def host_enqueue_ms(fn, calls: int = 8) -> float:
    """CPU milliseconds to enqueue one call (Python, argument checks, kernel launches), GPU time excluded: the
    floor of a short sequence's latency when the GPU work is smaller than this. Few calls: once about a thousand
    launches are pending, the CUDA launch queue is full and the host waits for the GPU (1M tokens: 49 launches a
    call), which would measure GPU time instead."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    enqueued = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e3 * enqueued / calls


def graphed(fn):
    """fn captured once in a CUDA graph (static inputs): replaying it launches every kernel without Python, the
    way a serving engine that graphs its prefill would run it. Returns the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture (compiles the kernels)
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure_call(fn, device, repeats: int):
    """(result of an untimed warm-up call, median ms of `repeats` more calls, peak MiB of the warm-up call).

    The warm-up call absorbs Triton compilation and allocator growth; its result is what the caller measures. On
    CUDA each timed call sits between two CUDA events (the GPU's time, launches included) and the peak is
    torch.cuda.max_memory_allocated beyond what was allocated before the call; on a CPU the time is wall clock and
    the peak is None."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    result = fn()
    peak_mib = None
    if cuda:
        torch.cuda.synchronize(device)
        peak_mib = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return result, statistics.median(times), peak_mib


def dense_baselines(q, k, v) -> dict[str, float]:
    """SDPA flash (FA2) and cuDNN on (B, H, L, D) with kv heads repeated (the repeat is not timed)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[2] // k.shape[2]
    qt = q.transpose(1, 2)
    kt = k.repeat_interleave(group, dim=2).transpose(1, 2)
    vt = v.repeat_interleave(group, dim=2).transpose(1, 2)
    times = {}
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                times[name] = bench_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True))
        except RuntimeError as err:  # backend not available for this shape / build
            print(f"  {name}: unavailable ({str(err).splitlines()[0]})")
    return times
