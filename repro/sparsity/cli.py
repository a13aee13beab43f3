"""Block density of FlashPrefill vs FlexPrefill vs XAttention on the same inputs, with selection time and
attention-output error (the paper's sparsity comparison: 3.5% / 8.4% / 18.5% at 256K).

    python -m repro.sparsity [--lengths 4096 ...] [--real-lengths 1024 ...] [--device cpu|cuda] [--no-match]
                             [--synthetic-only] [--tag NAME] [--out-dir DIR]

Selectors (all in this repo, `block_selectors.SELECTORS`: same list format, same sparse attention):
  FlashPrefill  stages 1-4 (mean_pool_keys, block_scores, select_blocks + compact_blocks), V1 safety net (sink 2,
                window 4, last-dense 2 blocks), alpha 0.12 (the V1 default, Qwen3-30B-A3B, the model of the paper's
                256K density figure) and alpha 0.1 (the V2 paper's setting). Two implementations:
                * "Triton kernels": triton_impl.mean_pool_keys, block_scores, select_and_compact (the selection
                  triton_impl.flash_prefill runs before its attention), the timed FlashPrefill selector on a GPU
                  (and on a CPU under TRITON_INTERPRET=1, for dry runs);
                * "reference stages": the readable PyTorch stages of `reference`, alpha 0.12 only when the Triton
                  rows run (a second, separately labelled row; its density must equal the Triton one), both alphas
                  otherwise.
  FlexPrefill   `peers.flexprefill_select` (peers/), paper defaults gamma 0.9, tau 0.1, min_budget 1024 tokens;
  XAttention    `peers.xattention_select` (peers/), paper defaults threshold 0.9, stride 8.
                The peers exist in PyTorch only (written by us from the papers; no Triton version here).
Block size 128 everywhere.

Inputs:
  (a) real: SmolLM2-135M q/k/v dumps (repro/activations/, a NIAH prompt, 5 layers, Hq=9, Hkv=3, D=64), truncated
      to each length of --real-lengths (a causal prefix of real activations is the prefix prompt's activations).
      Skipped, with a message, when the dumps are absent (python -m repro.dump_activations makes them) or with
      --synthetic-only. FlashPrefill runs the reference stages here on every device.
  (b) synthetic: `reference.synthetic.planted_qkv` (sinks, local decay, slashes, vertical stripes; **synthetic**,
      no model), B=1, CPU Hq=8 Hkv=2 D=64 float32 / GPU Hq=32 Hkv=4 D=128 bfloat16, lengths --lengths.

Measured: density = kept causal blocks / all causal blocks over heads (and layers), from the lists the timed
selector returned; selection time = one untimed warm-up call, then the median of --repeats calls (CUDA: each call
between two CUDA events; CPU: wall clock, one thread; `repro.timing.measure_call`); on CUDA, the peak memory one
call allocates beyond its inputs. On the real activations, the relative error ||O_sparse - O_dense||_F /
||O_dense||_F of reference.block_sparse_attention with each selector's lists against reference.dense_attention.
"Error-matched" (unless --no-match): at the longest real length, each peer's parameter is swept and the sparsest
setting whose error is <= FlashPrefill's error at alpha 0.12 is reported. This matches attention-output error, not
task accuracy.

Where the Triton and reference FlashPrefill rows both run, their densities must agree to 1e-3: the run fails
otherwise (after writing the CSV, for diagnosis).

Writes <out-dir>/<tag>.csv (long format), <tag>.md, <tag>_density.png and, with real activations, <tag>_error.png;
--out-dir defaults to the run folder repro/runs/<date>-<device>/sparsity/ (the committed runs are in
repro/results/sparsity/). The tag defaults to "sparsity" on a CPU and "sparsity_<gpu>" (e.g. sparsity_h200) on
CUDA, so the results of different machines never overwrite each other.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib
import torch

from triton_impl.common import interpreting

from ..common import default_device, environment_stamp, run_dir, write_long_csv
from .figures import plot_density, plot_error
from .measure import density_check, match_errors, measure_real, measure_synthetic
from .report import write_markdown
from .settings import (CPU_LENGTHS, CPU_SHAPE, DEFAULT_SETTINGS, DENSITY_TOLERANCE, GPU_LENGTHS, GPU_SHAPE,
                       REAL_LENGTHS, impl_label, output_tag, settings_for, sweep_settings)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m repro.sparsity", description=__doc__.split("\n")[0])
    p.add_argument("--device", default=default_device(), help="(default: %(default)s)")
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help=f"synthetic lengths (default: CPU {list(CPU_LENGTHS)}, GPU {list(GPU_LENGTHS)})")
    p.add_argument("--real-lengths", type=int, nargs="+", default=list(REAL_LENGTHS), help="(default: %(default)s)")
    p.add_argument("--activations", type=Path, default=None, help="dump folder (default: repro/activations/)")
    p.add_argument("--synthetic-only", action="store_true", help="skip the real-activation part")
    p.add_argument("--no-match", action="store_true", help="skip the error-matching sweep")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per selection after the warm-up (default: CPU 1, GPU 10)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="(default: the run folder repro/runs/<date>-<device>/sparsity/)")
    p.add_argument("--tag", default=None,
                   help="file name stem (default: sparsity on a CPU, sparsity_<gpu> on CUDA, e.g. sparsity_h200)")
    return p


def measure_real_part(acts, args) -> list[dict]:
    """The default settings at every real length, then (unless --no-match) the sweep at the longest and its
    error-matched settings."""
    avail = next(iter(acts.values()))[0].shape[1]
    # A dump "L8192" holds the prompt's real token count (a little under 8192): the longest length is capped.
    real_lengths = sorted({min(L, avail) for L in args.real_lengths})
    rows = measure_real(acts, real_lengths, DEFAULT_SETTINGS, args.device, 1, "real")
    if not args.no_match:
        L = max(real_lengths)
        sweep_rows = measure_real(acts, [L], sweep_settings(), args.device, 1, f"error sweep @{L}")
        rows += sweep_rows
        rows += match_errors(sweep_rows, L)
    return rows


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    matplotlib.use("Agg")
    torch.set_grad_enabled(False)
    on_gpu = torch.device(args.device).type == "cuda"
    if not on_gpu:
        torch.set_num_threads(1)  # small tensors on a 2-core VM: one thread is 5-50x faster
    lengths = args.lengths or (GPU_LENGTHS if on_gpu else CPU_LENGTHS)
    shape = GPU_SHAPE if on_gpu else CPU_SHAPE
    settings = settings_for(triton=on_gpu or interpreting())
    repeats = args.repeats or (10 if on_gpu else 1)
    start = time.perf_counter()
    stamp = environment_stamp(args.device)
    tag = args.tag or output_tag(stamp)
    out_dir = args.out_dir or run_dir("sparsity", args.device)
    print(f"FlashPrefill selectors: "
          f"{', '.join(sorted({impl_label(s) for s in settings if s.selector == 'flashprefill'}))}"
          f"; writing {out_dir / tag}.*")

    rows = measure_synthetic(lengths, settings, shape, args.device, repeats, args.seed)
    from ..capture import activations_or_reason  # lazily: it imports the accuracy tasks and the harness

    acts, real_note = activations_or_reason(args.activations, max_length=max(args.real_lengths),
                                            synthetic_only=args.synthetic_only)
    if real_note:
        print(real_note)
    else:
        rows += measure_real_part(acts, args)

    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = write_long_csv(out_dir / f"{tag}.csv", rows, stamp)
    pairs, bad = density_check(rows)
    if bad:  # the CSV is written, for diagnosis; nothing else
        raise SystemExit(f"FAIL: Triton and reference FlashPrefill densities differ by more than {DENSITY_TOLERANCE:g}"
                         f" at L = {bad}: " + ", ".join(f"{L}: {a:.5f} vs {b:.5f}" for L, a, b in pairs if L in bad)
                         + f" (rows in {csv_path})")
    if on_gpu and not pairs:
        raise SystemExit("FAIL: no length ran both the Triton and the reference FlashPrefill selection")
    md_path = out_dir / f"{tag}.md"
    text = write_markdown(md_path, rows, stamp, settings=settings, shape=shape, repeats=repeats, layers=list(acts),
                          real_note=real_note)
    png1 = out_dir / f"{tag}_density.png"
    plot_density(png1, rows, stamp)
    png2 = out_dir / f"{tag}_error.png"
    wrote_err = plot_error(png2, rows, stamp)
    print(text)
    print(f"wrote {csv_path}, {md_path}, {png1}" + (f", {png2}" if wrote_err else "")
          + f" in {time.perf_counter() - start:.1f} s")
