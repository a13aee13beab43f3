"""Differential tests of `triton_impl.flash_prefill_varlen` (packed variable-length batches, chunked prefill over a
cached prefix) against `triton_impl.flash_prefill`, `reference.flash_prefill_varlen` and the float64 oracle.

1. A batch of one prefilled in one call is `triton_impl.flash_prefill`: the same lists, output and lse to the bit
   (within ATOL where TMA K/V loads may run on one side only, L >= 8192 on a GPU).
2. A packed batch of mixed lengths is per-sequence `triton_impl.flash_prefill` calls, and the reference's call.
3. Chunked prefill over a prefix (aligned and unaligned prefixes, kbar_cache whole, partial or absent, taken from
   the previous chunk's stats.kbar; is_last_chunk per sequence) against the reference; block-aligned chunks
   passing kbar along reproduce the one-shot Triton call to the bit; a cache that is not the keys' means steers
   the call as it steers the reference's (the cache is read, not pooled again).
4. The mean correction against the reference.
5. lse: the chunk's prefix blocks and own blocks attended separately by the Triton kernel and merged with
   `merge_attention_states` equal the call.
6. validate=False: the same results, and no host synchronisation; validate=True reads cu_seqlens once. (And
   max_selection_bytes: a selection made one query-block row at a time changes nothing.)
7. Bad input: the reference's table of errors (tests/helpers.py, shared with tests/test_varlen.py), the structural
   part of it also with validate=False, and what only the kernels refuse.

Against the reference (same inputs, same dtype): block sets equal except at threshold ties (judged on float64
scores, tools.oracle.block_sets_agree), outputs within tools.oracle.ATOL of the dtype and lse within 1e-3 on the rows
whose lists coincide, and FlashAttention's rule against the float64 oracle on the kernel's own lists (short
sequences: the oracle materialises (Hq, Lq, Lk) logits).

On a CPU the kernels run under the interpreter (float32 / float16, Hq 4, Hkv 2, D 64, Bs 32, lengths up to 300); on a
GPU the same tests run natively in bfloat16 / float16, plus the cases marked `gpu` (D 128, Bs 128, lengths past 8192,
where the attention loads K/V through TMA descriptors). Every kernel output starts as NaN (conftest.py), so a row a
kernel forgot to write fails.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (DEVICE, HAS_CUDA, KERNEL_TEST_DTYPES, call_varlen, cu, dtype_id, listed, pack, prefill_in_chunks,
                     row_blocks, varlen_bad_inputs, varlen_valid_call)

import reference
import triton_impl
from reference import VarlenStats
from reference.synthetic import planted_qkv
from reference.varlen import chunk_block_scores, pool_keys_after_cache
from tools.oracle import (ATOL, FLASH_RULE_FACTOR, FLASH_RULE_SLACK, block_set_differences, block_sets_agree,
                          max_abs_diff, naive_chunk_attention, num_blocks)
from triton_impl.attention import ATTENTION_CONFIG

DTYPES = KERNEL_TEST_DTYPES
INF = float("inf")

# (Hq, Hkv, D, Bs): the CPU shape (the kernels take D in {64, 128}) and the GPU's standard one.
SMALL = (4, 2, 64, 32)
LARGE = (8, 2, 128, 128)
# TMA K/V loads run from this key length on (a GPU only): there the spec allows ATOL instead of bit equality
# between two paths that may not both use them.
TMA_MIN_LENGTH = ATTENTION_CONFIG["kv_descriptors_min_length"]
# The float64 oracle holds (Hq, Lq, Lk + N) logits per sequence: only sequences up to this many keys.
ORACLE_MAX_KEYS = 1024


def selection(block_size: int) -> dict:
    """A selection that prunes on planted inputs (about 60% of the causal blocks kept at L = 300, Bs = 32)."""
    return dict(alpha=0.3, block_size=block_size, sink_blocks=1, window_blocks=1, last_dense_blocks=1)


def prompts_of(shape, lengths, dtype, seed):
    """One planted prompt per length: [(q (L, Hq, D), k, v (L, Hkv, D))] on DEVICE (sinks, local decay, stripes:
    a sparse selection)."""
    Hq, Hkv, D, _ = shape
    out = []
    for i, L in enumerate(lengths):
        q, k, v = planted_qkv(1, L, Hq, Hkv, D, seed=seed + i, dtype=dtype, device=DEVICE)
        out.append((q[0], k[0], v[0]))
    return out


def lse_atol(dtype, mean_correction: bool) -> float:
    """lse against the reference or the oracle: both compute the logits in float32 or better from the same inputs;
    with the mean correction the kernel reads the block means rounded to q's dtype (triton_impl/attention.py)."""
    return 1e-3 + (ATOL[dtype] if mean_correction else 0.0)


UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}


def mean_logit_error_bound(q_chunk, kbar) -> torch.Tensor:
    """(n, Hq) bound on how far the kernel's mean-term logits can be from the reference's: the kernel rounds the
    scaled k_bar to q's dtype (relative error <= u per element), so |s_bar - s_bar'| <= scale sum_d |q_d| |k_bar_d| u
    for every block J; the lse, a smooth max of the logits, moves by at most the largest of those.
    q_chunk (n, Hq, D), kbar (N, Hkv, D) float32."""
    scale = q_chunk.shape[-1] ** -0.5
    kv = kbar.abs().float().repeat_interleave(q_chunk.shape[1] // kbar.shape[1], dim=1)  # (N, Hq, D)
    return scale * UNIT_ROUNDOFF[q_chunk.dtype] * torch.einsum("nhd,jhd->nhj", q_chunk.abs().float(), kv).amax(-1)


def assert_same(a, b, exact: bool, atol: float, what: str):
    """Bit equality where both sides run the same code path, else within atol."""
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    if exact:
        assert torch.equal(a, b), f"{what}: not bit-equal, max diff {max_abs_diff(a, b):.3g}"
    else:
        assert max_abs_diff(a, b) <= atol, f"{what}: max diff {max_abs_diff(a, b):.3g} > {atol:.3g}"


def assert_written(out, lse=None):
    assert not out.isnan().any(), "NaN in out (a row the kernel did not write, or an invalid value)"
    if lse is not None:
        assert not lse.isnan().any(), "NaN in lse (a row the kernel did not write, or an invalid value)"


def reference_selection_fp64(q_chunk, k_seq, prefix: int, last: bool, kw: dict, cache=None):
    """The chunk's block set and scores by the reference's stages in float64, kbar the cached blocks then the others
    pooled: (mask, scores), both (Hq, Mc, N), rows I0 .. N - 1 (reference/varlen.py, stages 1-3)."""
    bs = kw["block_size"]
    q_abs = torch.cat([q_chunk.new_zeros(prefix, *q_chunk.shape[1:]), q_chunk]).double()[None]
    kbar = pool_keys_after_cache(k_seq.double()[None], None if cache is None else cache.double(), bs)
    scores = chunk_block_scores(q_abs, kbar, bs, q_chunk.shape[-1] ** -0.5, first_row=prefix)
    mask = reference.select_blocks(scores, kw["alpha"], kw["sink_blocks"], kw["window_blocks"],
                                   kw["last_dense_blocks"] if last else 0)
    I0 = prefix // bs
    return mask[0, :, I0:], scores[0, :, I0:]


def check_against_reference(prompts, chunks, out, lse, stats, *, kw, kbar_cache=None, is_last_chunk=True,
                            oracle=True):
    """The Triton call's (out, lse, stats) on pack(prompts, chunks) with these arguments, sequence by sequence:
    the stats' layout; block sets = the float64 reference's up to ties; out within ATOL and lse within lse_atol of
    reference.flash_prefill_varlen (same inputs, same dtype) on the rows whose lists coincide (at least 90% of them);
    FlashAttention's rule and the lse against the float64 oracle on the kernel's own lists (short sequences; the
    oracle takes the block means from the keys: oracle=False for a cache that does not hold them, with the mean
    correction)."""
    args = pack(prompts, chunks)
    dtype = args[0].dtype
    mean_correction = kw.get("mean_correction", False)
    bs = kw["block_size"]
    Hq, Hkv, D = args[0].shape[1], args[1].shape[1], args[0].shape[2]
    ref_out, ref_lse, ref_stats = reference.flash_prefill_varlen(*args, kbar_cache=kbar_cache,
                                                                 is_last_chunk=is_last_chunk, return_lse=True,
                                                                 return_stats=True, **kw)
    last = is_last_chunk if isinstance(is_last_chunk, (list, tuple)) else [is_last_chunk] * len(chunks)
    assert out.shape == ref_out.shape and out.dtype == dtype and out.device == args[0].device
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert_written(out, lse)
    assert isinstance(stats, VarlenStats)
    assert stats.first_query_block == ref_stats.first_query_block
    kept = causal = 0
    start = 0
    for b, ((q, k, v), (P, n)) in enumerate(zip(prompts, chunks)):
        rows = slice(start, start + n)
        start += n
        k_len, I0 = P + n, P // bs
        N = num_blocks(k_len, bs)
        what = f"sequence {b} (prefix {P}, q_len {n})"
        # Layout of the stats, as the reference's.
        assert stats.counts[b].shape == (Hq, N - I0) and stats.counts[b].dtype == torch.int32, what
        assert stats.indices[b].shape == (Hq, N - I0, N) and stats.indices[b].dtype == torch.int32, what
        assert stats.kbar[b].shape == (k_len // bs, Hkv, D) and stats.kbar[b].dtype == torch.float32, what
        torch.testing.assert_close(stats.kbar[b], ref_stats.kbar[b], rtol=1e-5, atol=1e-5, msg=f"kbar of {what}")
        kept += int(stats.counts[b].sum())
        causal += Hq * (N * (N + 1) - I0 * (I0 + 1)) // 2
        # Block sets: the float64 reference's, except at threshold ties.
        mask = listed(stats.counts[b], stats.indices[b])
        assert torch.equal(mask.sum(-1, dtype=torch.int32), stats.counts[b]), f"lists of {what} not ascending"
        ref_mask, ref_scores = reference_selection_fp64(q[P:k_len], k[:k_len], P, last[b], kw,
                                                        None if kbar_cache is None else kbar_cache[b])
        n_differ, n_off_tie = block_set_differences(mask, ref_mask, ref_scores, kw["alpha"])
        assert block_sets_agree(mask, ref_mask, ref_scores, kw["alpha"]), \
            f"{what}: {n_differ} blocks differ from the float64 reference, {n_off_tie} off a threshold tie"
        # Output and lse: the reference's on the rows whose lists are the reference's.
        mine = row_blocks(stats, b, P, n, bs)  # (Hq, n, N)
        same = (mine == row_blocks(ref_stats, b, P, n, bs)).all(-1).T  # (n, Hq)
        assert same.float().mean() >= 0.9, f"{what}: only {same.float().mean():.0%} of the rows share the lists"
        err = max_abs_diff(out[rows][same], ref_out[rows][same])
        assert err <= ATOL[dtype], f"{what}: out differs from the reference by {err:.3g} > ATOL {ATOL[dtype]}"
        lse_err = (lse[:, rows].T - ref_lse[:, rows].T.float()).abs()  # (n, Hq)
        allowed = lse_atol(dtype, False) + 1e-5 * ref_lse[:, rows].T.abs()
        if mean_correction:  # plus the rounding of the block means to q's dtype, bounded row by row
            cache = None if kbar_cache is None or kbar_cache[b] is None else kbar_cache[b].float()
            kbar = pool_keys_after_cache(k[:k_len][None].float(), cache, bs)[0]  # what the kernel rounded
            allowed = allowed + mean_logit_error_bound(q[P:k_len], kbar)
        worst = (lse_err - allowed)[same].max()
        assert worst <= 0, \
            f"lse of {what}: exceeds its bound by {float(worst):.3g} (max error {lse_err[same].max():.3g})"
        # The float64 oracle on the kernel's own lists.
        if oracle and k_len <= ORACLE_MAX_KEYS:
            chunk = (q[P:k_len].cpu(), k[:k_len].cpu(), v[:k_len].cpu(), mine.cpu(), bs)
            ref64, ref64_lse = naive_chunk_attention(*chunk, mean_correction=mean_correction, return_lse=True)
            pt = naive_chunk_attention(*chunk, mean_correction=mean_correction, dtype=dtype)
            err, pt_err = max_abs_diff(out[rows].cpu(), ref64), max_abs_diff(pt, ref64)
            assert err <= FLASH_RULE_FACTOR * pt_err + FLASH_RULE_SLACK, \
                f"{what}: max error {err:.3g} > 2 x PyTorch's {pt_err:.3g} + 1e-5 (float64 oracle)"
            torch.testing.assert_close(lse[:, rows].cpu().double(), ref64_lse, rtol=1e-5,
                                       atol=lse_atol(dtype, mean_correction), msg=lambda m: f"lse of {what}: {m}")
    assert stats.density.shape == () and abs(float(stats.density) - kept / causal) < 1e-6


def varlen(*args, **kw):
    return triton_impl.flash_prefill_varlen(*args, **kw)


# --- 1. a batch of one in one call is flash_prefill ------------------------------------------------------------

ONE_CASES = [pytest.param(SMALL, 200, id="L200-bs32")] + [
    pytest.param(LARGE, L, id=f"L{L}-D128-bs128", marks=pytest.mark.gpu) for L in (4000, 9000)]


@pytest.mark.parametrize("mean_correction", [False, True], ids=["plain", "mean"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape, L", ONE_CASES)
def test_batch_of_one_is_flash_prefill(shape, L, dtype, mean_correction):
    """One sequence prefilled in one call is triton_impl.flash_prefill on it: the same counts and lists, density
    and kbar, and the same output and lse, to the bit below TMA_MIN_LENGTH (the same kernels on the same rows),
    within ATOL (lse 1e-5) above it, where one side may load K/V through TMA and the other not."""
    q, k, v = prompts_of(shape, [L], dtype, seed=1)[0]
    kw = dict(selection(shape[3]), mean_correction=mean_correction)
    one, one_lse, one_stats = triton_impl.flash_prefill(q[None], k[None], v[None], return_lse=True,
                                                        return_stats=True, **kw)
    assert float(one_stats.density) < 1
    c = cu([L], DEVICE)
    out, lse, stats = varlen(q, k, v, c, c, L, L, return_lse=True, return_stats=True, **kw)
    assert out.shape == (L, *q.shape[1:]) and out.dtype == dtype and lse.shape == (q.shape[1], L)
    assert lse.dtype == torch.float32
    assert_written(out, lse)
    assert isinstance(stats, VarlenStats) and stats.first_query_block == [0]
    assert torch.equal(stats.counts[0], one_stats.counts[0]), "counts differ from flash_prefill's"
    assert torch.equal(stats.indices[0], one_stats.indices[0]), "indices differ from flash_prefill's"
    assert torch.isclose(stats.density, one_stats.density, rtol=1e-6, atol=0)
    torch.testing.assert_close(stats.kbar[0], reference.mean_pool_keys(k[None], shape[3])[0, : L // shape[3]],
                               rtol=1e-5, atol=1e-5)
    exact = L < TMA_MIN_LENGTH
    assert_same(out, one[0], exact, ATOL[dtype], "out")
    assert_same(lse, one_lse[0], exact, 1e-5, "lse")


# --- 2. a packed batch of mixed lengths ------------------------------------------------------------------------

MIXED_CASES = [pytest.param(SMALL, [37, 130, 257, 64, 5], id="37-130-257-64-5-bs32"),
               pytest.param(LARGE, [8192, 2048, 300, 5000], id="8192-2048-300-5000-D128-bs128",
                            marks=pytest.mark.gpu)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape, lengths", MIXED_CASES)
def test_mixed_lengths_are_per_sequence_flash_prefill_and_the_reference(shape, lengths, dtype):
    """Whole prompts of mixed lengths (partial last blocks, block-aligned, shorter than a block) packed in one call:
    each sequence's rows, lse and lists are triton_impl.flash_prefill's on it alone (to the bit below
    TMA_MIN_LENGTH), and the call agrees with reference.flash_prefill_varlen (check_against_reference)."""
    prompts = prompts_of(shape, lengths, dtype, seed=10)
    kw = selection(shape[3])
    chunks = [(0, L) for L in lengths]
    out, lse, stats = varlen(*pack(prompts, chunks), return_lse=True, return_stats=True, **kw)
    assert_written(out, lse)
    exact = max(lengths) < TMA_MIN_LENGTH
    start = 0
    for b, (q, k, v) in enumerate(prompts):
        one, one_lse, one_stats = triton_impl.flash_prefill(q[None], k[None], v[None], return_lse=True,
                                                            return_stats=True, **kw)
        rows = slice(start, start + lengths[b])
        start += lengths[b]
        assert torch.equal(stats.counts[b], one_stats.counts[0]), f"counts of sequence {b}"
        assert torch.equal(stats.indices[b], one_stats.indices[0]), f"indices of sequence {b}"
        assert_same(out[rows], one[0], exact, ATOL[dtype], f"out of sequence {b}")
        assert_same(lse[:, rows], one_lse[0], exact, 1e-5, f"lse of sequence {b}")
    assert float(stats.density) < 1
    check_against_reference(prompts, chunks, out, lse, stats, kw=kw)


# --- 3. chunked prefill over a prefix --------------------------------------------------------------------------

# (shape, prompt lengths, first chunks, next chunks): prompt 0 continues from an unaligned prefix and does not end,
# prompt 1 from an aligned prefix to its end, prompt 2 from an aligned prefix to its end.
CHUNK_CASES = [
    pytest.param(SMALL, (200, 230, 180), [(0, 75), (0, 96), (0, 64)], [(75, 50), (96, 134), (64, 116)],
                 id="bs32"),
    pytest.param(LARGE, (12000, 9000, 3000), [(0, 5000), (0, 4096), (0, 1024)],
                 [(5000, 3500), (4096, 4904), (1024, 1976)], id="D128-bs128", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("mean_correction", [False, True], ids=["plain", "mean"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape, lengths, first, then", CHUNK_CASES)
def test_chunks_over_a_prefix_match_the_reference(shape, lengths, first, then, dtype, mean_correction):
    """Two calls, as a server makes them: the first chunks of three prompts (none ends its prompt), then their next
    chunks (q_len < k_len) over the prefixes, with kbar_cache from the first call's stats.kbar: whole (an unaligned
    prefix), absent (pooled afresh) and partial (one block of two); is_last_chunk per sequence. Both calls agree with
    the reference given the same caches (check_against_reference), and the caches are what pooling the prefix
    gives."""
    prompts = prompts_of(shape, lengths, dtype, seed=20)
    kw = dict(selection(shape[3]), mean_correction=mean_correction)
    bs = shape[3]
    out, lse, stats = varlen(*pack(prompts, first), is_last_chunk=False, return_lse=True, return_stats=True, **kw)
    check_against_reference(prompts, first, out, lse, stats, kw=kw, is_last_chunk=False)
    for (_, k, _), (P, n), kbar in zip(prompts, first, stats.kbar):
        torch.testing.assert_close(kbar, reference.mean_pool_keys(k[None, : P + n], bs)[0, : (P + n) // bs],
                                   rtol=1e-5, atol=1e-5)
    cache = [stats.kbar[0], None, stats.kbar[2][:1]]
    last = [P + n == L for (P, n), L in zip(then, lengths)]
    assert last == [False, True, True] and then[0][0] % bs != 0 and then[1][0] % bs == 0
    out, lse, stats = varlen(*pack(prompts, then), kbar_cache=cache, is_last_chunk=last, return_lse=True,
                             return_stats=True, **kw)
    check_against_reference(prompts, then, out, lse, stats, kw=kw, kbar_cache=cache, is_last_chunk=last)
    assert stats.first_query_block == [P // bs for P, _ in then]
    assert float(stats.density) < 1
    # The cache is read, not pooled again: cached "means" that are not the keys' steer the selection (and, with the
    # mean correction, the means attended) exactly as they steer the reference's.
    gen = torch.Generator().manual_seed(21)
    odd = [None if c is None else 3 * torch.randn(c.shape, generator=gen).to(c.device) for c in cache]
    odd_out, odd_lse, odd_stats = varlen(*pack(prompts, then), kbar_cache=odd, is_last_chunk=last, return_lse=True,
                                         return_stats=True, **kw)
    check_against_reference(prompts, then, odd_out, odd_lse, odd_stats, kw=kw, kbar_cache=odd, is_last_chunk=last,
                            oracle=not mean_correction)
    assert any(not torch.equal(a, b) for a, b in zip(odd_stats.counts, stats.counts)), "the cache changed nothing"


ALIGNED_CASES = [
    pytest.param(SMALL, 200, [(0, 64), (64, 96), (96, 160), (160, 200)], id="L200-bs32"),
    pytest.param(LARGE, 12000, [(0, 4096), (4096, 4224), (4224, 10240), (10240, 12000)], id="L12000-D128-bs128",
                 marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("mean_correction", [False, True], ids=["plain", "mean"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape, L, bounds", ALIGNED_CASES)
def test_block_aligned_chunks_reproduce_one_call(shape, L, bounds, dtype, mean_correction):
    """Chunks on block boundaries, each passing its stats.kbar to the next as kbar_cache, reproduce one
    triton_impl.flash_prefill call on the prompt: every query block of a chunk holds the same rows, is scored from
    the same float32 means (cached or pooled) and attended by the same kernel, so the lists are equal and out and lse
    are bit-equal; on the GPU case (L >= TMA_MIN_LENGTH) the one-shot call may load K/V through TMA where the short
    chunks do not, so there out within ATOL and lse within 1e-5. The last kbar is the one-shot pooling's."""
    bs = shape[3]
    q, k, v = prompts_of(shape, [L], dtype, seed=2)[0]
    kw = dict(selection(bs), mean_correction=mean_correction)
    one, one_lse, one_stats = triton_impl.flash_prefill(q[None], k[None], v[None], return_lse=True,
                                                        return_stats=True, **kw)
    out, lse, stats = prefill_in_chunks(varlen, q, k, v, bounds, **kw)
    assert_written(out, lse)
    assert torch.equal(torch.cat([s.counts[0] for s in stats], dim=1), one_stats.counts[0]), "counts"
    for s, (c0, c1) in zip(stats, bounds):  # each chunk's rows are the one-shot lists' rows, absolute numbering
        I0, N = s.first_query_block[0], s.indices[0].shape[-1]
        assert I0 == c0 // bs and N == num_blocks(c1, bs)
        assert torch.equal(listed(s.counts[0], s.indices[0]),
                           listed(one_stats.counts[0], one_stats.indices[0])[:, I0:N, :N]), f"lists of [{c0}, {c1})"
    exact = L < TMA_MIN_LENGTH
    assert_same(out, one[0], exact, ATOL[dtype], "out")
    assert_same(lse, one_lse[0], exact, 1e-5, "lse")
    torch.testing.assert_close(stats[-1].kbar[0], reference.mean_pool_keys(k[None], bs)[0, : L // bs], rtol=1e-5,
                               atol=1e-5)


# --- 4. the mean correction ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_mean_correction_matches_the_reference(dtype):
    """mean_correction=True on a batch of whole prompts and chunks over unaligned prefixes (one of 160 rows, one of a
    single row ending its block, one of 3 rows inside a block that does not end its prompt): the reference's output
    and lse (check_against_reference, the corrected oracle included), and not the plain attention's (the pruned
    blocks' means do reach the output)."""
    prompts = prompts_of(SMALL, (161, 90, 230, 64, 60), dtype, seed=30)
    chunks = [(0, 161), (0, 90), (70, 160), (63, 1), (50, 3)]
    last = [True, True, True, True, False]
    kw = dict(selection(SMALL[3]), mean_correction=True)
    out, lse, stats = varlen(*pack(prompts, chunks), is_last_chunk=last, return_lse=True, return_stats=True, **kw)
    check_against_reference(prompts, chunks, out, lse, stats, kw=kw, is_last_chunk=last)
    plain = reference.flash_prefill_varlen(*pack(prompts, chunks), is_last_chunk=last, **selection(SMALL[3]))
    assert max_abs_diff(out, plain) > 5 * ATOL[dtype], "the correction changed nothing"


# --- 5. lse: prefix part + chunk part merged = the call ----------------------------------------------------------


def test_merging_prefix_and_chunk_parts_is_the_call():
    """A chunk over an unaligned prefix: its kept blocks split into the prefix's (J < I0) and the chunk's own
    (J >= I0), each attended by triton_impl.block_sparse_attention on the one-sequence view (the chunk at its absolute
    rows), merged with merge_attention_states: the call's lse within float32 rounding, its output within 2 ATOL (two
    outputs rounded to q's dtype, then merged)."""
    dtype = DTYPES[-1]
    Hq, Hkv, D, bs = SMALL
    L, P = 230, 100
    q, k, v = prompts_of(SMALL, [L], dtype, seed=4)[0]
    out, lse, stats = varlen(*pack([(q, k, v)], [(P, L - P)]), return_lse=True, return_stats=True, **selection(bs))
    I0, N = stats.first_query_block[0], num_blocks(L, bs)
    mask = torch.zeros(1, Hq, N, N, dtype=torch.bool, device=DEVICE)
    mask[0, :, I0:] = listed(stats.counts[0], stats.indices[0])
    J = torch.arange(N, device=DEVICE)
    q_abs = torch.cat([torch.zeros_like(q[:P]), q[P:]])[None]
    parts = []
    for part in (mask & (J < I0), mask & (J >= I0)):
        counts, indices = reference.compact_blocks(part)
        o, l = triton_impl.block_sparse_attention(q_abs, k[None], v[None], counts, indices, bs, return_lse=True)
        parts += [o[0, P:], l[0, :, P:]]
    assert (parts[1] > -INF).all() and (parts[3] > -INF).all()  # both parts non-empty for every row
    merged, merged_lse = triton_impl.merge_attention_states(*parts)
    torch.testing.assert_close(merged_lse, lse, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(merged.float(), out.float(), atol=2 * ATOL[dtype], rtol=0)


# --- selection budget ----------------------------------------------------------------------------------------------


def test_selection_budget_does_not_change_the_results():
    """max_selection_bytes=1 (scores and lists made one query-block row at a time) gives the lists, output and lse
    of the default budget (one piece), bit for bit."""
    dtype = DTYPES[-1]
    prompts = prompts_of(SMALL, (100, 70), dtype, seed=40)
    chunks = [(0, 100), (33, 37)]
    kw = dict(selection(SMALL[3]), return_lse=True, return_stats=True)
    args = pack(prompts, chunks)
    out, lse, stats = varlen(*args, **kw)
    small, small_lse, small_stats = varlen(*args, max_selection_bytes=1, **kw)
    assert torch.equal(small, out) and torch.equal(small_lse, lse)
    for b in range(len(chunks)):
        assert torch.equal(small_stats.counts[b], stats.counts[b])
        assert torch.equal(listed(small_stats.counts[b], small_stats.indices[b]),
                           listed(stats.counts[b], stats.indices[b]))


# --- 6. validate=False ---------------------------------------------------------------------------------------------

HOST_READS = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


def chunk_batch(dtype):
    """A small batch of a whole prompt, an unaligned chunk with a cache and an aligned last chunk: (args, kw)."""
    prompts = prompts_of(SMALL, (70, 200, 160), dtype, seed=50)
    chunks = [(0, 70), (75, 50), (96, 64)]
    bs = SMALL[3]
    cache = [None, reference.mean_pool_keys(prompts[1][1][None, :64], bs)[0],
             reference.mean_pool_keys(prompts[2][1][None, :96], bs)[0, :2]]
    kw = dict(selection(bs), kbar_cache=cache, is_last_chunk=[True, False, True], return_lse=True)
    return pack(prompts, chunks), kw


def test_validate_false_gives_the_same_results_without_host_synchronisation(monkeypatch):
    """validate=False computes what validate=True does, to the bit, also with max_seqlen_q / max_seqlen_k larger
    than needed (they only size the grid); and it never brings a tensor's value to the host: every Tensor method
    that would (tolist, item, cpu, numpy, bool/int/float/index conversions) raises during the call, and on a GPU
    torch.cuda's sync debug mode turns any synchronising CUDA call into an error."""
    args, kw = chunk_batch(DTYPES[-1])
    out, lse = varlen(*args, **kw)
    assert_written(out, lse)
    for call_args in (args, (*args[:5], args[5] + 50, args[6] + 100)):
        unchecked, unchecked_lse = varlen(*call_args, validate=False, **kw)
        assert torch.equal(unchecked, out) and torch.equal(unchecked_lse, lse)

    def refuse(name):
        def method(self, *a, **k):
            raise AssertionError(f"host synchronisation: Tensor.{name} called during a validate=False call")
        return method

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, refuse(name))
    if HAS_CUDA:
        torch.cuda.set_sync_debug_mode("error")
    try:
        again, again_lse = varlen(*args, validate=False, **kw)
    finally:
        if HAS_CUDA:
            torch.cuda.set_sync_debug_mode(0)
        monkeypatch.undo()
    assert torch.equal(again, out) and torch.equal(again_lse, lse)


def test_validate_true_reads_cu_seqlens_once(monkeypatch):
    """validate=True (without return_stats) brings tensor values to the host once: the cu_seqlens read."""
    args, kw = chunk_batch(DTYPES[-1])
    varlen(*args, **kw)  # compiled / warmed up
    reads = []

    def counting(name, original):
        def method(self, *a, **k):
            reads.append(name)
            return original(self, *a, **k)
        return method

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    try:
        varlen(*args, **kw)
    finally:
        monkeypatch.undo()
    assert len(reads) == 1, f"{len(reads)} host reads: {reads}"


# --- 7. bad input ------------------------------------------------------------------------------------------------

HQ, HKV, D, BS = SMALL
BAD_DTYPE = DTYPES[-1]
OTHER_DTYPE = {torch.float16: torch.bfloat16 if HAS_CUDA else torch.float32}.get(BAD_DTYPE, torch.float16)
BAD = varlen_bad_inputs(HQ, HKV, D, BAD_DTYPE, DEVICE, other_dtype=OTHER_DTYPE)
# What can be checked without reading cu_seqlens' values (dtypes, shapes, devices, plain arguments).
STRUCTURAL = ("cu-int64", "cu-not-tensor", "cu-2d", "cu-one-entry", "cu-batch", "max-k-float", "cache-shape",
              "cache-2d", "cache-length", "cache-tensor", "cache-dtype", "q-4d", "kv-shapes", "kv-heads", "qkv-dtype",
              "last-int", "last-list", "alpha", "block_size", "return_lse", "mean_correction")


def valid_call():
    return varlen_valid_call(HQ, HKV, D, BS, BAD_DTYPE, DEVICE)


def test_the_valid_call_succeeds_and_the_return_conventions():
    """The base of the bad-input table runs, and returns out alone, (out, lse), (out, stats) or (out, lse, stats),
    out unchanged by asking for the others."""
    args = valid_call()
    out = call_varlen(varlen, args)
    assert out.shape == (46, HQ, D) and out.dtype == BAD_DTYPE and not out.isnan().any()
    pair = call_varlen(varlen, dict(args, return_lse=True))
    assert len(pair) == 2 and torch.equal(pair[0], out) and pair[1].shape == (HQ, 46)
    lse = pair[1]
    pair = call_varlen(varlen, dict(args, return_stats=True))
    assert len(pair) == 2 and torch.equal(pair[0], out) and isinstance(pair[1], VarlenStats)
    triple = call_varlen(varlen, dict(args, return_lse=True, return_stats=True))
    assert len(triple) == 3 and torch.equal(triple[0], out) and torch.equal(triple[1], lse)
    assert isinstance(triple[2], VarlenStats)


@pytest.mark.parametrize("change, error, match", [pytest.param(*c[1:], id=c[0]) for c in BAD])
def test_bad_input_is_rejected_like_the_reference(change, error, match):
    """Each bad argument raises the reference's error, with its message (naming the argument)."""
    args = valid_call()
    args.update(change)
    with pytest.raises(error, match=match):
        call_varlen(varlen, args)


@pytest.mark.parametrize("change, error, match", [pytest.param(*c[1:], id=c[0]) for c in BAD if c[0] in STRUCTURAL])
def test_structural_checks_still_run_with_validate_false(change, error, match):
    """validate=False trusts cu_seqlens' values only: a wrong dtype, shape, device or argument is still refused."""
    args = valid_call()
    args.update(change, validate=False)
    with pytest.raises(error, match=match):
        call_varlen(varlen, args)


def test_what_only_the_kernels_refuse():
    """Head dims and block sizes the kernels do not take, bfloat16 under the interpreter / float32 on a GPU, a zero
    selection budget, and inputs autograd would track (the kernels have no backward): clear errors before launch."""
    args = valid_call()
    for change, error, match in [
        (dict(block_size=512, kbar_cache=None), ValueError, "block_size 512 is not supported by the Triton kernels"),
        (dict(max_selection_bytes=0), ValueError, "max_selection_bytes"),
        (dict(q=args["q"].clone().requires_grad_()), RuntimeError, "inference-only"),
    ]:
        with pytest.raises(error, match=match):
            call_varlen(varlen, dict(args, **change))
    small = varlen_valid_call(HQ, HKV, 32, BS, BAD_DTYPE, DEVICE)
    small["kbar_cache"] = None
    with pytest.raises(ValueError, match="head dim 32 is not supported"):
        call_varlen(varlen, small)
    wrong = torch.float32 if HAS_CUDA else torch.bfloat16
    other = varlen_valid_call(HQ, HKV, D, BS, wrong, DEVICE)
    with pytest.raises(TypeError, match="float32 on a GPU" if HAS_CUDA else "not supported under the Triton interp"):
        call_varlen(varlen, other)
