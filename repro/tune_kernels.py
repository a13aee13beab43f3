"""Launch-configuration sweep for the score and attention kernels on a GPU (results feed repro/NOTES.md).

    python -m repro.tune_kernels [--length 65536] [--out-dir DIR]
    python -m repro.tune_kernels --diagnose        # per-block cost of the list walk, L2 sharing, index prefetch
    python -m repro.tune_kernels --kv-loads        # K/V loads: TMA descriptors vs pointers, tiles, stages
    python -m repro.tune_kernels --short-rows [--lengths 16384 65536 262144]   # tiles, warps, stages, interleaved
    python -m repro.tune_kernels --scores [--lengths 65536 262144]  # the fused score + select kernel, interleaved

Standard shape (bf16, B=1, Hq=32, Hkv=4, D=128, Bs=128), synthetic planted-pattern inputs. Every configuration's
output is compared with the default configuration's before it is timed, so a fast-but-wrong variant is flagged.
Writes a long-format CSV (`what`, config, ms, max_diff) into --out-dir (default: the run folder
repro/runs/<date>-<gpu>/kernel_tuning/; the committed H200 sweeps are in repro/results/kernel_tuning/) and prints
the best configurations.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
import triton
import triton.language as tl

from repro.common import environment_stamp, read_long_csv, run_dir, write_long_csv
from repro.masks import controlled_mask, full_causal_mask, group_shared_mask
from repro.timing import bench_ms, dense_baselines
from triton_impl.attention import ATTENTION_CONFIG, _load_kv_tile, kv_descriptor


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="(default: the run folder repro/runs/<date>-<gpu>/kernel_tuning/)")
    parser.add_argument("--diagnose", action="store_true",
                        help="only the physical-vs-dense per-block diagnosis, not the full sweep")
    parser.add_argument("--kv-loads", action="store_true",
                        help="only the K/V load sweep (TMA descriptors vs pointer loads, key tile, stages)")
    parser.add_argument("--short-rows", action="store_true",
                        help="only the per-block cost of short rows: query tile, key tile, warps, stages at 3.5%% "
                             "and 10%%, interleaved, against cuDNN per block (issue 14's per-block gap), and a fit "
                             "of the cost per kept block and per program on banded lists")
    parser.add_argument("--scores", action="store_true",
                        help="only the score + select kernel of flash_prefill: SCORE_CONFIGS (tiles, warps, stages) "
                             "interleaved, against its MMA floor on an H200 (790 TFLOP/s)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536, 262144],
                        help="lengths of --short-rows and --scores (default 16384 65536 262144)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of --short-rows (median)")
    parser.add_argument("--configs", type=int, nargs="+", default=None,
                        help="--short-rows: only these entries of SHORT_ROW_CONFIGS (0: the default; default all)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():  # every mode times native kernels; the interpreter's times would mean nothing
        raise SystemExit("repro.tune_kernels needs a CUDA GPU")
    args.out_dir = args.out_dir or run_dir("kernel_tuning")
    if args.diagnose:
        return diagnose(args)
    if args.kv_loads:
        return kv_loads(args)
    if args.short_rows:
        return short_rows(args)
    if args.scores:
        return scores(args)
    return sweep(args)


def sweep(args):
    """The launch-configuration sweep: the score kernel's tiles, warps and stages, then the attention kernel's on
    random block lists at 3.5% and 30% and in DENSE mode; prints the four best configurations of each."""
    import triton_impl
    from reference.synthetic import planted_qkv
    from triton_impl.attention import DENSE, PHYSICAL, launch_attention

    L, Hq, Hkv, D = args.length, 32, 4, 128
    M = L // 128
    q, k, v = planted_qkv(1, L, Hq, Hkv, D, seed=0, dtype=torch.bfloat16, device="cuda")
    rows = []

    kbar = triton_impl.mean_pool_keys(k, 128)
    base_scores = triton_impl.block_scores(q, kbar, 128)
    for block_n, warps, stages in itertools.product([32, 64, 128], [4, 8], [1, 2, 3]):
        cfg = dict(BLOCK_N=block_n, num_warps=warps, num_stages=stages)
        fn = lambda: triton_impl.block_scores(q, kbar, 128, _config=cfg)  # noqa: E731
        try:
            diff = (fn() - base_scores).abs().max().item()
            ms = bench_ms(fn)
        except Exception as err:  # e.g. out of shared memory for this configuration
            print(f"score {cfg}: failed ({type(err).__name__}: {str(err).splitlines()[0][:100]})")
            continue
        rows.append(dict(what="score", L=L, config=str(cfg), ms=ms, max_diff=diff))
        print(rows[-1], flush=True)

    scale = D ** -0.5
    workloads = {}
    for target in (0.035, 0.3):
        counts, indices = triton_impl.compact_blocks(controlled_mask(1, Hq, M, target, seed=1))
        workloads[f"physical@{target:.1%}"] = dict(mode=PHYSICAL, counts=counts, indices=indices)
    workloads["dense"] = dict(mode=DENSE)
    reference_out = {name: launch_attention(q, k, v, 128, scale, w["mode"], counts=w.get("counts"),
                                            indices=w.get("indices"))
                     for name, w in workloads.items()}
    # Heads-fastest program order won clearly in the first sweep (repro/NOTES.md); it is no longer swept.
    for block_m, block_n, warps, stages in itertools.product([64, 128], [64, 128], [4, 8], [2, 3]):
        cfg = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
        for name, w in workloads.items():
            fn = lambda: launch_attention(q, k, v, 128, scale, w["mode"], counts=w.get("counts"),  # noqa: E731
                                 indices=w.get("indices"), config=cfg)
            try:
                diff = (fn().float() - reference_out[name].float()).abs().max().item()
                ms = bench_ms(fn)
            except Exception as err:  # e.g. out of shared memory / registers for this configuration
                print(f"{name} {cfg}: failed ({type(err).__name__}: {str(err).splitlines()[0][:100]})")
                continue
            rows.append(dict(what=name, L=L, config=str(cfg), ms=ms, max_diff=diff))
            print(rows[-1], flush=True)

    write_long_csv(args.out_dir / f"tune_L{L}.csv", rows, environment_stamp("cuda"))
    for what in dict.fromkeys(r["what"] for r in rows):
        best = sorted((r for r in rows if r["what"] == what), key=lambda r: r["ms"])[:4]
        print(f"\n{what}: best")
        for r in best:
            print(f"  {r['ms']:.3f} ms  max_diff {r['max_diff']:.2g}  {r['config']}")


def diagnose(args):
    """Why does the physical walk cost more per block than the dense walk? Separate three effects at one length:
    the list walk itself (a full causal list vs DENSE mode), L2 locality (the heads of a GQA group sharing one
    random mask vs independent masks), and the dependent index load (PREFETCH_INDEX on/off)."""
    import triton_impl
    from reference.synthetic import planted_qkv
    from triton_impl.attention import DENSE, PHYSICAL, launch_attention

    L, Hq, Hkv, D = args.length, 32, 4, 128
    M, scale = L // 128, D ** -0.5
    q, k, v = planted_qkv(1, L, Hq, Hkv, D, seed=0, dtype=torch.bfloat16, device="cuda")
    full = full_causal_mask(Hq, M)
    independent = controlled_mask(1, Hq, M, 0.3, seed=1)
    shared = group_shared_mask(Hq, Hkv, M, 0.3, seed=1)
    lists = {name: triton_impl.compact_blocks(m.contiguous()) for name, m in
             (("full list", full), ("30% independent", independent), ("30% group-shared", shared))}
    rows = [dict(what="dense mode", L=L, ms=bench_ms(lambda: launch_attention(q, k, v, 128, scale, DENSE)),
                 blocks=M * (M + 1) // 2 * Hq)]
    for name, (counts, indices) in lists.items():
        for prefetch in (False, True):
            cfg = dict(prefetch_index=prefetch)
            fn = lambda: launch_attention(q, k, v, 128, scale, PHYSICAL, counts=counts, indices=indices,  # noqa
                                          config=cfg)
            rows.append(dict(what=f"physical, {name}", prefetch_index=prefetch, L=L, ms=bench_ms(fn),
                             blocks=int(counts.sum())))
    for r in rows:
        r["ns_per_block"] = r["ms"] * 1e6 / r["blocks"]
        print(f"{r['what']:<34} prefetch={r.get('prefetch_index', '-')!s:<5} {r['ms']:8.3f} ms "
              f"{r['ns_per_block']:6.2f} ns/block", flush=True)
    write_long_csv(args.out_dir / f"diagnose_L{L}.csv", rows, environment_stamp("cuda"))


KV_LOAD_CONFIGS = (  # the first is the reference: every other configuration's output is compared with its
    dict(kv_descriptors=False, prefetch_index=True, BLOCK_N=128, num_stages=3),
    dict(kv_descriptors=True, prefetch_index=True, BLOCK_N=128, num_stages=3),
    dict(kv_descriptors=True, prefetch_index=False, BLOCK_N=128, num_stages=3),
    dict(kv_descriptors=True, prefetch_index=True, BLOCK_N=128, num_stages=2),
    dict(kv_descriptors=True, prefetch_index=False, BLOCK_N=64, num_stages=5),
)


@triton.jit
def _gather_kv_kernel(K, V, OUT, COUNTS, INDICES, stride_kl, stride_vl, stride_kh, stride_vh, stride_lh, stride_lm,
                      HQ, GROUP, M, L, BLOCK_SIZE: tl.constexpr, D: tl.constexpr, KV_DESCRIPTORS: tl.constexpr):
    """The memory floor of the physical walk (B = 1): the same programs, in the same order, fetch the same K/V
    tiles as the attention kernel, with the same loads, and only add them up (no attention arithmetic)."""
    h = tl.program_id(0)
    I = tl.num_programs(1) - 1 - tl.program_id(1)
    kv_col = (h // GROUP) * D
    if not KV_DESCRIPTORS:
        K = K + (h // GROUP) * stride_kh
        V = V + (h // GROUP) * stride_vh
    row = h * stride_lh + I * stride_lm
    count = tl.load(COUNTS + h * M + I)
    acc = tl.zeros([BLOCK_SIZE, D], dtype=tl.float32)
    J = tl.load(INDICES + row, mask=count > 0, other=0)
    for t in range(0, count):
        J_next = tl.load(INDICES + row + t + 1, mask=t + 1 < count, other=0)
        k, v = _load_kv_tile(K, V, 0, kv_col, J * BLOCK_SIZE, stride_kl, stride_vl, L, BLOCK_SIZE, D, False,
                             KV_DESCRIPTORS)
        acc += k.to(tl.float32) + v.to(tl.float32)
        J = J_next
    tl.store(OUT + h * M + I, tl.sum(acc))


def gather_kv_ms(k, v, counts, indices, kv_descriptors: bool, Hq: int) -> float:
    """Time of _gather_kv_kernel over these lists (B = 1, 128-token blocks, 3 pipeline stages)."""
    M = counts.shape[-1]
    out = torch.empty(Hq, M, device=k.device)
    kv = (kv_descriptor(k, 128), kv_descriptor(v, 128)) if kv_descriptors else (k, v)
    fn = lambda: _gather_kv_kernel[(Hq, M)](  # noqa: E731
        *kv, out, counts, indices, k.stride(1), v.stride(1), k.stride(2), v.stride(2), indices.stride(1),
        indices.stride(2), Hq, Hq // k.shape[2], M, k.shape[1], BLOCK_SIZE=128, D=k.shape[3],
        KV_DESCRIPTORS=kv_descriptors, num_warps=8, num_stages=3)
    return bench_ms(fn)


def kv_loads(args):
    """K/V tiles fetched by TMA (tensor descriptors) or by per-thread pointer loads, with the key tile and the
    pipeline depth, on the workloads of `diagnose` plus the paper's 3.5% and 10%. Reports ns per block-head and
    the ratio to cuDNN dense per block-head (the issue-4 goal is <= 1.15). Above 128K only the sparse
    workloads run (the dense ones take over a second a call)."""
    import triton_impl
    from reference.synthetic import planted_qkv
    from triton_impl.attention import DENSE, PHYSICAL, launch_attention

    L, Hq, Hkv, D = args.length, 32, 4, 128
    M, scale = L // 128, D ** -0.5
    q, k, v = planted_qkv(1, L, Hq, Hkv, D, seed=0, dtype=torch.bfloat16, device="cuda")
    causal_block_heads = M * (M + 1) // 2 * Hq
    cudnn_ms = dense_baselines(q, k, v)["sdpa_cudnn"]
    cudnn_ns = cudnn_ms * 1e6 / causal_block_heads
    print(f"L={L}: cuDNN dense {cudnn_ms:.2f} ms = {cudnn_ns:.2f} ns per causal block-head", flush=True)
    masks = {f"{t:.1%} independent": controlled_mask(1, Hq, M, t, seed=1) for t in (0.035, 0.1, 0.3)}
    masks["3.5% group-shared"] = group_shared_mask(Hq, Hkv, M, 0.035, seed=1)
    if L <= 131072:
        masks["full list"] = full_causal_mask(Hq, M)
        masks["30% group-shared"] = group_shared_mask(Hq, Hkv, M, 0.3, seed=1)
    workloads = {name: dict(mode=PHYSICAL, lists=triton_impl.compact_blocks(m.contiguous()))
                 for name, m in masks.items()}
    if L <= 131072:
        workloads["dense mode"] = dict(mode=DENSE, lists=(None, None))
    rows = [dict(what="cudnn dense", L=L, ms=cudnn_ms, blocks=causal_block_heads, ns_per_block=cudnn_ns)]
    copy_ms = bench_ms(lambda: torch.add(k, v))  # reads K and V once, writes one of them: HBM streaming rate
    rows.append(dict(what="stream k + v", L=L, ms=copy_ms, tb_per_s=3 * k.nbytes / copy_ms / 1e9))
    print(f"stream k + v: {copy_ms:.3f} ms = {rows[-1]['tb_per_s']:.2f} TB/s", flush=True)
    for name, w in workloads.items():
        counts, indices = w["lists"]
        if counts is None:
            continue
        blocks = int(counts.sum())
        for tma in (False, True):
            ms = gather_kv_ms(k, v, counts, indices, tma, Hq)
            rows.append(dict(what=f"gather only, {name}", L=L, config=str(dict(kv_descriptors=tma)), ms=ms,
                             blocks=blocks, ns_per_block=ms * 1e6 / blocks, ratio_to_cudnn=ms * 1e6 / blocks / cudnn_ns,
                             tb_per_s=blocks * 2 * 128 * D * k.element_size() / ms / 1e9))
            print(f"gather only {name:<18} tma={tma!s:<5} {ms:9.3f} ms {rows[-1]['ns_per_block']:6.2f} ns/block "
                  f"{rows[-1]['tb_per_s']:.2f} TB/s if every tile came from HBM", flush=True)
    for name, w in workloads.items():
        counts, indices = w["lists"]
        blocks = int(counts.sum()) if counts is not None else causal_block_heads
        baseline = None
        for cfg in KV_LOAD_CONFIGS:
            fn = lambda: launch_attention(q, k, v, 128, scale, w["mode"], counts=counts, indices=indices,  # noqa: E731
                                 config=cfg)
            try:
                out = fn().float()
                baseline = out if baseline is None else baseline
                diff = (out - baseline).abs().max().item()
                ms = bench_ms(fn)
            except Exception as err:  # e.g. out of shared memory for this configuration
                print(f"{name} {cfg}: failed ({type(err).__name__}: {str(err).splitlines()[0][:100]})")
                continue
            ns = ms * 1e6 / blocks
            rows.append(dict(what=name, L=L, config=str(cfg), ms=ms, blocks=blocks, ns_per_block=ns,
                             ratio_to_cudnn=ns / cudnn_ns, max_diff=diff))
            print(f"{name:<18} {ms:9.3f} ms {ns:6.2f} ns/block x{ns / cudnn_ns:.3f} cuDNN  diff {diff:.2g}  {cfg}",
                  flush=True)
    counts, _ = triton_impl.select_and_compact(triton_impl.block_scores(q, triton_impl.mean_pool_keys(k)))
    default = ATTENTION_CONFIG["kv_descriptors"]
    try:
        for tma in (False, True):  # the whole call on planted inputs, at the density its own selection produces
            ATTENTION_CONFIG["kv_descriptors"] = tma
            ms = bench_ms(lambda: triton_impl.flash_prefill(q, k, v))
            rows.append(dict(what="flash_prefill, planted", L=L, config=str(dict(kv_descriptors=tma)), ms=ms,
                             density=int(counts.sum()) / causal_block_heads))
            print(f"flash_prefill planted density {rows[-1]['density']:.1%} tma={tma}: {ms:.2f} ms", flush=True)
    finally:
        ATTENTION_CONFIG["kv_descriptors"] = default
    write_long_csv(args.out_dir / f"kv_loads_L{L}.csv", rows, environment_stamp("cuda"))


# 1 stage with BLOCK_M 64: 16 KiB of Q + 64 KiB of K/V, so two programs share an SM and one's start-up (Q, count,
# first K/V) runs under the other's loop. A key tile smaller than the block does not save shared memory: the
# loop walks blocks, so a stage holds Bs / BLOCK_N tiles.
SHORT_ROW_CONFIGS = (  # the first is the default and the reference for the outputs
    dict(),
    dict(num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=1),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
)


def short_rows(args):
    """Per kept block against cuDNN's dense time per causal block, for every SHORT_ROW_CONFIGS entry, at 3.5% and
    10% (independent random lists), each length's configurations timed round-robin (--repeats rounds, median)."""
    import statistics

    import triton_impl
    from reference.synthetic import planted_qkv
    from repro.timing import interleaved
    from triton_impl.attention import PHYSICAL, launch_attention

    Hq, Hkv, D = 32, 4, 128
    rows = []
    for L in args.lengths:
        M, scale = L // 128, D ** -0.5
        q, k, v = planted_qkv(1, L, Hq, Hkv, D, seed=0, dtype=torch.bfloat16, device="cuda")
        cudnn_ns = dense_baselines(q, k, v)["sdpa_cudnn"] * 1e6 / (M * (M + 1) // 2 * Hq)
        for target in (0.035, 0.1):
            counts, indices = triton_impl.compact_blocks(controlled_mask(1, Hq, M, target, seed=1))
            blocks = int(counts.sum())
            calls, diffs, reference = {}, {}, None
            for cfg in [SHORT_ROW_CONFIGS[i] for i in args.configs or range(len(SHORT_ROW_CONFIGS))]:
                fn = lambda cfg=cfg: launch_attention(q, k, v, 128, scale, PHYSICAL, counts=counts,  # noqa: E731
                                                      indices=indices, config=cfg)
                try:
                    out = fn().float()
                except Exception as err:  # e.g. out of shared memory for this configuration
                    print(f"L={L} {target:.1%} {cfg}: failed ({type(err).__name__}: {str(err).splitlines()[0][:100]})")
                    continue
                reference = out if reference is None else reference
                name = str(cfg or "default")
                calls[name], diffs[name] = fn, (out - reference).abs().max().item()
            for name, ms in interleaved(calls, args.repeats, bench_ms).items():
                ns = statistics.median(ms) * 1e6 / blocks
                rows.append(dict(what=f"{target:.1%} independent", L=L, config=name, ms=statistics.median(ms),
                                 spread=max(ms) - min(ms), blocks=blocks, ns_per_block=ns,
                                 ratio_to_cudnn=ns / cudnn_ns, max_diff=diffs[name]))
                print(f"L={L:<7} {target:5.1%} {rows[-1]['ms']:9.3f} ms x{ns / cudnn_ns:.3f} cuDNN per block  "
                      f"diff {diffs[name]:.2g}  {name}", flush=True)
        rows += row_length_fit(q, k, v, L, cudnn_ns) if L <= 65536 else []
        del q, k, v
    path = write_long_csv(args.out_dir / "short_rows.csv", rows, environment_stamp("cuda"))
    if any(r["what"].startswith("fit") for r in rows):
        from repro.plot_short_rows import plot

        print(f"wrote {plot(read_long_csv(path), path.with_suffix('.png'))}")


def row_length_fit(q, k, v, L: int, cudnn_ns: float, widths=(1, 2, 4, 8, 16, 32)) -> list[dict]:
    """The default kernel on banded lists (every row keeps its `width` blocks ending at the diagonal: contiguous,
    shared by all heads, so L2-friendly), then a least-squares fit ms = per_block x blocks + per_program x programs
    (one program per query block and head): what a kept block costs in the loop, and what a program's start-up and
    epilogue cost beyond it (the short-row overhead), both in ns of the whole GPU."""
    import triton_impl
    from triton_impl.attention import PHYSICAL, launch_attention

    B, _, Hq, D = q.shape
    M = L // 128
    I, J = torch.arange(M, device=q.device)[:, None], torch.arange(M, device=q.device)[None, :]
    rows, fit = [], []
    for width in widths:
        band = ((J <= I) & (J > I - width)).expand(B, Hq, M, M)
        counts, indices = triton_impl.compact_blocks(band.contiguous())
        blocks, programs = int(counts.sum()), B * Hq * M
        ms = bench_ms(lambda: launch_attention(q, k, v, 128, D ** -0.5, PHYSICAL, counts=counts,  # noqa: E731
                                               indices=indices))
        fit.append((blocks, programs, ms))
        rows.append(dict(what=f"band of {width}", L=L, config="default", ms=ms, blocks=blocks,
                         ns_per_block=ms * 1e6 / blocks, ratio_to_cudnn=ms * 1e6 / blocks / cudnn_ns))
        print(f"L={L:<7} band of {width:<3} {ms:9.3f} ms {rows[-1]['ns_per_block']:6.2f} ns per block", flush=True)
    design = torch.tensor([[b, p] for b, p, _ in fit], dtype=torch.float64)
    per_block, per_program = torch.linalg.lstsq(design, torch.tensor([[ms] for *_, ms in fit],
                                                                     dtype=torch.float64)).solution.flatten() * 1e6
    print(f"L={L}: fit {per_block:.2f} ns per kept block-head + {per_program:.2f} ns per program "
          f"(cuDNN dense {cudnn_ns:.2f} ns per block)", flush=True)
    return rows + [dict(what="fit: ns per kept block-head", L=L, config="default", ns_per_block=float(per_block)),
                   dict(what="fit: ns per program", L=L, config="default", ns_per_block=float(per_program))]


SCORE_CONFIGS = (  # merged into SCORE_CONFIG; the first is the reference for the block lists
    dict(sm90=False),  # the Triton kernel
    dict(),  # the default: the Gluon kernel of scoring_sm90.py on an sm_90 GPU from 32K tokens on
    dict(sm90=True),  # the Gluon kernel at every length
    dict(sm90=dict(STAGES=2)),
)
# Measured and not kept (Gluon kernel, repro/results/kernel_tuning/scores_sm90_variants_run*_h200.csv): the next tile's
# dots issued before this tile's reductions, early refill of the hi slot, three ring slots.
# Measured and not kept (Triton kernel): two query heads of a GQA group per program sharing each kbar tile (0c7f409,
# 9-10% slower, repro/results/kernel_tuning/scores_heads_h200.csv); maxnreg 120 / 168 / none, 2 stages, 128-wide
# tiles with 8 warps (scores_maxnreg_h200.csv).


def scores(args):
    """flash_prefill's stages 2-4 in one launch (`launch_scores_and_select`, alpha 0.12, default safety net) for
    every SCORE_CONFIGS entry, timed round-robin (--repeats rounds, median). Lists are compared with the first
    entry's: identical bits where only the stages differ, near-identical elsewhere (another tile width changes the
    order of the row sums, which can move a block at a threshold tie). The MMA floor counts the hi and lo dots of
    every causal (query row, key block) pair at the H200's measured bf16 ceiling (~790 TFLOP/s, repro/NOTES.md)."""
    import statistics

    import triton_impl
    from reference.synthetic import planted_qkv
    from repro.timing import interleaved
    from triton_impl.scoring import launch_scores_and_select, split_kbar

    Hq, Hkv, D = 32, 4, 128
    rows = []
    for L in args.lengths:
        M = L // 128
        q, k, _ = planted_qkv(1, L, Hq, Hkv, D, seed=0, dtype=torch.bfloat16, device="cuda")
        kbar_parts = split_kbar(triton_impl.mean_pool_keys(k, 128), D ** -0.5, q.dtype)
        mma_floor_ms = 2 * 2 * 128 * D * Hq * (M * (M + 1) // 2) / 790e12 * 1e3
        calls, agree, reference = {}, {}, None
        for cfg in SCORE_CONFIGS:
            fn = lambda cfg=cfg: launch_scores_and_select(q, kbar_parts, 128, 0.12, 2, 4, 2,  # noqa: E731
                                                          pad_lists=False, _config=cfg)
            try:
                counts, indices = fn()
            except Exception as err:  # e.g. out of shared memory for this configuration
                print(f"L={L} {cfg}: failed ({type(err).__name__}: {str(err).splitlines()[0][:100]})")
                continue
            listed = torch.arange(M, device="cuda") < counts[..., None]
            out = (counts, indices.where(listed, -1))
            reference = out if reference is None else reference
            name = str(cfg or "default")
            calls[name] = fn
            agree[name] = dict(counts_equal=torch.equal(out[0], reference[0]),
                               lists_equal=torch.equal(out[1], reference[1]),
                               rows_differing=int((out[1] != reference[1]).any(-1).sum()))
        for name, ms in interleaved(calls, args.repeats, bench_ms).items():
            rows.append(dict(what="score+select", L=L, config=name, ms=statistics.median(ms),
                             spread=max(ms) - min(ms), mma_floor_ms=mma_floor_ms,
                             ratio_to_floor=statistics.median(ms) / mma_floor_ms, **agree[name]))
            print(f"L={L:<7} {rows[-1]['ms']:8.3f} ms  x{rows[-1]['ratio_to_floor']:.2f} the H200 MMA floor  "
                  f"lists equal {agree[name]['lists_equal']} ({agree[name]['rows_differing']} rows differ)  {name}",
                  flush=True)
        del q, k
    write_long_csv(args.out_dir / "scores.csv", rows, environment_stamp("cuda"))


if __name__ == "__main__":
    main()
