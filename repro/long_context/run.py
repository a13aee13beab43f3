"""Longer real contexts: SmolLM2-135M-Instruct (trained for 8K tokens) at 16K and 32K with RoPE scaling.

    python -m repro.long_context --device cuda      # GPU, ~7 min on an H200: dev 60 + test 300 prompts per length
    python -m repro.long_context --quick            # CPU, a few minutes: one 8.7K prompt per split, 2 arms
    python -m repro.long_context --report-only      # the committed run's report and figures, into a run folder

Two steps, on the powered evaluation's prompts (repro/powered: same task families and seeds, exact token lengths):

1. dev, Full only: every RoPE scaling method of rope.py ("linear", "dynamic" NTK, "yarn", and "none", the trained
   RoPE extrapolated, as a control) answers the dev prompts of each length; the method with the best Full dev score
   is chosen per length (ties: the earlier of ROPE_METHODS). Nothing else is chosen here.
2. test, the chosen method: Full, the noise floor (FlashPrefill at alpha 0 through the backend) and FlashPrefill
   settings answer the test prompts, each paired with Full (repro/stats.py), with per-layer densities.

Outputs in --out-dir (default: the run folder repro/runs/<date>-<device>/long_context/; the committed GPU run is
in repro/results/long_context/), named long_context_ (long_context_quick_ with --quick): samples.csv.gz (one row per
prompt, arm and RoPE method), layers.csv (per-layer density per arm and length), run.json, summary.md, figure.png.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from ..common import (RESULTS_DIR, environment_stamp, fill_defaults, read_long_csv, read_run_json, run_dir,
                      write_long_csv, write_run_json)
from ..harness import AttentionSwitch, load_for_run, run_device
from ..powered.arms import ARMS, check_arms
from ..powered.experiment import build_prompts, make_batches, run_arm
from ..powered.prompts import FAMILIES
from ..powered.run import add_prompt_arguments
from .rope import CONTROL, ROPE_METHODS, scaled_rope
from .summary import choose_methods

COMMITTED = RESULTS_DIR / "long_context"
POWERED = RESULTS_DIR / "powered" / "powered_samples.csv.gz"  # the 2K-8K run the figure continues
TEST_ARMS = ["full", "dense_kernels", "fp", "fp_a0.3", "fp_v2", "fp+mc"]  # in PRIORITY order when run
# CPU-sized: one prompt per split just past the trained 8K (the reference backend at 8.7K takes ~1 min per prefill).
QUICK = dict(lengths=[8704], families=["needle"], n_dev=1, n_test=1, arms=["full", "fp"])
FULL_GRID = dict(lengths=[16384, 32768], families=list(FAMILIES), n_dev=30, n_test=150, arms=TEST_ARMS)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU-sized: 8.7K, needle family, 1 prompt per split, 2 arms")
    add_prompt_arguments(p, lengths_help="prompt lengths in tokens (longer than the trained context)",
                         dev_help="dev prompts per family and length (choose the RoPE method)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds after the model load past which no new test arm starts")
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--report-only", action="store_true", help="redraw the report from --in-dir's files")
    p.add_argument("--in-dir", type=Path, default=COMMITTED)
    p.add_argument("--note", default=None, help="a note for the report")
    args = p.parse_args(argv)
    fill_defaults(args, QUICK if args.quick else FULL_GRID)
    args.prefix = "long_context_quick_" if args.quick else "long_context_"
    return args


def files(directory: Path, prefix: str) -> dict[str, Path]:
    return {name: directory / f"{prefix}{name}" for name in ("samples.csv.gz", "layers.csv", "run.json", "summary.md",
                                                              "figure.png")}


def report(rows, layers, info: dict, out: dict[str, Path], powered_rows) -> None:
    from .figures import save_figure
    from .report import write_report

    write_report(out["summary.md"], rows, layers, info, powered_rows)
    save_figure(rows, layers, powered_rows, out["figure.png"])


def _powered_rows():
    return read_long_csv(POWERED) if POWERED.exists() else []


def answer(model, tokenizer, switch, arm, batches, methods: dict[int, str], layers: list[dict]) -> list[dict]:
    """Rows of `arm` on `batches`, each length with its RoPE method `methods[length]` (one scaled_rope per length),
    with the method, its factor and the per-layer densities of every batch (into `layers`)."""
    rows = []
    for L in sorted({b.ids.shape[1] for b in batches}):
        same = [b for b in batches if b.ids.shape[1] == L]
        method = methods[L]
        with scaled_rope(model, method, L) as factor:
            def on_batch(batch, recorder):
                if recorder is not None:
                    layers.extend(dict(arm=arm.name, split=batch.prompts[0].split, length=L, rope=method,
                                       layer=layer, density=d, batch=len(batch.prompts))
                                  for layer, d in recorder.per_layer().items())
            rows += [dict(r, rope=method, rope_factor=round(factor, 4))
                     for r in run_arm(model, tokenizer, switch, arm, same, on_batch)]
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python -m repro.long_context " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    if args.report_only:
        src, out_dir = files(args.in_dir, args.prefix), args.out_dir or run_dir("long_context")
        info = read_run_json(src["run.json"])
        if args.note is not None:
            info["note"] = args.note
            write_run_json(files(out_dir, args.prefix)["run.json"], info)
        report(read_long_csv(src["samples.csv.gz"]), read_long_csv(src["layers.csv"]), info,
               files(out_dir, args.prefix), _powered_rows())
        print(f"report in {out_dir}")
        return 0

    device = run_device(args.device)
    out_dir = args.out_dir or run_dir("long_context", device)
    out = files(out_dir, args.prefix)
    arms = check_arms(args.arms)
    info = dict(commands=[command], skipped=[], note=args.note or "")
    start = time.time()
    model, tokenizer, info["model"] = load_for_run(args.model, device)
    short = [L for L in args.lengths if L <= model.config.max_position_embeddings]
    if short:
        raise SystemExit(f"error: --lengths {short} are within the trained context "
                         f"({model.config.max_position_embeddings}); the 2K-8K evaluation is repro.powered")
    cells = [(f, L, s, n) for s, n in (("dev", args.n_dev), ("test", args.n_test)) if n > 0
             for L in args.lengths for f in args.families]
    batches = make_batches(build_prompts(tokenizer, cells, args.workers), args.max_batch_tokens)
    print(f"{sum(len(b.prompts) for b in batches)} prompts in {len(batches)} batches "
          f"({time.time() - start:.0f} s since the start)", flush=True)
    stamp = environment_stamp(device)
    switch = AttentionSwitch(model, cpu_threads=1 if device.type == "cpu" else None)
    rows, layers = [], []

    def save():
        write_long_csv(out["samples.csv.gz"], [dict(r, **stamp) for r in rows])
        write_long_csv(out["layers.csv"], layers, stamp)
        info["wall_seconds"] = round(time.time() - start)
        write_run_json(out["run.json"], info)

    with torch.inference_mode():
        dev = [b for b in batches if b.prompts[0].split == "dev"]
        for method in (CONTROL, *ROPE_METHODS):  # 1. dev: Full with every method
            t0 = time.time()
            rows += answer(model, tokenizer, switch, ARMS["full"], dev, dict.fromkeys(args.lengths, method), layers)
            print(f"dev, Full with RoPE {method}: {time.time() - t0:.0f} s", flush=True)
        chosen = choose_methods(rows, args.lengths)
        info["chosen"] = {str(L): m for L, m in chosen.items()}
        print(f"chosen on dev: {info['chosen']}", flush=True)
        save()
        test = [b for b in batches if b.prompts[0].split == "test"]
        for n, arm in enumerate(arms):  # 2. test: the chosen method, every arm
            if args.time_budget is not None and time.time() - start > args.time_budget:
                info["skipped"].append(f"test arms {[a.name for a in arms[n:]]} not run (time budget "
                                       f"{args.time_budget:.0f} s)")
                break
            t0 = time.time()
            rows += answer(model, tokenizer, switch, arm, test, chosen, layers)
            print(f"test, {arm.name}: {time.time() - t0:.0f} s", flush=True)
            save()
    save()
    report(read_long_csv(out["samples.csv.gz"]), read_long_csv(out["layers.csv"]), info, out, _powered_rows())
    print(f"wrote {out_dir}")
    return 0
