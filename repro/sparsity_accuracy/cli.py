"""Density vs task accuracy per block selector on a real model: FlashPrefill, FlexPrefill and XAttention at their
paper defaults and on a grid of their own knob, matched by *task accuracy* on the same prompts.

    python -m repro.sparsity_accuracy --quick     # ~2 minutes on a CPU (2K, 2 prompts, 6 settings)
    python -m repro.sparsity_accuracy             # the committed CPU run (4K, <= 12 prompts, ~32 minutes), then
    python -m repro.sparsity_accuracy --append --flex-gammas 0.6 0.7 --xattn-thresholds 0.5 0.7   # sparser
    python -m repro.sparsity_accuracy --append --flex-gammas 0.4 --xattn-thresholds 0.2 0.3       # settings
    python -m repro.sparsity_accuracy --append --redo --tasks niah_multikey niah_multiquery --seeds 10 11 \
        --flex-gammas 0.4 0.6 0.7 0.8 0.9 0.95 0.99 --xattn-thresholds 0.2 0.3 0.5 0.7 0.8 0.9 0.95 0.99
      # (the redo: those prompts depended on PYTHONHASHSEED before f0623f2; see the report's note)
    python -m repro.sparsity_accuracy --report-only   # the committed run's report and figure, into a run folder

`python -m repro.sparsity` matches the peers to FlashPrefill by attention-output error on activations; this script runs
each selector inside SmolLM2-135M-Instruct (flashprefill_hf backend, `FlashPrefillConfig.selector`) on long-context
tasks (repro/accuracy/tasks.py), answers every prompt with every setting (greedy decoding, dense attention while
decoding) and reports per setting: task score (RULER string match, percent), the fraction of prompts whose answer
is identical to Full attention's, and the realised block density (kept causal blocks / all causal blocks, averaged
over the 30 layers and all heads). The settings and prompts: repro/sparsity_accuracy/experiment.py; the matching
rule: summary.py.

Outputs in --out-dir (default: the run folder repro/runs/<date>-<device>/sparsity_accuracy/; the committed run is
in repro/results/sparsity_accuracy/), named by --prefix (sparsity_accuracy, or sparsity_accuracy_quick with
--quick): <prefix>.csv (long format, one row per prompt and setting, with the environment stamp; rewritten after
every prompt), <prefix>.json (each command's wall time in seconds, what the time budget skipped, the note;
rewritten with the CSV), <prefix>.md (the tables, self-contained) and <prefix>.png (score and same-as-Full vs
density). `--append` extends the run already in --out-dir (the committed one only when --out-dir names it).
`--report-only` rewrites the markdown and the figure from the CSV and JSON in --in-dir (default: the committed run)
into --out-dir (a --note there replaces the run's note, saved in --out-dir's JSON). The report marks the
error-matched settings of the CPU run of `python -m repro.sparsity` (--sparsity-csv, default the committed
repro/results/sparsity/sparsity.csv).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from ..accuracy.tasks import GENERATORS
from ..common import (RESULTS_DIR, environment_stamp, read_long_csv, read_run_json, run_dir, stamp_of,
                      write_long_csv, write_run_json)
from ..harness import AttentionSwitch, load_for_run, run_device, seed_major, selector_columns, token_counter
from .experiment import SEEDS, extend, make_samples, prompt_key, run_prompts, settings_for
from .figure import plot
from .report import write_report

# The CPU run: 12 prompts x 10 settings at ~20 s a 4K answer (1 thread) is ~40 min; the budget (no new prompt
# after 31 min) keeps the whole run near 35 min, dropping the last prompts of the last seed if the VM is busy.
FULL_RUN = dict(lengths=[4096], seeds=SEEDS, tasks=["niah_single", "niah_multiquery", "niah_multikey", "passkey"],
                depths=[0.2, 0.5, 0.8], flex_gammas=[0.8, 0.9, 0.95, 0.99], xattn_thresholds=[0.8, 0.9, 0.95, 0.99],
                time_budget=1860.0)
QUICK = dict(lengths=[2048], seeds=[SEEDS[0]], tasks=["niah_single", "niah_multikey"], depths=[0.5],
             flex_gammas=[0.9, 0.99], xattn_thresholds=[0.9, 0.99], time_budget=600.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2K, 2 prompts, 6 settings: a few minutes on a CPU")
    p.add_argument("--model", default=None, help="local checkpoint or .gguf (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--lengths", type=int, nargs="+", help="prompt lengths in tokens")
    p.add_argument("--seeds", type=int, nargs="+", help=f"prompt seeds (default {SEEDS})")
    p.add_argument("--tasks", nargs="+", choices=sorted(GENERATORS), help="tasks, one prompt per seed and length")
    p.add_argument("--depths", type=float, nargs="+", help="needle depth of the i-th seed: depths[i %% len]")
    p.add_argument("--alpha", type=float, default=0.12, help="FlashPrefill alpha (the reference point)")
    p.add_argument("--flex-gammas", type=float, nargs="+", help="FlexPrefill gamma grid (paper default 0.9)")
    p.add_argument("--xattn-thresholds", type=float, nargs="+", help="XAttention threshold grid (paper default 0.9)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the model (1 is fastest on 2 cores)")
    p.add_argument("--ref-threads", type=int, default=1, help="torch threads inside the CPU reference")
    p.add_argument("--time-budget", type=float,
                   help="seconds from the model load after which no new prompt starts (default 1860; quick 600)")
    p.add_argument("--note", default="", help="a paragraph added to the report (kept by --report-only/--append)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the report and figure from the CSV and JSON in --in-dir, into --out-dir")
    p.add_argument("--in-dir", type=Path, default=RESULTS_DIR / "sparsity_accuracy",
                   help="--report-only: the folder of the run to redraw (default: %(default)s)")
    p.add_argument("--sparsity-csv", type=Path, default=RESULTS_DIR / "sparsity" / "sparsity.csv",
                   help="the CPU run of python -m repro.sparsity whose error-matched settings the report marks "
                        "(default: %(default)s)")
    p.add_argument("--append", action="store_true",
                   help="add settings to the existing CSV: run only the (prompt, setting) pairs it lacks, on its "
                        "prompts (e.g. --append --xattn-thresholds 0.5 0.7: Full and FlashPrefill are not rerun)")
    p.add_argument("--redo", action="store_true",
                   help="with --append: drop the CSV's rows of this command's prompts (--tasks, --seeds, ...) and "
                        "answer them again with every setting of this command")
    p.add_argument("--device", default=None)
    p.add_argument("--out-dir", type=Path, default=None,
                   help="(default: the run folder repro/runs/<date>-<device>/sparsity_accuracy/)")
    p.add_argument("--prefix", default=None, help="file prefix (default sparsity_accuracy / sparsity_accuracy_quick)")
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL_RUN
    for key in ("lengths", "seeds", "tasks", "depths", "flex_gammas", "xattn_thresholds", "time_budget"):
        if getattr(args, key) is None:
            setattr(args, key, base[key])
    args.prefix = args.prefix or ("sparsity_accuracy_quick" if args.quick else "sparsity_accuracy")
    if args.redo and not args.append:
        p.error("--redo needs --append")
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    args.plot_written = False
    return args


# --------------------------------------------------------------------------------------------------------------
# The run's JSON: what the CSV does not hold
# --------------------------------------------------------------------------------------------------------------
def run_info(walls: dict[str, float], skipped: list[str], note: str) -> dict:
    """<prefix>.json: every command (argv, in the order they ran) with its wall time in seconds, what the time
    budgets skipped, the report's note."""
    return dict(commands=[dict(argv=shlex.split(cmd), wall_seconds=wall) for cmd, wall in walls.items()],
                skipped=list(skipped), note=note)


def read_info(path: Path, flag: str) -> tuple[dict[str, float], list[str], str]:
    """(walls: command as in the CSV's `command` column -> seconds, skipped, note) from a run's JSON; a missing
    JSON ends the run with a message naming it."""
    try:
        info = read_run_json(path)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {flag}: {e}")
    walls = {shlex.join(c["argv"]): c["wall_seconds"] for c in info["commands"]}
    return walls, list(info["skipped"]), info["note"]


def report_only(args) -> None:
    src = args.in_dir / args.prefix
    walls, skipped, note = read_info(src.with_suffix(".json"), "--report-only")
    rows = read_long_csv(src.with_suffix(".csv"))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.note:  # the new note is the run's from now on
        write_run_json(args.out_dir / f"{args.prefix}.json", run_info(walls, skipped, args.note))
    write_outputs(args.out_dir, args.prefix, rows, walls, skipped, args.note or note, args.sparsity_csv)


def write_outputs(out: Path, prefix: str, rows: list[dict], walls: dict[str, float], skipped: list[str],
                  note: str, sparsity_csv: Path | None = None) -> None:
    """Figure and markdown from the CSV's rows (strings); the first run's command gives the planned prompts (and,
    unless `sparsity_csv` is given, the sparsity CSV whose error-matched settings are marked)."""
    args = parse_args(shlex.split(rows[0]["command"]))
    args.note = note or args.note
    args.sparsity_csv = sparsity_csv or args.sparsity_csv
    stamp = stamp_of(rows[0])
    args.plot_written = plot(rows, out / f"{prefix}.png", args.alpha)
    write_report(out / f"{prefix}.md", rows, args, stamp, walls, skipped)
    print((out / f"{prefix}.md").read_text())


def main(argv=None) -> None:
    args = parse_args(argv)
    device = run_device(args.device)
    args.out_dir = args.out_dir or run_dir("sparsity_accuracy", device)
    if args.report_only:
        return report_only(args)
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    t_start = time.time()
    deadline = t_start + args.time_budget if args.time_budget else None
    model, tokenizer, name = load_for_run(args.model, device)
    switch = AttentionSwitch(model, args.ref_threads if device.type == "cpu" else None, columns=selector_columns)
    settings = settings_for(args)
    samples = seed_major(make_samples(args, token_counter(tokenizer)))
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / f"{args.prefix}.csv", out / f"{args.prefix}.json"
    old_rows, walls, skipped = [], {}, []
    if args.append:  # the prompts of the existing CSV; only the settings a prompt has no row for yet
        if not csv_path.exists():
            raise SystemExit(f"--append: {csv_path} does not exist")
        old_rows = read_long_csv(csv_path)
        walls, skipped, note = read_info(json_path, "--append")
        args.note = args.note or note
        samples, old_rows = extend(samples, old_rows, args.redo)
    done = {(prompt_key(r), r["setting"]) for r in old_rows}
    command = shlex.join(args.argv)
    # Every row carries its run's command and environment stamp, so appended runs stay distinguishable.
    meta = dict(model=name, model_dtype=str(model.dtype).replace("torch.", ""), quick=args.quick, command=command,
                **environment_stamp(device))

    def saved(rows):
        write_long_csv(csv_path, old_rows + rows)
        write_run_json(json_path, run_info({**walls, command: round(time.time() - t_start, 3)}, skipped, args.note))

    # One prompt at a time (every setting), so the CSV after each prompt holds whole prompts only.
    rows, cut = run_prompts(model, tokenizer, switch, samples, settings, done, meta, deadline, saved)
    walls[command] = round(time.time() - t_start, 3)  # as the JSON keeps it: --report-only writes the same
    if not rows:
        raise SystemExit("no prompt ran (time budget, or --append found nothing left to run)")
    skipped += cut
    write_run_json(json_path, run_info(walls, skipped, args.note))
    write_outputs(out, args.prefix, old_rows + rows, walls, skipped, args.note, args.sparsity_csv)
    print(f"done in {walls[command] / 60:.1f} min")
