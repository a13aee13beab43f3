"""A transformers attention backend that runs FlashPrefill for prefill and exact dense attention otherwise.

transformers (>= 5) looks attention functions up by name in `AttentionInterface`; every decoder layer calls

    attn_output, attn_weights = fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)

with query (B, Hq, Lq, D), key / value (B, Hkv, Lk, D), and expects attn_output (B, Lq, Hq, D).
`register()` adds the name "fprefill" (ATTN_NAME says why not "flashprefill") to that interface (and to the mask
interface, with the sdpa mask, so that a causal prompt without padding arrives with attention_mask=None).
The function below then decides, per call:

    prefill  (Lq > 1 or a one-token prompt; a causal module, no dropout, no softcap, no sliding window shorter
              than the keys, not one of the first `dense_layers` layers, and no autograd graph wanted: grad
              disabled or none of query / key / value requires grad), in one of two layouts:
      batch  the mask is None or exactly causal and Lq == Lk: B whole prompts of equal length ->
                "flashprefill" (the default selector): `triton_impl.flash_prefill` on CUDA, `reference.flash_prefill`
                on the CPU; "flexprefill" / "xattention" (the peers, `peers/`): the peer's block lists, then
                `triton_impl.block_sparse_attention` on CUDA, `reference.block_sparse_attention` on the CPU
      varlen the mask describes one sequence per batch row, left- or right-padded, each query chunk following its
             cached prefix (layout.py: padded batches, multi-turn chat, chunked prefill) -> the rows are packed
             and `flash_prefill_varlen` runs (Triton on CUDA, the reference on the CPU); padding rows output 0.
             Every call is taken as the end of its prompt (is_last_chunk) unless it runs inside
             `more_chunks_follow(model)`: the backend cannot see whether more chunks follow, and only the prompt's
             end gets `last_dense_blocks` dense query blocks. The peers have no varlen selection: with them these
             calls run sdpa (reason "selector_without_varlen").
    anything else (decoding: Lq == 1 < Lk; a custom mask, a static cache, training, ...)
             -> exact dense attention: transformers' own sdpa function

The Triton kernels are inference-only (no backward), so a call that autograd would track runs sdpa instead
(reason "requires_grad"): training through the backend gives the same gradients as sdpa. On CUDA with
impl="auto", a head dim or dtype the kernels do not support (triton_impl.common.HEAD_DIMS / GPU_DTYPES) also
runs sdpa (reason "unsupported_by_kernels"); impl="reference" runs the PyTorch reference for any shape.

A prefill (Lq > 1) that falls back warns with `FlashPrefillFallbackWarning`, once per model and reason, naming the
reason and how to avoid it; decoding steps (Lq == 1) and the configured `dense_layers` never warn. Silence it with
`warnings.filterwarnings("ignore", category=flashprefill_hf.FlashPrefillFallbackWarning)`.

Per-model parameters live in a `FlashPrefillConfig` attached to the model's attention modules by `configure`;
a `DensityRecorder` in that config keeps one record per layer per prefill call (decoding steps only on request).

Tested with transformers 5.0.0 (the lowest version pyproject.toml admits; .ci/run runs the backend tests in a second
environment with it) and 5.24.0 (the version setup.sh installs).
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from block_selectors import SELECTORS

from .fallbacks import FALLBACK_REMEDIES, FlashPrefillFallbackWarning, warn_fallback, warn_fp8_on_varlen
from .layout import PackedLayout, batch_layout

# Not "flashprefill": transformers (5.x) treats every implementation name that contains "flash" as a FlashAttention
# kernel (it tries to import flash_attn / hub kernels and changes its masking), so the backend is named "fprefill".
ATTN_NAME = "fprefill"
_CONFIG_ATTR = "flashprefill_config"


# --------------------------------------------------------------------------------------------------------------
# Density recording
# --------------------------------------------------------------------------------------------------------------
class DensityRecorder:
    """Collects one record per attention call of a prefill that went through the backend.

    Each record is a dict: layer (module.layer_idx), length (Lq), batch, decode (True for a decoding step: one query
    token after a cached prefix), path ("flashprefill", "dense_layer" or "dense_fallback"), reason (why a call fell
    back), density (kept causal blocks / all causal blocks for a block-sparse prefill call; 1.0 for a dense-layer
    prefill; None for a fallback), and for block-sparse prefill calls (path "flashprefill", whichever selector ran)
    impl ("triton" or "reference": which implementation ran), selector (the config's selector: "flashprefill",
    "flexprefill" or "xattention"), layout ("batch": whole unpadded prompts; "varlen": padded rows or a chunk after
    a cached prefix, packed for `flash_prefill_varlen`) and prefix (the longest cached prefix in tokens, 0 for
    "batch"); for "varlen" the density is over every sequence of the call. Densities are kept as tensors until
    read, so recording adds no host synchronisation on the GPU.

    Decoding steps are not recorded unless record_decode=True: generation would otherwise add a record per layer per
    generated token. max_records (None = no limit) keeps only the most recent records; `dropped` counts the ones it
    discarded, so that means over a truncated history are never mistaken for the whole run's.
    """

    def __init__(self, record_decode: bool = False, max_records: int | None = None) -> None:
        if not isinstance(record_decode, bool):
            raise TypeError(f"record_decode must be a bool, got {type(record_decode).__name__}")
        if max_records is not None and (isinstance(max_records, bool) or not isinstance(max_records, int)):
            raise TypeError(f"max_records must be an int or None, got {type(max_records).__name__}")
        if max_records is not None and max_records < 1:
            raise ValueError(f"max_records must be >= 1 (or None for no limit), got {max_records}")
        self.record_decode = record_decode
        self.max_records = max_records
        self.dropped = 0
        self._records: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_records)
        self._lock = threading.Lock()

    def add(self, **record) -> None:
        """Keep `record` (a dict as described above) unless it is a decoding step and record_decode is off."""
        if record.get("decode") and not self.record_decode:
            return
        with self._lock:
            if len(self._records) == self.max_records:
                self.dropped += 1  # the deque drops the oldest record
            self._records.append(record)

    def clear(self) -> None:
        with self._lock:
            self._records.clear()
            self.dropped = 0

    def _snapshot(self) -> list[dict[str, Any]]:
        with self._lock:  # a deque must not change while it is iterated
            return list(self._records)

    @property
    def records(self) -> list[dict[str, Any]]:
        """The records, with densities as Python floats."""
        out = []
        for r in self._snapshot():
            d = r.get("density")
            out.append(dict(r, density=float(d) if isinstance(d, torch.Tensor) else d))
        return out

    def __len__(self) -> int:
        return len(self._records)

    def prefill_records(self) -> list[dict[str, Any]]:
        """Records of prefill calls (FlashPrefill and dense-layer prefill), the ones that carry a density."""
        return [r for r in self.records if r["density"] is not None]

    def mean_density(self, include_dense_layers: bool = True) -> float | None:
        """Mean density over prefill calls (dense layers count as 1.0 unless excluded); None if there were none.

        Every layer of a Llama-style model has the same number of causal blocks, so the plain mean over layers is
        the density of the whole prefill."""
        recs = [r for r in self.prefill_records() if include_dense_layers or r["path"] == "flashprefill"]
        return sum(r["density"] for r in recs) / len(recs) if recs else None

    def per_layer(self) -> dict[int, float]:
        """layer index -> mean density over that layer's prefill calls."""
        acc: dict[int, list[float]] = {}
        for r in self.prefill_records():
            acc.setdefault(r["layer"], []).append(r["density"])
        return {layer: sum(v) / len(v) for layer, v in sorted(acc.items())}

    def impls(self) -> dict[str, int]:
        """How many FlashPrefill calls each implementation ("triton", "reference") ran."""
        counts: dict[str, int] = {}
        for r in self._snapshot():
            if r["path"] == "flashprefill":
                counts[r["impl"]] = counts.get(r["impl"], 0) + 1
        return counts

    def paths(self) -> dict[str, int]:
        """How many calls took each path."""
        counts: dict[str, int] = {}
        for r in self._snapshot():
            counts[r["path"]] = counts.get(r["path"], 0) + 1
        return counts


# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------
@dataclass
class FlashPrefillConfig:
    """FlashPrefill parameters for one model (docs/DESIGN.md section 2; defaults follow the official V1 code).

    alpha: dynamic threshold (0 = dense). block_size, sink_blocks, window_blocks, last_dense_blocks: the block
    size and the safety net, in blocks. dense_layers: the first N layers keep exact dense attention.
    mean_correction: FlashPrefill V2's Eq. 6 (opt-in): every pruned causal block below the diagonal joins the
    softmax as its mean key and value (reference/attention.py); it applies to the peers' lists as well.
    fp8: the attention over the kept blocks in e4m3 (reference/fp8.py; opt-in, not with mean_correction), for whole
    unpadded prompts (FlashPrefill's and the peers' lists); padded batches and chunks after a cached prefix (the
    varlen path, which has no FP8 kernel) run in the model's dtype, with a UserWarning once per config.
    impl: "auto" (Triton on CUDA, reference elsewhere), "reference" or "triton".
    recorder: a `DensityRecorder` (by default it records prefill calls, not decoding steps), or None to record
    nothing.
    cpu_threads: torch threads while the reference runs on the CPU (None = leave as is). The reference walks
    small (Bs x Bs) tiles; on a 2-core VM a multi-threaded torch op on such tiles pays a multi-millisecond thread
    wake-up, and one thread ran the reference several times faster (see repro/results/accuracy/accuracy_cpu_threads.md),
    while the model's large matmuls still gain from all cores. Threads are restored after each call.
    selector: which block selection the prefill uses, a key of `block_selectors.SELECTORS`: "flashprefill"
    (default; alpha and the safety net apply) or a peer, "flexprefill" / "xattention" (peers/; alpha and the
    safety-net fields are then unused: the peers force their own sink / diagonal blocks). selector_params: the
    peer's parameters, e.g. {"gamma": 0.95} or {"threshold": 0.95}; unset ones take the peer's paper defaults
    (SELECTORS[name].defaults). block_size is shared by every selector. "flashprefill" takes no selector_params
    (set alpha etc. directly).
    """

    alpha: float = 0.12
    block_size: int = 128
    sink_blocks: int = 2
    window_blocks: int = 4
    last_dense_blocks: int = 2
    dense_layers: int = 0
    mean_correction: bool = False
    fp8: bool = False
    impl: str = "auto"
    recorder: DensityRecorder | None = field(default_factory=DensityRecorder)
    cpu_threads: int | None = 1
    selector: str = "flashprefill"
    selector_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from reference.validation import check_count, check_flag

        SELECTORS["flashprefill"].check(**self.kernel_kwargs())
        check_count("dense_layers", self.dense_layers, minimum=0)
        check_flag("mean_correction", self.mean_correction)
        check_flag("fp8", self.fp8)
        if self.fp8 and self.mean_correction:
            raise ValueError("fp8=True runs without mean_correction (the FP8 attention has none); set one of them to "
                             "False")
        if self.fp8:
            from triton_impl.fp8 import FP8_BLOCK_SIZES

            if self.block_size not in FP8_BLOCK_SIZES:
                raise ValueError(f"fp8=True needs block_size in {FP8_BLOCK_SIZES} (the FP8 kernel's query tile is "
                                 f"one block), got {self.block_size}")
        if self.impl not in ("auto", "reference", "triton"):
            raise ValueError(f"impl must be 'auto', 'reference' or 'triton', got {self.impl!r}")
        self._check_selector()

    def _check_selector(self) -> None:
        if self.selector not in SELECTORS:
            raise ValueError(f"selector must be one of {', '.join(map(repr, SELECTORS))}, got {self.selector!r}")
        if not isinstance(self.selector_params, dict):
            raise TypeError(f"selector_params must be a dict, got {type(self.selector_params).__name__}")
        if self.selector == "flashprefill":
            if self.selector_params:
                raise ValueError(f"selector 'flashprefill' takes no selector_params (set alpha, sink_blocks, ... "
                                 f"on the config), got {sorted(self.selector_params)}")
            return
        peer = SELECTORS[self.selector]
        unknown = sorted(set(self.selector_params) - set(peer.params))
        if unknown:
            raise ValueError(f"selector {self.selector!r} has no parameter(s) {unknown}; "
                             f"it takes {', '.join(peer.params)}")
        peer.check(block_size=self.block_size, **self.selector_params)  # raises with the parameter's name

    def kernel_kwargs(self) -> dict[str, Any]:
        return dict(alpha=self.alpha, block_size=self.block_size, sink_blocks=self.sink_blocks,
                    window_blocks=self.window_blocks, last_dense_blocks=self.last_dense_blocks)

    def select_peer(self, q: torch.Tensor, k: torch.Tensor, softmax_scale: float | None):
        """(counts, indices) of the configured peer selector for q (B, L, Hq, D), k (B, L, Hkv, D)."""
        return SELECTORS[self.selector].select(q, k, block_size=self.block_size, softmax_scale=softmax_scale,
                                               **self.selector_params)

    def describe(self) -> str:
        """The selection in words, e.g. "flashprefill alpha=0.12" or "xattention threshold=0.95"."""
        correction = " +mean correction" if self.mean_correction else ""
        correction += " fp8" if self.fp8 else ""
        if self.selector == "flashprefill":
            return f"flashprefill alpha={self.alpha:g}{correction}"
        return " ".join([self.selector] + [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in self.selector_params.items()]) + correction

    def replace(self, **changes) -> "FlashPrefillConfig":
        """A copy with some fields changed (the recorder is shared unless replaced)."""
        return dataclasses.replace(self, **changes)


# Used by modules that `configure` never touched (e.g. a model loaded with attn_implementation="fprefill").
_DEFAULT_CONFIG = FlashPrefillConfig()


def default_config() -> FlashPrefillConfig:
    return _DEFAULT_CONFIG


def set_default_config(config: FlashPrefillConfig | None = None, **kwargs) -> FlashPrefillConfig:
    """Replace the process-wide default (used by attention modules without a per-model config)."""
    global _DEFAULT_CONFIG
    _DEFAULT_CONFIG = config if config is not None else FlashPrefillConfig(**kwargs)
    return _DEFAULT_CONFIG


def _config_of(module) -> FlashPrefillConfig:
    return getattr(module, _CONFIG_ATTR, None) or _DEFAULT_CONFIG


# --------------------------------------------------------------------------------------------------------------
# The attention function
# --------------------------------------------------------------------------------------------------------------
def _dense(module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    """Exact attention through transformers' sdpa function (handles masks, GQA, decoding, cached prefixes)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def prefill_blocker(module, query, key, value, attention_mask, dropout, kwargs) -> str | None:
    """Why the shape, mask or options of this call rule FlashPrefill out, or None if they allow it.

    (The attention function adds "dense_layer", "requires_grad" and "unsupported_by_kernels", which depend on the
    config, autograd and the device rather than on the call.)"""
    return _blocker_and_layout(module, query, key, value, attention_mask, dropout, kwargs)[0]


def _blocker_and_layout(module, query, key, value, attention_mask, dropout, kwargs
                        ) -> tuple[str | None, PackedLayout | None]:
    """(`prefill_blocker`'s reason, the call's varlen layout): the layout (layout.py) is None for a batch of whole
    prompts (no mask, or a mask that is plain causal attention over unpadded rows) and whenever there is a reason.
    One function, so that the mask is read once per call (a mask made under inference mode is not cached)."""
    Lq, Lk = query.shape[2], key.shape[2]
    if Lq > Lk:
        return "query_longer_than_keys", None
    if Lq == 1 < Lk:
        return "decode", None
    if not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False:
        return "not_causal", None
    if dropout and module.training:
        return "dropout", None
    if kwargs.get("softcap") is not None:
        return "softcap", None
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        return "attention_sinks", None
    window = kwargs.get("sliding_window")
    if window is not None and window < Lk:
        return "sliding_window", None
    if kwargs.get("position_bias") is not None:
        return "position_bias", None
    if query.shape[-1] != value.shape[-1]:
        return "head_dims_differ", None
    if attention_mask is None:
        return (None if Lq == Lk else "cache_layout"), None  # sdpa's is_causal would align the queries top-left
    layout = (batch_layout(attention_mask, query.shape[0], Lq, Lk) if isinstance(attention_mask, torch.Tensor)
              else None)
    if layout is None:
        return "padding_or_custom_mask", None
    return None, (None if layout.is_full else layout)


def _auto_impl(device: torch.device) -> str:
    """What impl="auto" runs on this device: the Triton kernels on CUDA, the PyTorch reference elsewhere."""
    return "triton" if device.type == "cuda" else "reference"


def _implementation(config: FlashPrefillConfig, device: torch.device, head_dim: int, dtype: torch.dtype) -> str | None:
    """"triton" or "reference": which implementation runs this prefill. None when impl="auto" picks the Triton
    kernels and they do not support this head dim or dtype (the caller then runs sdpa). An explicit impl is kept:
    "reference" runs any shape, "triton" lets the kernels raise their own error."""
    if config.impl != "auto":
        return config.impl
    impl = _auto_impl(device)
    if impl == "triton":
        from triton_impl.common import GPU_DTYPES, HEAD_DIMS

        if head_dim not in HEAD_DIMS or dtype not in GPU_DTYPES:
            return None
    return impl


def _sparse_prefill(config: FlashPrefillConfig, impl_name: str, q, k, v, scaling, layout: PackedLayout | None):
    """Block-sparse causal attention of q (B, Lq, Hq, D), k, v (B, Lk, Hkv, D) with the configured selector, over
    whole prompts (layout None: Lq == Lk) or the sequences of `layout`. Returns (out (B, Lq, Hq, D), density (0-d
    tensor))."""
    import reference

    if impl_name == "triton":
        import triton_impl as impl
    else:
        impl = reference
    # Functions are looked up on the module at call time (not bound at import), so tests can wrap or forbid them.
    kernel_kwargs = config.kernel_kwargs()
    if id(config) in _CONTINUED.get():  # not the end of the prompt: no dense last blocks (more_chunks_follow)
        kernel_kwargs["last_dense_blocks"] = 0
    if layout is not None:
        if config.fp8:
            warn_fp8_on_varlen(config)
        # The layout is valid by construction: the Triton call skips re-reading cu_seqlens (a host sync).
        checks = dict(validate=False) if impl_name == "triton" else {}
        out, stats = impl.flash_prefill_varlen(
            layout.pack(q, layout.q_rows), layout.pack(k, layout.k_rows), layout.pack(v, layout.k_rows),
            layout.cu_seqlens_q, layout.cu_seqlens_k, layout.max_seqlen_q, layout.max_seqlen_k,
            softmax_scale=scaling, return_stats=True, mean_correction=config.mean_correction, **checks,
            **kernel_kwargs)
        return layout.unpack_queries(out), stats.density
    if config.selector == "flashprefill":
        out, stats = impl.flash_prefill(q, k, v, softmax_scale=scaling, return_stats=True,
                                        mean_correction=config.mean_correction, fp8=config.fp8, **kernel_kwargs)
        return out, stats.density
    counts, indices = config.select_peer(q, k, scaling)
    # The peers' lists come from compact_blocks (valid by construction): the Triton call skips re-checking them,
    # which would cost a host synchronisation per layer.
    checks = dict(validate=False) if impl_name == "triton" else {}
    if config.fp8:
        out = impl.block_sparse_attention_fp8(q, k, v, counts, indices, config.block_size, scaling, **checks)
    else:
        out = impl.block_sparse_attention(q, k, v, counts, indices, config.block_size, scaling,
                                          mean_correction=config.mean_correction, **checks)
    return out, reference.causal_block_density(counts)


# ids of the configs whose prefill calls are not the end of their prompt (inside `more_chunks_follow`).
_CONTINUED: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("flashprefill_continued",
                                                                            default=frozenset())


@contextlib.contextmanager
def more_chunks_follow(model):
    """Within the block, the model's prefill calls are not the end of their prompt: a chunked prefill's chunks
    before the last. They get no dense last blocks (`last_dense_blocks` counts from the end of the whole prompt,
    docs/DESIGN.md section 9), so block-aligned chunks reproduce a one-shot prefill exactly::

        with torch.no_grad():
            with flashprefill_hf.more_chunks_follow(model):
                for chunk in chunks[:-1]:
                    model(chunk, past_key_values=cache, use_cache=True)
            model.generate(whole_prompt, past_key_values=cache, ...)  # the last chunk ends the prompt

    Without it every call counts as the end of its prompt (denser, never less accurate). Per model (its config)
    and per thread / task (a context variable)."""
    config = _config_of(next(iter(attention_modules(model)), None))
    token = _CONTINUED.set(_CONTINUED.get() | {id(config)})
    try:
        yield config
    finally:
        _CONTINUED.reset(token)


@contextlib.contextmanager
def _cpu_threads(n: int | None):
    """Run the block with n torch threads (restored afterwards); None changes nothing."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def flashprefill_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function (see the module docstring for the dispatch rules)."""
    config = _config_of(module)
    recorder = config.recorder
    layer = getattr(module, "layer_idx", None)
    B, Hq, Lq, D = query.shape
    impl = None
    reason, layout = _blocker_and_layout(module, query, key, value, attention_mask, dropout, kwargs)
    if reason is None and layer is not None and layer < config.dense_layers:
        reason = "dense_layer"
    if reason is None and torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                                       or value.requires_grad):
        reason = "requires_grad"
    if reason is None and layout is not None and config.selector != "flashprefill":
        reason = "selector_without_varlen"
    if reason is None:
        impl = _implementation(config, query.device, D, query.dtype)
        if impl is None:
            reason = "unsupported_by_kernels"
    if reason is not None:
        decode = reason == "decode"  # one new token after a cached prefix: dense by design, never warned
        if recorder is not None:
            recorder.add(layer=layer, length=Lq, batch=B, decode=decode,
                         path="dense_layer" if reason == "dense_layer" else "dense_fallback", reason=reason,
                         density=1.0 if reason == "dense_layer" else None)
        if reason != "dense_layer" and Lq > 1:
            warn_fallback(module, reason, query)
        return _dense(module, query, key, value, attention_mask, scaling, dropout, **kwargs)

    # (B, H, L, D) -> (B, L, H, D), the layout of the FlashPrefill API; the output is already (B, L, Hq, D).
    q = query.transpose(1, 2).contiguous()
    k = key.transpose(1, 2).contiguous()
    v = value.transpose(1, 2).contiguous()
    with _cpu_threads(config.cpu_threads if q.device.type == "cpu" else None):
        out, density = _sparse_prefill(config, impl, q, k, v, scaling, layout)
    if recorder is not None:
        recorder.add(layer=layer, length=Lq, batch=B, decode=False, path="flashprefill", reason=None,
                     density=density, impl=impl, selector=config.selector,
                     layout="batch" if layout is None else "varlen", prefix=0 if layout is None else layout.prefix)
    return out, None


# --------------------------------------------------------------------------------------------------------------
# Registration and per-model configuration
# --------------------------------------------------------------------------------------------------------------
def register(name: str = ATTN_NAME) -> str:
    """Register the backend under `name` in transformers' attention and attention-mask interfaces (idempotent).

    After this, `from_pretrained(..., attn_implementation="fprefill")` or
    `model.set_attn_implementation("fprefill")` selects it. Returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, flashprefill_attention_forward)
    # The sdpa mask builder returns None for a causal, unpadded prompt: the cheapest signal of a plain prefill.
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def attention_modules(model) -> list:
    """The model's self-attention modules: modules with an integer `layer_idx` and a `config`."""
    return [m for m in model.modules()
            if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "config")
            and any(hasattr(m, p) for p in ("q_proj", "qkv_proj", "c_attn", "query_key_value"))]


def configure(model, config: FlashPrefillConfig | None = None, *, enable: bool = True, **kwargs) -> FlashPrefillConfig:
    """Attach a `FlashPrefillConfig` (given, or built from kwargs) to every attention module of `model`.

    With enable=True (default) also registers the backend and switches the model to it. Returns the config,
    whose `recorder` collects the densities."""
    if config is None:
        config = FlashPrefillConfig(**kwargs)
    elif kwargs:
        config = config.replace(**kwargs)
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"found no attention module with a layer_idx in {type(model).__name__}")
    for m in modules:
        setattr(m, _CONFIG_ATTR, config)
    if enable:
        use_flashprefill(model)
    return config


def use_flashprefill(model) -> None:
    """Switch a loaded model to the backend (registering it first)."""
    set_attn_implementation(model, register())


def use_dense(model, implementation: str = "sdpa") -> None:
    """Switch a loaded model back to a dense implementation ("sdpa" or "eager")."""
    set_attn_implementation(model, implementation)


def set_attn_implementation(model, implementation: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:  # older transformers: set it on every config
        for m in model.modules():
            cfg = getattr(m, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                cfg._attn_implementation = implementation
