"""Why a prefill ran dense attention, and the warning that tells the user (once per model and reason).

`FALLBACK_REMEDIES` maps every reason of `backend.prefill_blocker` (and those the attention function adds) to what
the user can do about it; `warn_fallback` issues the `FlashPrefillFallbackWarning`, attributed to the user's line.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
import weakref

import torch

class FlashPrefillFallbackWarning(UserWarning):
    """A prefill ran exact dense attention (sdpa) instead of FlashPrefill. Issued once per model and reason; the
    message names the reason and how to avoid it. Silence it with
    `warnings.filterwarnings("ignore", category=flashprefill_hf.FlashPrefillFallbackWarning)`."""


# Why a prefill fell back, and what the user can do about it (the reasons of `prefill_blocker`, plus those the
# attention function adds: "requires_grad", "unsupported_by_kernels", "selector_without_varlen" and the configured,
# silent "dense_layer").
FALLBACK_REMEDIES = {
    "padding_or_custom_mask": (
        "the attention mask is neither causal attention over one left- or right-padded sequence per batch row nor "
        "a chunk after its cached prefix (flashprefill_hf/layout.py): padding inside a prompt, or a custom mask. "
        "For an unpadded prompt pass an explicit attention_mask (all ones, e.g. torch.ones_like(input_ids)): "
        "without one, generate infers a mask from pad_token_id that hides every occurrence of that id in the "
        "prompt when it differs from the model's eos_token_id (e.g. pad_token_id=tokenizer.eos_token_id on a chat "
        "prompt that contains it, with some transformers versions' tokenizers)"),
    "decode": "a decoding step (one query token after a cached prefix) runs dense attention by design",
    "cache_layout": (
        "the queries are not the last rows of the keys (e.g. a static cache, whose keys span the whole cache); "
        "use the default dynamic cache"),
    "selector_without_varlen": (
        "the peer selectors run on unpadded prompts without a cached prefix only; prefill prompts one at a time "
        "in one call, or use selector='flashprefill'"),
    "query_longer_than_keys": "the query is longer than the keys (a cache layout the backend does not handle)",
    "not_causal": "the attention is not causal; FlashPrefill is causal-only",
    "dropout": "attention dropout is active (the model is in training mode); call model.eval() for inference",
    "softcap": "attention logit soft-capping is not supported",
    "attention_sinks": "learned attention sinks are not supported",
    "sliding_window": "a sliding window shorter than the prompt is not supported",
    "position_bias": "an additive position bias is not supported",
    "head_dims_differ": "the value head dim differs from the query/key head dim",
    "requires_grad": (
        "query, key or value requires grad, and the FlashPrefill kernels are inference-only (no backward), so "
        "sdpa ran and gradients flow as usual; run inference under torch.no_grad() or torch.inference_mode() to "
        "use FlashPrefill (the `reference` package is differentiable if you need FlashPrefill's gradients)"),
    "unsupported_by_kernels": (
        "the Triton kernels support head dims {head_dims} and dtypes {dtypes}, this layer has head dim {head_dim} "
        "and {dtype}; set impl='reference' in flashprefill_hf.configure to run FlashPrefill's (slow) PyTorch "
        "reference instead"),
}


class _OncePerModel:
    """Which (model, reason) pairs have warned. A model is the transformers config object its attention modules
    share (one per loaded model; configs are unhashable, hence the id and a weak reference that drops the entry
    when the model goes); a FlashPrefillConfig serves as the owner the same way (warn_fp8_on_varlen)."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[weakref.ref, set[str]]] = {}
        self._lock = threading.Lock()

    def first(self, owner, reason: str) -> bool:
        """True the first time `reason` is seen for `owner`."""
        key = id(owner)
        with self._lock:
            entry = self._seen.get(key)
            if entry is None or entry[0]() is not owner:
                entry = (weakref.ref(owner, lambda _, key=key: self._seen.pop(key, None)), set())
                self._seen[key] = entry
            if reason in entry[1]:
                return False
            entry[1].add(reason)
            return True


_WARNED = _OncePerModel()


def _first_frame_outside(packages: tuple[str, ...]):
    """The innermost stack frame whose file is outside `packages` (the user's code: their generate or forward call)."""
    prefixes = tuple(os.path.dirname(sys.modules[p].__file__) + os.sep for p in packages if p in sys.modules)
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(prefixes):
        frame = frame.f_back
    return frame


def warn_fp8_on_varlen(config) -> None:
    """Warn once per FlashPrefillConfig that its varlen calls (padded batches, chunks after a cached prefix) run the
    attention in the model's dtype: `fp8=True` has no varlen kernel. Not a dense fallback: the selection still runs."""
    if _WARNED.first(config, "fp8_on_varlen"):
        warnings.warn(f"fp8=True: this {config.describe()} call is a padded batch or a chunk after a cached prefix "
                      "(the varlen path), which has no FP8 kernel: it runs in the model's dtype", UserWarning,
                      stacklevel=3)


def warn_fallback(module, reason: str, query: torch.Tensor) -> None:
    """Warn once per (model, reason) that a prefill of query (B, Hq, Lq, D) ran dense attention."""
    model_config = getattr(module, "config", None)
    if not _WARNED.first(model_config if model_config is not None else module, reason):
        return
    remedy = FALLBACK_REMEDIES[reason]
    if reason == "unsupported_by_kernels":
        from triton_impl.common import GPU_DTYPES, HEAD_DIMS

        remedy = remedy.format(head_dims=HEAD_DIMS, dtypes=GPU_DTYPES, head_dim=query.shape[-1], dtype=query.dtype)
    model = getattr(model_config, "name_or_path", "") or getattr(model_config, "model_type", None) or "the model"
    message = (f"FlashPrefill did not run for a {query.shape[2]}-token prefill of {model}: exact dense attention "
               f"(sdpa) ran instead. Reason {reason!r}: {remedy}. (Warned once per model and reason; the config's "
               "recorder lists every fallback.)")
    # Attributed to the user's line rather than a transformers internal; Python's once-per-location registry is not
    # used (registry=None) because the once-per-model rule above replaces it: a second model warns again. Filters
    # ("ignore", "error") apply as usual.
    frame = _first_frame_outside(("flashprefill_hf", "transformers", "torch"))
    if frame is None:
        warnings.warn(message, FlashPrefillFallbackWarning, stacklevel=2)
        return
    warnings.warn_explicit(message, FlashPrefillFallbackWarning, frame.f_code.co_filename, frame.f_lineno,
                           module=frame.f_globals.get("__name__"), registry=None, module_globals=frame.f_globals)
