"""Launch-configuration sweep for the score and attention kernels on a GPU (results feed repro/NOTES.md).

    python -m repro.tune_kernels [--length 65536] [--out-dir DIR]

Standard shape (bf16, B=1, Hq=32, Hkv=4, D=128, Bs=128), synthetic planted-pattern inputs. Every configuration's
output is compared with the default configuration's before it is timed, so a fast-but-wrong variant is flagged.
Writes a long-format CSV (`what`, config, ms, max_diff) and prints the best configurations.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from repro.bench_speed import bench_ms, controlled_mask
from repro.common import RESULTS_DIR, environment_stamp, write_long_csv


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--diagnose", action="store_true",
                        help="only the physical-vs-dense per-block diagnosis, not the full sweep")
    args = parser.parse_args(argv)
    if args.diagnose:
        return diagnose(args)

    import triton_impl
    from reference.synthetic import planted_qkv
    from triton_impl.attention import DENSE, PHYSICAL, _launch

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
    reference_out = {name: _launch(q, k, v, 128, scale, w["mode"], counts=w.get("counts"), indices=w.get("indices"))
                     for name, w in workloads.items()}
    # Heads-fastest program order won clearly in the first sweep (repro/NOTES.md); it is no longer swept.
    for block_m, block_n, warps, stages in itertools.product([64, 128], [64, 128], [4, 8], [2, 3]):
        cfg = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
        for name, w in workloads.items():
            fn = lambda: _launch(q, k, v, 128, scale, w["mode"], counts=w.get("counts"),  # noqa: E731
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
    from triton_impl.attention import DENSE, PHYSICAL, _launch

    L, Hq, Hkv, D = args.length, 32, 4, 128
    M, scale = L // 128, D ** -0.5
    q, k, v = planted_qkv(1, L, Hq, Hkv, D, seed=0, dtype=torch.bfloat16, device="cuda")
    full = torch.ones(M, M, dtype=torch.bool, device="cuda").tril().expand(1, Hq, M, M)
    independent = controlled_mask(1, Hq, M, 0.3, seed=1)
    shared = controlled_mask(1, Hkv, M, 0.3, seed=1).repeat_interleave(Hq // Hkv, dim=1)
    lists = {name: triton_impl.compact_blocks(m.contiguous()) for name, m in
             (("full list", full), ("30% independent", independent), ("30% group-shared", shared))}
    rows = [dict(what="dense mode", L=L, ms=bench_ms(lambda: _launch(q, k, v, 128, scale, DENSE)), blocks=M * (M + 1) // 2 * Hq)]
    for name, (counts, indices) in lists.items():
        for prefetch in (False, True):
            cfg = dict(prefetch_index=prefetch)
            fn = lambda: _launch(q, k, v, 128, scale, PHYSICAL, counts=counts, indices=indices, config=cfg)  # noqa
            rows.append(dict(what=f"physical, {name}", prefetch_index=prefetch, L=L, ms=bench_ms(fn),
                             blocks=int(counts.sum())))
    for r in rows:
        r["ns_per_block"] = r["ms"] * 1e6 / r["blocks"]
        print(f"{r['what']:<34} prefetch={r.get('prefetch_index', '-')!s:<5} {r['ms']:8.3f} ms "
              f"{r['ns_per_block']:6.2f} ns/block", flush=True)
    write_long_csv(args.out_dir / f"diagnose_L{L}.csv", rows, environment_stamp("cuda"))


if __name__ == "__main__":
    main()
