"""FlashPrefill as a transformers attention backend.

Three lines::

    import flashprefill_hf
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=flashprefill_hf.register())
    cfg = flashprefill_hf.configure(model, alpha=0.12)   # optional: per-model parameters; cfg.recorder has densities

A peer's block selection instead of FlashPrefill's, for comparisons: `configure(model, selector="xattention",
selector_params={"threshold": 0.95})` (or "flexprefill" with {"gamma": ...}); see `FlashPrefillConfig`.

Prefill (query length == key length, causal, no padding, no cached prefix) runs FlashPrefill (Triton on CUDA,
the pure-PyTorch reference elsewhere); decoding, cached prefixes and padded batches run exact dense attention.
"""

from .backend import (
    ATTN_NAME,
    DensityRecorder,
    FlashPrefillConfig,
    PEER_SELECTORS,
    SELECTORS,
    attention_modules,
    configure,
    default_config,
    flashprefill_attention_forward,
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
    "FlashPrefillConfig",
    "PEER_SELECTORS",
    "SELECTORS",
    "attention_modules",
    "configure",
    "default_config",
    "flashprefill_attention_forward",
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
