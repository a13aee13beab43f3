"""The model-and-prompt harness of the experiments that answer prompts with a real model: repro/accuracy/ (Full vs
FlashPrefill at alphas) and repro/sparsity_accuracy/ (every block selector of `block_selectors`).

    model, tokenizer, name = load_for_run(path, run_device(None))
    switch = AttentionSwitch(model, cpu_threads=1, columns=alpha_columns)
    rows, skipped = run_samples(model, tokenizer, switch, seed_major(samples), [Setting(FULL), ...], "phase")

A setting is a `block_selectors.Setting`: Setting(FULL) is the model's exact attention (transformers' sdpa), any
other setting runs the prefill through the flashprefill_hf backend with that selector and knob value (dense
attention while decoding). `columns` decides how a row names its setting: `alpha_columns` (method, alpha: the
accuracy runner's CSV) or `selector_columns` (method, param, value, setting, paper_default: sparsity_accuracy's).
"""

from __future__ import annotations

import os
import time
from typing import Callable

import torch

from block_selectors import FULL, Setting

from .accuracy import scoring
from .accuracy.tasks import Sample


# --------------------------------------------------------------------------------------------------------------
# Prompting and decoding
# --------------------------------------------------------------------------------------------------------------
def token_counter(tokenizer) -> Callable[[str], int]:
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)
    return count


def chat_text(tokenizer, sample: Sample) -> str:
    """The prompt as text: the chat template around the user message, the generation prompt, then the answer
    prefix (a tokenizer without a chat template gets the user message and a blank line)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": sample.user_message}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = sample.user_message + "\n\n"
    return text + sample.answer_prefix


def build_prompt(tokenizer, sample: Sample) -> torch.Tensor:
    """Chat-formatted prompt ids (1, L) of `chat_text`."""
    return tokenizer(chat_text(tokenizer, sample), return_tensors="pt", add_special_tokens=False).input_ids


@torch.no_grad()
def greedy_answers(model, tokenizer, ids: torch.Tensor, max_new_tokens: int) -> list[str]:
    """Greedy answers of a (B, L) batch of prompts of equal length (no padding: the attention mask is all ones)."""
    ids = ids.to(model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, temperature=None, top_p=None,
                         top_k=None)
    return tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)


def greedy_answer(model, tokenizer, ids: torch.Tensor, max_new_tokens: int) -> str:
    """The greedy answer of one prompt (1, L)."""
    return greedy_answers(model, tokenizer, ids, max_new_tokens)[0]


# --------------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------------
def alpha_columns(setting: Setting) -> dict:
    """The accuracy runner's columns: method ("full" / "flashprefill") and alpha ("" for Full)."""
    return dict(method=setting.selector, alpha="" if setting.value is None else setting.value)


def selector_columns(setting: Setting) -> dict:
    """sparsity_accuracy's columns: the selector, its knob and value, the label and whether it is the paper's."""
    return dict(method=setting.selector, param=setting.param, value="" if setting.value is None else setting.value,
                setting=setting.label, paper_default=setting.paper_default)


class AttentionSwitch:
    """Switches one loaded model between settings (`block_selectors.Setting`); `columns(setting)` names the setting
    in a result row (the columns that follow `task`). `config` is the base the settings change (set fields such as
    dense_layers on it before the first `use`); each `use` configures a copy, so the base stays as it is."""

    def __init__(self, model, cpu_threads: int | None, columns: Callable[[Setting], dict] = alpha_columns):
        import flashprefill_hf

        self.fh = flashprefill_hf
        self.model = model
        self.config = flashprefill_hf.FlashPrefillConfig(cpu_threads=cpu_threads)
        self.columns = columns

    def use(self, setting: Setting, **knobs):
        """Switch the model to `setting`, with further FlashPrefillConfig fields `knobs` for this call only (e.g.
        mean_correction=True, dense_layers=4); returns the backend's (cleared) recorder, None for Full."""
        if setting.selector == FULL:
            self.fh.use_dense(self.model, "sdpa")
            return None
        config = self.fh.configure(self.model, self.config, **setting.config_changes(), **knobs)
        config.recorder.clear()  # the copies share the base's recorder
        return config.recorder


# --------------------------------------------------------------------------------------------------------------
# Answering prompts
# --------------------------------------------------------------------------------------------------------------
def run_samples(model, tokenizer, switch: AttentionSwitch, samples: list[tuple[str, Sample]], settings: list[Setting],
                desc: str, deadline: float | None = None) -> tuple[list[dict], list[str]]:
    """Answer every (group, sample) with every setting: one row per (sample, setting), all settings of a sample
    before the next sample. Past `deadline` (time.time()) the remaining samples are skipped. Returns (rows, what
    was skipped: a sentence for the report, or nothing)."""
    from tqdm.auto import tqdm

    rows, skipped = [], []
    t_phase = time.time()
    with tqdm(total=len(samples) * len(settings), desc=desc, unit="prompt", dynamic_ncols=True) as bar:
        for n, (group, sample) in enumerate(samples):
            if deadline is not None and time.time() > deadline:
                skipped.append(f"{desc}: {len(samples) - n} of {len(samples)} prompts skipped (time budget)")
                break
            ids = build_prompt(tokenizer, sample)
            for setting in settings:
                recorder = switch.use(setting)
                named = switch.columns(setting)
                t0 = time.perf_counter()
                pred = greedy_answer(model, tokenizer, ids, sample.max_new_tokens)
                seconds = time.perf_counter() - t0
                score = 100 * scoring.sample_score(pred, sample.answers, sample.metric)
                density = recorder.mean_density() if recorder is not None else 1.0
                # Which prefill attention ran: "sdpa" for Full, else the implementation(s) the backend recorded.
                impl = "sdpa" if recorder is None else "+".join(sorted(recorder.impls())) or "none"
                rows.append(dict(experiment=group, task=sample.task, **named, length=sample.length, tokens=ids.shape[1],
                                 depth="" if sample.depth is None else round(sample.depth, 4), seed=sample.seed,
                                 score=score, density=density, impl=impl, seconds=round(seconds, 3),
                                 answer=" | ".join(sample.answers), prediction=pred.strip().replace("\n", " ")[:200]))
                bar.set_postfix(task=sample.task, L=sample.length, m=named["method"], s=f"{score:.0f}",
                                refresh=False)  # refresh=True would print every prompt, whatever mininterval
                bar.update()
    print(f"{desc}: {len(rows)} of {len(samples) * len(settings)} answers in {time.time() - t_phase:.0f} s",
          flush=True)
    return rows, skipped


def seed_major(samples: list[tuple[str, Sample]]) -> list[tuple[str, Sample]]:
    """Stable sort by seed: a time budget then cuts whole seeds, never a task or a length."""
    return sorted(samples, key=lambda gs: gs[1].seed)


# --------------------------------------------------------------------------------------------------------------
# Device and model
# --------------------------------------------------------------------------------------------------------------
def run_device(name: str | None) -> torch.device:
    """--device, or CUDA when there is one."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_for_run(path, device: torch.device):
    """(model, tokenizer, name) offline, with its load time printed; a missing model ends the run with a message."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is first imported
    import flashprefill_hf

    start = time.time()
    try:
        model, tokenizer, name = flashprefill_hf.load_model(path, device=device)
    except flashprefill_hf.ModelNotAvailable as e:
        raise SystemExit(f"error: {e}")
    print(f"loaded {name} ({model.dtype}) on {device} in {time.time() - start:.0f} s; "
          f"torch threads {torch.get_num_threads()}", flush=True)
    return model, tokenizer, name
