"""The experiment: its settings (Full, FlashPrefill at the reference alpha, each peer on a grid of its knob), its
prompts, and the prompt-by-prompt run that extends an earlier one (--append, --redo).

Settings: Full (sdpa); FlashPrefill at alpha 0.12 (the V1 default; SmolLM2 is not in the paper); FlexPrefill
(gamma; tau 0.1, min_budget 1024 tokens, block 128) and XAttention (threshold; stride 8, block 128) on a grid that
includes each paper default (0.9). The peers are our PyTorch implementations (peers/) and attend with
reference.block_sparse_attention on the CPU (triton_impl.block_sparse_attention on a GPU).

Prompts: seeds 10-12 by default: a range of their own, distinct from the evaluation seeds 0-2 of the committed
accuracy runs (repro/results/accuracy/) and from the calibration seeds (>= 100000) of repro/accuracy/. Prompts run
one at a time with every setting, seed by seed, so a time budget drops whole prompts (never one setting of a
prompt) and every setting is scored on the same prompts.
"""

from __future__ import annotations

import time
from typing import Callable

from block_selectors import FULL, Setting

from ..accuracy.tasks import Sample, generate
from ..harness import AttentionSwitch, run_samples

DEPTH_TASKS = ("passkey", "niah_single", "qa")  # generators that take a needle depth
SEEDS = [10, 11, 12]  # selection seeds: distinct from the evaluation seeds 0-2 of the committed accuracy runs


def settings_for(args) -> list[Setting]:
    return ([Setting(FULL), Setting("flashprefill", args.alpha)]
            + [Setting("flexprefill", g) for g in args.flex_gammas]
            + [Setting("xattention", t) for t in args.xattn_thresholds])


def make_samples(args, count_tokens) -> list[tuple[str, Sample]]:
    """One prompt per (seed, length, task). Tasks with a needle depth take the seed's depth (depths[i % len] for
    the i-th seed), so three seeds cover three depths; the other tasks place their needles from the seed."""
    samples = []
    for i, seed in enumerate(args.seeds):
        depth = args.depths[i % len(args.depths)]
        for L in args.lengths:
            for task in args.tasks:
                kwargs = dict(depth=depth) if task in DEPTH_TASKS else {}
                samples.append(("needle" if task in DEPTH_TASKS else "ruler", generate(task, L, seed, count_tokens,
                                                                                      **kwargs)))
    return samples


def prompt_key(r) -> tuple:
    """A prompt's identity in a row (CSV strings or run_samples' values)."""
    return (r["task"], int(r["length"]), str(r["depth"]), int(r["seed"]))


def sample_key(sample: Sample) -> tuple:
    """The same identity for a generated sample (run_samples writes depth rounded to 4 digits, "" for none)."""
    return (sample.task, sample.length, "" if sample.depth is None else str(round(sample.depth, 4)), sample.seed)


def extend(samples: list[tuple[str, Sample]], old_rows: list[dict], redo: bool):
    """What an --append run does with the existing CSV's rows: (the samples to run, the old rows to keep).
    Without redo: only the existing CSV's prompts (the settings they lack run); with redo: this command's prompts
    replace their rows, every setting answering them again."""
    if redo:
        planned = {sample_key(sample) for _, sample in samples}
        return samples, [r for r in old_rows if prompt_key(r) not in planned]
    prompts = {prompt_key(r) for r in old_rows}
    return [gs for gs in samples if sample_key(gs[1]) in prompts], old_rows


def run_prompts(model, tokenizer, switch: AttentionSwitch, samples, settings: list[Setting], done: set,
                meta: dict, deadline: float | None, saved: Callable[[list[dict]], None]):
    """Answer the samples one at a time with every setting not in `done` ({(prompt key, label)}); after each
    prompt `saved(rows so far)` is called, so the files hold whole prompts only. Rows are the CSV's view (strings,
    with `meta`'s columns). Returns (rows, what the time budget skipped)."""
    rows, skipped = [], []
    for i, sample in enumerate(samples):
        if deadline is not None and time.time() > deadline:
            skipped.append(f"{len(samples) - i} prompt(s) skipped by the time budget")
            break
        todo = [s for s in settings if (sample_key(sample[1]), s.label) not in done]
        if todo:
            new, _ = run_samples(model, tokenizer, switch, [sample], todo, f"prompt {i + 1}/{len(samples)}")
            rows += [{k: str(v) for k, v in dict(r, **meta).items()} for r in new]  # as --report-only reads them
            saved(rows)
    return rows, skipped
