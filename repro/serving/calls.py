"""How the serving check calls a transformers model: greedy `generate`, a prefill in chunks over a DynamicCache, a
left-padded batch, the two turns of a chat. Pure helpers (no model) are at the top; the tests call them directly.

The KV cache keyword: transformers 5.0 takes it as `past_key_values`, 5.24 as `cache` (it still accepts
`past_key_values` there, with a FutureWarning), both in `forward` and in `generate`. `cache_keyword` reads which
one the model's forward declares, so neither version warns.

Every answer is a list of token ids: what `generate` produced for the row, cut at its first end-of-sequence id and
at the prompt's own token budget (a batch decodes to its longest budget; greedy rows do not depend on later steps).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterable, Sequence

import torch

# Asked in turn 1 of the two-turn chat, before the task's own question: a short answer about the context, so that
# turn 2 continues a cache that holds the context, a question and a model answer.
FIRST_QUESTION = "Before my real question: what is the text above about? Answer in one short sentence."
_SENTINEL = "\x00ANSWER-1\x00"  # stands for the model's first answer when the chat template renders turn 2


# --------------------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------------------
def answer_tokens(generated: Sequence[int], max_new_tokens: int, eos: Iterable[int]) -> list[int]:
    """The answer in one row of generated ids: at most max_new_tokens ids, up to (not including) the first
    end-of-sequence id (after it a batch row holds padding)."""
    eos = set(eos)
    answer = []
    for token in list(generated)[:max_new_tokens]:
        if token in eos:
            break
        answer.append(int(token))
    return answer


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first token where two answers differ (the shorter one's length when one extends the other);
    None when they are identical."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def chunk_bounds(length: int, chunk: int) -> list[tuple[int, int]]:
    """[(start, end)] of consecutive chunks of `chunk` tokens covering `length` tokens (the last one shorter)."""
    if length < 1 or chunk < 1:
        raise ValueError(f"length and chunk must be >= 1, got length={length}, chunk={chunk}")
    return [(s, min(s + chunk, length)) for s in range(0, length, chunk)]


def left_pad(rows: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths (each (L_i,) ids) as one left-padded batch: ids (B, W) and the attention mask
    (B, W), 0 on padding, W = max L_i."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = r
        mask[b, width - len(r):] = 1
    return ids, mask


def two_turn_texts(tokenizer, sample, first_question: str = FIRST_QUESTION) -> tuple[str, str]:
    """The chat of the multi-turn scenario as (turn 1, turn 2) text.

    turn 1: the chat prompt of the user message (the sample's context and `first_question`) up to the assistant's
            generation prompt;
    turn 2: what follows the model's first answer: the end of that answer's turn, the sample's question as the next
            user message, the generation prompt and the sample's answer prefix.
    turn 1 + answer 1 + turn 2 is the whole conversation as the chat template renders it. A tokenizer without a
    chat template gets blank lines between the parts (as repro.harness.chat_text does)."""
    first = f"{sample.context}\n\n{first_question}"
    if not getattr(tokenizer, "chat_template", None):
        return first + "\n\n", f"\n\n{sample.question}\n\n{sample.answer_prefix}"
    user = [{"role": "user", "content": first}]
    turn1 = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    chat = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": _SENTINEL},
                                                 {"role": "user", "content": sample.question}],
                                         tokenize=False, add_generation_prompt=True)
    head, _, tail = chat.partition(_SENTINEL)
    if head != turn1:  # e.g. a template that rewrites earlier turns: turn 2 would not continue turn 1's cache
        raise ValueError("the chat template does not render turn 1 as the start of the two-turn chat")
    return turn1, tail + sample.answer_prefix


# --------------------------------------------------------------------------------------------------------------
# Calls into the model
# --------------------------------------------------------------------------------------------------------------
def cache_keyword(model) -> str:
    """The keyword under which `model.forward` (and `generate`) take the KV cache: "cache" or "past_key_values"."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def new_cache(model):
    """An empty `transformers.DynamicCache` for the model (the cache of a chunked prefill or of a chat)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def eos_ids(model, tokenizer) -> set[int]:
    """The ids that end an answer: the generation config's eos id(s) and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    ids = set(eos) if isinstance(eos, (list, tuple)) else set() if eos is None else {eos}
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def greedy(model, ids: torch.Tensor, max_new_tokens: int, pad_token_id: int, attention_mask: torch.Tensor | None = None,
           cache=None) -> list[list[int]]:
    """Greedy `generate` of ids (B, L): the generated ids of every row (cut them with `answer_tokens`).

    attention_mask: (B, L), default all ones (always explicit: without one, generate may infer a mask from
    pad_token_id, which here is the chat's end-of-turn id). cache: a DynamicCache that already holds a prefix of
    the rows (a chunked prefill, turn 1 of a chat): generate prefills only the ids after it, then decodes; the
    cache is updated in place."""
    ids = ids.to(model.device)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(model.device)
    extra = {} if cache is None else {cache_keyword(model): cache}
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                         top_p=None, top_k=None, pad_token_id=pad_token_id, **extra)
    return out[:, ids.shape[1]:].tolist()


@torch.no_grad()
def prefill_all_but_last_chunk(model, ids: torch.Tensor, chunk: int, declare: bool = False):
    """A DynamicCache holding every chunk of ids (1, L) but the last, each prefilled by its own forward call over
    the cache of the chunks before it (the first without a prefix, the others as chunks after a cached prefix).
    declare: the calls run inside `flashprefill_hf.more_chunks_follow(model)` (no dense last blocks: they are not
    the end of the prompt); without it the backend takes each call as the prompt's end.

    The last chunk is left to `greedy(..., cache=...)`: generate's first forward prefills it, then decoding
    follows, exactly as after a one-shot prefill."""
    ids = ids.to(model.device)
    import flashprefill_hf

    cache, keyword = new_cache(model), cache_keyword(model)
    with flashprefill_hf.more_chunks_follow(model) if declare else contextlib.nullcontext():
        for start, end in chunk_bounds(ids.shape[1], chunk)[:-1]:
            mask = torch.ones((ids.shape[0], end), dtype=torch.long, device=ids.device)  # prefix + this chunk
            model(input_ids=ids[:, start:end], attention_mask=mask, use_cache=True, logits_to_keep=1,
                  **{keyword: cache})
    return cache
