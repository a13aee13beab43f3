"""Dump real SmolLM2-135M query / key / value tensors (a few layers, one 8K-token prompt) for tests and benchmarks.

    python -m repro.dump_activations [--length 8192] [--layers 0 7 15 23 29] [--model PATH] [--out repro/activations]

Writes <out>/<model>_L<length>_layer<NN>.pt (float16, post-RoPE q / k / v of a single-needle NIAH prompt); the
capture, the file format and `load_activations()` are in repro/capture.py.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from repro.capture import ACTIVATIONS_DIR, DEFAULT_LAYERS, dump


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--layers", type=int, nargs="+", default=list(DEFAULT_LAYERS))
    parser.add_argument("--model", default=None, help="local transformers checkpoint (default: SmolLM2 GGUF)")
    parser.add_argument("--out", type=Path, default=ACTIVATIONS_DIR)
    args = parser.parse_args(argv)
    from flashprefill_hf import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    model, tokenizer, name = load_model(args.model, device=device)
    paths = dump(model, tokenizer, name, args.length, args.layers, args.out)
    size = sum(p.stat().st_size for p in paths) / 2**20
    print(f"wrote {len(paths)} files ({size:.0f} MiB) to {args.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
