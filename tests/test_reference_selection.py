"""Stages 1-4 of the reference: mean pooling, block scores (Eq. 1-2), thresholding (Eq. 3), compaction, density.

Expected values are restated from docs/DESIGN.md section 2 in float64 with plain loops (tests/helpers.py) or by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import random_qkv
from hypothesis import given
from hypothesis import strategies as st

from reference import (
    block_scores,
    causal_block_density,
    compact_blocks,
    flash_prefill,
    lists_to_mask,
    mean_pool_keys,
    select_and_compact,
    select_blocks,
)
from reference.synthetic import PlantedPatterns, planted_qkv
from tools.oracle import (
    assert_lists_match_mask,
    naive_block_scores_fp64,
    naive_mean_pool_fp64,
    naive_select_blocks,
    num_blocks,
)


# --- stage 1: mean_pool_keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "L, Bs",
    [(1, 16), (15, 16), (16, 16), (40, 16), (129, 32), (1000, 128)],
    ids=["L1-Bs16", "L15-Bs16", "L16-Bs16", "L40-Bs16", "L129-Bs32", "L1000-Bs128"],
)
def test_mean_pool_keys_matches_naive(L, Bs):
    B, Hkv, D = 2, 3, 8
    _, k, _ = random_qkv(B, L, Hkv, Hkv, D, torch.float32, seed=L)
    kbar = mean_pool_keys(k, Bs)
    N = num_blocks(L, Bs)
    assert kbar.shape == (B, N, Hkv, D) and kbar.dtype == torch.float32
    torch.testing.assert_close(kbar.double(), naive_mean_pool_fp64(k, Bs), atol=1e-6, rtol=0)


def test_mean_pool_keys_partial_block_averages_valid_tokens_only():
    """L = 40, Bs = 16: the last block holds 8 tokens and is their mean, not their sum / 16."""
    k = torch.arange(40, dtype=torch.float64).view(1, 40, 1, 1).expand(1, 40, 2, 3).contiguous()
    kbar = mean_pool_keys(k, 16)
    assert kbar.dtype == torch.float64
    expected = torch.tensor([7.5, 23.5, 35.5], dtype=torch.float64)  # means of 0..15, 16..31, 32..39
    assert torch.equal(kbar[0, :, 0, 0], expected)
    assert torch.equal(kbar[0, :, 1, 2], expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_mean_pool_keys_accumulates_in_float32(dtype):
    _, k, _ = random_qkv(1, 300, 2, 2, 64, dtype, seed=3)
    kbar = mean_pool_keys(k, 128)
    assert kbar.dtype == torch.float32
    torch.testing.assert_close(kbar.double(), naive_mean_pool_fp64(k, 128), atol=1e-6, rtol=0)


# --- stage 2: block_scores ---------------------------------------------------------------------------------------


def test_block_scores_hand_example():
    """B = Hq = Hkv = D = 1, Bs = 16, L = 32 (M = N = 2), scale = 1, every q_i = 1, kbar = (1, 2).

    Row 0: only query 15 sees all of key block 0: m00 = 1, S00 = 1 -> Score00 = 1 / (1 + 1e-9); Score01 = 0.
    Row 1: queries 16..31 contribute to J = 0 (m10 = 1, S10 = 16); only query 31 to J = 1 (m11 = 2, S11 = 1);
    M_1 = 2; Score10 = 16 e^-1 / (16 e^-1 + 1 + 1e-9), Score11 = 1 / (16 e^-1 + 1 + 1e-9).
    """
    q = torch.ones(1, 32, 1, 1, dtype=torch.float64)
    kbar = torch.tensor([1.0, 2.0], dtype=torch.float64).view(1, 2, 1, 1)
    scores = block_scores(q, kbar, 16, 1.0)
    assert scores.shape == (1, 1, 2, 2) and scores.dtype == torch.float64
    w = 16 * math.exp(-1)
    expected = torch.tensor([[1 / (1 + 1e-9), 0.0], [w / (w + 1 + 1e-9), 1 / (w + 1 + 1e-9)]], dtype=torch.float64)
    torch.testing.assert_close(scores[0, 0], expected, atol=1e-15, rtol=1e-13)
    assert scores[0, 0, 0, 1] == 0.0


def test_block_scores_hand_example_max_and_sum():
    """Varying logits within a block: row 1 of L = 32, Bs = 16, kbar = (1, 1), q_i = (i - 16) / 4 for i >= 16.

    J = 0 sees s = 0, 0.25, ..., 3.75 (m10 = 3.75, S10 = sum_t exp(t/4 - 3.75)); J = 1 sees only s_31 = 3.75.
    """
    q = torch.zeros(1, 32, 1, 1, dtype=torch.float64)
    q[0, 16:, 0, 0] = (torch.arange(16, 32, dtype=torch.float64) - 16) / 4
    kbar = torch.ones(1, 2, 1, 1, dtype=torch.float64)
    scores = block_scores(q, kbar, 16, 1.0)
    S10 = sum(math.exp(t / 4 - 3.75) for t in range(16))
    S11 = 1.0
    total = S10 + S11  # both m equal M_1 = 3.75
    assert scores[0, 0, 1, 0].item() == pytest.approx(S10 / (total + 1e-9), rel=1e-13)
    assert scores[0, 0, 1, 1].item() == pytest.approx(S11 / (total + 1e-9), rel=1e-13)
    # Row 0: query 15 alone contributes (q_15 = 0): Score00 = 1 / (1 + 1e-9).
    assert scores[0, 0, 0, 0].item() == pytest.approx(1 / (1 + 1e-9), rel=1e-15)


@pytest.mark.parametrize(
    "B, L, Hq, Hkv, D, Bs, scale",
    [
        (2, 70, 4, 2, 8, 16, None),  # partial last block (6 tokens), GQA g = 2
        (1, 64, 3, 1, 16, 16, 0.7),  # whole blocks, g = 3, custom scale
        (1, 33, 2, 2, 4, 32, None),  # one query just past a whole block
    ],
    ids=["L70-g2-Bs16", "L64-g3-Bs16-scale0.7", "L33-g1-Bs32"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_block_scores_match_loops(B, L, Hq, Hkv, D, Bs, scale, dtype):
    q, k, _ = random_qkv(B, L, Hq, Hkv, D, dtype, seed=L + Hq)
    q = q * 3  # peakier logits than N(0, 1), so the reweighting by M_I matters
    kbar = mean_pool_keys(k, Bs)
    scores = block_scores(q, kbar, Bs, scale)
    M = num_blocks(L, Bs)
    assert scores.shape == (B, Hq, M, M)
    assert scores.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expected = naive_block_scores_fp64(q, kbar, Bs, 1 / math.sqrt(D) if scale is None else scale)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(scores.double(), expected, atol=tol, rtol=0)
    # Pairs with no contributing query are exactly 0: J > I, the diagonal of a partial query block, a partial
    # last key block.
    no_contributor = expected == 0
    assert (scores[no_contributor] == 0).all()
    assert (scores.triu(1) == 0).all()
    if L % Bs:
        assert (scores[..., M - 1] == 0).all()


@pytest.mark.parametrize("L, Bs", [(1, 16), (15, 16), (100, 128)], ids=["L1-Bs16", "L15-Bs16", "L100-Bs128"])
def test_block_scores_shorter_than_a_block_are_zero(L, Bs):
    q, k, _ = random_qkv(2, L, 4, 2, 16, torch.float32, seed=L)
    scores = block_scores(q, mean_pool_keys(k, Bs), Bs)
    assert scores.shape == (2, 4, 1, 1)
    assert (scores == 0).all()


@given(
    seed=st.integers(0, 2**16),
    B=st.integers(1, 2),
    Hkv=st.integers(1, 2),
    g=st.sampled_from([1, 3, 4]),
    L=st.integers(1, 150),
    Bs=st.sampled_from([16, 32]),
    logit_scale=st.sampled_from([0.1, 1.0, 10.0]),
)
def test_block_scores_properties(seed, B, Hkv, g, L, Bs, logit_scale):
    """Non-negative, zero on and above nothing-contributes pairs, every row sums to 1 (up to eps) or to 0."""
    Hq = Hkv * g
    q, k, _ = random_qkv(B, L, Hq, Hkv, 16, torch.float32, seed=seed)
    scores = block_scores(q * logit_scale, mean_pool_keys(k, Bs), Bs)
    M = num_blocks(L, Bs)
    assert scores.shape == (B, Hq, M, M)
    assert torch.isfinite(scores).all() and (scores >= 0).all()
    assert (scores.triu(1) == 0).all()
    if L % Bs:
        assert (scores[..., M - 1] == 0).all()  # partial last key block: nobody sees all of it
    sums = scores.sum(dim=-1)
    # A row has a contributor iff it holds a query i >= Bs - 1 (which sees key block 0).
    has_contributor = torch.tensor([min(L, (I + 1) * Bs) - 1 >= Bs - 1 for I in range(M)])
    torch.testing.assert_close(sums[..., has_contributor], torch.ones_like(sums[..., has_contributor]),
                               atol=1e-5, rtol=0)
    assert (sums[..., ~has_contributor] == 0).all()


# --- stage 3: select_blocks --------------------------------------------------------------------------------------


def random_scores(B, Hq, M, seed, *, zero_rows=True, ties=True, dtype=torch.float64):
    """Score-like tensors: non-negative, zero above the diagonal, some all-zero rows and some tied values."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.rand(B, Hq, M, M, generator=gen, dtype=torch.float64) ** 3
    if ties:
        s = (s * 8).round() / 8
    if zero_rows:
        s[torch.rand(B, Hq, M, generator=gen) < 0.2] = 0.0
    return s.tril().to(dtype)


def test_select_alpha0_keeps_every_causal_block():
    scores = random_scores(2, 3, 9, seed=0)
    mask = select_blocks(scores, 0.0, 0, 1, 0)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert torch.equal(mask, torch.ones(9, 9, dtype=torch.bool).tril().expand_as(mask))


def test_select_diagonal_always_kept():
    scores = torch.ones(1, 1, 6, 6, dtype=torch.float32).tril()
    scores.diagonal(dim1=-2, dim2=-1).zero_()  # the diagonal scores nothing
    scores[..., 0, 0] = 0.0
    mask = select_blocks(scores, 0.5, 0, 1, 0)
    assert mask.diagonal(dim1=-2, dim2=-1).all()
    assert torch.equal(mask[0, 0], torch.ones(6, 6, dtype=torch.bool).tril())  # 1 >= 0.5 * 1 off the diagonal


def test_select_alpha_above_one_keeps_forced_blocks_and_zero_rows():
    M, sink, window, last = 10, 1, 2, 1
    scores = random_scores(2, 2, M, seed=1, zero_rows=False, ties=False)
    scores[0, 1, 5] = 0.0  # a row whose max is 0 keeps all its causal blocks (0 >= alpha * 0)
    mask = select_blocks(scores, 1.5, sink, window, last)
    I = torch.arange(M).view(M, 1)
    J = torch.arange(M).view(1, M)
    forced = (J <= I) & ((J < sink) | (I - J < window) | (I >= M - last))
    expected = forced.expand(2, 2, M, M).clone()
    expected[0, 1, 5, :6] = True
    assert torch.equal(mask, expected)


def test_select_alpha_one_keeps_the_row_max():
    scores = random_scores(1, 2, 8, seed=2, zero_rows=False, ties=False)
    mask = select_blocks(scores, 1.0, 0, 1, 0)
    argmax = scores.argmax(dim=-1)
    assert mask.gather(-1, argmax.unsqueeze(-1)).all()
    assert torch.equal(mask.sum(-1), 1 + (argmax != torch.arange(8)).long())  # the row max and the diagonal


def test_select_never_keeps_blocks_above_the_diagonal():
    scores = torch.zeros(1, 1, 5, 5, dtype=torch.float32)
    scores[..., 1, 4] = 100.0  # junk above the diagonal (block_scores never produces it) is never kept
    scores[..., 3, 0] = 1.0
    mask = select_blocks(scores, 0.5, 0, 1, 0)
    assert not mask.triu(1).any()
    assert mask[0, 0, 3, 0] and not mask[0, 0, 3, 1]


@given(
    seed=st.integers(0, 2**16),
    B=st.integers(1, 2),
    Hq=st.integers(1, 3),
    M=st.integers(1, 12),
    alpha=st.floats(0.0, 2.0),
    alpha_delta=st.floats(0.0, 1.0),
    sink=st.integers(0, 4),
    window=st.integers(1, 5),
    last=st.integers(0, 4),
    full_upper=st.booleans(),
)
def test_select_blocks_invariants(seed, B, Hq, M, alpha, alpha_delta, sink, window, last, full_upper):
    scores = random_scores(B, Hq, M, seed)
    if full_upper:  # junk above the diagonal must never be kept
        gen = torch.Generator().manual_seed(seed + 1)
        scores = scores + torch.rand(B, Hq, M, M, generator=gen, dtype=torch.float64).triu(1)
    mask = select_blocks(scores, alpha, sink, window, last)
    assert mask.dtype == torch.bool and mask.shape == (B, Hq, M, M)

    # Exactly the rule of docs/DESIGN.md section 2 step 3 (float64 scores: the threshold is computed identically).
    assert torch.equal(mask, naive_select_blocks(scores, alpha, sink, window, last))

    I = torch.arange(M).view(M, 1)
    J = torch.arange(M).view(1, M)
    causal = J <= I
    assert not (mask & ~causal).any(), "kept a block above the diagonal"
    assert mask[..., (J < sink) & causal].all(), "dropped a sink block"
    assert mask[..., (I - J < window) & causal].all(), "dropped a window block"
    assert mask[..., (I >= M - last) & causal].all(), "dropped a last-dense block"
    assert mask.diagonal(dim1=-2, dim2=-1).all(), "dropped the diagonal"

    # A larger alpha keeps a subset; more forced blocks keep a superset.
    larger = select_blocks(scores, alpha + alpha_delta, sink, window, last)
    assert not (larger & ~mask).any()
    more_forced = select_blocks(scores, alpha, sink + 1, window + 1, last + 1)
    assert not (mask & ~more_forced).any()

    # Compaction of what was selected.
    counts, indices = compact_blocks(mask)
    assert_lists_match_mask(counts, indices, mask)
    assert torch.equal(counts, mask.sum(dim=-1, dtype=torch.int32))


@given(seed=st.integers(0, 2**16), M=st.integers(2, 10), alpha=st.floats(0.0, 1.0))
def test_select_blocks_float32_scores_agree_with_float64(seed, M, alpha):
    """The threshold rule does not depend on the score dtype, except within rounding of the threshold."""
    scores = random_scores(2, 2, M, seed, ties=False)
    m32 = select_blocks(scores.float(), alpha, 0, 1, 0)
    m64 = select_blocks(scores, alpha, 0, 1, 0)
    differ = m32 != m64
    if differ.any():
        threshold = alpha * scores.amax(dim=-1, keepdim=True)
        near = (scores - threshold).abs() <= 1e-6 * threshold.clamp_min(1e-30)
        assert near[differ].all()


# --- stage 4: compact_blocks -------------------------------------------------------------------------------------


def test_compact_blocks_hand_example():
    mask = torch.tensor(
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool
    ).view(1, 1, 4, 4)
    counts, indices = compact_blocks(mask)
    assert counts.dtype == torch.int32 and indices.dtype == torch.int32
    assert counts.shape == (1, 1, 4) and indices.shape == (1, 1, 4, 4)
    assert counts[0, 0].tolist() == [1, 2, 1, 3]
    expected = [[0], [0, 1], [2], [0, 2, 3]]
    for I, row in enumerate(expected):
        assert indices[0, 0, I, : counts[0, 0, I]].tolist() == row


def test_compact_blocks_empty_rows():
    mask = torch.zeros(2, 1, 3, 3, dtype=torch.bool)
    mask[1, 0, 2, 1] = True
    counts, indices = compact_blocks(mask)
    assert counts.tolist() == [[[0, 0, 0]], [[0, 0, 1]]]
    assert indices[1, 0, 2, 0].item() == 1


@given(
    seed=st.integers(0, 2**16),
    B=st.integers(1, 3),
    Hq=st.integers(1, 3),
    M=st.integers(1, 16),
    keep=st.floats(0.0, 1.0),
)
def test_compact_blocks_properties(seed, B, Hq, M, keep):
    """Any bool mask (not only causal ones): counts == row sums, lists ascending == the kept J."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, Hq, M, M, generator=gen) < keep
    counts, indices = compact_blocks(mask)
    assert_lists_match_mask(counts, indices, mask)
    for b, h, I in torch.nonzero(counts).tolist():
        row = indices[b, h, I, : counts[b, h, I]]
        assert (row[1:] > row[:-1]).all(), "list not strictly ascending"
        assert ((row >= 0) & (row < M)).all()


@given(seed=st.integers(0, 2**16), B=st.integers(1, 3), Hq=st.integers(1, 3), M=st.integers(1, 16),
       keep=st.floats(0.0, 1.0))
def test_lists_to_mask_inverts_compact_blocks(seed, B, Hq, M, keep):
    """lists_to_mask(compact_blocks(mask)) == mask for causal masks; what lies past counts is never read."""
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, Hq, M, M, generator=gen) < keep) & torch.ones(M, M, dtype=torch.bool).tril()
    counts, indices = compact_blocks(mask)
    assert torch.equal(lists_to_mask(counts, indices), mask)
    junk = torch.where(torch.arange(M) < counts.unsqueeze(-1), indices, 0)  # 0 past counts: ignored
    assert torch.equal(lists_to_mask(counts, junk), mask)


def test_lists_to_mask_reads_narrow_lists():
    """Lists narrower than the block grid (C < M, as block_sparse_attention admits) give an (M, M) mask."""
    counts = torch.tensor([[[1, 1, 2, 1]]], dtype=torch.int32)
    indices = torch.tensor([[[[0, -1], [1, -1], [0, 2], [3, -1]]]], dtype=torch.int32)
    expected = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    for I, row in enumerate([[0], [1], [0, 2], [3]]):
        expected[0, 0, I, row] = True
    assert torch.equal(lists_to_mask(counts, indices), expected)


def test_select_and_compact_is_select_then_compact():
    q, k, _ = random_qkv(2, 300, 4, 2, 16, seed=5)
    scores = block_scores(q, mean_pool_keys(k, 32), 32)
    expected = compact_blocks(select_blocks(scores, 0.2, 1, 2, 1))
    for got, want in zip(select_and_compact(scores, 0.2, 1, 2, 1), expected):
        assert torch.equal(got, want)


# --- density -----------------------------------------------------------------------------------------------------


def test_causal_block_density():
    B, Hq, M = 2, 3, 7
    full = torch.arange(1, M + 1, dtype=torch.int32).expand(B, Hq, M).contiguous()
    density = causal_block_density(full)
    assert density.dim() == 0 and density.dtype == torch.float32
    assert density.item() == 1.0
    diagonal_only = torch.ones(B, Hq, M, dtype=torch.int32)
    assert causal_block_density(diagonal_only).item() == pytest.approx(2 / (M + 1), rel=1e-6)
    gen = torch.Generator().manual_seed(0)
    counts = (torch.rand(B, Hq, M, generator=gen) * torch.arange(1, M + 1)).ceil().int()
    expected = counts.sum().item() / (B * Hq * M * (M + 1) / 2)
    assert causal_block_density(counts).item() == pytest.approx(expected, rel=1e-6)


# --- structured synthetic input: the selection really is sparse --------------------------------------------------


def test_planted_input_is_sparse_at_4k_with_default_alpha():
    L, Bs = 4096, 128
    q, k, v = planted_qkv(1, L, 4, 2, 64, seed=0)
    scores = block_scores(q, mean_pool_keys(k, Bs), Bs)
    mask = select_blocks(scores)  # defaults: alpha 0.12, sink 2, window 4, last 2
    counts, indices = compact_blocks(mask)
    density = causal_block_density(counts).item()
    assert 0.0 < density < 0.75  # about 0.5 for this seed: the structured input really is sparse
    assert mask[..., :, 0].all() and mask[..., 1:, 1].all()  # the planted sinks (block 0, forced blocks 0-1)
    # flash_prefill makes the same selection with its defaults.
    _, stats = flash_prefill(q, k, v, return_stats=True)
    assert torch.equal(stats.counts, counts)
    assert stats.density.item() == pytest.approx(density, rel=1e-6)


def test_planted_sinks_are_found_by_the_threshold_alone():
    """With no forced sink blocks, a planted sink that fills block 0 is still selected in every row by
    Score >= alpha * max: pattern discovery sees it through the mean proxy."""
    L, Bs = 4096, 128
    q, k, _ = planted_qkv(1, L, 4, 2, 64, seed=0, patterns=PlantedPatterns(sink_tokens=Bs))
    scores = block_scores(q, mean_pool_keys(k, Bs), Bs)
    mask = select_blocks(scores, 0.12, sink_blocks=0, window_blocks=1, last_dense_blocks=0)
    assert mask[..., 1:, 0].all()  # every row that has key block 0 strictly in its past
    assert causal_block_density(compact_blocks(mask)[0]).item() < 0.5
