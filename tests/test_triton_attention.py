"""Differential tests: triton_impl attention kernels against float64 oracles and against the reference.

FlashAttention's rule for outputs: with a float64 oracle `ref` and a PyTorch result `pt` computed in the input's
own precision on the same inputs and the same block set,

    max |out - ref| <= 2 * max |pt - ref| + 1e-5.

On CPU the kernels run under TRITON_INTERPRET=1 in float32/float16 at small sizes; on a GPU the same tests run
natively in bfloat16/float16, plus larger sizes (up to L = 32K) marked `gpu`. Every kernel output starts as NaN
(see the `poison_outputs` fixture in conftest.py), so an element a kernel forgot to write fails.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    DEVICE,
    KERNEL_TEST_DTYPES,
    case_id,
    case_params,
    causal_block_mask,
    dtype_id,
    random_block_mask,
    random_qkv,
)

import reference
import triton_impl
from reference import lists_to_mask
from reference.synthetic import planted_qkv
from tools.oracle import flash_rule, num_blocks
from triton_impl.common import BLOCK_SIZES, GPU_DTYPES, HEAD_DIMS

DTYPES = KERNEL_TEST_DTYPES

# (B, L, Hq, Hkv, D, block_size): odd lengths, GQA groups 1/2/4/7/8, head dims 64/128, batch 1-3, blocks 16-256.
CASES = [  # kept small: the CPU interpreter runs every program in Python
    (1, 1, 2, 1, 64, 16),
    (3, 127, 4, 1, 64, 32),
    (1, 128, 7, 1, 64, 32),
    (1, 129, 8, 1, 64, 16),
    (1, 1000, 2, 2, 64, 64),
    (2, 300, 2, 1, 128, 32),
    (1, 257, 2, 1, 128, 128),
    (1, 600, 2, 1, 64, 256),  # blocks larger than a tile: two query tiles and two key tiles per block
]
GPU_CASES = [
    (1, 4097, 8, 1, 128, 128),
    (2, 8191, 16, 2, 64, 128),
    (1, 32768, 32, 4, 128, 128),
]
ALL_CASES = case_params(CASES, GPU_CASES)


def assert_flash_rule(out, q, k, v, block_mask, block_size, scale=None):
    assert not out.isnan().any(), "kernel left NaN (unwritten or invalid) elements"
    ok, err, pt_err = flash_rule(out, q, k, v, block_mask, block_size, scale)
    assert ok, f"max error {err:.3g} > 2 x PyTorch's {pt_err:.3g} + 1e-5"


def inputs(case, dtype, seed, planted):
    B, L, Hq, Hkv, D, _ = case
    if planted:
        return planted_qkv(B, L, Hq, Hkv, D, seed=seed, dtype=dtype, device=DEVICE)
    return random_qkv(B, L, Hq, Hkv, D, dtype=dtype, seed=seed, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", ALL_CASES)
def test_dense_attention_matches_fp64(case, dtype):
    q, k, v = inputs(case, dtype, seed=1, planted=False)
    out = triton_impl.dense_attention(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape
    M = num_blocks(q.shape[1], 128)
    assert_flash_rule(out, q, k, v, causal_block_mask(q.shape[0], q.shape[2], M, device=DEVICE), 128)


@pytest.mark.parametrize("planted", [False, True], ids=["random", "planted"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", ALL_CASES)
def test_physical_and_logical_match_fp64_on_the_same_block_set(case, dtype, planted):
    B, L, Hq, Hkv, D, bs = case
    q, k, v = inputs(case, dtype, seed=2, planted=planted)
    M = num_blocks(L, bs)
    mask = random_block_mask(B, Hq, M, keep=0.4, seed=3, device=DEVICE)
    counts, indices = reference.compact_blocks(mask)
    physical, visits = triton_impl.block_sparse_attention(q, k, v, counts, indices, bs, return_visits=True)
    logical, logical_visits = triton_impl.block_sparse_attention_logical(q, k, v, mask, bs, return_visits=True)
    assert_flash_rule(physical, q, k, v, mask, bs)
    assert_flash_rule(logical, q, k, v, mask, bs)
    # Both walks fold the same blocks in the same ascending order: the outputs agree to the bit.
    torch.testing.assert_close(physical, logical, rtol=0, atol=0)
    # Visits are counted inside the kernels: the list length, versus every causal block.
    assert torch.equal(visits, counts)
    assert torch.equal(logical_visits, (torch.arange(M, device=DEVICE, dtype=torch.int32) + 1).expand(B, Hq, M))
    if M > 1:
        assert visits.sum() < logical_visits.sum()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", [pytest.param(c, id=case_id(c)) for c in CASES[1:4]])
def test_full_block_set_equals_dense(case, dtype):
    B, L, Hq, Hkv, D, bs = case
    q, k, v = inputs(case, dtype, seed=4, planted=False)
    M = num_blocks(L, bs)
    counts, indices = reference.compact_blocks(causal_block_mask(B, Hq, M, device=DEVICE))
    sparse = triton_impl.block_sparse_attention(q, k, v, counts, indices, bs)
    assert_flash_rule(sparse, q, k, v, causal_block_mask(B, Hq, M, device=DEVICE), bs)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", [pytest.param(c, id=case_id(c)) for c in CASES[2:]] + [
    pytest.param(GPU_CASES[1], id=case_id(GPU_CASES[1]), marks=pytest.mark.gpu)])
def test_tma_and_pointer_kv_loads_agree(case, dtype):
    """K/V tiles fetched through TMA descriptors (the default) or by per-thread pointer loads (the fallback for
    layouts a descriptor cannot describe): the same tiles, the same arithmetic, the same output to the bit."""
    from triton_impl.attention import DENSE, PHYSICAL, launch_attention

    B, L, Hq, Hkv, D, bs = case
    q, k, v = inputs(case, dtype, seed=11, planted=False)
    M = num_blocks(L, bs)
    mask = random_block_mask(B, Hq, M, keep=0.3, seed=12, device=DEVICE)
    counts, indices = reference.compact_blocks(mask)
    for mode, lists, block_size, block_mask in ((PHYSICAL, dict(counts=counts, indices=indices), bs, mask),
                                                (DENSE, {}, 128, causal_block_mask(B, Hq, num_blocks(L, 128),
                                                                                   device=DEVICE))):
        tma, pointers = (launch_attention(q, k, v, block_size, D ** -0.5, mode, **lists,
                                 config=dict(kv_descriptors=flag, kv_descriptors_min_length=1))
                         for flag in (True, False))
        assert_flash_rule(tma, q, k, v, block_mask, block_size)
        torch.testing.assert_close(tma, pointers, rtol=0, atol=0)


def test_kv_descriptor_only_for_packed_aligned_layouts():
    from triton_impl.attention import kv_descriptor

    k = torch.zeros(2, 300, 4, 64, dtype=torch.float16, device=DEVICE)
    assert kv_descriptor(k, 64) is not None
    assert kv_descriptor(torch.zeros(2, 4, 300, 64, dtype=torch.float16, device=DEVICE).transpose(1, 2), 64) is None
    assert kv_descriptor(torch.zeros(2, 300, 4, 72, dtype=torch.float16, device=DEVICE)[..., :64], 64) is None
    unaligned = torch.zeros(2 * 300 * 4 * 64 + 1, dtype=torch.float16, device=DEVICE)[1:].view(2, 300, 4, 64)
    assert kv_descriptor(unaligned, 64) is None  # base 2 bytes past an aligned address


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_rows_without_their_diagonal_block(dtype):
    """Lists need not contain the diagonal (the kernel handles it as an ordinary list); empty rows give 0."""
    B, L, Hq, Hkv, D, bs = 1, 100, 2, 1, 64, 16
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype=dtype, seed=5, device=DEVICE)
    M = num_blocks(L, bs)
    mask = random_block_mask(B, Hq, M, keep=0.5, seed=6, device=DEVICE)
    mask &= ~torch.eye(M, dtype=torch.bool, device=DEVICE)
    counts, indices = reference.compact_blocks(mask)
    out = triton_impl.block_sparse_attention(q, k, v, counts, indices, bs)
    assert_flash_rule(out, q, k, v, mask, bs)
    assert (out[:, :bs] == 0).all()  # block 0 has no key block left


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_non_contiguous_inputs_and_custom_scale(dtype):
    B, L, Hq, Hkv, D, bs = 2, 200, 4, 2, 64, 32
    gen = torch.Generator().manual_seed(7)
    # (B, H, L, D) storage viewed as (B, L, H, D): strided along L and H.
    q = torch.randn(B, Hq, L, D, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    k = torch.randn(B, Hkv, L, D, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    v = torch.randn(B, Hkv, L, D, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    assert not q.is_contiguous()
    M = num_blocks(L, bs)
    mask = random_block_mask(B, Hq, M, keep=0.5, seed=8, device=DEVICE)
    counts, indices = reference.compact_blocks(mask)
    strided = torch.full((*indices.shape[:-1], 2 * M), -1, dtype=torch.int32, device=DEVICE)
    strided[..., ::2] = indices  # lists with a last-dim stride of 2
    out = triton_impl.block_sparse_attention(q, k, v, counts, strided[..., ::2], bs, 0.3)
    assert_flash_rule(out, q, k, v, mask, bs, scale=0.3)
    dense = triton_impl.dense_attention(q, k, v, softmax_scale=0.05)
    assert_flash_rule(dense, q, k, v, causal_block_mask(B, Hq, num_blocks(L, 128), device=DEVICE), 128, 0.05)


# Whole calls on the GPU at every block size the kernels take (BLOCK_SIZES), both head dims, odd lengths.
GPU_FLASH_PREFILL_CASES = [
    (1, 16384, 8, 2, 128, 128),
    (1, 4100, 8, 2, 128, 16),
    (2, 3001, 4, 4, 64, 16),
    (1, 8191, 8, 2, 128, 32),
    (1, 6000, 8, 1, 64, 32),
    (2, 6000, 8, 1, 64, 64),
    (1, 12345, 16, 2, 128, 64),
    (1, 16384, 8, 2, 128, 256),
    (1, 9000, 4, 1, 64, 256),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", [pytest.param(c, id=case_id(c)) for c in CASES[1:]] + [
    pytest.param(c, id=case_id(c), marks=pytest.mark.gpu) for c in GPU_FLASH_PREFILL_CASES])
def test_flash_prefill_on_its_own_block_set(case, dtype):
    """End to end: the output is exact attention over the block set the Triton selection chose."""
    B, L, Hq, Hkv, D, bs = case
    q, k, v = inputs(case, dtype, seed=9, planted=True)
    out, stats = triton_impl.flash_prefill(q, k, v, alpha=0.1, block_size=bs, return_stats=True)
    M = num_blocks(L, bs)
    mask = lists_to_mask(stats.counts, stats.indices)
    assert torch.equal(mask.sum(-1, dtype=torch.int32), stats.counts)
    assert_flash_rule(out, q, k, v, mask, bs)
    assert 0 < stats.density.item() <= 1


def test_flash_prefill_alpha_zero_is_dense():
    dtype = DTYPES[-1]
    q, k, v = random_qkv(2, 150, 4, 2, 64, dtype=dtype, seed=10, device=DEVICE)
    out, stats = triton_impl.flash_prefill(q, k, v, alpha=0.0, block_size=32, return_stats=True)
    assert stats.density.item() == 1.0
    assert_flash_rule(out, q, k, v, causal_block_mask(2, 4, num_blocks(150, 32), device=DEVICE), 32)


@pytest.mark.parametrize("head_dim", [32, 96, 256])
def test_unsupported_head_dims_raise(head_dim):
    q, k, v = random_qkv(1, 64, 2, 1, head_dim, dtype=DTYPES[-1], device=DEVICE)
    for call in (lambda: triton_impl.flash_prefill(q, k, v), lambda: triton_impl.dense_attention(q, k, v),
                 lambda: triton_impl.mean_pool_keys(k)):
        with pytest.raises(ValueError, match=f"head dim {head_dim} is not supported"):
            call()


def test_unsupported_dtype_and_device_raise(monkeypatch):
    q, k, v = random_qkv(1, 64, 2, 1, 64, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="q has dtype torch.float64"):
        triton_impl.flash_prefill(q, k, v)
    from triton_impl import common

    monkeypatch.setattr(common, "interpreting", lambda: False)
    q, k, v = random_qkv(1, 64, 2, 1, 64, device="cpu")
    with pytest.raises(ValueError, match="triton_impl needs CUDA tensors"):
        triton_impl.dense_attention(q, k, v)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_every_supported_block_size_head_dim_and_dtype_runs(block_size, head_dim, dtype):
    """Everything the validation admits runs natively (no launch failure such as Triton's OutOfResources) and is
    exact attention over its block set: flash_prefill, both sparse walks, at a length with a partial last block."""
    case = (1, 3 * block_size + 5 if block_size >= 128 else 40 * block_size + 5, 8, 2, head_dim, block_size)
    B, L, Hq, Hkv, D, bs = case
    q, k, v = inputs(case, dtype, seed=13, planted=True)
    out, stats = triton_impl.flash_prefill(q, k, v, alpha=0.1, block_size=bs, return_stats=True)
    mask = lists_to_mask(stats.counts, stats.indices)
    assert_flash_rule(out, q, k, v, mask, bs)
    logical = triton_impl.block_sparse_attention_logical(q, k, v, mask, bs)
    torch.testing.assert_close(logical, out, rtol=0, atol=0)


@pytest.mark.parametrize("block_size", [512, 1024])
def test_block_sizes_the_kernels_do_not_take_are_refused_before_launch(block_size):
    """Powers of two above 256 are valid for the reference but refused by every Triton entry point that takes a
    block size, with a ValueError naming block_size (never a Triton launch failure)."""
    dtype = DTYPES[-1]
    q, k, v = random_qkv(1, 64, 2, 1, 64, dtype=dtype, device=DEVICE)
    mask = causal_block_mask(1, 2, 1, device=DEVICE)
    counts, indices = reference.compact_blocks(mask)
    calls = {
        "flash_prefill": lambda: triton_impl.flash_prefill(q, k, v, block_size=block_size),
        "block_sparse_attention": lambda: triton_impl.block_sparse_attention(q, k, v, counts, indices, block_size),
        "block_sparse_attention_logical": lambda: triton_impl.block_sparse_attention_logical(q, k, v, mask,
                                                                                             block_size),
        "mean_pool_keys": lambda: triton_impl.mean_pool_keys(k, block_size),
        "block_scores": lambda: triton_impl.block_scores(q, triton_impl.mean_pool_keys(k, 64)[:, :1], block_size),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=f"block_size {block_size} is not supported by the Triton kernels"):
            call()
    assert reference.flash_prefill(q.float(), k.float(), v.float(), block_size=block_size).shape == q.shape


def bad_lists(B, Hq, M, device):
    """Lists that break each rule of check_block_lists, with the message each must raise."""
    counts, indices = reference.compact_blocks(causal_block_mask(B, Hq, M, device=device))
    swapped = indices.clone()
    swapped[..., M - 1, :2] = swapped[..., M - 1, :2].flip(-1)
    beyond = indices.clone()
    beyond[..., 1, 0] = 2  # above the diagonal of row 1
    negative = indices.clone()
    negative[0, 0, M - 1, 1] = -1
    return {
        "counts-negative": ((counts - 2, indices), "counts must satisfy"),
        "counts-above-diagonal": ((counts + 1, indices), "counts must satisfy"),
        "index-above-diagonal": ((counts, beyond), r"must lie in \[0, I\]"),
        "index-negative": ((counts, negative), r"must lie in \[0, I\]"),
        "not-ascending": ((counts, swapped), "strictly ascending"),
    }


@pytest.mark.parametrize("wrong", ["counts-negative", "counts-above-diagonal", "index-above-diagonal",
                                   "index-negative", "not-ascending"])
def test_bad_lists_are_refused_like_the_reference(wrong):
    """validate=True: the one-kernel check raises what reference.validation.check_block_lists raises (the reference
    checks by default), for the same lists."""
    B, L, Hq, Hkv, D, bs = 2, 64, 4, 2, 64, 16
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype=DTYPES[-1], seed=14, device=DEVICE)
    (counts, indices), message = bad_lists(B, Hq, num_blocks(L, bs), DEVICE)[wrong]
    with pytest.raises(ValueError, match=message):
        reference.block_sparse_attention(q.float(), k.float(), v.float(), counts, indices, bs)
    with pytest.raises(ValueError, match=message):
        triton_impl.block_sparse_attention(q, k, v, counts, indices, bs, validate=True)
    # Unchecked (the default), a malformed list gives wrong rows but the kernel reads nothing out of bounds.
    out = triton_impl.block_sparse_attention(q, k, v, counts, indices, bs)
    assert out.shape == q.shape and not out.isnan().any()


def test_lists_pointing_far_outside_are_never_read():
    """validate=False: ids and counts far beyond the tensors (a crash or an illegal memory access if read) are
    clamped to the causal blocks inside the kernel."""
    B, L, Hq, Hkv, D, bs = 1, 80, 2, 1, 64, 16
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype=DTYPES[-1], seed=18, device=DEVICE)
    M = num_blocks(L, bs)
    counts = torch.full((B, Hq, M), 10**6, dtype=torch.int32, device=DEVICE)
    indices = torch.full((B, Hq, M, M), 10**8, dtype=torch.int32, device=DEVICE)
    indices[..., 1::2] = -(10**8)
    out = triton_impl.block_sparse_attention(q, k, v, counts, indices, bs)
    assert out.shape == q.shape and not out.isnan().any()
    from triton_impl.attention import PHYSICAL, launch_attention

    # The same lists through TMA descriptors (the default from 8K tokens): boxes outside k / v come back as zeros.
    tma = launch_attention(q, k, v, bs, D ** -0.5, PHYSICAL, counts=counts, indices=indices,
                           config=dict(kv_descriptors=True, kv_descriptors_min_length=1))
    assert tma.shape == q.shape and not tma.isnan().any()


def test_valid_lists_pass_the_check_and_validate_false_gives_the_same_output():
    B, L, Hq, Hkv, D, bs = 2, 100, 4, 2, 64, 16
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype=DTYPES[-1], seed=15, device=DEVICE)
    mask = random_block_mask(B, Hq, num_blocks(L, bs), keep=0.4, seed=16, device=DEVICE)
    counts, indices = reference.compact_blocks(mask)
    checked = triton_impl.block_sparse_attention(q, k, v, counts, indices, bs, validate=True)
    unchecked = triton_impl.block_sparse_attention(q, k, v, counts, indices, bs)
    torch.testing.assert_close(checked, unchecked, rtol=0, atol=0)
    assert_flash_rule(checked, q, k, v, mask, bs)


def test_attention_entry_points_are_inference_only():
    """With grad mode on and an input that requires grad, every attention entry point refuses (the kernels have no
    backward: the output would silently carry no gradient); under no_grad the same call runs."""
    B, L, Hq, Hkv, D, bs = 1, 64, 2, 1, 64, 16
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype=DTYPES[-1], seed=17, device=DEVICE)
    mask = causal_block_mask(B, Hq, num_blocks(L, bs), device=DEVICE)
    counts, indices = reference.compact_blocks(mask)
    calls = {
        "dense_attention": lambda q: triton_impl.dense_attention(q, k, v),
        "block_sparse_attention": lambda q: triton_impl.block_sparse_attention(q, k, v, counts, indices, bs),
        "block_sparse_attention_logical": lambda q: triton_impl.block_sparse_attention_logical(q, k, v, mask, bs),
    }
    for name, call in calls.items():
        with torch.enable_grad(), pytest.raises(RuntimeError, match="inference-only"):
            call(q.clone().requires_grad_())
        with torch.no_grad():
            call(q.clone().requires_grad_())


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter runs on the CPU")
def test_bfloat16_is_refused_under_the_interpreter():
    q, k, v = random_qkv(1, 64, 2, 1, 64, dtype=torch.bfloat16, device="cpu")
    counts, indices = reference.compact_blocks(causal_block_mask(1, 2, 4))
    for call in (lambda: triton_impl.dense_attention(q, k, v),
                 lambda: triton_impl.block_sparse_attention(q, k, v, counts, indices, 16)):
        with pytest.raises(TypeError, match="bfloat16, which is not supported under the Triton interpreter"):
            call()


@pytest.mark.gpu
def test_float32_is_refused_on_the_gpu():
    """float32 runs only under the interpreter: on a GPU every entry point taking q/k refuses it before launch."""
    q, k, v = random_qkv(1, 64, 2, 1, 64, dtype=torch.float32, device=DEVICE)
    counts, indices = reference.compact_blocks(causal_block_mask(1, 2, 4, device=DEVICE))
    for call in (lambda: triton_impl.flash_prefill(q, k, v, block_size=16),
                 lambda: triton_impl.dense_attention(q, k, v),
                 lambda: triton_impl.block_sparse_attention(q, k, v, counts, indices, 16),
                 lambda: triton_impl.mean_pool_keys(k, 16)):
        with pytest.raises(TypeError, match="float32 on a GPU"):
            call()
