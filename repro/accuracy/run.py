"""Accuracy of FlashPrefill vs Full attention on a real LLM, offline: passkey / NIAH grid, RULER-style suite,
alpha sweep with realised densities, and per-layer error of sparse vs dense attention on real activations.

    python -m repro.accuracy.run --quick              # a few minutes on a CPU: what repro/run_all.sh runs
    python -m repro.accuracy.run                      # the full grid (meant for a GPU; hours on a 2-core CPU)
    python -m repro.accuracy.run --model /ckpt/Qwen2.5-7B-Instruct    # any local checkpoint, the paper's alpha
    bash repro/accuracy/device_run.sh                 # the GPU run (bf16, Triton kernels), files accuracy_gpu_*

Every prompt is generated from a seed (repro/accuracy/tasks.py) and answered with greedy decoding; scores are
RULER's string_match_all / string_match_part in percent. "full" is the model's exact attention (sdpa);
"flashprefill" is the same model with the flashprefill_hf backend: FlashPrefill for the prefill (Triton on CUDA,
the reference on CPU), dense attention while decoding. The default alpha is the paper's for the model
(flashprefill_hf.paper_alpha; 0.12, the V1 default, for models the paper does not name, SmolLM2 included).

Outputs in --out-dir (default: the run folder repro/runs/<date>-<device>/accuracy/; the committed runs are in
repro/results/accuracy/), prefixed accuracy_ (accuracy_quick_ with --quick): per-sample long CSV (samples),
per-layer error CSV, the run's metadata (run.json: command line, wall time, what the time budget skipped, the
note, calibrated alphas), a markdown summary with the paper's figures labelled "paper", NIAH heatmaps, the alpha
sweep and the layer-error plots. `--report-only` redraws the summary and figures of a finished run from the CSVs
and run.json in --in-dir (default: the committed repro/results/accuracy/) into --out-dir; its --note replaces the
run's note (and is saved into --out-dir's run.json).

Order and time budget: the per-layer error study runs first (no decoding: seconds on a GPU), then Full and
FlashPrefill at the default alpha on every prompt, then the extra alphas of the sweep. Within a phase prompts run
seed by seed (all tasks, lengths and depths of seed 0, then seed 1, ...), so a --time-budget that cuts a phase
short drops whole seeds, never a task or a length; the report counts the prompts that ran against those planned.
The CSVs and run.json are rewritten after each phase, so a killed run still leaves the finished phases.

Calibration (--calibrate): alpha is chosen on prompts of a separate seed range (CALIBRATION_SEED), never on the
evaluation prompts, then evaluated on the evaluation seeds.

The parts: experiments.py (prompts, layer error, calibration), report.py (the summary, one function per section),
figures.py (one function per figure), repro/harness.py (model, prompts, settings, decoding).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from repro.common import (RESULTS_DIR, environment_stamp, read_long_csv, read_run_json, run_dir, stamp_of,
                          write_long_csv, write_run_json)
from repro.harness import AttentionSwitch, load_for_run, run_device, run_samples, seed_major, token_counter

from .experiments import (DEFAULT_SWEEP, NIAH_TASKS, alpha_setting, calibrate, layer_errors, niah_samples,
                          ruler_samples)
from .figures import save_figures
from .report import typed, write_report
from .tasks import RULER_TASKS

QUICK = dict(lengths=[1024, 2048], depths=2, seeds=[0], ruler_lengths=[2048], ruler_tasks=["niah_multikey", "qa"],
             sweep_alphas=[], error_lengths=[2048], error_layers=[0, 15, 29], error_alphas=[0.12, 0.3])
FULL = dict(lengths=[1024, 2048, 4096, 8192], depths=10, seeds=[0, 1, 2], ruler_lengths=[4096, 8192],
            ruler_tasks=RULER_TASKS, sweep_alphas=list(DEFAULT_SWEEP), error_lengths=[4096, 8192], error_layers=None,
            error_alphas=list(DEFAULT_SWEEP))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="about 3 minutes on a CPU (1K-2K, 2 depths, 2 RULER tasks)")
    p.add_argument("--model", default=None, help="local transformers checkpoint (default: SmolLM2-135M GGUF)")
    p.add_argument("--lengths", type=int, nargs="+", help="passkey / NIAH lengths in tokens")
    p.add_argument("--depths", type=int, help="number of needle depths, evenly from 0 to 1")
    p.add_argument("--seeds", type=int, nargs="+", help="evaluation seeds (< 1000); samples per cell = count")
    p.add_argument("--niah-tasks", nargs="+", default=list(NIAH_TASKS), choices=list(NIAH_TASKS),
                   help="which of passkey / niah_single run on the NIAH grid")
    p.add_argument("--ruler-lengths", type=int, nargs="*", help="RULER-style suite lengths (none: skip)")
    p.add_argument("--ruler-tasks", nargs="+", help=f"subset of {RULER_TASKS}")
    p.add_argument("--alpha", type=float, help="FlashPrefill alpha (default: the paper's for the model)")
    p.add_argument("--alphas", type=float, nargs="*", help="extra alphas of the sweep (none: no sweep)")
    p.add_argument("--sweep-on", choices=["all", "niah", "ruler"], default="all",
                   help="which prompts the extra alphas run on")
    p.add_argument("--sweep-lengths", type=int, nargs="+",
                   help="lengths the extra alphas run on (default: all; at 1K the safety net keeps every block of "
                        "SmolLM2's prompts, so every alpha is the same attention there)")
    p.add_argument("--error-lengths", type=int, nargs="*", help="lengths of the per-layer error study (none: skip)")
    p.add_argument("--error-layers", type=int, nargs="*", help="layers of the error study (default all)")
    p.add_argument("--error-alphas", type=float, nargs="+",
                   help="alphas of the error study (cheap: no decoding)")
    p.add_argument("--dense-layers", type=int, default=0, help="keep the first N layers dense")
    p.add_argument("--calibrate", action="store_true", help="choose alpha on separate seeds before evaluating")
    p.add_argument("--threads", type=int, help="torch threads for the model (default: all cores)")
    p.add_argument("--ref-threads", type=int, default=1, help="torch threads inside the CPU reference")
    p.add_argument("--note", default="", help="a sentence added under the command line of the report")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the summary and figures from --in-dir's <prefix>samples.csv and <prefix>run.json "
                        "(no model)")
    p.add_argument("--in-dir", type=Path, default=RESULTS_DIR / "accuracy",
                   help="--report-only: the folder of the run to redraw (default: %(default)s)")
    p.add_argument("--time-budget", type=float,
                   help="seconds, counted from the start of the model load, after which no new prompt (nor "
                        "error-study length) starts; the report counts what ran against what was planned")
    p.add_argument("--device", default=None)
    p.add_argument("--out-dir", type=Path, default=None,
                   help="(default: the run folder repro/runs/<date>-<device>/accuracy/)")
    p.add_argument("--prefix", default=None, help="file prefix (default accuracy_ or accuracy_quick_)")
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    args.lengths = args.lengths or base["lengths"]
    args.depths = args.depths or base["depths"]
    args.seeds = args.seeds or base["seeds"]
    args.ruler_lengths = base["ruler_lengths"] if args.ruler_lengths is None else args.ruler_lengths
    args.ruler_tasks = args.ruler_tasks or base["ruler_tasks"]
    args.alphas = base["sweep_alphas"] if args.alphas is None else args.alphas
    args.error_lengths = base["error_lengths"] if args.error_lengths is None else args.error_lengths
    args.error_layers = base["error_layers"] if args.error_layers is None else args.error_layers
    args.error_alphas = args.error_alphas or base["error_alphas"]
    if any(s >= 1000 for s in args.seeds):
        p.error("evaluation seeds must be < 1000 (calibration uses its own seeds)")
    args.prefix = args.prefix or ("accuracy_quick_" if args.quick else "accuracy_")
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args


# --------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------
def run_info(argv, wall: float, skipped, note: str, calibrated: dict, finished: bool) -> dict:
    """What <prefix>run.json holds: the command line, its wall time in seconds (so far, until finished), what the
    time budget skipped, the report's note and the calibrated alpha per length."""
    return dict(argv=list(argv), wall_seconds=round(wall, 3), finished=finished, skipped=list(skipped), note=note,
                calibrated_alpha={str(L): a for L, a in calibrated.items()})


def write_outputs(out: Path, prefix: str, rows, err_rows, stamp, meta, name, info: dict) -> None:
    """The CSVs and run.json (rewritten after every phase, so a run killed later still leaves what finished)."""
    out.mkdir(parents=True, exist_ok=True)
    if rows:
        write_long_csv(out / f"{prefix}samples.csv", [dict(r, **meta) for r in rows], stamp)
    if err_rows:
        write_long_csv(out / f"{prefix}layer_error.csv", [dict(r, model=name) for r in err_rows], stamp)
    write_run_json(out / f"{prefix}run.json", info)


def safe_plot(*args) -> list[Path]:
    """save_figures(), but a plotting failure (a missing matplotlib, a font) costs the figures, not the run's data:
    `--report-only` redraws them from the CSVs."""
    try:
        return save_figures(*args)
    except Exception as e:  # noqa: BLE001
        print(f"warning: figures not drawn ({type(e).__name__}: {e}); redraw them with --report-only")
        return []


def report_only(args) -> None:
    src, out, prefix = args.in_dir, args.out_dir, args.prefix
    try:
        info = read_run_json(src / f"{prefix}run.json")
    except FileNotFoundError as e:
        raise SystemExit(f"error: --report-only: {e}")
    rows = typed(read_long_csv(src / f"{prefix}samples.csv"))
    err_path = src / f"{prefix}layer_error.csv"
    err_rows = typed(read_long_csv(err_path)) if err_path.exists() else []
    out.mkdir(parents=True, exist_ok=True)
    run_args = parse_args(info["argv"])
    run_args.seeds = sorted(set(run_args.seeds) | {r["seed"] for r in rows})
    run_args.note = args.note or info["note"]
    if args.note:  # the new note is the run's from now on
        write_run_json(out / f"{prefix}run.json", dict(info, note=args.note))
    stamp = stamp_of(rows[0])
    default_alpha = float(rows[0]["default_alpha"])
    name = rows[0]["model"]
    calibrated = {int(L): a for L, a in info["calibrated_alpha"].items()}
    safe_plot(rows, err_rows, default_alpha, out, prefix, name)
    write_report(out / f"{prefix}summary.md", rows, err_rows, run_args, name, default_alpha, stamp,
                 info["wall_seconds"], calibrated, prefix, info["skipped"])
    print((out / f"{prefix}summary.md").read_text())


# --------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    args = parse_args(argv)
    device = run_device(args.device)
    args.out_dir = args.out_dir or run_dir("accuracy", device)
    if args.report_only:
        return report_only(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    deadline = t_start + args.time_budget if args.time_budget else None
    model, tokenizer, name = load_for_run(args.model, device)
    from flashprefill_hf import paper_alpha  # after load_for_run has set HF_HUB_OFFLINE

    count = token_counter(tokenizer)
    default_alpha = args.alpha if args.alpha is not None else paper_alpha(args.model or name)
    switch = AttentionSwitch(model, args.ref_threads if device.type == "cpu" else None)
    switch.config = switch.config.replace(dense_layers=args.dense_layers)
    sweep = [a for a in args.alphas if a != default_alpha]
    stamp = environment_stamp(device)
    meta = dict(model=name, default_alpha=default_alpha, quick=args.quick,
                model_dtype=str(model.dtype).replace("torch.", ""))
    out = args.out_dir
    skipped, calibrated = [], {}

    def save(rows, err_rows):
        info = run_info(args.argv, time.time() - t_start, skipped, args.note, calibrated, finished=False)
        write_outputs(out, args.prefix, rows, err_rows, stamp, meta, name, info)

    # 1. Per-layer error on real activations: no decoding, seconds on a GPU (the first Triton compiles happen here).
    err_rows = []
    if args.error_lengths:
        err_rows, cut = layer_errors(model, tokenizer, args.error_lengths,
                                     sorted(set(args.error_alphas) | {default_alpha}), args.error_layers, count,
                                     args.ref_threads if device.type == "cpu" else None, deadline,
                                     cross_check_alpha=default_alpha)
        skipped += cut
        save([], err_rows)

    if args.calibrate:
        calibrated = calibrate(model, tokenizer, switch, args.lengths, list(DEFAULT_SWEEP), count, 1.0, 5)
        print("calibrated alpha per length:", calibrated)

    # 2. Full and FlashPrefill at the default alpha on every prompt, seed by seed.
    niah = niah_samples(args.lengths, [i / max(1, args.depths - 1) for i in range(args.depths)], args.niah_tasks,
                        args.seeds, count)
    ruler = ruler_samples(args.ruler_lengths, args.ruler_tasks, args.seeds, count) if args.ruler_lengths else []
    rows, cut = run_samples(model, tokenizer, switch, seed_major(niah + ruler),
                            [alpha_setting(None), alpha_setting(default_alpha)], "Full + FlashPrefill", deadline)
    skipped += cut
    save(rows, err_rows)
    # 3. The alpha sweep on the same prompts (optionally fewer lengths), seed by seed.
    if sweep:
        on = {"all": niah + ruler, "niah": niah, "ruler": ruler}[args.sweep_on]
        if args.sweep_lengths:
            on = [gs for gs in on if gs[1].length in args.sweep_lengths]
        more, cut = run_samples(model, tokenizer, switch, seed_major(on), [alpha_setting(a) for a in sweep],
                                f"alpha sweep {sweep}", deadline)
        rows += more
        skipped += cut
        save(rows, err_rows)
    wall = round(time.time() - t_start, 3)  # as run.json keeps it: --report-only writes the same summary
    write_run_json(out / f"{args.prefix}run.json",
                   run_info(args.argv, wall, skipped, args.note, calibrated, finished=True))
    pngs = safe_plot(rows, err_rows, default_alpha, out, args.prefix, name)
    write_report(out / f"{args.prefix}summary.md", [dict(r, **meta) for r in rows], err_rows, args, name,
                 default_alpha, stamp, wall, calibrated, args.prefix, skipped)
    print(f"done in {wall / 60:.1f} min; wrote {out / (args.prefix + 'summary.md')} and {len(pngs)} figures")
    print((out / f"{args.prefix}summary.md").read_text())


if __name__ == "__main__":
    main()
