"""Differential tests of the selection stages: triton_impl against the reference and against float64 restatements.

Block sets must be identical except where a score lies within float rounding of its threshold; such ties are
counted and bounded. Structured inputs (planted sinks, local bands, stripes, slashes) exercise real selections;
random inputs exercise the arithmetic.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, KERNEL_TEST_DTYPES, case_id, case_params, dtype_id, random_block_mask, random_qkv

import reference
import triton_impl
from reference import lists_to_mask
from reference.synthetic import planted_qkv
from triton_impl.flash_prefill import query_block_chunks
from tools.oracle import assert_lists_match_mask, block_set_differences, block_sets_agree, naive_mean_pool_fp64

DTYPES = KERNEL_TEST_DTYPES

CASES = [  # (B, L, Hq, Hkv, D, block_size): kept small, the CPU interpreter runs every program in Python
    (1, 1, 2, 1, 64, 16),
    (3, 127, 4, 1, 64, 16),
    (1, 129, 7, 1, 64, 32),
    (1, 200, 8, 1, 64, 32),
    (1, 1000, 2, 2, 128, 64),
    (1, 2100, 2, 1, 64, 128),
]
GPU_CASES = [(1, 8192, 32, 4, 128, 128), (2, 32768, 8, 1, 64, 128)]
ALL_CASES = case_params(CASES, GPU_CASES)


def make_inputs(case, dtype, seed, planted=True):
    B, L, Hq, Hkv, D, _ = case
    if planted:
        return planted_qkv(B, L, Hq, Hkv, D, seed=seed, dtype=dtype, device=DEVICE)
    return random_qkv(B, L, Hq, Hkv, D, dtype=dtype, seed=seed, device=DEVICE)


def assert_same_blocks_except_ties(mask, ref_mask, ref_scores, alpha):
    """mask == ref_mask, except at scores within TIE_TOLERANCE x row max of the threshold alpha x row max."""
    n_differ, n_off_tie = block_set_differences(mask, ref_mask, ref_scores, alpha)
    assert n_off_tie == 0, f"{n_off_tie} blocks differ off a tie"
    assert block_sets_agree(mask, ref_mask, ref_scores, alpha), f"{n_differ} threshold ties"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", ALL_CASES)
def test_mean_pool_keys(case, dtype):
    q, k, v = make_inputs(case, dtype, seed=1, planted=False)
    bs = case[-1]
    kbar = triton_impl.mean_pool_keys(k, bs)
    assert kbar.dtype == torch.float32
    torch.testing.assert_close(kbar.double(), naive_mean_pool_fp64(k.cpu(), bs).to(DEVICE), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("planted", [False, True], ids=["random", "planted"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", ALL_CASES)
def test_block_scores(case, dtype, planted):
    q, k, v = make_inputs(case, dtype, seed=2, planted=planted)
    bs = case[-1]
    kbar = reference.mean_pool_keys(k, bs)
    scores = triton_impl.block_scores(q, kbar, bs)
    expected = reference.block_scores(q.double(), kbar.double(), bs)  # float64 reference
    assert scores.dtype == torch.float32 and scores.shape == expected.shape
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-6)
    M = scores.shape[-1]
    assert (scores.triu(1) == 0).all(), "J > I must score exactly 0"
    custom = triton_impl.block_scores(q, kbar, bs, 0.02)
    torch.testing.assert_close(custom.double(), reference.block_scores(q.double(), kbar.double(), bs, 0.02),
                               rtol=1e-4, atol=1e-6)
    assert M == scores.shape[-2]


@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.12, 0.5, 1.5])
@pytest.mark.parametrize("case", ALL_CASES)
def test_select_and_compact_match_reference_exactly_on_the_same_scores(case, alpha):
    """Given the same float32 scores, the threshold arithmetic is identical: no tie is allowed."""
    q, k, v = make_inputs(case, torch.float32, seed=3)
    bs = case[-1]
    scores = reference.block_scores(q, reference.mean_pool_keys(k, bs), bs)
    params = dict(sink_blocks=1, window_blocks=2, last_dense_blocks=1)
    ref_mask = reference.select_blocks(scores, alpha, **params)
    mask = triton_impl.select_blocks(scores, alpha, **params)
    assert torch.equal(mask, ref_mask)
    counts, indices = triton_impl.compact_blocks(ref_mask)
    assert_lists_match_mask(counts.cpu(), indices.cpu(), ref_mask.cpu())
    counts, indices = triton_impl.select_and_compact(scores, alpha, **params)
    assert_lists_match_mask(counts.cpu(), indices.cpu(), ref_mask.cpu())
    ref_counts, ref_indices = reference.select_and_compact(scores, alpha, **params)  # the twin: the same lists
    assert torch.equal(counts.cpu(), ref_counts.cpu()) and torch.equal(indices.cpu(), ref_indices.cpu())


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", ALL_CASES)
def test_fused_score_and_select_equals_the_two_stages(case, dtype):
    """flash_prefill's one-launch stages 2-4 give, bit for bit, the counts and lists of the score kernel followed by
    the select + compact kernel, in one piece and in a chunk of query blocks (rows=), lists padded or not."""
    from triton_impl.scoring import launch_block_scores, launch_scores_and_select, split_kbar
    from triton_impl.selection import launch_select_and_compact

    q, k, v = make_inputs(case, dtype, seed=8)
    B, L, Hq, _, D, bs = case
    M = -(-L // bs)
    kbar_parts = split_kbar(triton_impl.mean_pool_keys(k, bs), D**-0.5, dtype)
    scores = {rows: launch_block_scores(q, kbar_parts, bs, rows=rows) for rows in [(0, M), (M // 2, M)]}
    for alpha, rows, pad_lists in [(0.0, (0, M), True), (0.12, (M // 2, M), False), (0.6, (0, M), False)]:
        net = (alpha, 1, 2, 1)
        counts = torch.zeros(B, Hq, M, dtype=torch.int32, device=DEVICE)
        fused_counts = counts.clone()
        _, indices = launch_select_and_compact(scores[rows], *net, row0=rows[0], counts=counts, pad_lists=pad_lists)
        _, fused = launch_scores_and_select(q, kbar_parts, bs, *net, rows=rows, counts=fused_counts,
                                            pad_lists=pad_lists)
        assert torch.equal(fused_counts, counts)
        if not pad_lists:  # only the first count slots of a list are written
            listed = torch.arange(M, device=DEVICE) < counts[:, :, rows[0]:rows[1], None]
            fused, indices = fused.where(listed, -1), indices.where(listed, -1)
        assert torch.equal(fused, indices)


@pytest.mark.parametrize("keep", [0.0, 0.3, 1.0])
def test_compact_random_masks(keep):
    mask = random_block_mask(2, 3, 37, keep=keep, seed=4, device=DEVICE)
    if keep == 0.0:
        mask[:] = False  # not even the diagonal: every count is 0
    counts, indices = triton_impl.compact_blocks(mask)
    assert_lists_match_mask(counts.cpu(), indices.cpu(), mask.cpu())


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", [p for p in ALL_CASES if p.id not in (case_id(CASES[0]), case_id(CASES[3]))])
def test_flash_prefill_selects_the_reference_block_set(case, dtype):
    q, k, v = make_inputs(case, dtype, seed=5)
    bs, alpha = case[-1], 0.1
    _, stats = triton_impl.flash_prefill(q, k, v, alpha=alpha, block_size=bs, return_stats=True)
    ref_scores = reference.block_scores(q.double(), reference.mean_pool_keys(k.double(), bs), bs)
    ref_mask = reference.select_blocks(ref_scores, alpha)
    M = ref_mask.shape[-1]
    mask = lists_to_mask(stats.counts, stats.indices)
    assert_same_blocks_except_ties(mask, ref_mask, ref_scores, alpha)
    assert torch.equal(mask.sum(-1, dtype=torch.int32), stats.counts)
    assert torch.isclose(stats.density, reference.causal_block_density(stats.counts))


@pytest.mark.parametrize("budget_rows", [1, 3])
def test_flash_prefill_in_chunks_of_query_blocks_equals_one_piece(budget_rows):
    """Scoring, selecting and attending a few query blocks at a time (the memory bound of 1M-token prefill) gives
    the same lists and the same output, bit for bit, as one piece."""
    B, L, Hq, Hkv, D, bs = 2, 700, 4, 2, 64, 64
    q, k, v = make_inputs((B, L, Hq, Hkv, D, bs), torch.float16, seed=6)
    M = -(-L // bs)
    budget = budget_rows * B * Hq * M * 8
    assert len(query_block_chunks(B, Hq, M, budget)) == -(-M // budget_rows)
    one, one_stats = triton_impl.flash_prefill(q, k, v, alpha=0.1, block_size=bs, return_stats=True)
    out, stats = triton_impl.flash_prefill(q, k, v, alpha=0.1, block_size=bs, return_stats=True,
                                           max_selection_bytes=budget)
    assert torch.equal(stats.counts, one_stats.counts)
    assert torch.equal(lists_to_mask(stats.counts, stats.indices), lists_to_mask(one_stats.counts,
                                                                                    one_stats.indices))
    assert torch.equal(out, one)


def test_flash_prefill_chunks_cover_every_query_block_within_the_budget():
    for B, Hq, M, budget in [(1, 32, 8192, 1 << 30), (1, 32, 2048, 1 << 30), (2, 3, 5, 1), (1, 1, 1, 10**12)]:
        chunks = query_block_chunks(B, Hq, M, budget)
        assert chunks[0][0] == 0 and chunks[-1][1] == M
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
        assert all(B * Hq * (i1 - i0) * M * 8 <= max(budget, B * Hq * M * 8) for i0, i1 in chunks)
    assert len(query_block_chunks(1, 32, 2048, 1 << 30)) == 1  # 256K: one piece
    assert len(query_block_chunks(1, 32, 8192, 1 << 30)) == 16  # 1M: 16 x 512 query blocks
    with pytest.raises(ValueError, match="max_selection_bytes"):
        triton_impl.flash_prefill(*make_inputs((1, 64, 2, 1, 64, 16), torch.float16, seed=0), block_size=16,
                                  max_selection_bytes=0)


def test_wide_offsets_give_the_same_results(monkeypatch):
    """The int64-offset variant of every kernel (chosen for tensors past 2^31 elements, e.g. 1M tokens) computes
    exactly what the int32 variant does."""
    from triton_impl import attention, pooling, scoring, selection

    q, k, v = make_inputs((1, 300, 4, 2, 64, 32), torch.float16, seed=7)
    narrow, narrow_stats = triton_impl.flash_prefill(q, k, v, alpha=0.1, block_size=32, return_stats=True)
    for module in (attention, pooling, scoring, selection):
        monkeypatch.setattr(module, "needs_wide_offsets", lambda *tensors: True)
    wide, wide_stats = triton_impl.flash_prefill(q, k, v, alpha=0.1, block_size=32, return_stats=True)
    assert torch.equal(wide, narrow)
    assert torch.equal(wide_stats.counts, narrow_stats.counts)
    assert torch.equal(lists_to_mask(wide_stats.counts, wide_stats.indices),
                       lists_to_mask(narrow_stats.counts, narrow_stats.indices))
