"""Mean correction (FlashPrefill V2, Eq. 6; `mean_correction=True`) in the reference: every pruned causal block below
the diagonal joins the softmax as its mean key and value, with logit scale q . k_bar + log Bs.

Checked against the float64 restatement of tools/oracle.py, against dense attention where the correction is exact
(keys and values constant inside each block), and between the physical and logical walks. The Triton kernels are
checked against both in tests/test_triton_mean_correction.py."""

from __future__ import annotations

import pytest
import torch
from helpers import random_block_mask, random_qkv

import reference
from reference import block_sparse_attention, block_sparse_attention_logical, compact_blocks, dense_attention
from reference.synthetic import planted_qkv
from tools.oracle import ATOL, naive_attention, naive_mean_corrected_attention_fp64, num_blocks

CASES = [(1, 100, 2, 1, 16, 16), (2, 333, 4, 2, 32, 32), (1, 520, 8, 2, 16, 64)]  # (B, L, Hq, Hkv, D, Bs)


def case_id(c):
    return f"B{c[0]}-L{c[1]}-g{c[2] // c[3]}-bs{c[5]}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_the_oracle_on_random_masks(case, dtype):
    B, L, Hq, Hkv, D, Bs = case
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype, seed=7)
    mask = random_block_mask(B, Hq, num_blocks(L, Bs), keep=0.4, seed=3)
    expected = naive_mean_corrected_attention_fp64(q, k, v, mask, Bs)
    physical = block_sparse_attention(q, k, v, *compact_blocks(mask), Bs, mean_correction=True)
    logical = block_sparse_attention_logical(q, k, v, mask, Bs, mean_correction=True)
    torch.testing.assert_close(physical.double(), expected, atol=ATOL[dtype], rtol=0)
    torch.testing.assert_close(logical, physical, atol=0, rtol=0)


def block_constant(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Every token of a block replaced by the block's first token: the block equals its mean."""
    idx = (torch.arange(x.shape[1]) // block_size) * block_size
    return x[:, idx]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_is_exact_when_every_pruned_block_equals_its_mean(case):
    """With keys and values constant inside each block, Bs exp(q . k_bar) v_bar is exactly the block's softmax
    numerator: the corrected sparse attention equals dense attention, however many blocks are pruned."""
    B, L, Hq, Hkv, D, Bs = case
    q, k, v = random_qkv(B, L, Hq, Hkv, D, torch.float64, seed=1)
    k, v = block_constant(k, Bs), block_constant(v, Bs)
    mask = random_block_mask(B, Hq, num_blocks(L, Bs), keep=0.2, seed=5)  # the diagonal is always kept
    dense = dense_attention(q, k, v)
    corrected = block_sparse_attention(q, k, v, *compact_blocks(mask), Bs, mean_correction=True)
    plain = block_sparse_attention(q, k, v, *compact_blocks(mask), Bs)
    torch.testing.assert_close(corrected, dense, atol=1e-12, rtol=0)
    assert (plain - dense).abs().max() > 1e-3  # without the correction the pruned blocks are missing


def test_changes_nothing_when_nothing_is_pruned():
    q, k, v = random_qkv(2, 300, 4, 2, 32, torch.float64, seed=2)
    out, stats = reference.flash_prefill(q, k, v, alpha=0.0, block_size=32, return_stats=True)
    corrected = reference.flash_prefill(q, k, v, alpha=0.0, block_size=32, mean_correction=True)
    assert float(stats.density) == 1.0
    torch.testing.assert_close(corrected, out, atol=0, rtol=0)


def test_flash_prefill_keeps_its_selection_and_corrects_the_rest():
    """The same blocks are kept (the selection does not see the option); the output is the oracle's on them."""
    q, k, v = planted_qkv(1, 512, 4, 2, 32, seed=4, dtype=torch.float64)  # structured: the threshold prunes
    kw = dict(alpha=0.3, block_size=32, sink_blocks=1, window_blocks=1, last_dense_blocks=0)
    _, plain = reference.flash_prefill(q, k, v, return_stats=True, **kw)
    out, stats = reference.flash_prefill(q, k, v, return_stats=True, mean_correction=True, **kw)
    assert torch.equal(stats.counts, plain.counts) and float(stats.density) < 0.9
    mask = reference.lists_to_mask(stats.counts, stats.indices)
    torch.testing.assert_close(out, naive_mean_corrected_attention_fp64(q, k, v, mask, 32), atol=1e-10, rtol=0)


def test_a_pruned_diagonal_block_gets_no_correction():
    """Hand-made lists without the diagonal: only blocks strictly below it are corrected (the diagonal block's mean
    would hold keys its rows cannot see), and the visits count the listed blocks only."""
    q, k, v = random_qkv(1, 64, 2, 1, 16, torch.float64, seed=6)
    mask = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    mask[..., 0, 0] = True  # row 0 keeps its diagonal; rows 1-3 keep nothing
    out, visits = block_sparse_attention(q, k, v, *compact_blocks(mask), 16, mean_correction=True, return_visits=True)
    torch.testing.assert_close(out, naive_mean_corrected_attention_fp64(q, k, v, mask, 16), atol=1e-12, rtol=0)
    assert visits.tolist() == [[[1, 0, 0, 0]] * 2]
    assert out[:, 16:32].abs().max() > 0  # block 1 sees block 0's mean, not nothing
    torch.testing.assert_close(out[:, 16:32], v[:, :16].mean(dim=1, keepdim=True).expand(1, 16, 1, 16).expand(
        1, 16, 2, 16), atol=1e-12, rtol=0)  # one extra key only: its value is the mean value


def test_is_differentiable():
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 128, 2, 1, 16, torch.float64, seed=8))
    mask = random_block_mask(1, 2, 8, keep=0.3, seed=1)
    out = block_sparse_attention(q, k, v, *compact_blocks(mask), 16, mean_correction=True)
    out.square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))


def test_the_plain_oracle_is_unchanged_by_the_option():
    """mean_correction=False (the default) is the plain block-sparse attention."""
    q, k, v = random_qkv(1, 200, 2, 1, 16, torch.float64, seed=9)
    mask = random_block_mask(1, 2, num_blocks(200, 32), keep=0.4, seed=2)
    out = block_sparse_attention(q, k, v, *compact_blocks(mask), 32, mean_correction=False)
    torch.testing.assert_close(out, naive_attention(q, k, v, mask, 32), atol=1e-12, rtol=0)


@pytest.mark.parametrize("call", ["flash_prefill", "block_sparse_attention", "block_sparse_attention_logical"])
def test_the_option_must_be_a_bool(call):
    q, k, v = random_qkv(1, 64, 2, 1, 16, torch.float32, seed=0)
    mask = random_block_mask(1, 2, 4, seed=0)
    fn = {"flash_prefill": lambda: reference.flash_prefill(q, k, v, block_size=16, mean_correction="yes"),
          "block_sparse_attention": lambda: block_sparse_attention(q, k, v, *compact_blocks(mask), 16,
                                                                   mean_correction=1),
          "block_sparse_attention_logical": lambda: block_sparse_attention_logical(q, k, v, mask, 16,
                                                                                   mean_correction=None)}[call]
    with pytest.raises(TypeError, match="^mean_correction must be a bool"):
        fn()
