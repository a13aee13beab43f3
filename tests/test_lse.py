"""Log-sum-exp output (`return_lse=True`) of the attention entry points, and `merge_attention_states`.

lse_i = log sum_{j visible} exp(scale q_i . k_j), (B, Hq, L), -inf for a row that sees no key (docs/DESIGN.md,
section 9). Checked four ways:

1. the reference's lse against the float64 oracle (tools/oracle.py, `return_lse=True`), mean correction included;
2. the Triton lse against the reference's on the same lists: physical, logical and dense paths;
3. merging: a row's kept blocks split into two disjoint lists, attended separately and merged with
   `merge_attention_states`, equal one call on the whole list (output and lse), empty parts included;
4. `flash_prefill(return_lse=True, return_stats=True)` returns (out, lse, stats), its lse that of
   `block_sparse_attention` on the stats' lists.

On a CPU the kernels run under the interpreter (float32 / float16, small shapes); on a GPU the same tests run in
bfloat16 / float16, plus the cases marked `gpu`. Every kernel output starts as NaN (conftest.py), so an lse row the
kernel forgot to store (the rows past L of a partial last tile are not stored, nor read) fails.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (DEVICE, KERNEL_TEST_DTYPES, case_id, causal_block_mask, dtype_id, random_block_mask,
                     random_qkv)

import reference
import triton_impl
from reference.synthetic import planted_qkv
from tools.oracle import (ATOL, flash_rule, naive_attention, naive_mean_corrected_attention_fp64, num_blocks)

DTYPES = KERNEL_TEST_DTYPES
INF = float("inf")

# (B, L, Hq, Hkv, D, block_size): partial last blocks (130 = 4 x 32 + 2, 293 = 4 x 64 + 37), GQA 2.
REFERENCE_CASES = [
    (2, 130, 4, 2, 32, 32),
    (1, 293, 4, 2, 64, 64),
]
KERNEL_CASES = [  # the kernels take D in {64, 128}
    (1, 130, 4, 2, 64, 32),
    (1, 293, 4, 2, 64, 64),
]
GPU_CASES = [
    (1, 4097, 8, 2, 128, 128),
    (2, 3001, 8, 1, 64, 64),
]


def params(cases, gpu_cases=()):
    return [pytest.param(c, id=case_id(c)) for c in cases] + [
        pytest.param(c, id=case_id(c), marks=pytest.mark.gpu) for c in gpu_cases]


def lists_with_empty_rows(B, Hq, M, seed, device):
    """A random causal block mask whose head 0 lists nothing in query block 0 (an empty row: lse -inf, out 0)
    and whose head 1 keeps no diagonal block (rows that see only earlier blocks)."""
    mask = random_block_mask(B, Hq, M, keep=0.4, seed=seed, device=device)
    mask[:, 0, 0] = False
    mask[:, 1] &= ~torch.eye(M, dtype=torch.bool, device=device)
    return mask


def assert_lse_close(lse, expected, atol, rtol=0.0):
    """Same -inf rows, values within tolerance elsewhere (assert_close compares infinities for equality)."""
    assert lse.shape == expected.shape
    assert not lse.isnan().any(), "NaN in lse (an unwritten row, or an invalid value)"
    torch.testing.assert_close(lse.double(), expected.double(), atol=atol, rtol=rtol)


# --- 1. the reference against the float64 oracle --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("case", params(REFERENCE_CASES))
def test_reference_lse_matches_fp64_oracle(case, dtype):
    B, L, Hq, Hkv, D, bs = case
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype, seed=1)
    M = num_blocks(L, bs)
    atol = 1e-12 if dtype == torch.float64 else ATOL[torch.float32]
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    out, lse = reference.dense_attention(q, k, v, return_lse=True)
    assert lse.shape == (B, Hq, L) and lse.dtype == lse_dtype and lse.is_contiguous()
    assert_lse_close(lse, naive_attention(q, k, v, return_lse=True)[1], atol)

    mask = lists_with_empty_rows(B, Hq, M, seed=2, device=q.device)
    counts, indices = reference.compact_blocks(mask)
    out64, lse64 = naive_attention(q, k, v, mask, bs, return_lse=True)
    physical, lse_p = reference.block_sparse_attention(q, k, v, counts, indices, bs, return_lse=True)
    logical, lse_l = reference.block_sparse_attention_logical(q, k, v, mask, bs, return_lse=True)
    for o, l in ((physical, lse_p), (logical, lse_l)):
        assert l.dtype == lse_dtype
        assert_lse_close(l, lse64, atol)
        torch.testing.assert_close(o.double(), out64, atol=atol, rtol=0)
    # The empty row: lse -inf and output 0, in both walks.
    assert (lse_p[:, 0, :bs] == -INF).all() and (physical[:, :bs, 0] == 0).all()
    assert torch.isinf(lse64).any() and not torch.isinf(lse64[:, 2:]).any()

    # With the mean correction the pruned blocks' Bs exp(s_bar_iJ) are part of the denominator.
    corrected, lse_c = reference.block_sparse_attention(q, k, v, counts, indices, bs, mean_correction=True,
                                                        return_lse=True)
    out64_c, lse64_c = naive_mean_corrected_attention_fp64(q, k, v, mask, bs, return_lse=True)
    assert_lse_close(lse_c, lse64_c, atol)
    torch.testing.assert_close(corrected.double(), out64_c, atol=atol, rtol=0)
    assert (lse_c[:, :, bs:] > lse_p[:, :, bs:]).sum() > 0  # the means add mass (block 0 has nothing below)


def test_reference_lse_is_the_log_of_the_dense_softmax_denominator():
    """A direct check of the definition (natural log, scale applied): exp(s - lse) sums to 1 over the causal keys."""
    q, k, v = random_qkv(1, 40, 2, 1, 32, torch.float64, seed=3)
    _, lse = reference.dense_attention(q, k, v, softmax_scale=0.3, return_lse=True)
    s = 0.3 * torch.einsum("bihd,bjhd->bhij", q, k.expand(-1, -1, 2, -1))
    s = s.masked_fill(torch.ones(40, 40, dtype=torch.bool).triu(1), -INF)
    torch.testing.assert_close(torch.exp(s - lse.unsqueeze(-1)).sum(-1), torch.ones(1, 2, 40, dtype=torch.float64))
    assert torch.equal(lse[..., 0], s[..., 0, 0])  # row 0 sees key 0 alone


# --- 2. Triton against the reference on the same lists ---------------------------------------------------------


def kernel_lse_atol(dtype, mean_correction):
    """Both sides compute the logits in float32 from the same inputs; with the mean correction the kernel reads
    the block means pre-scaled and rounded to q's dtype (triton_impl/attention.py), the reference in float32."""
    return 1e-4 + (ATOL[dtype] if mean_correction else 0.0)


@pytest.mark.parametrize("mean_correction", [False, True], ids=["plain", "mean"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", params(KERNEL_CASES, GPU_CASES))
def test_triton_lse_matches_the_reference(case, dtype, mean_correction):
    B, L, Hq, Hkv, D, bs = case
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype, seed=4, device=DEVICE)
    mask = lists_with_empty_rows(B, Hq, num_blocks(L, bs), seed=5, device=DEVICE)
    counts, indices = reference.compact_blocks(mask)
    kw = dict(mean_correction=mean_correction, return_lse=True)
    expected_out, expected = reference.block_sparse_attention(q, k, v, counts, indices, bs, **kw)
    out, lse, visits = triton_impl.block_sparse_attention(q, k, v, counts, indices, bs, return_visits=True, **kw)
    assert lse.shape == (B, Hq, L) and lse.dtype == torch.float32 and lse.device == q.device
    assert torch.equal(visits, counts)  # out, lse, visits: the order every entry point returns them in
    assert_lse_close(lse, expected, kernel_lse_atol(dtype, mean_correction), rtol=1e-5)
    if not mean_correction:
        assert (lse[:, 0, :bs] == -INF).all() and (out[:, :bs, 0] == 0).all()
    # The logical walk folds the same blocks in the same order: the same lse to the bit.
    logical, logical_lse = triton_impl.block_sparse_attention_logical(q, k, v, mask, bs, **kw)
    torch.testing.assert_close(logical_lse, lse, rtol=0, atol=0)
    torch.testing.assert_close(logical, out, rtol=0, atol=0)
    # The output is unchanged by asking for the lse.
    plain = triton_impl.block_sparse_attention(q, k, v, counts, indices, bs, mean_correction=mean_correction)
    torch.testing.assert_close(plain, out, rtol=0, atol=0)
    if not mean_correction:
        dense, dense_lse = triton_impl.dense_attention(q, k, v, return_lse=True)
        assert_lse_close(dense_lse, reference.dense_attention(q, k, v, return_lse=True)[1], 1e-4, rtol=1e-5)
        torch.testing.assert_close(dense, triton_impl.dense_attention(q, k, v), rtol=0, atol=0)


def test_triton_lse_with_wide_offsets_and_tma(monkeypatch):
    """The 64-bit-offset path (inputs past 2^31 elements) and TMA K/V loads store the same lse, to the bit."""
    from triton_impl import attention
    from triton_impl.attention import PHYSICAL, launch_attention

    B, L, Hq, Hkv, D, bs = KERNEL_CASES[0]
    q, k, v = random_qkv(B, L, Hq, Hkv, D, DTYPES[-1], seed=6, device=DEVICE)
    counts, indices = reference.compact_blocks(lists_with_empty_rows(B, Hq, num_blocks(L, bs), seed=7, device=DEVICE))
    call = dict(counts=counts, indices=indices, return_lse=True)
    out, lse = launch_attention(q, k, v, bs, D ** -0.5, PHYSICAL, **call)
    tma = launch_attention(q, k, v, bs, D ** -0.5, PHYSICAL, **call,
                           config=dict(kv_descriptors=True, kv_descriptors_min_length=1))
    monkeypatch.setattr(attention, "needs_wide_offsets", lambda *tensors: True)
    wide = launch_attention(q, k, v, bs, D ** -0.5, PHYSICAL, **call)
    for other_out, other_lse in (tma, wide):
        torch.testing.assert_close(other_lse, lse, rtol=0, atol=0)
        torch.testing.assert_close(other_out, out, rtol=0, atol=0)


# --- 3. merging two disjoint parts equals one call on the union ------------------------------------------------


def splits(mask, cut):
    """Two ways of splitting each row's kept blocks into two disjoint lists: J < cut vs J >= cut (rows I < cut
    then have an empty second part), and alternating list positions (rows keeping one block: empty second part)."""
    J = torch.arange(mask.shape[-1], device=mask.device)
    low = mask & (J < cut)
    position = mask.int().cumsum(-1) - 1  # the list position of each kept block
    even = mask & (position % 2 == 0)
    return {"J<cut": (low, mask & ~low), "alternating": (even, mask & ~even)}


def attend(impl, q, k, v, mask, bs):
    counts, indices = reference.compact_blocks(mask)
    return impl.block_sparse_attention(q, k, v, counts, indices, bs, return_lse=True)


@pytest.mark.parametrize("split", ["J<cut", "alternating"])
def test_merging_two_parts_is_one_call_reference(split):
    B, L, Hq, Hkv, D, bs = REFERENCE_CASES[0]
    q, k, v = random_qkv(B, L, Hq, Hkv, D, torch.float64, seed=8)
    mask = lists_with_empty_rows(B, Hq, num_blocks(L, bs), seed=9, device=q.device)
    part_a, part_b = splits(mask, cut=2)[split]
    assert (part_b.sum(-1) == 0).any() and (part_a.sum(-1) == 0).any()  # rows with an empty part, either side
    out, lse = reference.merge_attention_states(*attend(reference, q, k, v, part_a, bs),
                                                *attend(reference, q, k, v, part_b, bs))
    expected_out, expected_lse = attend(reference, q, k, v, mask, bs)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert not out.isnan().any()
    assert_lse_close(lse, expected_lse, 1e-12)
    torch.testing.assert_close(out, expected_out, atol=1e-12, rtol=0)


@pytest.mark.parametrize("split", ["J<cut", "alternating"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_merging_two_parts_is_one_call_triton(dtype, split):
    """The merged Triton parts: the same lse as one call within float32 rounding, and an output that is exact
    attention over the union within FlashAttention's rule (two outputs rounded to q's dtype, then merged)."""
    B, L, Hq, Hkv, D, bs = KERNEL_CASES[1]
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype, seed=10, device=DEVICE)
    mask = lists_with_empty_rows(B, Hq, num_blocks(L, bs), seed=11, device=q.device)
    part_a, part_b = splits(mask, cut=2)[split]
    out, lse = triton_impl.merge_attention_states(*attend(triton_impl, q, k, v, part_a, bs),
                                                  *attend(triton_impl, q, k, v, part_b, bs))
    assert out.dtype == dtype and lse.dtype == torch.float32
    whole_out, whole_lse = attend(triton_impl, q, k, v, mask, bs)
    assert_lse_close(lse, whole_lse, 1e-5, rtol=1e-6)
    ok, err, pt_err = flash_rule(out, q, k, v, mask, bs)
    assert ok, f"merged output: max error {err:.3g} > 2 x PyTorch's {pt_err:.3g} + 1e-5"
    torch.testing.assert_close(out.float(), whole_out.float(), atol=2 * ATOL[dtype], rtol=0)


def test_merge_attention_states_rules():
    """-inf parts, dtypes, the varlen layout, and the shape checks."""
    merge = reference.merge_attention_states
    assert triton_impl.merge_attention_states is merge
    gen = torch.Generator().manual_seed(12)
    out_a, out_b = (torch.randn(2, 5, 3, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    lse_a, lse_b = (torch.randn(2, 3, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    lse_a[0, 0, 0] = lse_b[0, 0, 0] = -INF  # both parts empty
    out_a[0, 0, 0] = out_b[0, 0, 0] = 0.0
    lse_a[1, 2, 4] = -INF  # part a empty: the row is part b's
    out_a[1, 4, 2] = 0.0
    out, lse = merge(out_a, lse_a, out_b, lse_b)
    assert not out.isnan().any() and not lse.isnan().any()
    assert lse[0, 0, 0] == -INF and (out[0, 0, 0] == 0).all()
    assert lse[1, 2, 4] == lse_b[1, 2, 4] and torch.equal(out[1, 4, 2], out_b[1, 4, 2])
    # The union's denominator is the sum of the parts'; the output is the mass-weighted mean of the parts.
    torch.testing.assert_close(lse.exp(), lse_a.exp() + lse_b.exp())
    w_a = (lse_a - lse).exp().transpose(1, 2).unsqueeze(-1)
    torch.testing.assert_close(out[1:], (w_a * out_a + (1 - w_a) * out_b)[1:])
    # Merging is symmetric, and with an empty part the identity.
    torch.testing.assert_close(merge(out_b, lse_b, out_a, lse_a)[0], out, rtol=0, atol=1e-15)
    empty = torch.full_like(lse_a, -INF)
    assert torch.equal(merge(out_a, lse_a, torch.zeros_like(out_a), empty)[0], out_a)
    # dtypes: out in out_a's dtype, lse float32 (float64 if an input is), computed in float32.
    half, lse32 = merge(out_a.half(), lse_a.float(), out_b.half(), lse_b.float())
    assert half.dtype == torch.float16 and lse32.dtype == torch.float32
    torch.testing.assert_close(half.float(), out.float(), atol=2e-3, rtol=0)
    # Varlen layout: out (total, Hq, D), lse (Hq, total).
    flat, flat_lse = merge(out_a[0], lse_a[0], out_b[0], lse_b[0])
    torch.testing.assert_close(flat, out[0], rtol=0, atol=1e-14)
    torch.testing.assert_close(flat_lse, lse[0], rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match=r"\(\.\.\., Hq, L\)"):
        merge(out_a, lse_a.transpose(1, 2), out_b, lse_b.transpose(1, 2))
    with pytest.raises(ValueError, match="out_a, out_b must share one shape"):
        merge(out_a, lse_a, out_b[:, :4], lse_b)
    with pytest.raises(TypeError, match="lse_b must be a torch.Tensor"):
        merge(out_a, lse_a, out_b, None)
    with pytest.raises(ValueError, match="lse_a must be 3-D"):
        merge(out_a, lse_a[0], out_b, lse_b)


# --- 4. flash_prefill --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mean_correction", [False, True], ids=["plain", "mean"])
@pytest.mark.parametrize("impl", [reference, triton_impl], ids=["reference", "triton"])
def test_flash_prefill_returns_out_lse_stats(impl, mean_correction):
    """(out, lse, stats), lse that of block_sparse_attention on the stats' lists, to the bit (the same walk; in
    Triton the selection runs in chunks of query blocks here, each chunk's attention writing its rows' lse)."""
    B, L, Hq, Hkv, D, bs = 1, 293, 4, 2, 64, 32
    dtype = DTYPES[-1] if impl is triton_impl else torch.float32
    q, k, v = planted_qkv(B, L, Hq, Hkv, D, seed=13, dtype=dtype, device=DEVICE)  # planted: a sparse selection
    kw = dict(alpha=0.3, block_size=bs, sink_blocks=1, window_blocks=1, last_dense_blocks=0,
              mean_correction=mean_correction)
    chunks = dict(max_selection_bytes=B * Hq * num_blocks(L, bs) * 8 * 2) if impl is triton_impl else {}
    out, lse, stats = impl.flash_prefill(q, k, v, return_lse=True, return_stats=True, **kw, **chunks)
    assert isinstance(stats, reference.FlashPrefillStats) and float(stats.density) < 1
    alone, alone_lse = impl.block_sparse_attention(q, k, v, stats.counts, stats.indices, bs,
                                                   mean_correction=mean_correction, return_lse=True)
    torch.testing.assert_close(lse, alone_lse, rtol=0, atol=0)
    torch.testing.assert_close(out, alone, rtol=0, atol=0)
    if mean_correction:
        return
    # The other return conventions are unchanged: out alone, (out, lse), (out, stats).
    assert torch.equal(impl.flash_prefill(q, k, v, **kw), out)
    pair = impl.flash_prefill(q, k, v, return_lse=True, **kw)
    assert len(pair) == 2 and torch.equal(pair[1], lse)
    assert isinstance(impl.flash_prefill(q, k, v, return_stats=True, **kw)[1], reference.FlashPrefillStats)


# --- 5. bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", [reference, triton_impl], ids=["reference", "triton"])
@pytest.mark.parametrize("bad", [1, "yes", None], ids=["int", "str", "None"])
def test_return_lse_must_be_a_bool(impl, bad):
    B, L, Hq, Hkv, D, bs = 1, 64, 2, 1, 64, 16
    q, k, v = random_qkv(B, L, Hq, Hkv, D, DTYPES[-1], seed=14, device=DEVICE)
    mask = causal_block_mask(B, Hq, num_blocks(L, bs), device=DEVICE)
    counts, indices = reference.compact_blocks(mask)
    calls = {
        "dense_attention": lambda: impl.dense_attention(q, k, v, return_lse=bad),
        "block_sparse_attention": lambda: impl.block_sparse_attention(q, k, v, counts, indices, bs, return_lse=bad),
        "block_sparse_attention_logical": lambda: impl.block_sparse_attention_logical(q, k, v, mask, bs,
                                                                                      return_lse=bad),
        "flash_prefill": lambda: impl.flash_prefill(q, k, v, block_size=bs, return_lse=bad),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match="^return_lse must be a bool"):
            call()
