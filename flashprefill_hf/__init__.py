"""FlashPrefill as a transformers attention backend.

Three lines::

    import flashprefill_hf
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=flashprefill_hf.register())
    cfg = flashprefill_hf.configure(model, alpha=0.12)   # optional: per-model parameters; cfg.recorder has densities

A peer's block selection instead of FlashPrefill's, for comparisons: `configure(model, selector="xattention",
selector_params={"threshold": 0.95})` (or "flexprefill" with {"gamma": ...}); see `FlashPrefillConfig`.

Prefill runs FlashPrefill (Triton on CUDA, the pure-PyTorch reference elsewhere): whole prompts through
`flash_prefill`; left- or right-padded batches and chunks that continue a cached prefix (chunked prefill, multi-turn
chat) through `flash_prefill_varlen` (layout.py reads the layout off the mask). Decoding steps run exact dense
attention (transformers' sdpa). The kernels are inference-only: a call that autograd tracks (grad enabled and q, k or v
requiring grad) runs sdpa too, so training through the backend works as with sdpa.

A prefill that does not get FlashPrefill warns (`FlashPrefillFallbackWarning`, once per model and reason, with the
reason and the remedy: e.g. pass an explicit all-ones attention_mask when transformers inferred one from
pad_token_id); decoding steps never warn. `cfg.recorder` (a `DensityRecorder`) keeps a record per layer per prefill
call (decoding steps only with DensityRecorder(record_decode=True)).

Tested with transformers 5.0.0 (the lowest version pyproject.toml admits) and 5.24.0.
"""

from .backend import (
    ATTN_NAME,
    DensityRecorder,
    FALLBACK_REMEDIES,
    FlashPrefillConfig,
    FlashPrefillFallbackWarning,
    SELECTORS,
    attention_modules,
    configure,
    default_config,
    flashprefill_attention_forward,
    more_chunks_follow,
    prefill_blocker,
    register,
    set_default_config,
    use_dense,
    use_flashprefill,
)
from .models import ModelNotAvailable, load_model, paper_alpha, smollm2_available, smollm2_gguf_path

__all__ = [
    "ATTN_NAME",
    "DensityRecorder",
    "FALLBACK_REMEDIES",
    "FlashPrefillConfig",
    "FlashPrefillFallbackWarning",
    "SELECTORS",
    "attention_modules",
    "configure",
    "default_config",
    "flashprefill_attention_forward",
    "more_chunks_follow",
    "prefill_blocker",
    "register",
    "set_default_config",
    "use_dense",
    "use_flashprefill",
    "ModelNotAvailable",
    "load_model",
    "paper_alpha",
    "smollm2_available",
    "smollm2_gguf_path",
]
