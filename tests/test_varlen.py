"""`reference.flash_prefill_varlen`: packed variable-length batches and chunked prefill over a cached prefix
(docs/DESIGN.md section 9, "Varlen", "Chunked prefill over a prefix", "LSE"; section 3 has the signature).

1. A batch of one prefilled in one call is `flash_prefill`, to the bit (output, lse, lists, density).
2. A batch of sequences of mixed lengths, or of chunks at different stages of their prompts, is per-sequence calls.
3. Chunked prefill passing kbar_cache along: block-aligned chunks reproduce the one-shot call to the bit; chunks
   of 50 rows with Bs 32 do so for every query block a chunk holds whole, and a straddled block is scored from the
   rows each chunk has (checked against the float64 restatement).
4. The output and lse against the float64 restatement (tools/oracle.py) over the returned block sets, at alpha 0
   and alpha > 0, with and without the mean correction; the selection against the restated scores.
5. LSE: the chunk's kept blocks split into prefix blocks and chunk blocks, attended separately and merged with
   `merge_attention_states`, equal the call.
6. Bad input: each refused with a message naming the argument.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (call_varlen, cu, dtype_id, listed, pack, prefill_in_chunks, row_blocks, varlen_bad_inputs,
                     varlen_valid_call)

import reference
from reference import VarlenStats, block_sparse_attention, flash_prefill, flash_prefill_varlen, merge_attention_states
from reference.synthetic import planted_qkv
from reference.varlen import chunk_block_scores
from tools.oracle import (ATOL, block_sets_agree, naive_chunk_attention, naive_chunk_block_scores_fp64,
                          naive_mean_pool_fp64, naive_select_blocks, num_blocks)

HQ, HKV, D, BS = 4, 2, 32, 32
# A selection that prunes on planted inputs (alpha 0.3 keeps about 65% of the causal blocks at L = 300).
SPARSE = dict(alpha=0.3, block_size=BS, sink_blocks=1, window_blocks=1, last_dense_blocks=1)
INF = float("inf")


def sequence(L: int, seed: int, dtype=torch.float32):
    """q (L, Hq, D), k, v (L, Hkv, D): one planted prompt (sinks, local decay, stripes: a sparse selection)."""
    q, k, v = planted_qkv(1, L, HQ, HKV, D, seed=seed, dtype=dtype)
    return q[0], k[0], v[0]


def assert_equal(a, b, what=""):
    assert torch.equal(a, b), f"{what}: max diff {(a.double() - b.double()).abs().max().item():.3g}"


# --- 1. a batch of one in one call is flash_prefill ------------------------------------------------------------


@pytest.mark.parametrize("mean_correction", [False, True], ids=["plain", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_batch_of_one_is_flash_prefill(dtype, mean_correction):
    L = 130  # a partial last block (4 x 32 + 2)
    q, k, v = sequence(L, seed=1, dtype=dtype)
    kw = dict(SPARSE, mean_correction=mean_correction)
    out, lse, stats = flash_prefill(q[None], k[None], v[None], return_lse=True, return_stats=True, **kw)
    assert float(stats.density) < 1
    c = cu([L])
    v_out, v_lse, v_stats = flash_prefill_varlen(q, k, v, c, c, L, L, return_lse=True, return_stats=True, **kw)
    assert v_out.shape == (L, HQ, D) and v_out.dtype == dtype
    assert v_lse.shape == (HQ, L) and v_lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert isinstance(v_stats, VarlenStats) and v_stats.first_query_block == [0]
    assert_equal(v_out, out[0], "out")
    assert_equal(v_lse, lse[0], "lse")
    assert_equal(v_stats.counts[0], stats.counts[0], "counts")
    assert_equal(v_stats.indices[0], stats.indices[0], "indices")
    assert_equal(v_stats.density, stats.density, "density")
    assert_equal(v_stats.kbar[0], reference.mean_pool_keys(k[None], BS)[0, : L // BS], "kbar")
    # The return conventions: out alone, (out, lse), (out, stats).
    assert torch.equal(flash_prefill_varlen(q, k, v, c, c, L, L, **kw), v_out)
    assert torch.equal(flash_prefill_varlen(q, k, v, c, c, L, L, return_lse=True, **kw)[1], v_lse)
    assert isinstance(flash_prefill_varlen(q, k, v, c, c, L, L, return_stats=True, **kw)[1], VarlenStats)


# --- 2. a packed batch is per-sequence calls -------------------------------------------------------------------


def test_mixed_lengths_are_per_sequence_flash_prefill():
    lengths = [37, 130, 64, 5]  # partial, partial last block, aligned, shorter than a block
    prompts = [sequence(L, seed=10 + i) for i, L in enumerate(lengths)]
    args = pack(prompts, [(0, L) for L in lengths])
    out, lse, stats = flash_prefill_varlen(*args, return_lse=True, return_stats=True, **SPARSE)
    starts = args[3].tolist()
    kept = causal = 0
    for b, (q, k, v) in enumerate(prompts):
        one, one_lse, one_stats = flash_prefill(q[None], k[None], v[None], return_lse=True, return_stats=True,
                                                **SPARSE)
        rows = slice(starts[b], starts[b + 1])
        assert_equal(out[rows], one[0], f"out of sequence {b}")
        assert_equal(lse[:, rows], one_lse[0], f"lse of sequence {b}")
        assert_equal(stats.counts[b], one_stats.counts[0], f"counts of sequence {b}")
        assert_equal(stats.indices[b], one_stats.indices[0], f"indices of sequence {b}")
        M = num_blocks(lengths[b], BS)
        kept += int(one_stats.counts.sum())
        causal += HQ * M * (M + 1) // 2
    assert abs(float(stats.density) - kept / causal) < 1e-6 and float(stats.density) < 1


def test_a_batch_of_chunks_is_per_sequence_calls():
    """Serving: sequences at different stages of their prompts in one call (a fresh prompt, a middle chunk that
    does not start on a block boundary, a last chunk over a cached prefix), is_last_chunk per sequence, kbar_cache
    for some of them."""
    prompts = [sequence(L, seed=20 + i) for i, L in enumerate((70, 200, 160))]
    chunks = [(0, 70), (75, 50), (96, 64)]
    last = [True, False, True]
    caches = [None, reference.mean_pool_keys(prompts[1][1][None, :64], BS)[0],
              reference.mean_pool_keys(prompts[2][1][None, :96], BS)[0, :2]]  # 2 of the 3 cached blocks: pools one
    kw = dict(SPARSE, mean_correction=True, return_lse=True, return_stats=True)
    out, lse, stats = flash_prefill_varlen(*pack(prompts, chunks), kbar_cache=caches, is_last_chunk=last, **kw)
    start = 0
    for b, (prompt, chunk) in enumerate(zip(prompts, chunks)):
        one, one_lse, one_stats = flash_prefill_varlen(*pack([prompt], [chunk]), is_last_chunk=last[b], **kw)
        rows = slice(start, start + chunk[1])
        start += chunk[1]
        assert_equal(out[rows], one, f"out of sequence {b}")
        assert_equal(lse[:, rows], one_lse, f"lse of sequence {b}")
        assert_equal(stats.counts[b], one_stats.counts[0], f"counts of sequence {b}")
        assert_equal(stats.indices[b], one_stats.indices[0], f"indices of sequence {b}")
        assert_equal(stats.kbar[b], one_stats.kbar[0], f"kbar of sequence {b}")
        assert stats.first_query_block[b] == chunk[0] // BS
        N = num_blocks(sum(chunk), BS)
        Mc = N - chunk[0] // BS
        assert stats.counts[b].shape == (HQ, Mc) and stats.indices[b].shape == (HQ, Mc, N)
        assert stats.kbar[b].shape == (sum(chunk) // BS, HKV, D)
    # The middle chunk (not the end of its prompt) has no dense last blocks; the same chunk ending its prompt does.
    not_last = stats.counts[1]
    as_last = flash_prefill_varlen(*pack(prompts[1:2], chunks[1:2]), **kw)[2].counts[0]
    causal = num_blocks(125, BS)  # the causal key blocks of the chunk's last query block
    assert (as_last[:, -1] == causal).all() and (not_last[:, -1] < causal).any()


# --- 3. chunked prefill ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mean_correction", [False, True], ids=["plain", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_block_aligned_chunks_reproduce_one_call(dtype, mean_correction):
    L = 300
    q, k, v = sequence(L, seed=2, dtype=dtype)
    kw = dict(SPARSE, mean_correction=mean_correction)
    one, one_lse, one_stats = flash_prefill(q[None], k[None], v[None], return_lse=True, return_stats=True, **kw)
    bounds = [(0, 64), (64, 96), (96, 224), (224, 300)]
    out, lse, stats = prefill_in_chunks(flash_prefill_varlen, q, k, v, bounds, **kw)
    assert_equal(out, one[0], "out")
    assert_equal(lse, one_lse[0], "lse")
    assert_equal(torch.cat([s.counts[0] for s in stats], dim=1), one_stats.counts[0], "counts")
    for s in stats:  # each chunk's rows are the one-shot lists' rows, in absolute numbering
        I0, N = s.first_query_block[0], s.indices[0].shape[-1]
        assert_equal(s.indices[0], one_stats.indices[0, :, I0 : I0 + s.counts[0].shape[1], :N], "indices")
    # The cache handed along is the one-shot kbar of the complete blocks.
    assert_equal(stats[-1].kbar[0], reference.mean_pool_keys(k[None], BS)[0, : L // BS], "kbar")


@pytest.mark.parametrize("mean_correction", [False, True], ids=["plain", "mean"])
def test_unaligned_chunks(mean_correction):
    """Chunks of 50 rows with Bs 32: the query blocks a chunk holds whole (0, 2, 5, 8, 9: the last one dense in
    both) keep the one-shot lists and rows; the straddled blocks are scored from each chunk's rows, which the
    float64 restatement checks; dense (alpha 0), the chunked output is the one-shot output."""
    L = 300
    q, k, v = sequence(L, seed=3, dtype=torch.float64)
    bounds = [(c0, min(L, c0 + 50)) for c0 in range(0, L, 50)]
    kw = dict(SPARSE, mean_correction=mean_correction)
    one, one_lse, one_stats = flash_prefill(q[None], k[None], v[None], return_lse=True, return_stats=True, **kw)
    out, lse, stats = prefill_in_chunks(flash_prefill_varlen, q, k, v, bounds, **kw)
    whole = [0, 2, 5, 8, 9]
    straddled = [1, 3, 4, 6, 7]
    for I in whole:
        s = next(s for s in stats if s.first_query_block[0] <= I < s.first_query_block[0] + s.counts[0].shape[1])
        t = I - s.first_query_block[0]
        assert_equal(s.counts[0][:, t], one_stats.counts[0, :, I], f"counts of block {I}")
        assert_equal(s.indices[0][:, t], one_stats.indices[0, :, I, : s.indices[0].shape[-1]], f"block {I}")
        rows = slice(I * BS, min(L, (I + 1) * BS))
        torch.testing.assert_close(out[rows], one[0, rows], atol=1e-12, rtol=0)
        torch.testing.assert_close(lse[:, rows], one_lse[0, :, rows], atol=1e-12, rtol=0)
    # The straddled blocks differ from the one-shot selection somewhere (else this test would test nothing) ...
    differs = 0
    for s, (c0, c1) in zip(stats, bounds):
        I0 = s.first_query_block[0]
        N = s.indices[0].shape[-1]
        chunk_mask = listed(s.counts[0], s.indices[0])
        one_mask = listed(one_stats.counts[0], one_stats.indices[0])[:, I0:N, :N]
        differs += int((chunk_mask != one_mask)[:, [t for t in range(N - I0) if I0 + t in straddled]].sum())
        # ... and every chunk's selection is the restated one: scores from the chunk's rows, absolute blocks.
        assert_selection_is_restated(s, 0, q[c0:c1], k[:c1], last=c1 == L)
    assert differs > 0
    # kbar handed along is still the one-shot kbar of the complete blocks.
    assert_equal(stats[-1].kbar[0], reference.mean_pool_keys(k[None], BS)[0, : L // BS], "kbar")
    # Dense: every causal block in every chunk, so the chunked rows are the one-shot rows.
    dense_kw = dict(kw, alpha=0.0)
    dense, dense_lse, _ = prefill_in_chunks(flash_prefill_varlen, q, k, v, bounds, **dense_kw)
    one_dense, one_dense_lse = flash_prefill(q[None], k[None], v[None], return_lse=True, **dense_kw)
    torch.testing.assert_close(dense, one_dense[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(dense_lse, one_dense_lse[0], atol=1e-12, rtol=0)


def assert_selection_is_restated(stats: VarlenStats, b: int, q_chunk, k_seq, last: bool, alpha=SPARSE["alpha"]):
    """Sequence b's lists against steps 1-3 restated in float64 for the chunk (tools/oracle.py)."""
    k_len = k_seq.shape[0]
    N = num_blocks(k_len, BS)
    I0 = (k_len - q_chunk.shape[0]) // BS
    kbar = naive_mean_pool_fp64(k_seq[None], BS)[0]
    scores = naive_chunk_block_scores_fp64(q_chunk, kbar, BS, D ** -0.5, k_len)  # (Hq, N - I0, N)
    square = torch.zeros(1, HQ, N, N, dtype=torch.float64)
    square[0, :, I0:] = scores  # rows are independent: the chunk's rows at their absolute block numbers
    expected = naive_select_blocks(square, alpha, SPARSE["sink_blocks"], SPARSE["window_blocks"],
                                   SPARSE["last_dense_blocks"] if last else 0)[0, :, I0:]
    assert block_sets_agree(listed(stats.counts[b], stats.indices[b]), expected, scores, alpha)


# --- 4. against the float64 restatement ------------------------------------------------------------------------


@pytest.mark.parametrize("prefix, q_len", [(0, 75), (17, 58), (40, 60), (32, 40), (50, 3), (100, 70)])
def test_chunk_scores_match_the_fp64_restatement(prefix, q_len):
    """Stage 2 of a chunk: only the chunk's rows contribute (a partial first query block is scored from the rows
    it has), on Gaussian inputs, whose logits are small enough that a row wrongly contributing would show."""
    gen = torch.Generator().manual_seed(prefix + q_len)
    k_len = prefix + q_len
    q = torch.randn(q_len, HQ, D, generator=gen, dtype=torch.float64)
    k = torch.randn(k_len, HKV, D, generator=gen, dtype=torch.float64)
    kbar = naive_mean_pool_fp64(k[None], BS)
    q_abs = torch.cat([torch.full((prefix, HQ, D), 7.0, dtype=torch.float64), q])[None]  # rows never read
    scores = chunk_block_scores(q_abs, kbar, BS, D ** -0.5, first_row=prefix)  # (1, Hq, N, N)
    I0 = prefix // BS
    assert (scores[0, :, :I0] == 0).all()
    expected = naive_chunk_block_scores_fp64(q, kbar[0], BS, D ** -0.5, k_len)
    torch.testing.assert_close(scores[0, :, I0:], expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("mean_correction", [False, True], ids=["plain", "mean"])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_output_and_lse_match_the_fp64_restatement(dtype, alpha, mean_correction):
    prompts = [sequence(L, seed=30 + i, dtype=dtype) for i, L in enumerate((90, 161, 40))]
    chunks = [(0, 90), (70, 91), (33, 7)]  # a whole prompt, chunks over unaligned prefixes
    last = [True, True, False]
    kw = dict(SPARSE, alpha=alpha, mean_correction=mean_correction)
    out, lse, stats = flash_prefill_varlen(*pack(prompts, chunks), is_last_chunk=last, return_lse=True,
                                           return_stats=True, **kw)
    atol = 1e-10 if dtype == torch.float64 else ATOL[torch.float32]
    start = 0
    for b, ((q, k, v), (P, n)) in enumerate(zip(prompts, chunks)):
        kept = row_blocks(stats, b, P, n, BS)
        if alpha == 0:
            assert kept.sum() == sum(min(p // BS, num_blocks(P + n, BS) - 1) + 1 for p in range(P, P + n)) * HQ
        ref, ref_lse = naive_chunk_attention(q[P : P + n], k[: P + n], v[: P + n], kept, BS,
                                             mean_correction=mean_correction, return_lse=True)
        rows = slice(start, start + n)
        start += n
        torch.testing.assert_close(out[rows].double(), ref, atol=atol, rtol=0)
        torch.testing.assert_close(lse[:, rows].double(), ref_lse, atol=atol, rtol=0)
        if dtype == torch.float64:
            assert_selection_is_restated(stats, b, q[P : P + n], k[: P + n], last[b], alpha)
    if alpha > 0:
        assert float(stats.density) < 1


# --- 5. lse: prefix part + chunk part merged = the call ----------------------------------------------------------


def test_merging_prefix_and_chunk_parts_is_the_call():
    """The chunk's rows attend the cached prefix's blocks (J < I0) and the chunk's own blocks (J >= I0): attend each
    part alone (block_sparse_attention on the one-sequence view, the chunk at its absolute rows), merge them with
    merge_attention_states, and get the varlen call's output and lse."""
    L, P = 230, 96
    q, k, v = sequence(L, seed=4, dtype=torch.float64)
    out, lse, stats = flash_prefill_varlen(*pack([(q, k, v)], [(P, L - P)]), return_lse=True, return_stats=True,
                                           **SPARSE)
    I0, N = stats.first_query_block[0], num_blocks(L, BS)
    mask = torch.zeros(1, HQ, N, N, dtype=torch.bool)
    mask[0, :, I0:] = listed(stats.counts[0], stats.indices[0])
    J = torch.arange(N)
    q_abs = torch.cat([torch.zeros_like(q[:P]), q[P:]])[None]
    parts = []
    for part in (mask & (J < I0), mask & (J >= I0)):
        counts, indices = reference.compact_blocks(part)
        o, l = block_sparse_attention(q_abs, k[None], v[None], counts, indices, BS, return_lse=True)
        parts += [o[0, P:], l[0, :, P:]]
    merged, merged_lse = merge_attention_states(*parts)
    assert (parts[1] > -INF).all() and (parts[3] > -INF).all()  # both parts non-empty for every row
    torch.testing.assert_close(merged_lse, lse, atol=1e-12, rtol=0)
    torch.testing.assert_close(merged, out, atol=1e-12, rtol=0)


def test_varlen_is_differentiable():
    """gradcheck through a chunk over a cached prefix with the mean correction (float64, finite differences)."""
    q, k, v = (t.detach().requires_grad_() for t in sequence(40, seed=5, dtype=torch.float64))
    small = dict(alpha=0.3, block_size=16, sink_blocks=1, window_blocks=1, mean_correction=True)

    def call(q, k, v):
        return flash_prefill_varlen(q[17:], k, v, cu([23]), cu([40]), 23, 40, **small)

    assert torch.autograd.gradcheck(call, (q, k, v), fast_mode=True)


# --- 6. bad input --------------------------------------------------------------------------------------------------


def valid_call():
    return varlen_valid_call(HQ, HKV, D, BS)


BAD = varlen_bad_inputs(HQ, HKV, D)  # shared with tests/test_triton_varlen.py (helpers.py)


def call_with(args: dict):
    return call_varlen(flash_prefill_varlen, args)


def test_the_valid_call_succeeds():
    out = call_with(valid_call())
    assert out.shape == (46, HQ, D)


@pytest.mark.parametrize("change, error, match", [pytest.param(*c[1:], id=c[0]) for c in BAD])
def test_bad_input_is_rejected(change, error, match):
    args = valid_call()
    args.update(change)
    with pytest.raises(error, match=match):
        call_with(args)
