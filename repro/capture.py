"""Capture the real query / key / value tensors of a model's attention layers, and the dumps made of them.

    with capture_qkv(model, {0, 15}) as store:       # {layer: (q, k, v)} of every prefill forward in the block
        model(ids)
    dump(model, tokenizer, name, 8192, DEFAULT_LAYERS, ACTIVATIONS_DIR)   # what `python -m repro.dump_activations`
    load_activations()                                                     # writes, and how tests read it back

A dump is <out>/<model>_L<length>_layer<NN>.pt, each {"q": (1, L, Hq, D), "k": (1, L, Hkv, D), "v": ..., "meta":
...} in float16 (about 2.3 MB per layer per 1K tokens for SmolLM2), after RoPE, exactly what the attention function
receives. repro/activations/ is git-ignored: regenerate on demand. `load_activations()` returns what is there (or
{} when nothing was dumped), so tests can use real inputs when present and skip otherwise.

The prompt is a single-needle NIAH prompt (repro/accuracy/tasks.py, seed 12345, depth 0.5), so the attention
patterns are those of a real retrieval prompt.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .accuracy.tasks import niah_single
from .common import ROOT
from .harness import build_prompt, token_counter

ACTIVATIONS_DIR = ROOT / "repro" / "activations"
NO_DUMPS = ("Skipped: no SmolLM2 activation dumps in repro/activations/ (make them with "
            "`python -m repro.dump_activations`)")
DEFAULT_LAYERS = (0, 7, 15, 23, 29)
CAPTURE_NAME = "fprefill_capture"


@contextlib.contextmanager
def capture_qkv(model, layers=None, dtype=torch.float16):
    """Within the block, every forward of `model` stores the (post-RoPE) q, k, v of prefill calls of `layers`
    (None = all) into the yielded dict {layer: (q, k, v)} as CPU tensors (B, L, H, D) in `dtype`; attention itself
    runs with transformers' sdpa function. The model's attention implementation is restored afterwards."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    store: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        layer = getattr(module, "layer_idx", None)
        if query.shape[2] == key.shape[2] and (layers is None or layer in layers):
            store[layer] = tuple(t.transpose(1, 2).to("cpu", dtype).contiguous() for t in (query, key, value))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(CAPTURE_NAME, capture)
    AttentionMaskInterface.register(CAPTURE_NAME, sdpa_mask)
    before = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE_NAME)
    try:
        yield store
    finally:
        model.set_attn_implementation(before)


def niah_prompt_ids(tokenizer, length: int, seed: int = 12345, depth: float = 0.5) -> torch.Tensor:
    sample = niah_single(length, seed, token_counter(tokenizer), depth=depth)
    return build_prompt(tokenizer, sample)


def dump(model, tokenizer, name: str, length: int, layers, out_dir: Path) -> list[Path]:
    """Capture `layers` on the NIAH prompt of `length` tokens and save one file per layer into `out_dir`."""
    ids = niah_prompt_ids(tokenizer, length).to(model.device)
    with capture_qkv(model, set(layers)) as store, torch.no_grad():
        model(ids, logits_to_keep=1)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for layer in sorted(store):
        q, k, v = store[layer]
        path = out_dir / f"{name}_L{length}_layer{layer:02d}.pt"
        torch.save({"q": q, "k": k, "v": v, "meta": {"model": name, "layer": layer, "tokens": ids.shape[1],
                                                      "prompt": "niah_single seed 12345 depth 0.5"}}, path)
        paths.append(path)
    return paths


def load_activations(folder: str | Path | None = None, *, max_length: int | None = None, layers=None,
                     dtype: torch.dtype = torch.float32) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{layer: (q, k, v)} from the first dump found in `folder` (default repro/activations/), or {} if none.

    max_length keeps the first max_length tokens (a causal prefix of real activations is the activations of the
    prompt's prefix). Tensors are (1, L, H, D) in `dtype`."""
    folder = Path(folder) if folder is not None else ACTIVATIONS_DIR
    files = sorted(folder.glob("*_L*_layer*.pt")) if folder.exists() else []
    if not files:
        return {}
    prefix = files[0].name.rsplit("_layer", 1)[0]  # one dump (model, length) only
    out = {}
    for f in files:
        if not f.name.startswith(prefix + "_layer"):
            continue
        d = torch.load(f, map_location="cpu", weights_only=True)
        layer = int(d["meta"]["layer"])
        if layers is not None and layer not in layers:
            continue
        out[layer] = tuple(d[x][:, :max_length].to(dtype).contiguous() for x in ("q", "k", "v"))
    return dict(sorted(out.items()))


def activations_or_reason(folder: str | Path | None, *, max_length: int, synthetic_only: bool = False,
                          without_dumps: str = NO_DUMPS + ".") -> tuple[dict, str]:
    """({layer: (q, k, v)}, "") from the dumps in `folder` (`load_activations`), or ({}, the sentence a report gives
    for skipping its real-activation part: --synthetic-only, or `without_dumps` when nothing was dumped)."""
    if synthetic_only:
        return {}, "Skipped (--synthetic-only)."
    acts = load_activations(folder, max_length=max_length)
    return (acts, "") if acts else ({}, without_dumps)
