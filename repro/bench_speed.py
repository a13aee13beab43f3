"""GPU operator timings: FlashPrefill's Triton kernels against dense attention.

    python -m repro.bench_speed [--lengths 4096 16384 ...] [--densities 0.035 0.1 0.3] [--out-dir DIR]

Dense baselines, in the same run: torch SDPA with the FLASH_ATTENTION backend (FlashAttention-2, the paper's
baseline) and with the CUDNN_ATTENTION backend (the fastest dense kernel on an H200), plus our own dense
Triton kernel. Standard shape (docs/DESIGN.md section 5): bf16, B=1, Hq=32, Hkv=4, D=128, causal.

Two modes, one long-format CSV row per measurement (`what`, L, density, ms, ... and the environment stamp):

* controlled  operator only: `block_sparse_attention` (physical skip) and `block_sparse_attention_logical`
              (logical skip) on fixed random block masks that contain the forced blocks (sinks, window, dense
              last rows) and random other causal blocks; `density` is the realised density of the mask.
* pipeline    `flash_prefill` end to end (selection included) on synthetic planted-pattern inputs
              (reference.synthetic.planted_qkv) at the density its own selection produces, and every selection
              stage (pool, score, select + compact) timed alone. Also: the selection's peak memory
              (`selection_peak_mib`: peak allocation beyond q, k, v and the output), the host time to enqueue
              one call (`flash_prefill_host`, CPU only) and, up to --max-graph-length, the same call replayed
              from a CUDA graph (`flash_prefill_cuda_graph`: no Python or launch overhead).
              `flash_prefill_at_target`: the whole call again, with alpha chosen by bisection so that its own
              selection keeps --pipeline-densities of the causal blocks (the paper's 3.5% at 256K), where the
              forced blocks leave room for it; `alpha` and the realised density are in the row.

Times are medians of triton.testing.do_bench (CUDA events, after warm-up). Writes <tag>.csv and <tag>.md into
--out-dir (default: the run folder repro/runs/<date>-<gpu>/speed/; the committed H200 results are in
repro/results/speed/); `python -m repro.plot_speed --csv <out-dir>/<tag>.csv` draws the figures.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from repro.common import device_slug, environment_stamp, markdown_table, run_dir, stamp_line, write_long_csv
from repro.masks import alpha_for_density, controlled_mask
from repro.paper import PAPER_DENSITY_256K
from repro.timing import bench_ms, dense_baselines, graphed, host_enqueue_ms

DEFAULT_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072, 262144)
DEFAULT_DENSITIES = (PAPER_DENSITY_256K["FlashPrefill"], 0.1, 0.3)  # the paper's 3.5% at 256K, then denser


# --------------------------------------------------------------------------------------------------------------
# Measurement: one row per timing, per length
# --------------------------------------------------------------------------------------------------------------
def run(lengths, densities, head_dim, q_heads, kv_heads, modes, alpha, seed, max_dense_length, max_graph_length,
        pipeline_densities=()):
    from reference.synthetic import planted_qkv

    rows = []
    base = dict(B=1, Hq=q_heads, Hkv=kv_heads, D=head_dim, dtype="bfloat16", block_size=128)
    for L in tqdm(lengths, desc="lengths"):
        M = -(-L // 128)
        q, k, v = planted_qkv(1, L, q_heads, kv_heads, head_dim, seed=seed, dtype=torch.bfloat16, device="cuda")
        add = lambda what, ms, **kw: rows.append(dict(base, what=what, L=L, ms=ms, **kw))  # noqa: E731
        if L <= max_dense_length:
            time_dense(add, q, k, v)
        if "controlled" in modes:
            time_controlled(add, q, k, v, M, densities, seed)
        if "pipeline" in modes:
            time_pipeline(add, q, k, v, L, alpha, pipeline_densities, max_graph_length)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def time_dense(add, q, k, v) -> None:
    """The dense baselines (SDPA FA2, cuDNN) and our dense Triton kernel."""
    import triton_impl

    for name, ms in dense_baselines(q, k, v).items():
        add(name, ms, density=1.0, scope="operator", input="synthetic")
    add("triton_dense", bench_ms(lambda: triton_impl.dense_attention(q, k, v)), density=1.0,
        scope="operator", input="synthetic")


def time_controlled(add, q, k, v, M, densities, seed) -> None:
    """Controlled mode: the physical and logical skip alone on random block masks at each target density."""
    import triton_impl
    from triton_impl.attention import PHYSICAL, launch_attention

    q_heads, head_dim = q.shape[2], q.shape[3]
    for target in densities:
        mask = controlled_mask(1, q_heads, M, target, seed)
        counts, indices = triton_impl.compact_blocks(mask)
        density = float(triton_impl.causal_block_density(counts))
        scale = head_dim ** -0.5
        add("physical", bench_ms(lambda: launch_attention(q, k, v, 128, scale, PHYSICAL, counts=counts,
                                                 indices=indices)),
            density=density, target_density=target, scope="operator", input="synthetic, random mask")
        add("logical", bench_ms(lambda: triton_impl.block_sparse_attention_logical(q, k, v, mask, 128)),
            density=density, target_density=target, scope="operator", input="synthetic, random mask")
        del mask, counts, indices


def time_pipeline(add, q, k, v, L, alpha, pipeline_densities, max_graph_length) -> None:
    """Pipeline mode: every selection stage alone, flash_prefill at target densities, then the whole call (peak
    memory, GPU time, host enqueue time, CUDA graph replay)."""
    import triton_impl
    from triton_impl.selection import select_and_compact

    _, stats = triton_impl.flash_prefill(q, k, v, alpha=alpha, return_stats=True)
    density = float(stats.density)
    kbar = triton_impl.mean_pool_keys(k, 128)
    scores = triton_impl.block_scores(q, kbar, 128)
    stages = {
        "pool": lambda: triton_impl.mean_pool_keys(k, 128),
        "score": lambda: triton_impl.block_scores(q, kbar, 128),
        "select_compact": lambda: select_and_compact(scores, alpha),
        "selection_total": lambda: select_and_compact(
            triton_impl.block_scores(q, triton_impl.mean_pool_keys(k, 128), 128), alpha),
    }
    for name, fn in stages.items():
        add(name, bench_ms(fn), density=density, alpha=alpha, scope="selection", input="synthetic")
    for target in pipeline_densities:
        found = alpha_for_density(scores, target)
        if found is None:
            continue
        target_alpha, rho = found
        add("flash_prefill_at_target", bench_ms(lambda: triton_impl.flash_prefill(q, k, v, alpha=target_alpha)),
            density=rho, target_density=target, alpha=round(target_alpha, 5),
            scope="operator + selection, alpha chosen for the target density", input="synthetic")
    del scores, stats
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = triton_impl.flash_prefill(q, k, v, alpha=alpha)
    torch.cuda.synchronize()
    peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20  # beyond q, k, v: selection + output
    selection_mb = peak_mb - out.numel() * out.element_size() / 2**20
    del out
    ms = bench_ms(lambda: triton_impl.flash_prefill(q, k, v, alpha=alpha))
    add("flash_prefill", ms, density=density, alpha=alpha, scope="operator + selection", input="synthetic",
        extra_peak_mib=round(peak_mb, 1), selection_peak_mib=round(selection_mb, 1))
    add("flash_prefill_host", host_enqueue_ms(lambda: triton_impl.flash_prefill(q, k, v, alpha=alpha)),
        density=density, alpha=alpha, scope="host enqueue (CPU time per call)", input="synthetic")
    if L <= max_graph_length:
        add("flash_prefill_cuda_graph", bench_ms(graphed(lambda: triton_impl.flash_prefill(q, k, v,
                                                                                           alpha=alpha))),
            density=density, alpha=alpha, scope="operator + selection, CUDA graph replay",
            input="synthetic")


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------
def summary_table(rows) -> str:
    lengths = sorted({r["L"] for r in rows})
    whats = []
    for r in rows:
        key = (r["what"], r.get("target_density"))
        if key not in whats:
            whats.append(key)
    table = []
    for what, target in whats:
        cells = []
        for L in lengths:
            hit = [r for r in rows if r["L"] == L and r["what"] == what and r.get("target_density") == target]
            cells.append(f"{hit[0]['ms']:.3f} ({hit[0]['density']:.1%})" if hit else "-")
        label = what if target is None else f"{what} @ target {target:.1%}"
        table.append([label] + cells)
    return markdown_table(["ms (realised density)"] + [f"{L // 1024}K" for L in lengths], table)


def markdown(table: str, stamp, args) -> str:
    """<tag>.md: the summary table with the shape, the modes and the environment stamp."""
    return (f"# Operator timings ({stamp['device_name']})\n\nbf16, B=1, Hq={args.q_heads}, Hkv={args.kv_heads}, "
            f"D={args.head_dim}, causal, Bs=128; synthetic inputs. `physical`/`logical`: operator only on random "
            f"block masks with the forced blocks; `flash_prefill`: selection included, alpha={args.alpha}.\n\n"
            f"{table}\n\n{stamp_line(stamp)}\n")


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------
def default_tag(device_name: str) -> str:
    """"NVIDIA H200" -> "speed_h200": results of different GPUs never overwrite each other."""
    return "speed_" + device_slug(device_name)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS))
    parser.add_argument("--densities", type=float, nargs="+", default=list(DEFAULT_DENSITIES))
    parser.add_argument("--modes", nargs="+", default=["controlled", "pipeline"], choices=["controlled", "pipeline"])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.12)
    parser.add_argument("--pipeline-densities", type=float, nargs="*", default=[PAPER_DENSITY_256K["FlashPrefill"]],
                        help="pipeline mode: also time flash_prefill with alpha chosen to keep these densities")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-dense-length", type=int, default=262144,
                        help="skip the dense baselines above this length (FA2 takes ~30 s a call at 1M)")
    parser.add_argument("--max-graph-length", type=int, default=32768,
                        help="also time flash_prefill replayed from a CUDA graph up to this length")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="(default: the run folder repro/runs/<date>-<gpu>/speed/)")
    parser.add_argument("--tag", default=None,
                        help="file name stem of the CSV / markdown (default: speed_<gpu>, e.g. speed_h200)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_speed needs a CUDA GPU; the committed results are in repro/results/speed/")
    args.out_dir = args.out_dir or run_dir("speed", "cuda")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = environment_stamp("cuda")
    args.tag = args.tag or default_tag(stamp["device_name"])
    rows = run(args.lengths, args.densities, args.head_dim, args.q_heads, args.kv_heads, args.modes, args.alpha,
               args.seed, args.max_dense_length, args.max_graph_length, args.pipeline_densities)
    csv_path = write_long_csv(args.out_dir / f"{args.tag}.csv", rows, stamp)
    table = summary_table(rows)
    (args.out_dir / f"{args.tag}.md").write_text(markdown(table, stamp, args))
    print(table)
    print(f"wrote {csv_path}")


if __name__ == "__main__":
    main()
