"""A powered, held-out accuracy evaluation of FlashPrefill against Full attention on SmolLM2-135M-Instruct.

    python -m repro.powered --quick                  # CPU, a few minutes: 2K, needle family, 2 prompts per split
    python -m repro.powered --device cuda            # the full grid (GPU): 2K/4K/8K, dev 90 + test 300 prompts
                                                     # per family and length, every arm of arms.PRIORITY
    python -m repro.powered --append --arms ...      # more arms on the run already in --out-dir
    python -m repro.powered --report-only            # the committed run's report and figures, into a run folder

What it measures (prompts.py, arms.py, summary.py): two task families (needle retrieval; the other RULER
families) at 2K, 4K and 8K tokens, a dev split (for choosing knobs) and a test split (reported, never tuned on)
from disjoint seed ranges. Every arm answers every prompt with greedy decoding; each arm is paired with Full (sdpa)
on the same prompts: accuracy, difference with a 95% paired-bootstrap interval and the exact McNemar p-value, per
length, family and task. The noise floor is the arm "dense_kernels" (alpha 0 through the same backend: dense
attention that differs from sdpa only in rounding).

Outputs in --out-dir (default: the run folder repro/runs/<date>-<device>/powered/; the committed GPU run is in
repro/results/powered/), named by --prefix (powered_, or powered_quick_ with --quick): samples.csv.gz (one row per
prompt and arm, with the environment stamp; rewritten after every arm), run.json (command lines, wall times,
what the time budget skipped, the note), summary.md, pareto.png and depth.png.
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
from .arms import PRIORITY, check_arms
from .experiment import build_prompts, make_batches, run_arm
from .prompts import FAMILIES

COMMITTED = RESULTS_DIR / "powered"
# CPU-sized: about 3 minutes on 2 cores (the prefill of a 2K prompt through the 135M model takes ~5 s there).
QUICK = dict(lengths=[2048], families=["needle"], n_dev=2, n_test=2, arms=["full", "dense_kernels", "fp"])
FULL_GRID = dict(lengths=[2048, 4096, 8192], families=list(FAMILIES), n_dev=90, n_test=300, arms=list(PRIORITY))


def add_prompt_arguments(p: argparse.ArgumentParser, lengths_help: str = "prompt lengths in tokens",
                         dev_help: str = "dev prompts per family and length") -> None:
    """The model, the prompt grid, the arms and the batching: the options every run over these prompts shares."""
    p.add_argument("--model", default=None, help="GGUF file or local checkpoint (default: SmolLM2-135M GGUF)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--lengths", type=int, nargs="+", help=lengths_help)
    p.add_argument("--families", nargs="+", choices=list(FAMILIES))
    p.add_argument("--n-dev", type=int, help=dev_help)
    p.add_argument("--n-test", type=int, help="test prompts per family and length")
    p.add_argument("--arms", nargs="+", help=f"arms to run, of {list(PRIORITY)} ('full' always runs)")
    p.add_argument("--max-batch-tokens", type=int, default=1 << 19,
                   help="tokens per prefill batch (default 524288: 64 prompts at 8K)")
    p.add_argument("--workers", type=int, default=None, help="processes that generate the prompts (default: CPUs)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU-sized: 2K, needle family, 2 prompts per split, 3 arms")
    add_prompt_arguments(p)
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds after the model load past which no new arm starts")
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--prefix", default=None)
    p.add_argument("--append", action="store_true", help="add arms to the run in --out-dir (arms it has are kept)")
    p.add_argument("--report-only", action="store_true", help="redraw the report from --in-dir's CSV and JSON")
    p.add_argument("--in-dir", type=Path, default=COMMITTED)
    p.add_argument("--note", default=None, help="a note for the report (replaces the run's note)")
    args = p.parse_args(argv)
    fill_defaults(args, QUICK if args.quick else FULL_GRID)
    args.prefix = args.prefix or ("powered_quick_" if args.quick else "powered_")
    return args


def files(directory: Path, prefix: str) -> dict[str, Path]:
    # samples.csv.gz: one row per prompt and arm (~28,000 rows in the full run, 8 MB as plain text).
    return {name: directory / f"{prefix}{name}" for name in ("samples.csv.gz", "run.json", "summary.md", "pareto.png",
                                                              "depth.png")}


def report(rows, info: dict, out: dict[str, Path]) -> None:
    from .figures import save_figures
    from .report import write_report

    write_report(out["summary.md"], rows, info)
    save_figures(rows, out["pareto.png"], out["depth.png"])


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python -m repro.powered " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    if args.report_only:
        src, out_dir = files(args.in_dir, args.prefix), args.out_dir or run_dir("powered")
        rows, info = read_long_csv(src["samples.csv.gz"]), read_run_json(src["run.json"])
        if args.note is not None:
            info["note"] = args.note
            write_run_json(files(out_dir, args.prefix)["run.json"], info)
        report(rows, info, files(out_dir, args.prefix))
        print(f"report in {out_dir}")
        return 0

    device = run_device(args.device)
    out_dir = args.out_dir or run_dir("powered", device)
    out = files(out_dir, args.prefix)
    arms = check_arms(args.arms)
    rows, info = [], dict(commands=[], wall_seconds=[], skipped=[], note=args.note or "")
    if args.append:
        rows, info = read_long_csv(out["samples.csv.gz"]), read_run_json(out["run.json"])
        done = {r["arm"] for r in rows}
        arms = [a for a in arms if a.name not in done]
        if args.note is not None:
            info["note"] = args.note
    info["commands"].append(command)
    start = time.time()
    model, tokenizer, name = load_for_run(args.model, device)
    info["model"] = name
    cells = [(f, L, s, n) for s, n in (("dev", args.n_dev), ("test", args.n_test)) if n > 0
             for L in args.lengths for f in args.families]
    pairs = build_prompts(tokenizer, cells, args.workers)
    batches = make_batches(pairs, args.max_batch_tokens)
    print(f"{len(pairs)} prompts in {len(batches)} batches ({time.time() - start:.0f} s since the start)", flush=True)
    if args.append and rows:
        expected = {(p.split, p.family, p.sample.task, str(p.sample.length), str(p.sample.seed)) for p, _ in pairs}
        have = {(r["split"], r["family"], r["task"], r["length"], r["seed"]) for r in rows if r["arm"] == "full"}
        if expected != have:
            raise SystemExit("error: --append needs the prompts of the run in --out-dir (same --lengths, --families, "
                             f"--n-dev, --n-test): {len(expected ^ have)} prompts differ")
    stamp = environment_stamp(device)
    switch = AttentionSwitch(model, cpu_threads=1 if device.type == "cpu" else None)
    with torch.inference_mode():
        for n, arm in enumerate(arms):
            if args.time_budget is not None and time.time() - start > args.time_budget:
                info["skipped"].append(f"arms {[a.name for a in arms[n:]]} not run (time budget "
                                       f"{args.time_budget:.0f} s)")
                break
            t0 = time.time()
            # Each row keeps the stamp of the run that answered it (an --append run adds rows with its own).
            rows += [dict(r, **stamp) for r in run_arm(model, tokenizer, switch, arm, batches)]
            print(f"{arm.name}: {time.time() - t0:.0f} s", flush=True)
            write_long_csv(out["samples.csv.gz"], rows)
            info["wall_seconds_so_far"] = round(time.time() - start)
            write_run_json(out["run.json"], info)
    info["wall_seconds"].append(round(time.time() - start))
    info.pop("wall_seconds_so_far", None)
    write_run_json(out["run.json"], info)
    report(read_long_csv(out["samples.csv.gz"]), info, out)
    print(f"wrote {out_dir}")
    return 0
