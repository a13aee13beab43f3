"""The serving check's measurement: one-shot references and the three serving scenarios, per attention.

    one-shot    each prompt alone: `generate` on the whole prompt in one call (B = 1, no padding, no cache)
    chunked     each prompt prefilled in chunks of `chunk` tokens, one forward call per chunk over a DynamicCache;
                generate then prefills the last chunk over that cache and decodes. Compared with one-shot. A
                "declared" variant runs the chunks before the last inside flashprefill_hf.more_chunks_follow.
    padded      prompt j of every length in one left-padded batch with its attention mask, generated together.
                Each row compared with its prompt alone (one-shot).
    multi_turn  turn 1 (the context and a first question, calls.FIRST_QUESTION) generated into a cache; turn 2 (the
                model's first answer and the prompt's real question) generated continuing that cache. Compared
                with a one-shot prefill of the whole conversation, turn 1 + answer 1 + turn 2, as the same ids.
                Turn 1 takes the sample's context without prompt_ids' filler, so the conversation is about L plus
                the two questions and answer 1 long: at 8K a few dozen tokens past SmolLM2's 8192 trained
                positions, the same positions on both sides.

Every model run goes through `Session.run`, which clears the backend's recorder before it and files what the
recorder saw (evidence.entry) after it, so every answer comes with the paths its prefill calls took. Rows are one
per (scenario, variant, prompt), in the long format of the run's CSV.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..accuracy import scoring
from ..common import length_label
from ..powered.prompts import Prompt
from . import evidence
from .calls import (answer_tokens, eos_ids, first_difference, greedy, left_pad, new_cache, pad_id,
                    prefill_all_but_last_chunk, two_turn_texts)

SCENARIOS = ("chunked", "padded", "multi_turn")
ATTENTIONS = ("flashprefill", "sdpa")  # sdpa: the dense floor (the same calls with transformers' exact attention)


@dataclass(frozen=True)
class Item:
    """One test prompt of the powered evaluation and its ids (1, L) (exactly L = sample.length tokens)."""

    prompt: Prompt
    ids: torch.Tensor

    @property
    def sample(self):
        return self.prompt.sample


@dataclass(frozen=True)
class Answer:
    """One greedy answer: its token ids (cut at the end of sequence and the prompt's budget), its text, and the
    mean density of the prefill calls of the run that produced it (1.0 under sdpa)."""

    tokens: list[int]
    text: str
    density: float


def padded_groups(items: list[Item]) -> list[list[Item]]:
    """The padded scenario's batches: the prompts of one (family, index) at every length (one task, so one answer
    budget), longest first; groups of fewer than two lengths are left out (nothing to pad)."""
    groups: dict[tuple[str, int], list[Item]] = {}
    for item in items:
        groups.setdefault((item.prompt.family, item.prompt.index), []).append(item)
    batches = [sorted(g, key=lambda it: -it.sample.length) for g in groups.values()]
    return [b for b in batches if len({it.sample.length for it in b}) > 1]


def chunk_variant(chunk: int, block_size: int, declared: bool = False) -> str:
    """The chunked scenario's variant name, e.g. "chunk 1024 (aligned)", "chunk 1000 (unaligned)" or
    "chunk 1024 (aligned, declared)" (the chunks before the last inside more_chunks_follow)."""
    return f"chunk {chunk} ({'aligned' if chunk % block_size == 0 else 'unaligned'}{', declared' * declared})"


class Session:
    """The loaded model and tokenizer, the backend's config (whose recorder is read), and the evidence so far."""

    def __init__(self, model, tokenizer, config, first_answer_tokens: int):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.first_answer_tokens = first_answer_tokens
        self.eos, self.pad = eos_ids(model, tokenizer), pad_id(tokenizer)
        self.attention = "flashprefill"
        self.entries: list[dict] = []

    def use(self, attention: str) -> None:
        """Route the model's attention through the backend ("flashprefill") or transformers' sdpa ("sdpa")."""
        import flashprefill_hf

        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if attention == "flashprefill":
            flashprefill_hf.use_flashprefill(self.model)
        else:
            flashprefill_hf.use_dense(self.model, "sdpa")
        self.attention = attention

    def run(self, call: Callable[[], list[list[int]]], budgets: list[int], where: tuple[str, str, str, str]
            ) -> list[Answer]:
        """Run `call` (generated ids per row) with a cleared recorder; one Answer per row, cut to `budgets`.
        where = (scenario, variant, side, lengths) names the run in the evidence."""
        recorder = self.config.recorder
        recorder.clear()
        generated = call()
        records = recorder.records if self.attention == "flashprefill" else []
        self.entries.append(evidence.entry(self.attention, *where, records))
        density = recorder.mean_density() if records else None
        answers = []
        for row, budget in zip(generated, budgets, strict=True):
            tokens = answer_tokens(row, budget, self.eos)
            answers.append(Answer(tokens, self.tokenizer.decode(tokens, skip_special_tokens=True),
                                  1.0 if density is None else density))
        return answers

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    # ---------------------------------------------------------------------------------------------- the calls
    def one_shot(self, item: Item, scenario: str = "one_shot", variant: str = "one-shot") -> Answer:
        budget = item.sample.max_new_tokens
        return self.run(lambda: greedy(self.model, item.ids, budget, self.pad), [budget],
                        (scenario, variant, "one-shot", length_label(item.sample.length)))[0]

    def chunked(self, item: Item, chunk: int, variant: str, declare: bool = False) -> Answer:
        budget = item.sample.max_new_tokens

        def call():
            cache = prefill_all_but_last_chunk(self.model, item.ids, chunk, declare)
            return greedy(self.model, item.ids, budget, self.pad, cache=cache)
        return self.run(call, [budget], ("chunked", variant, "serving", length_label(item.sample.length)))[0]

    def padded(self, batch: list[Item], variant: str) -> list[Answer]:
        ids, mask = left_pad([it.ids[0] for it in batch], self.pad)
        budgets = [it.sample.max_new_tokens for it in batch]
        lengths = "+".join(length_label(L) for L in sorted({it.sample.length for it in batch}))
        return self.run(lambda: greedy(self.model, ids, max(budgets), self.pad, attention_mask=mask), budgets,
                        ("padded", variant, "serving", lengths))

    def two_turns(self, item: Item, variant: str) -> tuple[Answer, Answer, torch.Tensor, int]:
        """(turn 2 continuing turn 1's cache, turn 2 in a one-shot prefill of the conversation, the conversation's
        ids (1, T), the tokens cached when turn 2 started)."""
        sample, label = item.sample, length_label(item.sample.length)
        text1, text2 = two_turn_texts(self.tokenizer, sample)
        turn1, turn2 = self.encode(text1), self.encode(text2)
        cache = new_cache(self.model)
        state = {}  # the conversation's ids and the cached length, known only once turn 1 has answered

        def serving():
            first = greedy(self.model, torch.tensor([turn1]), self.first_answer_tokens, self.pad, cache=cache)[0]
            cached = cache.get_seq_length()
            # The cache holds turn 1 and all but the last generated token; the conversation must start with them.
            conversation = turn1 + answer_tokens(first, self.first_answer_tokens, self.eos) + turn2
            if conversation[:cached] != (turn1 + first)[:cached]:
                raise RuntimeError(f"{sample.uid}: turn 2 does not continue the tokens cached by turn 1")
            state.update(ids=torch.tensor([conversation]), cached=cached)
            return greedy(self.model, state["ids"], sample.max_new_tokens, self.pad, cache=cache)

        budget = [sample.max_new_tokens]
        served = self.run(serving, budget, ("multi_turn", variant, "serving", label))[0]
        whole = self.run(lambda: greedy(self.model, state["ids"], sample.max_new_tokens, self.pad), budget,
                         ("multi_turn", variant, "one-shot", label))[0]
        return served, whole, state["ids"], state["cached"]


# --------------------------------------------------------------------------------------------------------------
# The measurement
# --------------------------------------------------------------------------------------------------------------
def row(item: Item, scenario: str, variant: str, attention: str, served: Answer, one_shot: Answer, **extra) -> dict:
    """One CSV row: the prompt, the two answers (token-exact comparison, scores 0-100, densities) and `extra`."""
    s = item.sample
    diff = first_difference(served.tokens, one_shot.tokens)
    return dict(scenario=scenario, variant=variant, attention=attention, family=item.prompt.family, task=s.task,
                length=s.length, seed=s.seed, depth="" if s.depth is None else round(s.depth, 4), **extra,
                identical=int(diff is None), first_difference="" if diff is None else diff,
                score=100 * scoring.sample_score(served.text, s.answers, s.metric),
                score_one_shot=100 * scoring.sample_score(one_shot.text, s.answers, s.metric),
                density=round(served.density, 5), density_one_shot=round(one_shot.density, 5),
                new_tokens=len(served.tokens), new_tokens_one_shot=len(one_shot.tokens),
                answer=" | ".join(s.answers), prediction=_shown(served.text), prediction_one_shot=_shown(one_shot.text))


def _shown(text: str) -> str:
    return text.strip().replace("\n", " ")[:160]


def runs_per_attention(items: list[Item], scenarios, chunks: list[tuple[int, bool]]) -> int:
    """How many model runs `measure` makes for one attention (the progress bar's total)."""
    n = len(items)
    return (n * (1 + len(chunks) * ("chunked" in scenarios) + 2 * ("multi_turn" in scenarios))
            + len(padded_groups(items)) * ("padded" in scenarios))


def measure(session: Session, items: list[Item], attention: str, scenarios, chunks: list[tuple[int, bool]],
            block_size: int, bar=None) -> list[dict]:
    """Every scenario of `scenarios` on every item with `attention`; one row per (scenario, variant, prompt).
    chunks: (chunk size, declared) of each chunked variant."""
    session.use(attention)

    def step(scenario: str, length: int) -> None:
        if bar is not None:
            bar.set_postfix(attention=attention, scenario=scenario, L=length_label(length), refresh=False)
            bar.update()

    alone = {}
    for item in items:
        alone[item.prompt.key] = session.one_shot(item)
        step("one-shot", item.sample.length)
    rows = []
    if "chunked" in scenarios:
        for chunk, declared in chunks:
            variant = chunk_variant(chunk, block_size, declared)
            for item in items:
                served = session.chunked(item, chunk, variant, declared)
                rows.append(row(item, "chunked", variant, attention, served, alone[item.prompt.key],
                                tokens=item.sample.length, cached=""))
                step("chunked", item.sample.length)
    if "padded" in scenarios:
        for batch in padded_groups(items):
            variant = f"left-padded batch of {len(batch)}"
            for item, served in zip(batch, session.padded(batch, variant), strict=True):
                rows.append(row(item, "padded", variant, attention, served, alone[item.prompt.key],
                                tokens=item.sample.length, cached=""))
            step("padded", batch[0].sample.length)
    if "multi_turn" in scenarios:
        for item in items:
            served, whole, ids, cached = session.two_turns(item, "two turns")
            rows.append(row(item, "multi_turn", "two turns", attention, served, whole, tokens=ids.shape[1],
                            cached=cached))
            step("multi_turn", item.sample.length)
            step("multi_turn", item.sample.length)
    return rows
