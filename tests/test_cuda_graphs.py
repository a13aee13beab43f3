"""The Triton entry points a serving engine graphs: captured once in a CUDA graph, replayed on new inputs copied into
the captured buffers, they give the eager call's output to the bit (GPU only).

Capturable (no host synchronisation inside, no allocation that depends on the data): `flash_prefill` (with or
without fp8, return_stats included: the density stays a device tensor), and `flash_prefill_varlen` with
validate=False (validate=True reads cu_seqlens on the host). README.md ("CUDA graphs") shows the pattern.
"""

from __future__ import annotations

import pytest
import torch
from helpers import HAS_CUDA

from reference.synthetic import planted_qkv

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]


def capture(fn):
    """fn captured in a CUDA graph after a warm-up on a side stream (compiles the kernels); (graph, its output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def inputs(L, seed):
    return planted_qkv(1, L, 8, 2, 128, seed=seed, dtype=torch.bfloat16, device="cuda")


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("L", [4096, 9000])  # 9000: K/V through TMA descriptors (from 8K), a partial last block
def test_flash_prefill_replays_from_a_cuda_graph(L, fp8):
    import triton_impl

    static = [x.clone() for x in inputs(L, seed=0)]
    with torch.inference_mode():
        graph, (out, stats) = capture(lambda: triton_impl.flash_prefill(*static, fp8=fp8, return_stats=True))
        for seed in (1, 2):  # new data in the same buffers: the graph recomputes the selection too
            fresh = inputs(L, seed)
            for buffer, x in zip(static, fresh):
                buffer.copy_(x)
            graph.replay()
            eager, eager_stats = triton_impl.flash_prefill(*fresh, fp8=fp8, return_stats=True)
            assert torch.equal(out, eager)
            assert torch.equal(stats.counts, eager_stats.counts) and torch.equal(stats.density, eager_stats.density)


def test_flash_prefill_varlen_without_validation_replays_from_a_cuda_graph():
    import triton_impl

    lengths = [3000, 5000, 1000]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q, k, v = (x[0] for x in inputs(sum(lengths), seed=0))
    static = [x.clone() for x in (q, k, v)]
    args = (cu, cu, max(lengths), max(lengths))
    with torch.inference_mode():
        graph, out = capture(lambda: triton_impl.flash_prefill_varlen(*static, *args, validate=False))
        fresh = [x[0] for x in inputs(sum(lengths), seed=3)]
        for buffer, x in zip(static, fresh):
            buffer.copy_(x)
        graph.replay()
        assert torch.equal(out, triton_impl.flash_prefill_varlen(*fresh, *args, validate=False))
