"""The powered evaluation's run: every arm answers every prompt, batched by (split, task, length).

Prompts of one task and length have the same token length (prompts.prompt_ids) and the same answer budget, so they
go through the model as one (B, L) batch: one prefill (FlashPrefill through the backend, or sdpa for Full) and a
batched greedy decode (dense attention over the cache the prefill wrote, for every arm). Arms run one after the
other over all prompts, "full" first, so that a time budget cuts whole arms and every arm that ran is paired with
Full on every prompt.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from ..accuracy import scoring
from ..harness import AttentionSwitch, greedy_answers
from .arms import Arm
from .prompts import Prompt, family_prompts, prompt_ids, prompt_length


@dataclass
class Batch:
    """Prompts of one (split, task, length), with their ids stacked: (B, L)."""

    prompts: list[Prompt]
    ids: torch.Tensor

    @property
    def max_new_tokens(self) -> int:
        return self.prompts[0].sample.max_new_tokens


# --------------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------------
_TOKENIZER = None  # the tokenizer of the worker processes (inherited through fork)


CHUNK = 20  # prompts one worker task generates


def _chunk_prompts(chunk: tuple[str, int, str, int, int]) -> list[tuple[Prompt, list[int]]]:
    from ..harness import token_counter

    family, length, split, start, n = chunk
    prompts = family_prompts(family, length, split, n, token_counter(_TOKENIZER), prompt_length(_TOKENIZER), start)
    return [(p, prompt_ids(_TOKENIZER, p.sample)[0].tolist()) for p in prompts]


def build_prompts(tokenizer, cells: list[tuple[str, int, str, int]], workers: int | None = None
                  ) -> list[tuple[Prompt, list[int]]]:
    """(prompt, ids) of every (family, length, split, n) cell, generated CHUNK prompts at a time in `workers`
    processes (default: the CPU count); the prompts depend only on their seeds, not on the workers."""
    global _TOKENIZER
    _TOKENIZER = tokenizer
    chunks = [(f, L, s, start, min(CHUNK, n - start)) for f, L, s, n in cells for start in range(0, n, CHUNK)]
    workers = min(len(chunks), workers or os.cpu_count() or 1)
    if workers <= 1:
        return [pair for chunk in chunks for pair in _chunk_prompts(chunk)]
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the fast tokenizer's own threads do not survive a fork
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return [pair for chunk_pairs in pool.map(_chunk_prompts, chunks) for pair in chunk_pairs]


def make_batches(pairs: list[tuple[Prompt, list[int]]], max_batch_tokens: int) -> list[Batch]:
    """Group by (split, task, length) and cut each group into batches of at most max_batch_tokens tokens (at least
    one prompt each), in a fixed order: split, length, task."""
    groups: dict[tuple, list[tuple[Prompt, list[int]]]] = defaultdict(list)
    for prompt, ids in pairs:
        groups[(prompt.split, prompt.sample.length, prompt.family, prompt.sample.task)].append((prompt, ids))
    batches = []
    for key in sorted(groups):
        group = groups[key]
        size = max(1, max_batch_tokens // key[1])
        for start in range(0, len(group), size):
            chunk = group[start:start + size]
            batches.append(Batch([p for p, _ in chunk], torch.tensor([ids for _, ids in chunk], dtype=torch.long)))
    return batches


# --------------------------------------------------------------------------------------------------------------
# Answering
# --------------------------------------------------------------------------------------------------------------
def run_arm(model, tokenizer, switch: AttentionSwitch, arm: Arm, batches: list[Batch],
            on_batch: Callable[[Batch, object], None] | None = None) -> list[dict]:
    """One row per prompt: the arm's answer, its score (0-100) and the batch's density. on_batch(batch, recorder)
    runs after each batch (recorder: the backend's DensityRecorder, None for Full), e.g. to read per-layer densities."""
    from tqdm.auto import tqdm

    rows = []
    for batch in tqdm(batches, desc=arm.name, unit="batch", dynamic_ncols=True):
        recorder = switch.use(arm.setting, **arm.knobs)
        t0 = time.perf_counter()
        answers = greedy_answers(model, tokenizer, batch.ids, batch.max_new_tokens)
        seconds = time.perf_counter() - t0
        density = recorder.mean_density() if recorder is not None else 1.0
        impl = "sdpa" if recorder is None else "+".join(sorted(recorder.impls())) or "none"
        if recorder is not None and recorder.paths().get("dense_fallback"):
            # An arm that silently ran dense attention would look lossless: refuse to report it.
            reasons = sorted({r["reason"] for r in recorder.records if r["path"] == "dense_fallback"})
            raise RuntimeError(f"arm {arm.name}: the backend fell back to dense attention in the prefill ({reasons})")
        for prompt, answer in zip(batch.prompts, answers, strict=True):
            s = prompt.sample
            rows.append(dict(split=prompt.split, family=prompt.family, task=s.task, length=s.length, seed=s.seed,
                             budget=s.meta["budget"], depth="" if s.depth is None else round(s.depth, 4), **arm.columns(),
                             score=100 * scoring.sample_score(answer, s.answers, s.metric),
                             density=density, impl=impl, batch=len(batch.prompts),
                             batch_seconds=round(seconds, 3), answer=" | ".join(s.answers),
                             prediction=answer.strip().replace("\n", " ")[:160]))
        if on_batch is not None:
            on_batch(batch, recorder)
    return rows
