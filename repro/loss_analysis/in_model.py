"""In-model drift: the whole model runs FlashPrefill at one alpha through the flashprefill_hf backend, and every
layer's output hidden state and the answer's logits are compared with Full's (transformers' sdpa) on the same
prompt. Unlike the operator level, errors here compound: layer l sees the drifted outputs of layers < l.

Per (prompt, alpha, layer), with h the layer's output hidden states (L, hidden) in float32 (transformers'
hidden_states[l + 1]; the last layer's is taken after the final norm, as transformers returns it):

    drift_last   = ||h_alpha[L-1] - h_full[L-1]|| / ||h_full[L-1]||   the last prompt token (which predicts the answer)
    drift_tokens = mean_t ||h_alpha[t] - h_full[t]|| / ||h_full[t]||   every token, each weighted equally
    drift_all    = ||h_alpha - h_full||_F / ||h_full||_F               every token, weighted by its norm: a few
                                                                     tokens of very large norm (attention sinks)
                                                                     can dominate it

(The first blocks of the prompt are computed densely in every layer and contribute no difference.)

Per (prompt, setting), from the logits (float32):

    margin_first        top-1 minus runner-up logit at the prompt's last position (the first generated token,
                        for SmolLM2's digit answers usually a space), top1 its token, top1_same: equal to Full's
    margin_answer_first the teacher-forced answer " <answer>" fed through the cache the prefill wrote (dense
    margin_answer_min   attention, as in greedy decoding): correct logit minus the best other logit at the first
                        non-blank answer token, and the smallest such margin over the answer's tokens
    answer_greedy       margin_answer_min > 0: greedy decoding would write the answer's tokens
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch

from block_selectors import FULL, Setting

from ..harness import AttentionSwitch


@dataclass
class Forward:
    """One forward of a prompt: hidden states per layer (L, hidden) on the model's device, the next-token logits
    at the prompt's end (V,), the teacher-forced answer logits (A, V) (float32), and the backend's density."""

    hidden: list[torch.Tensor]
    first_logits: torch.Tensor
    answer_logits: torch.Tensor
    density: float


def answer_ids(tokenizer, answer: str) -> torch.Tensor:
    """(1, A) ids of the answer as the continuation of the answer prefix (which ends without a space)."""
    return tokenizer(" " + answer, return_tensors="pt", add_special_tokens=False).input_ids


def _cache_keyword(model) -> str:
    # transformers >= 5.2x calls it `cache`, earlier 5.x `past_key_values`
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def forward(model, ids: torch.Tensor, answer: torch.Tensor, recorder=None) -> Forward:
    """Prefill `ids` (1, L) with hidden states, then feed `answer` (1, A) but its last token one token at a time
    through the cache (greedy decoding's path: dense attention over the prefill's cache): answer_logits[a] predicts
    answer[a]. recorder: the backend's (cleared) recorder, or None for Full."""
    device = model.device
    out = model(ids.to(device), use_cache=True, output_hidden_states=True, logits_to_keep=1)
    density = 1.0
    if recorder is not None:  # checked before decoding: the decoding steps are not prefills
        if recorder.paths().get("dense_fallback"):
            reasons = sorted({r["reason"] for r in recorder.records if r["path"] == "dense_fallback"})
            raise RuntimeError(f"the backend fell back to dense attention in the prefill ({reasons})")
        density = recorder.mean_density()
    cache = out.get("cache")
    if cache is None:
        cache = out.get("past_key_values")
    logits = [out.logits[0, -1:].float()]
    # One token per step, as generate decodes (a multi-token step over a cache would be a "cached prefix" prefill);
    # the cache grows in place.
    for token in answer[0, :-1].tolist():
        step = model(torch.tensor([[token]], device=device), use_cache=True, **{_cache_keyword(model): cache})
        logits.append(step.logits[0, -1:].float())
    return Forward([h[0] for h in out.hidden_states[1:]], out.logits[0, -1].float(), torch.cat(logits), density)


def drift_rows(full: Forward, other: Forward) -> list[dict]:
    """One row per layer: drift_last, drift_tokens and drift_all of `other` against `full` (module docstring)."""
    rows = []
    for layer, (hf, ho) in enumerate(zip(full.hidden, other.hidden, strict=True)):
        hf, diff = hf.float(), ho.float() - hf.float()
        per_token = diff.norm(dim=-1) / hf.norm(dim=-1).clamp_min(1e-30)
        rows.append(dict(layer=layer, drift_last=float(per_token[-1]), drift_tokens=float(per_token.mean()),
                         drift_all=float(diff.norm() / hf.norm())))
    return rows


def margins(result: Forward, answer: torch.Tensor, blank: list[bool]) -> dict:
    """The logit columns of one forward (module docstring). answer (1, A) ids; blank[a]: token a is whitespace."""
    top = result.first_logits.topk(2)
    targets = answer[0].to(result.answer_logits.device)
    correct = result.answer_logits.gather(1, targets.view(-1, 1))[:, 0]
    others = result.answer_logits.scatter(1, targets.view(-1, 1), float("-inf")).amax(dim=1)
    per_token = (correct - others).tolist()
    first = next((m for m, b in zip(per_token, blank) if not b), math.nan)
    return dict(margin_first=float(top.values[0] - top.values[1]), top1=int(top.indices[0]),
                margin_answer_first=first, margin_answer_min=min(per_token),
                answer_greedy=min(per_token) > 0, answer_tokens=len(per_token))


def measure(model, tokenizer, switch: AttentionSwitch, ids: torch.Tensor, answer: str, full: Forward,
            alphas) -> tuple[list[dict], list[dict]]:
    """(drift rows, one per alpha and layer; answer rows, Full's then one per alpha) for one prompt whose Full
    forward is `full` (made with the same `answer`)."""
    target = answer_ids(tokenizer, answer)
    blank = [not tokenizer.decode([t]).strip() for t in target[0].tolist()]
    full_cols = margins(full, target, blank)

    def answer_row(setting: str, alpha, result: Forward, cols: dict) -> dict:
        return dict(setting=setting, alpha=alpha, density=result.density, **cols,
                    top1_text=tokenizer.decode([cols["top1"]]), top1_same=cols["top1"] == full_cols["top1"],
                    full_margin_first=full_cols["margin_first"], full_margin_answer_min=full_cols["margin_answer_min"])

    drifts, answers = [], [answer_row("full", "", full, full_cols)]
    for alpha in alphas:
        result = forward(model, ids, target, switch.use(Setting("flashprefill", alpha)))
        drifts += [dict(alpha=alpha, density=result.density, **r) for r in drift_rows(full, result)]
        answers.append(answer_row("flashprefill", alpha, result, margins(result, target, blank)))
        del result
    switch.use(Setting(FULL))
    return drifts, answers
