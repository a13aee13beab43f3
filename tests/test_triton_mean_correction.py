"""Mean correction (FlashPrefill V2, Eq. 6) in the Triton kernels: triton_impl against the reference and the float64
oracle (tools/oracle.py) on the same block lists.

The rule is FlashAttention's, for the corrected attention (tools.oracle.corrected_flash_rule): with `ref` the float64
oracle (`naive_mean_corrected_attention_fp64`) and `pt` the same formula computed by PyTorch in the input's own
dtype (the block means held in it, as the kernel reads them), max |out - ref| <= 2 max |pt - ref| + 1e-5.

On a CPU the kernels run under the interpreter (float32 / float16, small shapes: the file takes well under a minute);
on a GPU the same tests run in bfloat16 / float16, plus the cases marked `gpu`. Every kernel output starts as NaN
(conftest.py), so an element the means walk forgot to write fails.
"""

from __future__ import annotations


import pytest
import torch
from helpers import DEVICE, KERNEL_TEST_DTYPES, case_id, case_params, causal_block_mask, dtype_id, random_block_mask, \
    random_qkv

import reference
import triton_impl
from reference.synthetic import planted_qkv
from tools.oracle import (FLASH_RULE_FACTOR, FLASH_RULE_SLACK, corrected_flash_rule, max_abs_diff,
                          naive_mean_corrected_attention_fp64, num_blocks)
from triton_impl.attention import LOGICAL, PHYSICAL, attention_means, launch_attention
from triton_impl.common import BLOCK_SIZES, GPU_DTYPES, HEAD_DIMS

DTYPES = KERNEL_TEST_DTYPES

# (B, L, Hq, Hkv, D, block_size): odd lengths, GQA groups 1/2/4, batch 1-2, head dims 64/128, blocks 16-128.
CASES = [  # small: the interpreter runs every program in Python
    (1, 100, 2, 1, 64, 16),
    (2, 233, 4, 2, 64, 32),
    (1, 300, 4, 1, 128, 64),
    (1, 300, 2, 1, 64, 128),
]
GPU_CASES = [  # the oracle holds (B, Hq, L, L + N) float64 logits: L stays a few thousand
    (1, 4097, 8, 2, 128, 128),
    (2, 2049, 4, 1, 64, 64),
    (1, 3000, 8, 4, 128, 32),
    (1, 2500, 4, 2, 64, 16),  # 157 blocks: several chunks of 128 means, the first starting below 0
    (1, 2600, 4, 2, 128, 256),
]
ALL_CASES = case_params(CASES, GPU_CASES)


def assert_corrected_rule(out, q, k, v, block_mask, block_size, scale=None):
    assert not out.isnan().any(), "kernel left NaN (unwritten or invalid) elements"
    ok, err, pt_err = corrected_flash_rule(out, q, k, v, block_mask, block_size, scale)
    assert ok, f"max error {err:.3g} > 2 x PyTorch's {pt_err:.3g} + 1e-5"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", ALL_CASES)
def test_physical_and_logical_match_the_oracle_and_the_reference(case, dtype):
    B, L, Hq, Hkv, D, bs = case
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype=dtype, seed=2, device=DEVICE)
    mask = random_block_mask(B, Hq, num_blocks(L, bs), keep=0.3, seed=3, device=DEVICE)
    counts, indices = reference.compact_blocks(mask)
    physical, visits = triton_impl.block_sparse_attention(q, k, v, counts, indices, bs, mean_correction=True,
                                                          return_visits=True)
    logical, logical_visits = triton_impl.block_sparse_attention_logical(q, k, v, mask, bs, mean_correction=True,
                                                                         return_visits=True)
    assert_corrected_rule(physical, q, k, v, mask, bs)
    # Same blocks, same means, same order of folding: the two walks agree to the bit, and the corrections are not
    # visits.
    torch.testing.assert_close(physical, logical, rtol=0, atol=0)
    assert torch.equal(visits, counts)
    assert torch.equal(logical_visits[..., -1], torch.full_like(counts[..., -1], counts.shape[-1]))
    # The reference accumulates in float32 from the same inputs: it sits within the same bound of the oracle.
    expected = reference.block_sparse_attention(q, k, v, counts, indices, bs, mean_correction=True)
    ok, _, pt_err = corrected_flash_rule(physical, q, k, v, mask, bs)
    assert max_abs_diff(physical, expected) <= 2 * FLASH_RULE_FACTOR * pt_err + FLASH_RULE_SLACK


def test_several_chunks_of_means_per_row():
    """Chunks of 16 means make the long rows walk two chunks, the first starting below block 0, and consume their
    list window by window (the default 128 needs rows of more than 128 blocks for that: the GPU cases)."""
    B, L, Hq, Hkv, D, bs, mean_chunk = 1, 400, 2, 1, 64, 16, 16  # 25 blocks
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype=DTYPES[-1], seed=4, device=DEVICE)
    mask = random_block_mask(B, Hq, num_blocks(L, bs), keep=0.3, seed=5, device=DEVICE)
    counts, indices = reference.compact_blocks(mask)
    means = attention_means(k, v, bs, D ** -0.5, q.dtype)
    config = dict(mean_chunk=mean_chunk)
    physical = launch_attention(q, k, v, bs, D ** -0.5, PHYSICAL, counts=counts, indices=indices, means=means,
                                config=config)
    logical = launch_attention(q, k, v, bs, D ** -0.5, LOGICAL, mask=mask, means=means, config=config)
    assert_corrected_rule(physical, q, k, v, mask, bs)
    torch.testing.assert_close(physical, logical, rtol=0, atol=0)


@pytest.mark.parametrize("case", [pytest.param(c, id=case_id(c)) for c in CASES[2:3]] + [
    pytest.param(GPU_CASES[0], id=case_id(GPU_CASES[0]), marks=pytest.mark.gpu)])
def test_tma_and_pointer_loads_of_the_means_agree(case):
    """K/V and the means through TMA descriptors (the default from 8K tokens) or pointer loads: the same output to
    the bit (the first chunk of a row starts below block 0: TMA zero-fills those rows, pointer loads mask them)."""
    B, L, Hq, Hkv, D, bs = case
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype=DTYPES[-1], seed=6, device=DEVICE)
    mask = random_block_mask(B, Hq, num_blocks(L, bs), keep=0.3, seed=7, device=DEVICE)
    counts, indices = reference.compact_blocks(mask)
    means = attention_means(k, v, bs, D ** -0.5, q.dtype)
    tma, pointers = (launch_attention(q, k, v, bs, D ** -0.5, PHYSICAL, counts=counts, indices=indices, means=means,
                                      config=dict(kv_descriptors=flag, kv_descriptors_min_length=1, mean_chunk=32))
                     for flag in (True, False))
    assert_corrected_rule(tma, q, k, v, mask, bs)
    torch.testing.assert_close(tma, pointers, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_nothing_pruned_changes_nothing(dtype):
    """Every causal block kept: each chunk of means is all -inf, so the corrected output is the plain one to the bit."""
    B, L, Hq, Hkv, D, bs = 2, 100, 2, 1, 64, 16
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype=dtype, seed=8, device=DEVICE)
    counts, indices = reference.compact_blocks(causal_block_mask(B, Hq, num_blocks(L, bs), device=DEVICE))
    plain = triton_impl.block_sparse_attention(q, k, v, counts, indices, bs)
    corrected = triton_impl.block_sparse_attention(q, k, v, counts, indices, bs, mean_correction=True)
    torch.testing.assert_close(corrected, plain, rtol=0, atol=0)


def block_constant(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Every token of a block replaced by the block's first token: the block equals its mean."""
    idx = (torch.arange(x.shape[1], device=x.device) // block_size) * block_size
    return x[:, idx]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_exact_when_every_block_equals_its_mean(dtype):
    """Keys and values constant inside each block: Bs exp(q . k_bar) v_bar is the block's exact softmax numerator,
    so the corrected sparse attention is dense attention however much is pruned."""
    B, L, Hq, Hkv, D, bs = 1, 200, 2, 1, 64, 16
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype=dtype, seed=9, device=DEVICE)
    k, v = block_constant(k, bs), block_constant(v, bs)
    M = num_blocks(L, bs)
    mask = random_block_mask(B, Hq, M, keep=0.15, seed=10, device=DEVICE)
    out = triton_impl.block_sparse_attention(q, k, v, *reference.compact_blocks(mask), bs, mean_correction=True)
    assert_corrected_rule(out, q, k, v, mask, bs)
    dense64 = naive_mean_corrected_attention_fp64(q, k, v, causal_block_mask(B, Hq, M, device=DEVICE), bs)
    ok, _, pt_err = corrected_flash_rule(out, q, k, v, mask, bs)
    assert max_abs_diff(out, dense64) <= FLASH_RULE_FACTOR * pt_err + FLASH_RULE_SLACK + 1e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_hand_made_lists_empty_rows_and_no_diagonal(dtype):
    """Rows that list nothing see only the means below their diagonal; a pruned diagonal block is not corrected; a
    row that lists nothing and has nothing below (block 0) gives 0."""
    B, L, Hq, Hkv, D, bs = 1, 64, 2, 1, 64, 16
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype=dtype, seed=11, device=DEVICE)
    mask = torch.zeros(B, Hq, 4, 4, dtype=torch.bool, device=DEVICE)
    mask[0, 0, 0, 0] = True  # head 0: row 0 keeps its diagonal; everything else is empty
    mask[0, 1, 3, 1] = True  # head 1: row 3 keeps block 1 only
    counts, indices = reference.compact_blocks(mask)
    out, visits = triton_impl.block_sparse_attention(q, k, v, counts, indices, bs, mean_correction=True,
                                                     return_visits=True)
    assert torch.equal(visits, counts)
    assert_corrected_rule(out, q, k, v, mask, bs)
    assert (out[:, :bs, 1] == 0).all()  # head 1, block 0: no key, no mean below
    # Block 1 of head 0 sees one extra key only, block 0's mean: its output is block 0's mean value.
    v_bar = v[:, :bs].float().mean(dim=1).to(dtype)
    torch.testing.assert_close(out[0, bs:2 * bs, 0], v_bar[0, 0].expand(bs, D), rtol=0, atol=2e-3)
    logical = triton_impl.block_sparse_attention_logical(q, k, v, mask, bs, mean_correction=True)
    torch.testing.assert_close(logical, out, rtol=0, atol=0)


def test_flash_prefill_keeps_its_selection_and_corrects_the_rest():
    """Same lists with and without the option; the corrected output is the oracle's on them, and equals the
    block_sparse_attention call on those lists to the bit (flash_prefill pools V with K in stage 1 and reads the
    score kernel's kbar: the same means). Chunked selection (max_selection_bytes) gives the same output."""
    dtype = DTYPES[-1]
    B, L, Hq, Hkv, D, bs = 1, 192, 2, 1, 64, 16
    q, k, v = planted_qkv(B, L, Hq, Hkv, D, seed=12, dtype=dtype, device=DEVICE)
    kw = dict(alpha=0.3, block_size=bs, sink_blocks=1, window_blocks=1, last_dense_blocks=0)
    _, plain = triton_impl.flash_prefill(q, k, v, return_stats=True, **kw)
    out, stats = triton_impl.flash_prefill(q, k, v, return_stats=True, mean_correction=True, **kw)
    assert torch.equal(stats.counts, plain.counts) and torch.equal(stats.indices, plain.indices)
    assert float(stats.density) == float(plain.density) < 0.6
    mask = reference.lists_to_mask(stats.counts, stats.indices)
    assert_corrected_rule(out, q, k, v, mask, bs)
    alone = triton_impl.block_sparse_attention(q, k, v, stats.counts, stats.indices, bs, mean_correction=True)
    torch.testing.assert_close(out, alone, rtol=0, atol=0)
    budget = 2 * 12 * 8 * 5  # Hq x M x 8 bytes per query block: chunks of 5 query blocks
    chunked = triton_impl.flash_prefill(q, k, v, mean_correction=True, max_selection_bytes=budget, **kw)
    torch.testing.assert_close(chunked, out, rtol=0, atol=0)


def test_lowers_the_error_against_dense_on_planted_inputs():
    """The point of the option, as a statistical statement: on planted inputs, at equal lists, the corrected output
    is closer to dense attention than the plain one for most seeds, and on average (repro/mean_correction.py
    measures the same with the reference on real activations)."""
    dtype = DTYPES[-1]
    ratios = []
    for seed in range(4):
        q, k, v = planted_qkv(1, 192, 2, 1, 64, seed=seed, dtype=dtype, device=DEVICE)
        dense = reference.dense_attention(q.float(), k.float(), v.float())
        _, stats = reference.flash_prefill(q.float(), k.float(), v.float(), alpha=0.3, block_size=16, sink_blocks=1,
                                           window_blocks=1, last_dense_blocks=0, return_stats=True)
        errors = [float((triton_impl.block_sparse_attention(q, k, v, stats.counts, stats.indices, 16,
                                                            mean_correction=flag).float() - dense).norm())
                  for flag in (False, True)]
        ratios.append(errors[1] / errors[0])
    assert sum(r < 1 for r in ratios) >= 3, ratios
    assert sum(ratios) / len(ratios) < 0.99, ratios


def test_key_means_is_stage_1s_kbar():
    """key_means (mean_pool_keys' kbar) replaces pooling k inside the call, in both packages; it is checked like
    every argument."""
    B, L, Hq, Hkv, D, bs = 1, 100, 4, 2, 64, 16
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype=DTYPES[-1], seed=13, device=DEVICE)
    mask = random_block_mask(B, Hq, num_blocks(L, bs), keep=0.3, seed=14, device=DEVICE)
    counts, indices = reference.compact_blocks(mask)
    for impl in (reference, triton_impl):
        pooled = impl.block_sparse_attention(q, k, v, counts, indices, bs, mean_correction=True)
        given = impl.block_sparse_attention(q, k, v, counts, indices, bs, mean_correction=True,
                                            key_means=impl.mean_pool_keys(k, bs))
        torch.testing.assert_close(given, pooled, rtol=0, atol=0)
        logical = impl.block_sparse_attention_logical(q, k, v, mask, bs, mean_correction=True,
                                                      key_means=impl.mean_pool_keys(k, bs))
        torch.testing.assert_close(logical, pooled, rtol=0, atol=0)
        kbar = reference.mean_pool_keys(k.float(), bs)
        with pytest.raises(ValueError, match="key_means must have shape"):
            impl.block_sparse_attention(q, k, v, counts, indices, bs, mean_correction=True, key_means=kbar[:, :-1])
        with pytest.raises(ValueError, match="key_means is read only with mean_correction=True"):
            impl.block_sparse_attention(q, k, v, counts, indices, bs, key_means=kbar)
        with pytest.raises(TypeError, match="key_means"):
            impl.block_sparse_attention(q, k, v, counts, indices, bs, mean_correction=True, key_means=kbar.int())
        with pytest.raises(TypeError, match="^mean_correction must be a bool"):
            impl.block_sparse_attention(q, k, v, counts, indices, bs, mean_correction=1)


@pytest.mark.parametrize("where", ["value", "key"])
def test_non_finite_inputs_reach_the_rows_the_reference_says(where):
    """A NaN in a key or value of block 1: with the correction it reaches every later row (block 1 is kept there, or
    stands in as its mean), as in the reference; the NaN pattern is the reference's, element for element."""
    dtype = DTYPES[-1]
    B, L, Hq, Hkv, D, bs = 1, 128, 2, 1, 64, 16
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype=dtype, seed=15, device=DEVICE)
    (v if where == "value" else k)[0, 20, 0, 3] = float("nan")
    mask = random_block_mask(B, Hq, num_blocks(L, bs), keep=0.3, seed=16, device=DEVICE)
    counts, indices = reference.compact_blocks(mask)
    out = triton_impl.block_sparse_attention(q, k, v, counts, indices, bs, mean_correction=True)
    expected = reference.block_sparse_attention(q, k, v, counts, indices, bs, mean_correction=True)
    assert torch.equal(out.isnan(), expected.isnan())
    nan_rows = out.isnan().any(dim=-1)  # a NaN in one dim of a value reaches that dim of the output only
    assert nan_rows[:, 2 * bs:].all() and not nan_rows[:, :bs].any()


def test_malformed_lists_are_never_read_outside():
    """validate=False with the correction: counts and ids far outside the tensors give wrong rows, never a read out
    of bounds (the list windows stop at the clamped count; the means' addresses do not depend on the lists)."""
    B, L, Hq, Hkv, D, bs = 1, 80, 2, 1, 64, 16
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype=DTYPES[-1], seed=19, device=DEVICE)
    M = num_blocks(L, bs)
    counts = torch.full((B, Hq, M), 10**6, dtype=torch.int32, device=DEVICE)
    indices = torch.full((B, Hq, M, M), 10**8, dtype=torch.int32, device=DEVICE)
    indices[..., 1::2] = -(10**8)
    out = triton_impl.block_sparse_attention(q, k, v, counts, indices, bs, mean_correction=True)
    assert out.shape == q.shape and not out.isnan().any()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_every_supported_block_size_head_dim_and_dtype_runs(block_size, head_dim, dtype):
    """Everything the validation admits runs natively with the correction, and is the oracle's corrected attention
    over flash_prefill's own block set; the logical walk agrees to the bit."""
    L = 3 * block_size + 5 if block_size >= 128 else 40 * block_size + 5
    q, k, v = planted_qkv(1, L, 8, 2, head_dim, seed=17, dtype=dtype, device=DEVICE)
    out, stats = triton_impl.flash_prefill(q, k, v, alpha=0.1, block_size=block_size, return_stats=True,
                                           mean_correction=True)
    mask = reference.lists_to_mask(stats.counts, stats.indices)
    assert_corrected_rule(out, q, k, v, mask, block_size)
    logical = triton_impl.block_sparse_attention_logical(q, k, v, mask, block_size, mean_correction=True)
    torch.testing.assert_close(logical, out, rtol=0, atol=0)


@pytest.mark.gpu
def test_long_rows_on_the_gpu():
    """16K tokens at Bs = 64: rows of up to 255 means (two chunks of 128), K/V and means through TMA, GQA 4, on
    flash_prefill's own lists. The oracle would hold L x L logits per head, so the yardstick is the float32
    reference: the kernel may differ from it with the correction by at most twice what it differs without."""
    B, L, Hq, Hkv, D, bs = 1, 16384, 8, 2, 128, 64
    q, k, v = planted_qkv(B, L, Hq, Hkv, D, seed=18, dtype=torch.bfloat16, device=DEVICE)
    _, stats = triton_impl.flash_prefill(q, k, v, alpha=0.12, block_size=bs, return_stats=True)
    lists = (stats.counts, stats.indices, bs)
    errors = {}
    for flag in (False, True):
        out = triton_impl.block_sparse_attention(q, k, v, *lists, mean_correction=flag)
        expected = reference.block_sparse_attention(q, k, v, *lists, mean_correction=flag, validate=False)
        errors[flag] = max_abs_diff(out, expected)
        if flag:
            assert not out.isnan().any()
            plain_vs_corrected = max_abs_diff(triton_impl.block_sparse_attention(q, k, v, *lists), expected)
    assert errors[True] <= 2 * errors[False] + 1e-3, errors
    assert plain_vs_corrected > 2 * errors[True]  # the correction moves the output by more than the kernel's error


def test_bench_quick_mode_runs_on_this_machine(tmp_path):
    """repro/bench_mean_correction.py --quick: the correctness gate, the interleaved A/B and the flash_prefill rows
    at tiny sizes (under the interpreter on a CPU), writing its CSV, summary and run.json."""
    from repro import bench_mean_correction as bench
    from repro.common import read_long_csv, read_run_json

    bench.main(["--quick", "--out-dir", str(tmp_path)])
    rows = read_long_csv(tmp_path / "bench_mean_correction.csv")
    assert {r["what"] for r in rows} >= {"attention", "flash_prefill", "check"}
    assert {r["version"] for r in rows if r["what"] == "attention"} == {"plain", "corrected"}
    assert all(float(r["ms"]) > 0 for r in rows if r["what"] != "check")
    assert "overhead" in (tmp_path / "bench_mean_correction.md").read_text()
    assert read_run_json(tmp_path / "run.json")["quick"] is True
