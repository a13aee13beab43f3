"""The selection contract on any scores, in both packages (issue 11, section 3; docs/DESIGN.md section 2, step 3):

    m_I = max over J <= I of Score_IJ (NaN if one of them is NaN)
    keep(I, J) iff J <= I and (NOT(Score_IJ < alpha * m_I) or forced)

so whatever lies above the diagonal is ignored and a NaN in the causal part of a row keeps the whole causal row.
Both packages must equal the float64 restatement `naive_select_blocks` (tests/helpers.py) exactly: the scores are
multiples of 1/64 and alpha a multiple of 1/4, so alpha * m_I is exact in float32 as well. Also: block scores put
NaN in the same entries in both packages, and block lists hold -1 past counts in both packages.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import DEVICE, KERNEL_TEST_DTYPES, dtype_id, random_block_mask, random_qkv

import reference
import triton_impl
import triton_impl.common
from tools.oracle import naive_select_blocks

NAN, INF = float("nan"), float("inf")
B, HQ, M = 2, 1, 11
SAFETY_NETS = [dict(sink_blocks=0, window_blocks=1, last_dense_blocks=0),
               dict(sink_blocks=1, window_blocks=2, last_dense_blocks=1)]


def junk_scores(seed: int, *, nan_in_causal_part: bool) -> torch.Tensor:
    """(B, HQ, M, M) float32 scores in [0, 1], multiples of 1/64 (ties included), with junk above the diagonal
    (huge values, +-inf, NaN, negatives) and, optionally, NaN in the causal part of a few rows."""
    gen = torch.Generator().manual_seed(seed)
    s = (torch.rand(B, HQ, M, M, generator=gen) ** 2 * 64).floor() / 64
    junk = torch.tensor([1e30, INF, -INF, NAN, -5.0, 2.0])
    upper = torch.ones(M, M, dtype=torch.bool).triu(1)
    pick = torch.randint(0, len(junk), (B, HQ, M, M), generator=gen)
    s = torch.where(upper, junk[pick], s)
    if nan_in_causal_part:
        s[0, 0, 5, 2] = NAN  # below the diagonal
        s[1, 0, 7, 7] = NAN  # on the diagonal
        s[1, 0, M - 1, 0] = NAN  # first block of the last row (a second NaN row in batch 1)
    return s


def causal_max_is_below_junk(scores: torch.Tensor) -> bool:
    """The junk changes the plain row max of some row (so a row max over all blocks would select differently)."""
    causal = torch.ones(M, M, dtype=torch.bool).tril()
    plain = scores.amax(dim=-1)
    return bool((plain != scores.masked_fill(~causal, -INF).amax(dim=-1)).any())


@pytest.mark.parametrize("net", SAFETY_NETS, ids=["no-net", "net"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.25])
@pytest.mark.parametrize("nan_in_causal_part", [False, True], ids=["finite", "nan"])
def test_select_blocks_follows_the_contract_in_both_packages(nan_in_causal_part, alpha, net):
    scores = junk_scores(seed=int(alpha * 4) + 10 * nan_in_causal_part, nan_in_causal_part=nan_in_causal_part)
    assert causal_max_is_below_junk(scores)
    expected = naive_select_blocks(scores, alpha, **net)
    assert torch.equal(reference.select_blocks(scores, alpha, **net), expected)
    assert torch.equal(reference.select_blocks(scores.double(), alpha, **net), expected)
    tri = triton_impl.select_blocks(scores.to(DEVICE), alpha, **net)
    assert torch.equal(tri.cpu(), expected)
    # One kernel for both stages: the same lists as compacting the selected mask.
    counts, indices = triton_impl.select_and_compact(scores.to(DEVICE), alpha, **net)
    ref_counts, ref_indices = reference.compact_blocks(expected)
    assert torch.equal(counts.cpu(), ref_counts)
    assert torch.equal(indices.cpu(), ref_indices)
    tri_counts, tri_indices = triton_impl.compact_blocks(tri)
    assert torch.equal(tri_counts.cpu(), ref_counts) and torch.equal(tri_indices.cpu(), ref_indices)


def test_nan_keeps_the_whole_causal_row():
    scores = junk_scores(seed=0, nan_in_causal_part=True)
    causal = torch.ones(M, M, dtype=torch.bool).tril()
    for package in (reference, triton_impl):
        mask = package.select_blocks(scores.to(DEVICE), 1.0, 0, 1, 0).cpu()
        for b, h, I in [(0, 0, 5), (1, 0, 7), (1, 0, M - 1)]:
            assert torch.equal(mask[b, h, I], causal[I]), (package.__name__, b, h, I)
        assert not (mask & ~causal).any()


def test_junk_above_the_diagonal_changes_nothing():
    """The mask of junk scores equals the mask of the same scores with zeros above the diagonal."""
    scores = junk_scores(seed=1, nan_in_causal_part=False)
    clean = scores.tril()
    for package in (reference, triton_impl):
        for alpha in (0.25, 1.0):
            assert torch.equal(package.select_blocks(scores.to(DEVICE), alpha, 0, 1, 0),
                               package.select_blocks(clean.to(DEVICE), alpha, 0, 1, 0)), package.__name__


# --- block_scores: NaN in the same entries in both packages ---------------------------------------------------------

@pytest.mark.parametrize("dtype", KERNEL_TEST_DTYPES, ids=dtype_id)
def test_block_scores_nan_entries_agree(dtype):
    """A NaN in q_i (i contributing to row I) or in kbar_J makes the causal part of the rows it reaches NaN, the
    same entries in both packages; J > I stays 0; every other entry is finite and agrees."""
    L, bs = 100, 16  # M = 7, the last block partial
    q, k, _ = random_qkv(1, L, 4, 2, 64, dtype, seed=3)
    kbar = reference.mean_pool_keys(k, bs)
    q[0, 40, 1] = NAN  # query block 2, head 1 (contributes to key blocks 0 and 1)
    q[0, 3, 2] = NAN  # query block 0, not its last row: contributes nowhere, changes nothing
    kbar[0, 4, 1] = NAN  # key block 4 of kv head 1: query heads 2, 3, rows I >= 4
    ref = reference.block_scores(q, kbar, bs)
    tri = triton_impl.block_scores(q.to(DEVICE), kbar.to(DEVICE), bs).cpu()
    nan_rows = torch.zeros(1, 4, 7, dtype=torch.bool)
    nan_rows[0, 1, 2] = True
    nan_rows[0, 2:, 4:] = True
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    expected_nan = nan_rows.unsqueeze(-1) & causal
    assert torch.equal(torch.isnan(ref), expected_nan)
    assert torch.equal(torch.isnan(tri), expected_nan)
    assert (ref.triu(1) == 0).all() and (tri.triu(1) == 0).all()
    torch.testing.assert_close(tri[~expected_nan], ref[~expected_nan], rtol=1e-4, atol=1e-6)


# --- compact_blocks: -1 past counts in both packages ---------------------------------------------------------------

GARBAGE = 7777  # what torch.empty may hold, and not -1 as the test-time poisoning would have it


def garbage_outputs(*shape, dtype, device):
    return torch.full(shape, GARBAGE if not dtype.is_floating_point else NAN, dtype=dtype, device=device)


@pytest.fixture(params=["poisoned", "garbage"])
def output_memory(request, monkeypatch):
    """Kernel outputs start as the conftest poison (-1 for lists, which hides a missing write) or as garbage."""
    if request.param == "garbage":
        monkeypatch.setattr(triton_impl.common, "POISON_OUTPUTS", False)
        for module in ("triton_impl.selection", "triton_impl.flash_prefill"):  # the modules that allocate lists
            monkeypatch.setattr(importlib.import_module(module), "new_output", garbage_outputs)
    return request.param


def assert_minus_one_past_counts(counts: torch.Tensor, indices: torch.Tensor) -> None:
    past = torch.arange(indices.shape[-1], device=indices.device) >= counts.unsqueeze(-1)
    assert past.any()
    assert (indices[past] == -1).all(), f"{int((indices[past] != -1).sum())} list entries past counts are not -1"


def test_lists_hold_minus_one_past_counts(output_memory):
    mask = random_block_mask(B, HQ, 13, keep=0.4, seed=5)
    mask[1, 0, 6] = False  # an empty row
    ref_counts, ref_indices = reference.compact_blocks(mask)
    assert_minus_one_past_counts(ref_counts, ref_indices)
    counts, indices = triton_impl.compact_blocks(mask.to(DEVICE))
    assert torch.equal(counts.cpu(), ref_counts) and torch.equal(indices.cpu(), ref_indices)

    scores = junk_scores(seed=2, nan_in_causal_part=False)
    counts, indices = triton_impl.select_and_compact(scores.to(DEVICE), 0.5, 0, 1, 0)
    assert_minus_one_past_counts(counts, indices)
    assert torch.equal(indices.cpu(), reference.compact_blocks(reference.select_blocks(scores, 0.5, 0, 1, 0))[1])


@pytest.mark.parametrize("chunks", [1, 3])
def test_flash_prefill_stats_hold_minus_one_past_counts(output_memory, chunks):
    q, k, v = random_qkv(1, 130, 2, 1, 64, torch.float16, seed=6, device=DEVICE)
    M = 9
    budget = -(-M // chunks) * 2 * M * 8  # scores + lists of ceil(M / chunks) query blocks
    _, stats = triton_impl.flash_prefill(q, k, v, alpha=0.5, block_size=16, sink_blocks=0, window_blocks=1,
                                         last_dense_blocks=0, return_stats=True, max_selection_bytes=budget)
    assert_minus_one_past_counts(stats.counts, stats.indices)
    _, ref_stats = reference.flash_prefill(q.cpu().float(), k.cpu().float(), v.cpu().float(), alpha=0.5,
                                           block_size=16, sink_blocks=0, window_blocks=1, last_dense_blocks=0,
                                           return_stats=True)
    assert_minus_one_past_counts(ref_stats.counts, ref_stats.indices)
