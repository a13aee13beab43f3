"""How the kernels are launched (triton_impl.common): the offset width test, and the launch path that calls a compiled
kernel's launcher directly once Triton has specialised it (GPU), which must give what Triton's own launch gives on
inputs that specialise differently (alignment, divisibility), and must not go back through Triton once cached."""

from __future__ import annotations

import pytest
import torch
from helpers import HAS_CUDA
from triton import knobs

import triton_impl
from reference.synthetic import planted_qkv
from triton_impl import common, scoring

needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def test_wide_offsets_are_needed_from_the_largest_reachable_offset():
    limit = 2**31 - 2**24  # the largest offset, plus the margin of a tile past the end, reaches 2^31
    meta = dict(device="meta", dtype=torch.bfloat16)
    assert not common.needs_wide_offsets(torch.empty(limit, **meta))  # offsets 0 .. limit - 1
    assert common.needs_wide_offsets(torch.empty(limit + 1, **meta))
    # Not contiguous: the offset of the last element, not the number of elements, decides.
    wide_rows = torch.empty(2, limit // 2 + 8, **meta)[:, :4]  # 8 elements, the last at offset limit // 2 + 11
    assert not common.needs_wide_offsets(wide_rows)
    far = torch.empty(3, limit // 2 + 8, **meta)[:, :4]
    assert not far.is_contiguous() and common.needs_wide_offsets(far)
    assert not common.needs_wide_offsets(torch.empty(0, **meta), torch.empty(5, 0, 7, **meta))


def _inputs(L, misaligned):
    q, k, v = planted_qkv(1, L, 8, 2, 128, seed=3, dtype=torch.bfloat16, device="cuda")
    if not misaligned:
        return q, k, v
    # The same values one element (2 bytes) into a larger buffer: data pointers no longer 16-byte aligned.
    shifted = []
    for x in (q, k, v):
        buffer = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
        view = buffer[1:].view(x.shape)
        view.copy_(x)
        shifted.append(view)
    return shifted


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("L", [4096, 4100], ids=["L4096", "L4100"])
@pytest.mark.parametrize("mean_correction", [False, True], ids=["plain", "mean"])
def test_fast_launch_gives_what_triton_launches_give(monkeypatch, L, mean_correction):
    """After aligned inputs have filled the cache, misaligned ones (another specialisation) must get their own
    kernels: the fast path's output equals Triton's launch path's to the bit for both."""
    for misaligned in (False, True):
        q, k, v = _inputs(L, misaligned)
        fast, fast_stats = triton_impl.flash_prefill(q, k, v, alpha=0.1, mean_correction=mean_correction,
                                                     return_stats=True)
        monkeypatch.setattr(common, "FAST_LAUNCH", False)
        slow, slow_stats = triton_impl.flash_prefill(q, k, v, alpha=0.1, mean_correction=mean_correction,
                                                     return_stats=True)
        monkeypatch.setattr(common, "FAST_LAUNCH", True)
        assert torch.equal(fast, slow) and torch.equal(fast_stats.counts, slow_stats.counts)
        assert torch.equal(fast_stats.indices, slow_stats.indices)


@pytest.mark.gpu
@needs_gpu
def test_a_cached_specialisation_does_not_go_back_through_triton(monkeypatch):
    q, k, v = _inputs(4096, misaligned=False)
    triton_impl.flash_prefill(q, k, v)  # compiles / caches every kernel of the call
    calls = []
    kernel = scoring._block_scores_kernel
    run = kernel.run
    monkeypatch.setattr(kernel, "run", lambda *a, **kw: calls.append(1) or run(*a, **kw))
    q2, k2, v2 = _inputs(4096, misaligned=False)  # new tensors, the same specialisation
    out = triton_impl.flash_prefill(q2, k2, v2)
    assert calls == [], "the score kernel went through JITFunction.run again"
    monkeypatch.setattr(common, "FAST_LAUNCH", False)
    assert torch.equal(triton_impl.flash_prefill(q2, k2, v2), out) and calls == [1]



def _with_enter_hook(hook):
    """Install `hook` as a launch-enter hook the way a profiler does; returns the undo."""
    chain = knobs.runtime.launch_enter_hook
    if hasattr(chain, "add"):  # Triton 3.6: a HookChain
        chain.add(hook)
        return lambda: chain.remove(hook)
    knobs.runtime.launch_enter_hook = hook  # older Triton: one callable or None
    return lambda: setattr(knobs.runtime, "launch_enter_hook", chain)


def test_only_an_installed_hook_counts_as_one():
    # Triton's default (an empty chain, or None) is no hook: the fast path must stay on without a profiler.
    assert not common.launch_hooks_installed()
    undo = _with_enter_hook(lambda metadata: None)
    try:
        assert common.launch_hooks_installed()
    finally:
        undo()
    assert not common.launch_hooks_installed()


@pytest.mark.gpu
@needs_gpu
def test_a_profiler_hook_sees_every_launch():
    q, k, v = _inputs(4096, misaligned=False)
    triton_impl.flash_prefill(q, k, v)  # cached: without the hook these launches skip Triton
    seen = []
    undo = _with_enter_hook(lambda metadata: seen.append(metadata))
    try:
        triton_impl.flash_prefill(q, k, v)
    finally:
        undo()
    assert len(seen) == 3, f"{len(seen)} launches reached the hook; a call makes three (pool, score + select, attention)"
