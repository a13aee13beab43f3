"""Stage 5 of the reference and its composition: dense ground truth, physical / logical block-sparse attention,
flash_prefill, against float64 naive attention with explicit masks (docs/DESIGN.md sections 2 and 4)."""

from __future__ import annotations

import pytest
import torch
from helpers import causal_block_mask, random_block_mask, random_qkv

from reference import (
    block_sparse_attention,
    block_sparse_attention_logical,
    causal_block_density,
    compact_blocks,
    dense_attention,
    flash_prefill,
)
from tools.oracle import ATOL, naive_attention, num_blocks


# (B, L, Hq, Hkv, D, block_size): odd lengths 1/127/128/129/1000, GQA groups 1/3/4/8, D 64/128, batch 1-3.
SHAPES = [
    (1, 1, 1, 1, 64, 16),
    (2, 127, 3, 1, 64, 16),
    (1, 128, 8, 2, 128, 128),
    (2, 128, 8, 1, 64, 32),
    (2, 129, 4, 1, 64, 16),
    (3, 129, 2, 2, 128, 128),
    (1, 1000, 8, 1, 64, 32),
    (2, 1000, 3, 1, 128, 128),
]


def shape_id(shape) -> str:
    B, L, Hq, Hkv, D, Bs = shape
    return f"L{L}-g{Hq // Hkv}-D{D}-B{B}-Bs{Bs}"


SHAPE_PARAMS = [pytest.param(s, id=shape_id(s)) for s in SHAPES]


def seed_of(shape) -> int:
    """A fixed seed per shape (deterministic across runs, unlike hash())."""
    return sum(x * p for x, p in zip(shape, (3, 5, 7, 11, 13, 17)))


def full_lists(B, Hq, L, Bs):
    return compact_blocks(causal_block_mask(B, Hq, num_blocks(L, Bs)))


def assert_close64(out: torch.Tensor, ref64: torch.Tensor, atol: float) -> None:
    torch.testing.assert_close(out.double(), ref64, atol=atol, rtol=0)


# --- dense_attention: the ground truth itself ------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_dense_attention_matches_naive_fp64(shape):
    B, L, Hq, Hkv, D, _ = shape
    q, k, v = random_qkv(B, L, Hq, Hkv, D, torch.float32, seed=seed_of(shape))
    out = dense_attention(q, k, v)
    assert out.shape == (B, L, Hq, D) and out.dtype == torch.float32
    assert_close64(out, naive_attention(q, k, v), ATOL[torch.float32])


@pytest.mark.parametrize("shape", [SHAPE_PARAMS[i] for i in (1, 4, 6)])
def test_dense_attention_float64_is_exact(shape):
    B, L, Hq, Hkv, D, _ = shape
    q, k, v = random_qkv(B, L, Hq, Hkv, D, torch.float64, seed=seed_of(shape))
    out = dense_attention(q, k, v)
    assert out.dtype == torch.float64
    assert_close64(out, naive_attention(q, k, v), 1e-12)


def test_dense_attention_first_token_sees_only_itself():
    """Row 0 attends to key 0 alone, so out[:, 0] == v[:, 0] (per query head's kv head); pins causality + GQA."""
    q, k, v = random_qkv(2, 33, 6, 2, 64, torch.float64, seed=1)
    out = dense_attention(q, k, v)
    torch.testing.assert_close(out[:, 0], v[:, 0].repeat_interleave(3, dim=1), atol=1e-12, rtol=0)


def test_dense_attention_gqa_head_mapping():
    """Query head h reads kv head h // g: changing kv head 1 changes exactly query heads g..2g-1."""
    g = 4
    q, k, v = random_qkv(1, 40, 3 * g, 3, 64, torch.float64, seed=2)
    base = dense_attention(q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 1] += 1.0
    v2[:, :, 1] *= -2.0
    changed = (dense_attention(q, k2, v2) - base).abs().amax(dim=(0, 1, 3)) > 1e-6  # per query head
    assert changed.tolist() == [h // g == 1 for h in range(3 * g)]


# --- block_sparse_attention with every causal block kept == dense ----------------------------------------------


@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_block_sparse_full_mask_equals_dense(shape):
    B, L, Hq, Hkv, D, Bs = shape
    q, k, v = random_qkv(B, L, Hq, Hkv, D, torch.float32, seed=seed_of(shape) + 1)
    dense = dense_attention(q, k, v)
    counts, indices = full_lists(B, Hq, L, Bs)
    physical = block_sparse_attention(q, k, v, counts, indices, Bs)
    logical = block_sparse_attention_logical(q, k, v, causal_block_mask(B, Hq, num_blocks(L, Bs)), Bs)
    for out in (physical, logical):
        assert out.shape == (B, L, Hq, D) and out.dtype == torch.float32
        torch.testing.assert_close(out, dense, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_flash_prefill_alpha0_equals_dense(shape):
    B, L, Hq, Hkv, D, Bs = shape
    q, k, v = random_qkv(B, L, Hq, Hkv, D, torch.float32, seed=seed_of(shape) + 2)
    out, stats = flash_prefill(q, k, v, alpha=0.0, block_size=Bs, return_stats=True)
    torch.testing.assert_close(out, dense_attention(q, k, v), atol=1e-5, rtol=0)
    M = num_blocks(L, Bs)
    assert torch.equal(stats.counts, torch.arange(1, M + 1, dtype=torch.int32).expand(B, Hq, M))
    assert float(stats.density) == 1.0


# --- physical skip == logical skip, and how many blocks each visits --------------------------------------------


@pytest.mark.parametrize("keep", [0.25, 0.7], ids=["keep0.25", "keep0.7"])
@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_physical_and_logical_skip_agree(shape, keep):
    B, L, Hq, Hkv, D, Bs = shape
    M = num_blocks(L, Bs)
    seed = seed_of(shape) + int(keep * 100)
    q, k, v = random_qkv(B, L, Hq, Hkv, D, torch.float32, seed=seed)
    mask = random_block_mask(B, Hq, M, keep=keep, seed=seed)
    counts, indices = compact_blocks(mask)

    physical, phys_visits = block_sparse_attention(q, k, v, counts, indices, Bs, return_visits=True)
    logical, log_visits = block_sparse_attention_logical(q, k, v, mask, Bs, return_visits=True)

    torch.testing.assert_close(physical, logical, atol=1e-6, rtol=0)
    assert_close64(physical, naive_attention(q, k, v, mask, Bs), ATOL[torch.float32])

    assert phys_visits.dtype == torch.int32 and log_visits.dtype == torch.int32
    assert torch.equal(phys_visits, counts)
    assert torch.equal(log_visits, torch.arange(1, M + 1, dtype=torch.int32).expand(B, Hq, M))
    causal_total = B * Hq * M * (M + 1) // 2
    assert int(log_visits.sum()) == causal_total
    if int(mask.sum()) < causal_total:
        assert int(phys_visits.sum()) < int(log_visits.sum())
    else:
        assert int(phys_visits.sum()) == int(log_visits.sum())
    if M >= 4:  # the random mask must really be sparse here, or the strict inequality above was not exercised
        assert int(mask.sum()) < causal_total


def test_physical_skip_ignores_entries_past_counts():
    """Entries of indices past counts are unspecified: garbage there must not change the output."""
    B, L, Hq, Hkv, D, Bs = 2, 200, 4, 2, 64, 16
    M = num_blocks(L, Bs)
    q, k, v = random_qkv(B, L, Hq, Hkv, D, torch.float32, seed=11)
    mask = random_block_mask(B, Hq, M, keep=0.3, seed=11)
    counts, indices = compact_blocks(mask)
    expected = block_sparse_attention(q, k, v, counts, indices, Bs)

    gen = torch.Generator().manual_seed(11)
    garbage = torch.randint(0, M, indices.shape, generator=gen, dtype=torch.int32)
    past_counts = torch.arange(M).view(1, 1, 1, M) >= counts.unsqueeze(-1)
    poisoned = torch.where(past_counts, garbage, indices)
    assert not torch.equal(poisoned, indices)
    torch.testing.assert_close(block_sparse_attention(q, k, v, counts, poisoned, Bs), expected, atol=0, rtol=0)

    # A list narrower than N (C = longest list) is accepted and gives the same output.
    C = int(counts.max())
    assert C < M
    narrow = indices[..., :C].contiguous()
    torch.testing.assert_close(block_sparse_attention(q, k, v, counts, narrow, Bs), expected, atol=0, rtol=0)


def test_diagonal_only_mask_is_local_attention():
    """Keeping only the diagonal: query i attends to keys floor(i / Bs) * Bs .. i."""
    B, L, Hq, Hkv, D, Bs = 1, 70, 2, 1, 64, 16
    M = num_blocks(L, Bs)
    q, k, v = random_qkv(B, L, Hq, Hkv, D, torch.float64, seed=12)
    mask = torch.eye(M, dtype=torch.bool).expand(B, Hq, M, M).contiguous()
    pos = torch.arange(L)
    token_mask = (pos.view(-1, 1) >= pos.view(1, -1)) & (pos.view(-1, 1) // Bs == pos.view(1, -1) // Bs)
    expected = naive_attention(q, k, v, token_mask=token_mask.expand(B, Hq, L, L))
    counts, indices = compact_blocks(mask)
    assert_close64(block_sparse_attention(q, k, v, counts, indices, Bs), expected, 1e-12)
    assert_close64(block_sparse_attention_logical(q, k, v, mask, Bs), expected, 1e-12)


# --- flash_prefill end to end ----------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.05, 0.3, 2.0], ids=["alpha0.05", "alpha0.3", "alpha2"])
def test_flash_prefill_equals_attention_on_its_block_set(alpha):
    B, L, Hq, Hkv, D, Bs = 2, 300, 4, 2, 64, 16
    M = num_blocks(L, Bs)
    q, k, v = random_qkv(B, L, Hq, Hkv, D, torch.float32, seed=13)
    out, stats = flash_prefill(q, k, v, alpha=alpha, block_size=Bs, sink_blocks=1, window_blocks=2,
                               last_dense_blocks=1, return_stats=True)
    assert out.shape == (B, L, Hq, D) and out.dtype == torch.float32
    assert stats.counts.shape == (B, Hq, M) and stats.counts.dtype == torch.int32
    assert stats.indices.shape == (B, Hq, M, M) and stats.indices.dtype == torch.int32
    # Rebuild the kept block set from the lists (reading only the first counts entries).
    mask = torch.zeros(B, Hq, M, M, dtype=torch.bool)
    for b, h, I in torch.nonzero(torch.ones(B, Hq, M)).tolist():
        mask[b, h, I, stats.indices[b, h, I, : stats.counts[b, h, I]].long()] = True
    assert_close64(out, naive_attention(q, k, v, mask, Bs), ATOL[torch.float32])
    expected_density = int(stats.counts.sum()) / (B * Hq * M * (M + 1) / 2)
    assert stats.density.dim() == 0
    assert float(stats.density) == pytest.approx(expected_density, rel=1e-6)
    assert float(stats.density) == pytest.approx(float(causal_block_density(stats.counts)), rel=0)
    if alpha == 2.0:  # only forced blocks (+ rows whose max is 0): sink 1 + window 2 + last row dense
        assert float(stats.density) < 0.5


def test_flash_prefill_return_stats_false_returns_tensor():
    q, k, v = random_qkv(1, 50, 2, 1, 64, torch.float32, seed=14)
    out = flash_prefill(q, k, v, block_size=16)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape


# --- softmax scale and dtypes ----------------------------------------------------------------------------------


def test_custom_softmax_scale():
    B, L, Hq, Hkv, D, Bs = 2, 100, 4, 2, 64, 16
    M = num_blocks(L, Bs)
    scale = 0.37
    q, k, v = random_qkv(B, L, Hq, Hkv, D, torch.float32, seed=15)
    expected = naive_attention(q, k, v, softmax_scale=scale)
    default = naive_attention(q, k, v)
    assert (expected - default).abs().max() > 1e-2  # the scale matters for this input
    counts, indices = full_lists(B, Hq, L, Bs)
    outs = {
        "dense": dense_attention(q, k, v, softmax_scale=scale),
        "dense_positional": dense_attention(q, k, v, scale),
        "physical": block_sparse_attention(q, k, v, counts, indices, Bs, scale),
        "logical": block_sparse_attention_logical(q, k, v, causal_block_mask(B, Hq, M), Bs, scale),
        "flash_prefill": flash_prefill(q, k, v, alpha=0.0, block_size=Bs, softmax_scale=scale),
    }
    for out in outs.values():
        assert_close64(out, expected, ATOL[torch.float32])
    # The scale also reaches the selection: a sparse mask chosen with the scale, attention with the scale.
    mask = random_block_mask(B, Hq, M, keep=0.4, seed=15)
    c, i = compact_blocks(mask)
    assert_close64(block_sparse_attention(q, k, v, c, i, Bs, scale),
                   naive_attention(q, k, v, mask, Bs, scale), ATOL[torch.float32])


def test_softmax_scale_is_used_by_flash_prefill_selection():
    """A tiny scale flattens the block scores: with the same alpha the kept set can only grow."""
    q, k, v = random_qkv(1, 256, 2, 1, 64, torch.float32, seed=16)
    q = q * 4
    _, sharp = flash_prefill(q, k, v, alpha=0.5, block_size=16, sink_blocks=0, window_blocks=1,
                             last_dense_blocks=0, return_stats=True)
    _, flat = flash_prefill(q, k, v, alpha=0.5, block_size=16, sink_blocks=0, window_blocks=1,
                            last_dense_blocks=0, softmax_scale=1e-4, return_stats=True)
    assert float(flat.density) > float(sharp.density)


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).replace("torch.", "") for d in DTYPES])
def test_output_dtype_follows_q(dtype):
    B, L, Hq, Hkv, D, Bs = 2, 77, 4, 1, 64, 16
    M = num_blocks(L, Bs)
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype, seed=17)
    expected_dense = naive_attention(q, k, v)
    mask = random_block_mask(B, Hq, M, keep=0.5, seed=17)
    counts, indices = compact_blocks(mask)
    expected_sparse = naive_attention(q, k, v, mask, Bs)
    outs = {
        "dense": (dense_attention(q, k, v), expected_dense),
        "flash_prefill_alpha0": (flash_prefill(q, k, v, alpha=0.0, block_size=Bs), expected_dense),
        "physical": (block_sparse_attention(q, k, v, counts, indices, Bs), expected_sparse),
        "logical": (block_sparse_attention_logical(q, k, v, mask, Bs), expected_sparse),
    }
    for name, (out, expected) in outs.items():
        assert out.dtype == dtype, name
        assert out.shape == (B, L, Hq, D), name
        assert torch.isfinite(out).all(), name
        assert_close64(out, expected, ATOL[dtype])
