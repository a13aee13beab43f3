"""What the checks of the public `triton_impl.block_sparse_attention` cost, next to the bare kernel launch (GPU).

    python -m repro.bench_public_call [--lengths 16384 65536 262144] [--densities 0.12 0.035 0.10] [--out-dir DIR]

Four ways to run the same attention on the same random block lists (standard shape: bf16, B=1, Hq=32, Hkv=4,
D=128, Bs=128; masks from `repro.masks.controlled_mask`, forced blocks included), timed interleaved in one process
(triton.testing.do_bench, median), operator only:

    kernel          launch_attention, no checks at all (what flash_prefill runs)
    default         block_sparse_attention(...): shape/dtype/device checks on the host, lists trusted
    validate        block_sparse_attention(..., validate=True): plus the one-kernel list check and its one host
                    synchronisation
    checked_torch   the list check before this option existed (reference.validation.check_block_lists: several
                    passes over the lists, one host synchronisation each), then the kernel

Each row gives ms and the overhead over `kernel` in percent. A host synchronisation makes the next call wait for
the GPU to drain, so do_bench sees it as GPU idle time: what a caller sees. Writes public_call.csv and .md into
the run folder (repro/runs/<date>-<gpu>/public_call/), or --out-dir.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from reference.validation import check_block_lists as torch_check_block_lists
from repro.common import environment_stamp, markdown_table, run_dir, stamp_line, write_long_csv
from repro.masks import controlled_mask
from repro.timing import bench_ms

VARIANTS = ("kernel", "default", "validate", "checked_torch")


def calls(q, k, v, counts, indices, scale):
    import triton_impl
    from triton_impl.attention import PHYSICAL, launch_attention

    def checked_torch():
        torch_check_block_lists(counts, indices)
        return launch_attention(q, k, v, 128, scale, PHYSICAL, counts=counts, indices=indices)

    return {
        "kernel": lambda: launch_attention(q, k, v, 128, scale, PHYSICAL, counts=counts, indices=indices),
        "default": lambda: triton_impl.block_sparse_attention(q, k, v, counts, indices),
        "validate": lambda: triton_impl.block_sparse_attention(q, k, v, counts, indices, validate=True),
        "checked_torch": checked_torch,
    }


def run(lengths, densities, rounds: int, seed: int = 0) -> list[dict]:
    import reference

    rows = []
    B, Hq, Hkv, D = 1, 32, 4, 128
    for L, target in zip(lengths, densities):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        q, k, v = (torch.randn(B, L, H, D, generator=gen, device="cuda", dtype=torch.bfloat16)
                   for H in (Hq, Hkv, Hkv))
        M = L // 128
        mask = controlled_mask(B, Hq, M, target, seed)
        counts, indices = reference.compact_blocks(mask)
        density = float(counts.sum()) / (B * Hq * M * (M + 1) / 2)
        fns = calls(q, k, v, counts, indices, D ** -0.5)
        outs = {name: fn() for name, fn in fns.items()}
        for name, out in outs.items():  # the same kernel on the same lists: the same output to the bit
            assert torch.equal(out, outs["kernel"]), f"{name} differs from the bare kernel at L={L}"
        times = {name: [] for name in fns}
        for _ in range(rounds):  # interleaved: the lent GPU's speed drifts between runs
            for name, fn in fns.items():
                times[name].append(bench_ms(fn))
        kernel_ms = sorted(times["kernel"])[rounds // 2]
        for name in fns:
            ms = sorted(times[name])[rounds // 2]
            rows.append(dict(what=name, L=L, density=round(density, 4), ms=round(ms, 4),
                             overhead_pct=round(100 * (ms / kernel_ms - 1), 1), rounds=rounds))
        print(", ".join(f"{r['what']} {r['ms']:.3f} ms ({r['overhead_pct']:+.1f}%)" for r in rows[-len(fns):]),
              f"at L={L}, density {density:.3f}", flush=True)
        del q, k, v, mask, counts, indices, outs
        torch.cuda.empty_cache()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536, 65536, 262144])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.12, 0.035, 0.10, 0.035])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_public_call needs a CUDA GPU")
    if len(args.lengths) != len(args.densities):
        parser.error("--lengths and --densities must have the same number of values")
    out_dir = args.out_dir or run_dir("public_call")
    stamp = environment_stamp("cuda")
    rows = run(args.lengths, args.densities, args.rounds)
    write_long_csv(out_dir / "public_call.csv", rows, stamp)
    table = markdown_table(["L", "density", *VARIANTS],
                           [[r["L"], r["density"], *(f"{x['ms']:.3f} ms ({x['overhead_pct']:+.1f}%)"
                                                     for x in rows[i:i + len(VARIANTS)])]
                            for i, r in enumerate(rows) if i % len(VARIANTS) == 0])
    (out_dir / "public_call.md").write_text(
        "# Cost of the public block_sparse_attention's checks (operator only, random block lists, synthetic)\n\n"
        f"{stamp_line(stamp)}\n\nms (overhead over the bare kernel launch), median of {args.rounds} interleaved "
        f"rounds of triton.testing.do_bench; bf16, B=1, Hq=32, Hkv=4, D=128, Bs=128.\n\n{table}\n")
    print(f"wrote {out_dir}/public_call.csv and .md")


if __name__ == "__main__":
    main()
