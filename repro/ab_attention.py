"""A/B timing of the attention kernel against other versions of it, interleaved in one process (GPU).

    git archive 7321298 triton_impl | tar -x -C /tmp/before        # any other version of the kernels
    python -m repro.ab_attention --baseline before=/tmp/before [--baseline NAME=DIR ...] [--tag ab_attention]

Why: two benchmark runs on the lent H200 differ by up to ~10% for the same kernel (clocks, L2 state), which is
as large as the changes being judged. Here every version runs on the same inputs and lists, in the same process,
round-robin, `--repeats` times; the median is reported. Each DIR holds a copy of the `triton_impl` package; it is
imported under its own name next to the working tree's. Outputs are compared with the first version's (max abs
difference), so a fast-but-wrong variant shows up.

Workloads (standard shape, bf16, planted synthetic q/k/v): random block masks with the forced blocks at 3.5% and
30%, independent per query head or shared by the heads of a GQA group; the full causal list and the DENSE walk at
lengths up to 64K. Per row: ms, ns per kept block-head, and the ratio to rho x T(cuDNN dense) (issue-4 goal 1).
Writes <tag>.csv into --out-dir (default: the run folder repro/runs/<date>-<gpu>/ab_attention/; the committed A/B
runs are in repro/results/ab_attention/).
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from repro.common import environment_stamp, run_dir, write_long_csv
from repro.masks import controlled_mask, full_causal_mask, group_shared_mask
from repro.timing import bench_ms, dense_baselines


def launcher(attention_module):
    """The unchecked kernel launch of a version of triton_impl.attention (`_launch` before it became public)."""
    return getattr(attention_module, "launch_attention", None) or attention_module._launch


def load_versions(baselines: list[str]) -> dict:
    """{name: attention module}: the named copies first, then the working tree's as "working tree"."""
    versions = {}
    staging = Path(tempfile.mkdtemp(prefix="ab_attention_"))
    sys.path.insert(0, str(staging))
    for i, spec in enumerate(baselines):
        name, sep, directory = spec.partition("=")
        source = Path(directory) / "triton_impl"
        if not (sep and name and directory) or not (source / "attention.py").exists():
            raise SystemExit(f"--baseline must be NAME=DIR with DIR/triton_impl/attention.py, got {spec!r}")
        package = f"triton_impl_ab{i}"
        shutil.copytree(source, staging / package, ignore=shutil.ignore_patterns("__pycache__"))
        versions[name] = importlib.import_module(f"{package}.attention")
    versions["working tree"] = importlib.import_module("triton_impl.attention")
    return versions


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", action="append", default=[], help="NAME=DIR (repeatable)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536, 262144])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="(default: the run folder repro/runs/<date>-<gpu>/ab_attention/)")
    parser.add_argument("--tag", default="ab_attention")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("ab_attention needs a CUDA GPU")
    args.out_dir = args.out_dir or run_dir("ab_attention", "cuda")
    import triton_impl
    from reference.synthetic import planted_qkv

    versions = load_versions(args.baseline)
    rows = []
    Hq, Hkv, D = 32, 4, 128
    for L in args.lengths:
        M = L // 128
        causal = M * (M + 1) // 2 * Hq
        q, k, v = planted_qkv(1, L, Hq, Hkv, D, seed=0, dtype=torch.bfloat16, device="cuda")
        cudnn = dense_baselines(q, k, v)["sdpa_cudnn"]
        masks = {f"{t:.1%} independent": controlled_mask(1, Hq, M, t, seed=1) for t in (0.035, 0.3)}
        masks["3.5% group-shared"] = group_shared_mask(Hq, Hkv, M, 0.035, seed=1)
        if L <= 65536:
            masks["full list"] = full_causal_mask(Hq, M)
        work = {name: ("physical", triton_impl.compact_blocks(m.contiguous())) for name, m in masks.items()}
        if L <= 65536:
            work["dense mode"] = ("dense", (None, None))
        for name, (mode, (counts, indices)) in work.items():
            blocks = int(counts.sum()) if counts is not None else causal
            fns = {label: (lambda m=module: launcher(m)(q, k, v, 128, D ** -0.5, getattr(m, mode.upper()),
                                                        counts=counts, indices=indices))
                   for label, module in versions.items()}
            outs = {label: fn().float() for label, fn in fns.items()}
            first = next(iter(outs.values()))
            times = {label: [] for label in fns}
            for _ in range(args.repeats):
                for label, fn in fns.items():
                    times[label].append(bench_ms(fn))
            for label in fns:
                ms = statistics.median(times[label])
                runs = " ".join(f"{t:.3f}" for t in times[label])
                rows.append(dict(L=L, workload=name, version=label, ms=ms, runs=runs, density=blocks / causal,
                                 ns_per_block=ms * 1e6 / blocks, cudnn_ms=cudnn,
                                 ratio_to_rho_cudnn=ms / (blocks / causal * cudnn),
                                 max_diff_vs_first=(outs[label] - first).abs().max().item()))
                r = rows[-1]
                print(f"L={L} {name:<18} {label:<24} {ms:9.3f} ms  x{r['ratio_to_rho_cudnn']:.3f} rho*cuDNN  "
                      f"runs {r['runs']}  diff {r['max_diff_vs_first']:.2g}", flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    print(f"wrote {write_long_csv(args.out_dir / f'{args.tag}.csv', rows, environment_stamp('cuda'))}")


if __name__ == "__main__":
    main()
