"""RoPE scaling of a loaded transformers model for prompts longer than its trained context, through transformers'
own RoPE initialisers (`modeling_rope_utils.ROPE_INIT_FUNCTIONS`), so the three methods are exactly the ones a
user gets from `config.rope_parameters`:

    "linear"   position interpolation: every frequency divided by the factor
    "dynamic"  dynamic NTK: the RoPE base raised with the running length (no change up to the trained context)
    "yarn"     YaRN: low frequencies interpolated, high ones kept, and the attention temperature raised
    "none"     no scaling (the trained RoPE extrapolated): a control, never chosen

The factor is length / trained context (8192 for SmolLM2), at least 1.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

ROPE_METHODS = ("linear", "dynamic", "yarn")  # the candidates, in the order that breaks ties
CONTROL = "none"


def check_method(method: str) -> str:
    if method not in (*ROPE_METHODS, CONTROL):
        raise ValueError(f"rope method must be one of {[*ROPE_METHODS, CONTROL]}, got {method!r}")
    return method


def trained_context(model) -> int:
    """The context length the model was trained for (its config's max_position_embeddings)."""
    return int(model.config.max_position_embeddings)


def rope_factor(model, length: int) -> float:
    """length / trained context, at least 1."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    return max(1.0, length / trained_context(model))


def scaled_config(config, method: str, factor: float):
    """A copy of `config` whose rope_parameters ask for `method` with `factor` (the original is not touched)."""
    check_method(method)
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    base = getattr(config, "rope_parameters", None)
    if not isinstance(base, dict) or base.get("rope_type", "default") != "default":
        raise ValueError(f"expected a model with plain RoPE (rope_parameters with rope_type 'default'), got {base!r}")
    scaled = copy.deepcopy(config)
    if method == CONTROL:
        return scaled
    params = {"rope_type": method, "rope_theta": base["rope_theta"], "factor": float(factor)}
    if method == "yarn":
        params["original_max_position_embeddings"] = config.max_position_embeddings
    if method in ("linear", "yarn"):
        # dynamic reads max_position_embeddings as the trained length; the others are told the new one.
        scaled.max_position_embeddings = int(round(config.max_position_embeddings * factor))
    scaled.rope_parameters = params
    return scaled


def _rotary_owner(model):
    """The module that holds the model's one rotary embedding (Llama-style: model.model.rotary_emb)."""
    inner = getattr(model, "model", model)
    if not hasattr(inner, "rotary_emb"):
        raise ValueError(f"{type(model).__name__} has no shared rotary embedding (model.model.rotary_emb)")
    return inner


@contextmanager
def scaled_rope(model, method: str, length: int):
    """Within the block, `model` applies RoPE scaled by `method` for prompts of `length` tokens; the trained
    rotary embedding is put back afterwards. Yields the factor. "none" leaves the model as it is."""
    owner = _rotary_owner(model)
    trained = owner.rotary_emb
    factor = rope_factor(model, length)
    config = scaled_config(model.config, method, factor)
    if method == CONTROL:
        yield factor
        return
    owner.rotary_emb = type(trained)(config=config).to(trained.inv_freq.device)
    try:
        yield factor
    finally:
        owner.rotary_emb = trained
