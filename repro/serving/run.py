"""Serving-style calls through the flashprefill_hf backend against one-shot FlashPrefill, on SmolLM2-135M-Instruct.

    python -m repro.serving --quick           # CPU smoke test (the reference): 256 and 384 tokens, block size 32,
                                              # one needle prompt per length; ~50 s on 2 cores, 20 s of it the load
    python -m repro.serving                   # GPU: 2K, 4K, 8K, 16 test prompts per length (both families)
    python -m repro.serving --dense-floor     # the same calls with sdpa as well (about twice the time)

(`python -m repro.serving_check` is the same command.) Each prompt is answered in one shot and then in three
serving scenarios (scenarios.py): prefilled in chunks over a DynamicCache (a block-aligned and an unaligned chunk
size), left-padded into a batch of prompts of other lengths, and as turn 2 of a chat continuing turn 1's cache. The
report gives, per scenario and length, the fraction of token-identical greedy answers, both task scores with their
paired difference, and the prefill calls the backend recorded per path and layout.

The check: if any prefill call of a FlashPrefill run fell back to dense attention (a "dense_fallback" record that
is not a decoding step), or a serving run did not run the layout its scenario tests, the run writes its files,
prints what failed and exits with status 1 (evidence.py).

Prompts: the powered evaluation's held-out test split (repro/powered/prompts.py), the first n // families of each
family at each length, so prompt j of a family has the same task at every length. Measured on one H200 (FULL): the
default n = 16 takes about 5 minutes with the declared variant, model load and Triton compilation included.

Writes into --out (default: the run folder repro/runs/<date>-<device>/serving/): serving_samples.csv (one row per
scenario, variant and prompt, with the environment stamp), serving_run.json (command, wall time, settings, every
run's path evidence, the check's problems) and serving_report.md. The stamp's commit is git's, or the environment
variable FLASHPREFILL_COMMIT when set (a copy of the tree without .git, as on the lent GPU).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from ..common import environment_stamp, fill_defaults, run_dir, torch_threads, write_long_csv, write_run_json
from ..harness import load_for_run, run_device
from ..powered.experiment import build_prompts
from ..powered.prompts import FAMILIES
from .evidence import problems
from .report import write_report
from .scenarios import SCENARIOS, Item, Session, measure, runs_per_attention

EXPERIMENT = "serving"
# A 2-core CPU: the reference at 256 and 384 tokens (the tasks' shortest; block size 32, so that some blocks are
# pruned at 384), one needle prompt per length (12-token answers), a short first answer. ~25 s of model calls.
QUICK = dict(lengths=[256, 384], n=1, families=["needle"], block_size=32, chunks=[128, 100], first_answer_tokens=8,
             workers=1)
# One H200 (repro/results/serving/): --n 24 without the declared variant took 401 s (368 s of model runs, 384 runs:
# ~1 s per run), the sdpa floor at --n 16 255 s. The default n = 16 adds one declared chunking (48 runs): ~300 s.
FULL = dict(lengths=[2048, 4096, 8192], n=16, families=list(FAMILIES), block_size=128, chunks=[1024, 1000],
            first_answer_tokens=24, workers=None)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m repro.serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU smoke test: tiny lengths, one prompt per length")
    p.add_argument("--model", default=None, help="GGUF file or local checkpoint (default: the SmolLM2-135M GGUF)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--lengths", type=int, nargs="+", help="prompt lengths in tokens (default 2048 4096 8192)")
    p.add_argument("--n", type=int, help="test prompts per length, split over the families (default 16)")
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), help="task families (default: both)")
    p.add_argument("--chunks", type=int, nargs="+", help="chunk sizes of the chunked scenario (default 1024 1000)")
    p.add_argument("--declared-chunks", type=int, nargs="*", default=None,
                   help="chunk sizes run again with the chunks before the last inside "
                        "flashprefill_hf.more_chunks_follow (default: the block-aligned ones of --chunks)")
    p.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    p.add_argument("--alpha", type=float, default=0.12, help="FlashPrefill's threshold (default 0.12)")
    p.add_argument("--block-size", type=int, help="FlashPrefill's block size (default 128)")
    p.add_argument("--first-answer-tokens", type=int, help="token budget of the chat's first answer (default 24)")
    p.add_argument("--dense-floor", action="store_true", help="run every call with sdpa as well")
    p.add_argument("--floor-only", action="store_true",
                   help="run every call with sdpa only (the dense floor on its own, e.g. in a second device call)")
    p.add_argument("--workers", type=int, help="processes that generate the prompts (default: the CPU count)")
    p.add_argument("--cpu-threads", type=int, default=1,
                   help="torch threads on a CPU (default 1: a small VM runs the 135M model faster on one)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the run folder)")
    p.add_argument("--note", default="", help="a note for the report")
    args = p.parse_args(argv)
    fill_defaults(args, QUICK if args.quick else FULL)
    if min(args.lengths) < 1 or args.n < 1 or args.first_answer_tokens < 1:
        p.error("--lengths, --n and --first-answer-tokens must be >= 1")
    if args.declared_chunks is None:
        args.declared_chunks = [c for c in args.chunks if c % args.block_size == 0]
    if "chunked" in args.scenarios and not all(0 < c < min(args.lengths) for c in args.chunks + args.declared_chunks):
        p.error(f"every chunk must be shorter than the shortest length ({min(args.lengths)}): a chunk as long as "
                "the prompt is a one-shot prefill")
    return args


def load_items(tokenizer, lengths: list[int], families: list[str], n: int, workers: int | None) -> list[Item]:
    """n test prompts per length, split over the families (the first ones get the remainder)."""
    per_family = [n // len(families) + (i < n % len(families)) for i in range(len(families))]
    cells = [(f, L, "test", k) for L in lengths for f, k in zip(families, per_family) if k > 0]
    return [Item(p, torch.tensor([ids], dtype=torch.long)) for p, ids in build_prompts(tokenizer, cells, workers)]


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python -m repro.serving " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    start = time.time()
    device = run_device(args.device)
    out = args.out or run_dir(EXPERIMENT, device)
    model, tokenizer, name = load_for_run(args.model, device)
    import flashprefill_hf

    config = flashprefill_hf.configure(model, alpha=args.alpha, block_size=args.block_size)
    items = load_items(tokenizer, args.lengths, args.families, args.n, args.workers)
    attentions = ["sdpa"] if args.floor_only else ["flashprefill"] + (["sdpa"] if args.dense_floor else [])
    session = Session(model, tokenizer, config, args.first_answer_tokens)
    from tqdm.auto import tqdm

    rows = []
    threads = args.cpu_threads if device.type == "cpu" else None
    with torch_threads(threads), torch.inference_mode():  # as a serving loop calls the model
        chunks = [(c, False) for c in args.chunks] + [(c, True) for c in args.declared_chunks]
        total = len(attentions) * runs_per_attention(items, args.scenarios, chunks)
        with tqdm(total=total, desc="serving check", unit="run", dynamic_ncols=True) as bar:
            for attention in attentions:
                rows += measure(session, items, attention, args.scenarios, chunks, args.block_size, bar)
        stamp = environment_stamp(device)  # inside the threads block: the stamp names the threads that ran
    found = problems(session.entries)
    info = dict(command=command, model=name, wall_seconds=round(time.time() - start),
                settings=dict(alpha=args.alpha, block_size=args.block_size, lengths=args.lengths, n=args.n,
                              families=args.families, chunks=args.chunks,
                              declared_chunks=args.declared_chunks, scenarios=args.scenarios,
                              first_answer_tokens=args.first_answer_tokens, dense_floor=args.dense_floor,
                              floor_only=args.floor_only),
                note=args.note, problems=found, evidence=session.entries)
    write_long_csv(out / "serving_samples.csv", rows, stamp)
    write_run_json(out / "serving_run.json", info)
    write_report(out / "serving_report.md", [dict(r, **stamp) for r in rows], info)
    print(f"wrote {out} in {info['wall_seconds']} s")
    if found:
        print("FAILED: prefill calls that should have run FlashPrefill did not:\n  " + "\n  ".join(found),
              file=sys.stderr, flush=True)
        return 1
    print("path check passed: no prefill call fell back to dense attention")
    return 0
