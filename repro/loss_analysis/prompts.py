"""Which prompts the loss analysis looks at, and where their needle sits in tokens and key blocks.

With a powered run's samples CSV (repro/powered: one row per prompt and arm), the candidates are the test prompts of
the needle family at the chosen lengths that Full answers right. "Flipped" ones are those the default arm ("fp",
FlashPrefill alpha 0.12) then answers wrong, "controls" those it answers right too. `choose_from_rows` takes up to
half flipped and fills the rest with controls of the same (length, task) first (the closest seed), spreading the
choice round-robin over (length, task) groups; the order alternates flipped / control, so that a time budget that
stops early still leaves both groups. Everything is deterministic (sorted by length, task, seed).

Without a CSV, `generated` makes needle prompts of the dev split itself (repro.powered.prompts.family_prompts);
nothing is then known about flips (`Chosen.flipped` is None) and the report says so.

Needle location: the answer string inside the needle sentence (sample.meta["needle"] when the generator kept it,
else the first occurrence of the answer in the context) is mapped to token positions with the tokenizer's offset
mapping (or, for a tokenizer without one, by re-tokenizing the prefix), hence to key blocks of `block_size` tokens.
The prompt is `prompt_ids`' head + filler + tail, so positions inside the head are prompt positions; the tail
(question, chat template, answer prefix) is the prompt's last `question` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from ..accuracy.tasks import Sample
from ..powered.arms import DEFAULT_ALPHA
from ..powered.prompts import family_prompts, prompt_length, prompt_text, regenerate

FLIP_ARM = "fp"  # the powered run's arm at the default alpha, whose losses define "flipped"
PROMPT_FIELDS = ("split", "family", "task", "length", "seed")  # what names a prompt in the powered CSV


@dataclass(frozen=True)
class Candidate:
    """One prompt of the samples CSV: its naming fields, the generator budget, and every arm's score (0-100)."""

    split: str
    family: str
    task: str
    length: int
    seed: int
    budget: int
    depth: str
    scores: Mapping[str, float]

    @property
    def flipped(self) -> bool:
        """Full right and the default arm wrong."""
        return self.scores["full"] == 100 and self.scores[FLIP_ARM] < 100


@dataclass(frozen=True)
class Chosen:
    """A prompt to analyse: the regenerated sample, where it came from, and whether it flipped (None: unknown)."""

    sample: Sample
    split: str
    family: str
    flipped: bool | None
    scores: Mapping[str, float]

    def columns(self) -> dict:
        """How a result row names the prompt (the powered CSV's prompt fields plus the group)."""
        s = self.sample
        return dict(split=self.split, family=self.family, task=s.task, length=s.length, seed=s.seed,
                    budget=s.meta.get("budget", ""), depth="" if s.depth is None else round(s.depth, 4),
                    group=group_name(self.flipped))


def group_name(flipped: bool | None) -> str:
    return "unknown" if flipped is None else "flipped" if flipped else "control"


# --------------------------------------------------------------------------------------------------------------
# Choosing prompts
# --------------------------------------------------------------------------------------------------------------
def candidates(rows: Iterable[Mapping[str, str]], split: str = "test", family: str = "needle") -> list[Candidate]:
    """The prompts of `split` and `family` that Full and the default arm both answered, sorted by length, task and
    seed (rows: the samples CSV as csv.DictReader gives it)."""
    scores: dict[tuple, dict[str, float]] = {}
    info: dict[tuple, Mapping[str, str]] = {}
    for r in rows:
        if r["split"] != split or r["family"] != family:
            continue
        key = (r["task"], int(r["length"]), int(r["seed"]))
        scores.setdefault(key, {})[r["arm"]] = float(r["score"])
        info.setdefault(key, r)
    out = []
    for (task, length, seed), arm_scores in scores.items():
        if {"full", FLIP_ARM} <= set(arm_scores):
            row = info[(task, length, seed)]
            out.append(Candidate(split, family, task, length, seed, int(row["budget"]), str(row.get("depth", "")),
                                 arm_scores))
    return sorted(out, key=lambda c: (c.length, c.task, c.seed))


def default_lengths(cands: list[Candidate], how_many: int = 2) -> list[int]:
    """The `how_many` longest lengths among the candidates (where the issue saw the loss: 4K-8K)."""
    return sorted({c.length for c in cands})[-how_many:]


def _round_robin(cands: list[Candidate]) -> list[Candidate]:
    """The candidates reordered so that consecutive picks cycle through the (length, task) groups, longest first."""
    groups: dict[tuple, list[Candidate]] = {}
    for c in sorted(cands, key=lambda c: (-c.length, c.task, c.seed)):
        groups.setdefault((-c.length, c.task), []).append(c)
    queues = [groups[k] for k in sorted(groups)]
    out = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def choose_from_rows(rows, n: int, lengths: list[int] | None = None, split: str = "test",
                     family: str = "needle") -> tuple[list[Candidate], list[int], str]:
    """(up to n prompts, alternating flipped / control, the lengths used, a sentence for the report).

    Controls are matched to the chosen flipped prompts by (length, task), nearest seed, before the remaining
    controls fill up to n."""
    cands = candidates(rows, split, family)
    lengths = sorted(lengths) if lengths else default_lengths(cands)
    right = [c for c in cands if c.length in lengths and c.scores["full"] == 100]
    flips = _round_robin([c for c in right if c.flipped])[: (n + 1) // 2]
    pool = [c for c in right if not c.flipped]
    controls = []
    for f in flips:
        same = [c for c in pool if (c.length, c.task) == (f.length, f.task)]
        if same and len(controls) < n - len(flips):
            pick = min(same, key=lambda c: (abs(c.seed - f.seed), c.seed))
            controls.append(pick)
            pool.remove(pick)
    controls += _round_robin(pool)[: max(0, n - len(flips) - len(controls))]
    order = [c for pair in zip(flips, controls) for c in pair]
    order += flips[len(controls):] + controls[len(flips):]
    n_right = len(right)
    note = (f"{len(flips)} flipped (Full right, arm '{FLIP_ARM}' = alpha {DEFAULT_ALPHA:g} wrong) and "
            f"{len(controls)} control prompts (both right), of the {n_right} {split} prompts of the {family} family "
            f"at {', '.join(map(str, lengths))} tokens that Full answers right "
            f"({sum(c.flipped for c in right)} flipped among them)")
    return order, lengths, note


def regenerated(tokenizer, cands: list[Candidate]) -> list[Chosen]:
    """The samples the candidates name, regenerated exactly (repro.powered.prompts.regenerate)."""
    from ..harness import token_counter

    count = token_counter(tokenizer)
    return [Chosen(regenerate(c.task, c.length, c.seed, c.budget, count), c.split, c.family, c.flipped,
                   dict(c.scores)) for c in cands]


def generated(tokenizer, lengths: list[int], n: int, family: str = "needle", split: str = "dev") -> list[Chosen]:
    """n prompts of `family` and `split` spread over `lengths` (no CSV: nothing known about flips)."""
    from ..harness import token_counter

    per_length = [n // len(lengths) + (i < n % len(lengths)) for i in range(len(lengths))]
    out = []
    for length, count in zip(lengths, per_length):
        for p in family_prompts(family, length, split, count, token_counter(tokenizer), prompt_length(tokenizer)):
            out.append(Chosen(p.sample, split, family, None, {}))
    return out


# --------------------------------------------------------------------------------------------------------------
# Locating the needle
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NeedleLocation:
    """Token positions in the (1, length) prompt: the answer inside the needle [start, end), its key blocks, and
    the tail after the context (question, chat template, answer prefix) [question_start, length)."""

    start: int
    end: int
    blocks: tuple[int, ...]
    question_start: int
    length: int

    def columns(self) -> dict:
        return dict(needle_start=self.start, needle_end=self.end,
                    needle_blocks=" ".join(map(str, self.blocks)), question_start=self.question_start)


def answer_chars(sample: Sample) -> tuple[int, int]:
    """[start, end) characters of the (first) answer inside the needle, in sample.context."""
    context, answer = sample.context, sample.answers[0]
    lo, hi = 0, len(context)
    needle = sample.meta.get("needle")
    if needle:
        lo = context.find(needle)
        if lo < 0:
            raise ValueError(f"{sample.uid}: the needle text is not in the context")
        hi = lo + len(needle)
    start = context.find(answer, lo, hi)
    if start < 0:
        raise ValueError(f"{sample.uid}: the answer {answer!r} is not in the needle / context")
    return start, start + len(answer)


def token_span(tokenizer, text: str, start: int, end: int) -> tuple[int, int]:
    """[first, last + 1) token positions of the tokens of `text` that overlap characters [start, end).

    Uses the offset mapping of a fast tokenizer; without one, counts the tokens of the prefixes text[:start] and
    text[:end] (exact unless a token straddles the boundary)."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, KeyError, TypeError, ValueError):
        offsets = None
    if offsets:
        inside = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
        if not inside:
            raise ValueError(f"no token covers characters [{start}, {end})")
        return inside[0], inside[-1] + 1

    def count(prefix: str) -> int:
        return len(tokenizer(prefix, add_special_tokens=False)["input_ids"])

    first = count(text[:start])
    return first, max(first + 1, count(text[:end]))


def locate_needle(tokenizer, sample: Sample, block_size: int = 128) -> NeedleLocation:
    """Where the answer of `sample` sits in `prompt_ids(tokenizer, sample)` (tokens and key blocks)."""
    head, tail = prompt_text(tokenizer, sample)
    context_start = len(head) - len(sample.context)  # the head ends with the context (prompt_text)
    a, b = answer_chars(sample)
    start, end = token_span(tokenizer, head, context_start + a, context_start + b)
    n_tail = len(tokenizer(tail, add_special_tokens=False)["input_ids"])
    blocks = tuple(range(start // block_size, (end - 1) // block_size + 1))
    return NeedleLocation(start, end, blocks, sample.length - n_tail, sample.length)
