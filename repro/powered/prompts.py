"""The powered evaluation's prompts: two task families, a dev and a test split from disjoint seed ranges, and
prompts of an exact token length so that prompts of one length batch without padding.

    FAMILIES["needle"]  single-answer retrieval: passkey, niah_single (prose), niah_single_noise, niah_multikey
    FAMILIES["ruler"]   the other RULER families: niah_multivalue, niah_multiquery, vt, cwe, fwe, qa

Prompt i of (family, length, split) is task FAMILIES[family][i % len] with seed SPLIT_SEEDS[split] + i; needle
depths are drawn from the seed (uniform in [0, 1)), so the depth profile comes with the prompts. The dev split is
for choosing knobs; the test split is reported and never tuned on. The seed ranges are disjoint from every other
experiment's (repro/accuracy: < 1000 and 100_000+) and from the pilot that chose the families (300_000+).

Exact length. The generators fill a haystack to a token budget and land short of it (up to ~8% on prose: they
charge a token for every space between sentences, which the tokenizer merges into the next word). So each prompt is
generated for a budget raised by the measured shortfall (at most 3 tries, deterministic: the same seed gives the
same prompt), and `prompt_ids` inserts the few tokens still missing (the haystack's own kind: the noise sentence
or grammar prose) between the context and the question, so every prompt of length L has exactly L tokens and its
needles are spread over the whole context. Prompts of one length
then share one (B, L) batch with an all-ones attention mask: the flashprefill_hf backend runs FlashPrefill on
such a batch (a padded batch would fall back to dense attention).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..accuracy.tasks import NOISE, CountTokens, Sample, generate, prose_sentences
from ..harness import chat_text

FAMILIES: dict[str, tuple[str, ...]] = {
    "needle": ("niah_single", "niah_single_noise", "niah_multikey"),
    "ruler": ("niah_multivalue", "niah_multiquery", "fwe", "qa"),
}
# Left out (a 20-prompt pilot per length on the H200, Full attention only, seeds 300_000+ which no split uses):
# passkey, vt and cwe, on which SmolLM2-135M-Instruct scores 0-20 with Full attention at 2K-8K (it answers passkey
# with "a special type of pass key ..."): prompts both arms get wrong cannot show a difference, and cwe's 80-token
# answers cost a third of the decoding time.
PILOT_TASKS_LEFT_OUT = ("passkey", "vt", "cwe")
SPLIT_SEEDS = {"dev": 200_000, "test": 400_000}
NOISE_TASKS = frozenset({"passkey", "niah_single_noise", "vt"})  # haystacks of the repeated noise sentence


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt: where it comes from and the generated sample."""

    family: str
    split: str
    index: int
    sample: Sample

    @property
    def key(self) -> tuple:
        """What names the prompt in the result rows (the pairing key of the comparisons)."""
        return (self.split, self.family, self.sample.task, self.sample.length, self.sample.seed)


def check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")


def check_split(split: str) -> None:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")


MAX_FILLER = 24  # filler tokens `prompt_ids` may add without regenerating the prompt for a larger budget


def family_prompts(family: str, length: int, split: str, n: int, count_tokens: CountTokens,
                   prompt_length: Callable[[Sample], int] | None = None, start: int = 0) -> list[Prompt]:
    """Prompts start .. start + n - 1 of (family, length, split), tasks in rotation (prompt i is task i % tasks).

    prompt_length: the sample's full prompt length in tokens (chat template included); when given, a prompt more
    than MAX_FILLER tokens short of `length` is regenerated for a budget raised by the shortfall (the generator's
    budget is kept in sample.meta["budget"]; sample.length stays `length`)."""
    check_family(family)
    check_split(split)
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be >= 0, got n={n}, start={start}")
    tasks = FAMILIES[family]
    return [Prompt(family, split, i, _sized(tasks[i % len(tasks)], length, SPLIT_SEEDS[split] + i, count_tokens,
                                           prompt_length))
            for i in range(start, start + n)]


def _sized(task: str, length: int, seed: int, count_tokens: CountTokens,
           prompt_length: Callable[[Sample], int] | None) -> Sample:
    """The task's sample at `seed` whose prompt is at most `length` tokens and, with `prompt_length`, at most
    MAX_FILLER short of it when 3 budgets can get there (else the closest one that fits)."""
    budget, best = length, None
    for _ in range(3):
        sample = generate(task, budget, seed, count_tokens)
        if prompt_length is None:
            return replace(sample, length=length, meta={**sample.meta, "budget": budget})
        short = length - prompt_length(sample)
        if short >= 0 and (best is None or short < best[0]):
            best = (short, replace(sample, length=length, meta={**sample.meta, "budget": budget}))
        if 0 <= short <= MAX_FILLER:
            break
        budget += short - MAX_FILLER // 2  # aim at the middle of the window
    if best is None:
        raise ValueError(f"{task} seed {seed}: no budget gave a prompt of at most {length} tokens")
    return best[1]


def regenerate(task: str, length: int, seed: int, budget: int, count_tokens: CountTokens) -> Sample:
    """The sample a result row names (its task, length, seed and budget columns), as `family_prompts` made it."""
    sample = generate(task, budget, seed, count_tokens)
    return replace(sample, length=length, meta={**sample.meta, "budget": budget})


def _filler_text(task: str, n_tokens: int) -> str:
    """Text of at least n_tokens tokens (more than enough) of the task's haystack kind."""
    if task in NOISE_TASKS:
        return " " + " ".join([NOISE] * (n_tokens // 4 + 2))
    return " " + " ".join(prose_sentences(random.Random(f"filler-{task}"), n_tokens // 4 + 2))


def prompt_text(tokenizer, sample: Sample) -> tuple[str, str]:
    """The chat-formatted prompt (repro.harness.chat_text) split where the context ends: (head, tail)."""
    text = chat_text(tokenizer, sample)
    start = text.find(sample.context)
    if start < 0:
        raise ValueError(f"the chat template changed the context of {sample.uid}")
    end = start + len(sample.context)
    return text[:end], text[end:]


def prompt_length(tokenizer) -> Callable[[Sample], int]:
    """sample -> its prompt's length in tokens before the filler (the `prompt_length` of `family_prompts`)."""
    def length(sample: Sample) -> int:
        return sum(len(tokenizer(part, add_special_tokens=False).input_ids) for part in prompt_text(tokenizer, sample))
    return length


def prompt_ids(tokenizer, sample: Sample) -> torch.Tensor:
    """(1, sample.length) token ids: the prompt with filler tokens inserted after the context to reach exactly
    sample.length tokens. Raises ValueError when the generated prompt is already longer."""
    head, tail = prompt_text(tokenizer, sample)
    ids_head = tokenizer(head, add_special_tokens=False).input_ids
    ids_tail = tokenizer(tail, add_special_tokens=False).input_ids
    missing = sample.length - len(ids_head) - len(ids_tail)
    if missing < 0:
        raise ValueError(f"prompt {sample.uid} has {-missing} tokens more than its length {sample.length}")
    filler = tokenizer(_filler_text(sample.task, missing), add_special_tokens=False).input_ids[:missing]
    ids = ids_head + filler + ids_tail
    assert len(ids) == sample.length, (len(ids), sample.length)  # the filler text is long enough by construction
    return torch.tensor([ids], dtype=torch.long)
