"""FlexAttention interop (interop/flex.py; docs/DESIGN.md section 3, "FlexAttention interop").

flex_attention with `to_block_mask(lists)` must compute `reference.block_sparse_attention` on the same lists: random
lists from FlashPrefill's selection, rows holding only the diagonal, empty and narrow hand-made lists, a partial last
block, GQA and batches; dense lists (alpha 0) give dense attention. The BlockMask's structure is checked directly
(listed J < I full, the listed diagonal partial). On a CPU flex_attention runs eagerly (unfused, small shapes);
the test marked `gpu` runs the compiled kernel, the one that skips the mask_mod on full blocks, against ours.
"""

from __future__ import annotations

import re

import pytest
import torch
from helpers import DEVICE, random_block_mask, random_qkv

import reference
from interop.flex import flex_block_sparse_attention, to_block_mask
from reference.validation import BAD_INDEX, NOT_ASCENDING
from tools.oracle import ATOL

flex = pytest.importorskip("torch.nn.attention.flex_attention",
                           reason=f"torch {torch.__version__} has no torch.nn.attention.flex_attention")
if not hasattr(flex.BlockMask, "from_kv_blocks"):
    pytest.skip(f"torch {torch.__version__}'s BlockMask has no from_kv_blocks", allow_module_level=True)

# Eager flex_attention warns once that it is unfused: that is what these small CPU shapes want.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

TOL = ATOL[torch.float32]
# (B, L, Hq, Hkv, D, block_size): a partial last block (300), GQA 2 and none, block sizes 16 / 64 / 128.
CASES = [(2, 256, 4, 2, 32, 64), (1, 300, 4, 2, 64, 64), (2, 300, 4, 4, 32, 128), (1, 300, 4, 2, 32, 16)]


def case_id(case):
    B, L, Hq, Hkv, D, bs = case
    return f"B{B}-L{L}-g{Hq // Hkv}-D{D}-bs{bs}"


def random_lists(B, Hq, M, alpha, seed):
    """FlashPrefill's selection (stages 3-4) on random scores: sinks 1, window 1 (the diagonal), no dense rows, so
    that alpha decides the rest; alpha 0 keeps every causal block."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(B, Hq, M, M, generator=gen).to(DEVICE)
    return reference.select_and_compact(scores, alpha, sink_blocks=1, window_blocks=1, last_dense_blocks=0)


def both(q, k, v, counts, indices, bs, **kw):
    """(flex through to_block_mask, reference.block_sparse_attention) on the same lists."""
    mask = to_block_mask((counts, indices), q.shape[1], bs)
    scale = kw.get("softmax_scale")
    return (flex_block_sparse_attention(q, k, v, mask, scale),
            reference.block_sparse_attention(q, k, v, counts, indices, bs, scale))


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("alpha", [0.6, 0.95])
def test_flex_equals_block_sparse_attention_on_selected_lists(case, alpha):
    B, L, Hq, Hkv, D, bs = case
    q, k, v = random_qkv(B, L, Hq, Hkv, D, seed=1, device=DEVICE)
    counts, indices = random_lists(B, Hq, -(-L // bs), alpha, seed=2)
    out, ref = both(q, k, v, counts, indices, bs)
    assert out.shape == ref.shape == q.shape
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)


def test_flex_on_flash_prefill_stats_reproduces_its_output():
    q, k, v = random_qkv(1, 300, 4, 2, 32, seed=3, device=DEVICE)
    out, stats = reference.flash_prefill(q, k, v, alpha=0.9, block_size=16, sink_blocks=1, window_blocks=2,
                                         last_dense_blocks=1, softmax_scale=0.3, return_stats=True)
    assert float(stats.density) < 0.9  # the lists are sparse
    flex_out = flex_block_sparse_attention(q, k, v, to_block_mask(stats, 300, 16), softmax_scale=0.3)
    torch.testing.assert_close(flex_out, out, atol=TOL, rtol=0)


@pytest.mark.parametrize("L", [256, 300])
def test_dense_lists_give_dense_attention(L):
    q, k, v = random_qkv(2, L, 4, 2, 64, seed=4, device=DEVICE)
    M = -(-L // 64)
    counts, indices = random_lists(2, 4, M, alpha=0.0, seed=5)
    assert int(counts.sum()) == 2 * 4 * M * (M + 1) // 2  # every causal block
    out = flex_block_sparse_attention(q, k, v, to_block_mask((counts, indices), L, 64))
    torch.testing.assert_close(out, reference.dense_attention(q, k, v), atol=TOL, rtol=0)


def test_hand_made_lists_diagonal_only_empty_and_narrow():
    """Rows with only the diagonal, rows without it, empty rows (output 0), in lists narrower than M (C = 3)."""
    B, Hq, L, bs = 1, 4, 300, 64  # M = 5
    q, k, v = random_qkv(B, L, Hq, 2, 32, seed=6, device=DEVICE)
    M, C = 5, 3
    counts = torch.ones(B, Hq, M, dtype=torch.int32)
    indices = torch.full((B, Hq, M, C), -1, dtype=torch.int32)
    indices[..., 0] = torch.arange(M, dtype=torch.int32)  # head 0: the diagonal alone
    counts[0, 1] = torch.tensor([1, 2, 2, 2, 2])  # one block below the diagonal, then the diagonal
    indices[0, 1, :, :2] = torch.tensor([[0, -1], [0, 1], [0, 2], [1, 3], [2, 4]])
    counts[0, 2], indices[0, 2, :, 0] = 1, torch.tensor([0, 0, 1, 0, 3])  # below the diagonal only (row 0: diag)
    counts[0, 3, 1:] = 0  # empty rows: no visible key, output 0
    counts, indices = counts.to(DEVICE), indices.to(DEVICE)
    out, ref = both(q, k, v, counts, indices, bs)
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    assert not out[0, 64:, 3].any()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_block_mask_structure(case):
    """Listed J < I are full blocks, the listed diagonal is the only partial block; nothing else is in the mask."""
    B, L, Hq, _, _, bs = case
    M = -(-L // bs)
    listed = random_block_mask(B, Hq, M, keep=0.4, seed=7, device=DEVICE)
    listed[0, 0, M - 1, M - 1] = False  # one row without its diagonal
    mask = to_block_mask(reference.compact_blocks(listed), L, bs)
    assert mask.shape == (B, Hq, L, L) and mask.BLOCK_SIZE == (bs, bs) and mask.seq_lengths == (L, L)
    full = reference.lists_to_mask(mask.full_kv_num_blocks, mask.full_kv_indices)
    partial = reference.lists_to_mask(mask.kv_num_blocks, mask.kv_indices)
    diagonal = torch.eye(M, dtype=torch.bool, device=DEVICE)
    assert torch.equal(full, listed & ~diagonal)
    assert torch.equal(partial, listed & diagonal)
    assert torch.equal(mask.to_dense().bool(), listed)
    assert mask.kv_indices.min() >= 0 and mask.full_kv_indices.min() >= 0  # no -1 past the counts
    # The transposed (per key block) lists flex_attention's backward reads describe the same blocks.
    assert int(mask.q_num_blocks.sum() + mask.full_q_num_blocks.sum()) == int(listed.sum())


def test_mask_mod_is_causal_and_listed():
    listed = random_block_mask(1, 2, 4, keep=0.5, seed=8)
    mask = to_block_mask(reference.compact_blocks(listed), 64, 16)
    b, h = torch.tensor(0), torch.tensor(1)
    for qi, kj in [(5, 3), (3, 5), (40, 20), (63, 0), (20, 40)]:
        expected = kj <= qi and bool(listed[0, 1, qi // 16, kj // 16])
        assert bool(mask.mask_mod(b, h, torch.tensor(qi), torch.tensor(kj))) == expected
    causal_only = to_block_mask(reference.compact_blocks(listed), 64, 16, exact_mask_mod=False)
    assert bool(causal_only.mask_mod(b, h, torch.tensor(63), torch.tensor(0)))


def test_eager_flex_needs_the_list_lookup():
    """Why the mask_mod looks the lists up: eager flex_attention ignores the block lists, so a causal-only
    mask_mod gives dense attention there (if this fails, a newer torch honours the lists in eager mode too)."""
    q, k, v = random_qkv(1, 256, 4, 2, 32, seed=9, device=DEVICE)
    counts, indices = random_lists(1, 4, 4, alpha=0.95, seed=10)
    causal_only = to_block_mask((counts, indices), 256, 64, exact_mask_mod=False)
    torch.testing.assert_close(flex_block_sparse_attention(q, k, v, causal_only), reference.dense_attention(q, k, v),
                               atol=TOL, rtol=0)


def test_unvalidated_lists_never_reach_above_the_diagonal():
    counts = torch.tensor([[[1, 2]]], dtype=torch.int32)
    indices = torch.tensor([[[[1, -1], [0, 1]]]], dtype=torch.int32)  # row 0 lists block 1: above the diagonal
    mask = to_block_mask((counts, indices), 32, 16, validate=False)
    assert torch.equal(mask.to_dense()[0, 0].bool(), torch.tensor([[False, False], [True, True]]))


# --- bad input ------------------------------------------------------------------------------------------------------

def _lists(M=4):
    return reference.compact_blocks(random_block_mask(1, 2, M, seed=11))


@pytest.mark.parametrize("call, error, match", [
    (lambda: to_block_mask(torch.ones(3), 64, 16), TypeError, "stats_or_lists"),
    (lambda: to_block_mask((_lists()[0],), 64, 16), TypeError, "stats_or_lists"),
    (lambda: to_block_mask(_lists(), 0, 16), ValueError, "seq_len"),
    (lambda: to_block_mask(_lists(), 64.0, 16), TypeError, "seq_len"),
    (lambda: to_block_mask(_lists(), 64, 24), ValueError, "block_size"),
    (lambda: to_block_mask(_lists(), 100, 16), ValueError, r"counts must have M = .* = 7"),
    (lambda: to_block_mask((_lists()[0].long(), _lists()[1]), 64, 16), TypeError, "counts"),
    (lambda: to_block_mask((_lists()[0], _lists()[1][..., :2, :]), 64, 16), ValueError, "indices"),
    (lambda: to_block_mask(_lists(), 64, 16, exact_mask_mod=1), TypeError, "exact_mask_mod"),
    (lambda: to_block_mask((torch.full((1, 1, 2), 2, dtype=torch.int32),
                            torch.tensor([[[[1, 0], [0, 1]]]], dtype=torch.int32)), 32, 16), ValueError,
     "counts must satisfy"),
    (lambda: to_block_mask((torch.ones(1, 1, 2, dtype=torch.int32),
                            torch.tensor([[[[1, -1], [0, -1]]]], dtype=torch.int32)), 32, 16), ValueError,
     re.escape(BAD_INDEX)),
    (lambda: to_block_mask((torch.tensor([[[1, 2]]], dtype=torch.int32),
                            torch.tensor([[[[0, -1], [1, 0]]]], dtype=torch.int32)), 32, 16), ValueError,
     re.escape(NOT_ASCENDING)),
], ids=["tensor", "one-tensor", "seq_len-0", "seq_len-float", "block_size", "seq_len-vs-M", "counts-int64",
        "indices-shape", "exact_mask_mod", "counts-above-diagonal", "index-above-diagonal", "not-ascending"])
def test_to_block_mask_rejects_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_flex_block_sparse_attention_rejects_bad_input():
    q, k, v = random_qkv(1, 64, 4, 2, 32, seed=12)
    mask = to_block_mask(_lists(), 64, 16)
    with pytest.raises(TypeError, match="block_mask"):
        flex_block_sparse_attention(q, k, v, reference.lists_to_mask(*_lists()))
    with pytest.raises(ValueError, match="block_mask must have shape"):
        flex_block_sparse_attention(q[:, :48], k[:, :48], v[:, :48], mask)
    with pytest.raises(ValueError, match="block_mask must have shape"):  # 2 heads in the mask, 4 in q
        flex_block_sparse_attention(q, k, v, to_block_mask(_lists(), 64, 16))
    with pytest.raises(ValueError, match="divisible"):
        flex_block_sparse_attention(q[..., :3, :], k, v, mask)
    with pytest.raises(ValueError, match="softmax_scale"):
        flex_block_sparse_attention(q, k, v, mask, softmax_scale=-1.0)


# --- GPU: the compiled kernel (full blocks skip the mask_mod) against ours ----------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("exact_mask_mod", [True, False])
def test_compiled_flex_equals_triton_kernel(exact_mask_mod):
    import triton_impl

    B, L, Hq, Hkv, D, bs = 1, 4096 + 77, 8, 2, 128, 128
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype=torch.bfloat16, seed=13, device="cuda")
    counts, indices = random_lists(B, Hq, -(-L // bs), alpha=0.9, seed=14)
    mask = to_block_mask((counts, indices), L, bs, exact_mask_mod=exact_mask_mod)
    compiled = torch.compile(flex.flex_attention, dynamic=False)
    with torch.inference_mode():
        out = flex_block_sparse_attention(q, k, v, mask, flex_fn=compiled)
        ours = triton_impl.block_sparse_attention(q, k, v, counts, indices, bs)
    torch.testing.assert_close(out.float(), ours.float(), atol=ATOL[torch.bfloat16], rtol=0)
