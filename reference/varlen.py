"""FlashPrefill for serving-style calls: packed variable-length batches and chunked prefill over a cached prefix.

The contract is docs/DESIGN.md section 9 ("Varlen", "Chunked prefill over a prefix", "LSE"); section 3 has the
signature. This file adds no maths: it lays every sequence of the batch out as the one-sequence stages expect it and
calls them, generalising only what assumes that the queries are the whole sequence (stage 2's contributing rows).

**Layout** (FlashAttention's varlen): q (total_q, Hq, D) and k, v (total_k, Hkv, D) hold the sequences one after
the other; sequence b owns q[cu_seqlens_q[b] : cu_seqlens_q[b + 1]] and k, v[cu_seqlens_k[b] : cu_seqlens_k[b + 1]].
Its keys are the WHOLE key range of the sequence: the cached prefix followed by this chunk's own keys.

**Positions** of sequence b, with Lq = q_len, Lk = k_len and P = Lk - Lq the cached prefix:

    query row r of the chunk sits at absolute position p = P + r and sees keys 0 .. p   (bottom-right causal)
    key block J covers the absolute positions [J Bs, (J + 1) Bs) of the sequence; N = ceil(Lk / Bs)
    query row r belongs to query block I = p // Bs; the chunk touches I0 = P // Bs .. (Lk - 1) // Bs

Blocks start at each sequence's own offset: none straddles two sequences. A chunk that does not start on a block
boundary has a partial first query block (only the rows it has), and its last one may be partial too.

**The one-sequence view.** Sequence b's chunk is placed at its absolute rows of a query tensor of length Lk,
`q_abs` (1, Lk, Hq, D), whose rows before P are zeros that nothing reads back. With q_abs, k and v all of length Lk,
query block I of the chunk is query block I of a plain prefill, and the stages run unchanged:

1. kbar (1, N, Hkv, D): the cached blocks (`kbar_cache`) followed by `mean_pool_keys` of the keys after them.
2. Score (1, Hq, N, N): `chunk_block_scores`, stage 2 (Eq. 1-2) in which the rows before P contribute nowhere,
   exactly as the padding rows after Lk contribute nowhere in `block_scores`. Rows I < I0 are therefore all 0.
3. mask: `select_blocks` on that square matrix (its rows are independent), with last_dense_blocks counted from the
   end of the WHOLE prompt: applied only to a chunk that ends the prompt (`is_last_chunk`), 0 otherwise. Sinks and
   the window count absolute blocks, as they do there. The rows I < I0 are then cleared: they are not the chunk's.
4. counts, indices: `compact_blocks`, absolute block numbers; the chunk's rows are I0 .. N - 1.
5. out, lse: `block_sparse_attention` on q_abs (the rows I < I0 list nothing and are dropped, as are the zero rows
   before P in block I0), with the mean correction as stage 5 defines it: every pruned J < I (absolute) joins as
   its mean, k_bar being stage 1's kbar.

A chunking on block boundaries therefore reproduces a one-shot `flash_prefill` exactly: every query block of a
chunk holds the same rows, scores the same way and is attended the same way. Across a boundary that is not
block-aligned, the straddled query block is scored once per chunk, each time from the rows that chunk has, and only
the chunk that ends the prompt has dense last blocks: those rows may keep other blocks than a one-shot call would.

Cost: the reference keeps, per sequence, the (Hq, N, N) scores and mask of the whole key range (rows I < I0 being
zeros), and with mean_correction the rows I < I0 fold their means too (discarded): simple rather than lean.

Everything is differentiable, as in the rest of reference/ (cached kbar entries are used as given).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .attention import attention_outputs, block_sparse_attention
from .pooling import compute_dtype, mean_pool_keys
from .scoring import chunk_block_scores
from .selection import compact_blocks, select_blocks
from .validation import (ATTENTION_DTYPES, check_flag, check_heads, check_qkv_tensors, check_same_device,
                         check_selection_params, check_tensor, num_blocks, resolve_scale)


@dataclass
class VarlenStats:
    """What the selection kept, per sequence b of the batch (absolute block numbers; Mc_b = N_b - first_query_block[b]
    query blocks touched by the chunk, N_b = ceil(k_len_b / Bs)):

    first_query_block: list of int, I0_b = (k_len_b - q_len_b) // Bs, the first query block the chunk has rows in.
    counts: list of (Hq, Mc_b) int32; counts[b][h, t] is the number of kept key blocks of query block I0_b + t.
    indices: list of (Hq, Mc_b, N_b) int32; indices[b][h, t, :counts] are those key blocks J (0 <= J <= I0_b + t)
        in ascending order, -1 past counts (as `compact_blocks`).
    density: 0-d float32 tensor, kept causal blocks / causal blocks of the chunk's query blocks (I + 1 for block I,
        a partial block counting as one), over the whole batch and every head (`causal_block_density` for one
        sequence prefilled in one call).
    kbar: list of (k_len_b // Bs, Hkv, D), the pooled keys of every complete key block of sequence b after this
        chunk (float32, float64 for float64 keys): pass it as the next chunk's `kbar_cache`.
    """

    first_query_block: list[int]
    counts: list[torch.Tensor]
    indices: list[torch.Tensor]
    density: torch.Tensor
    kbar: list[torch.Tensor]


def flash_prefill_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    alpha: float = 0.12,
    block_size: int = 128,
    sink_blocks: int = 2,
    window_blocks: int = 4,
    last_dense_blocks: int = 2,
    softmax_scale: float | None = None,
    kbar_cache: Sequence[torch.Tensor | None] | None = None,
    is_last_chunk: bool | Sequence[bool] = True,
    mean_correction: bool = False,
    return_lse: bool = False,
    return_stats: bool = False,
):
    """Block-sparse causal prefill attention with FlashPrefill's selection, on a packed batch of chunks.

    Args:
        q: (total_q, Hq, D); k, v: (total_k, Hkv, D), sequences packed one after the other (module docstring).
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,), 0 first, non-decreasing, last = total_q / total_k;
            1 <= q_len_b <= k_len_b for every sequence b (k holds the cached prefix, then the chunk's keys).
        max_seqlen_q, max_seqlen_k: ints >= the longest q_len / k_len (FlashAttention's arguments; checked only).
        alpha, block_size, sink_blocks, window_blocks, last_dense_blocks, softmax_scale: as `flash_prefill`;
            blocks are counted absolutely, from each sequence's first key.
        kbar_cache: None, or one entry per sequence: None or (n_b, Hkv, D) with the pooled keys of the first n_b
            complete blocks of the cached prefix (n_b <= (k_len_b - q_len_b) // Bs), as `mean_pool_keys` gives
            them (its dtype: float32, float64 for float64 keys); those blocks are not pooled again.
        is_last_chunk: whether the chunk ends the prompt (then its last_dense_blocks query blocks keep every causal
            block); a bool for the batch or one per sequence.
        mean_correction: FlashPrefill V2's Eq. 6 over the pruned blocks J < I (reference/attention.py).
        return_lse: also return lse (Hq, total_q), log of each row's softmax denominator (scale applied), -inf for a
            row that sees no key; float32 (float64 for float64 inputs, the reference's accumulation dtype).
        return_stats: also return a `VarlenStats`.
    Returns:
        out (total_q, Hq, D) in q.dtype [, lse] [, stats].
    """
    scale, lengths, last = check_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                             alpha, block_size, sink_blocks, window_blocks, last_dense_blocks,
                                             softmax_scale, kbar_cache, is_last_chunk, mean_correction, return_lse,
                                             return_stats)
    outs, lses, counts, indices, first_blocks, kbars = [], [], [], [], [], []
    kept = causal = 0
    for b, (q0, k0, q_len, k_len) in enumerate(lengths):
        prefix = k_len - q_len  # P: keys cached before this chunk
        # The one-sequence view: the chunk's rows at their absolute positions, zeros before them (never read back).
        q_seq = q[q0 : q0 + q_len].unsqueeze(0)  # (1, Lq, Hq, D)
        q_abs = torch.cat([q_seq.new_zeros(1, prefix, *q.shape[1:]), q_seq], dim=1)  # (1, Lk, Hq, D)
        k_seq, v_seq = k[k0 : k0 + k_len].unsqueeze(0), v[k0 : k0 + k_len].unsqueeze(0)  # (1, Lk, Hkv, D)
        I0 = prefix // block_size  # the chunk's first (possibly partial) query block

        # 1. kbar of every key block: the cached complete blocks, then the blocks after them pooled here.
        cache = None if kbar_cache is None else kbar_cache[b]
        kbar = pool_keys_after_cache(k_seq, cache, block_size)  # (1, N, Hkv, D)
        # 2. Score rows of the chunk's query blocks, from the rows the chunk has (rows I < I0: all 0).
        scores = chunk_block_scores(q_abs, kbar, block_size, scale, first_row=prefix)  # (1, Hq, N, N)
        # 3. Threshold and safety net in absolute blocks; the dense last blocks only where the prompt ends.
        mask = select_blocks(scores, alpha, sink_blocks, window_blocks, last_dense_blocks if last[b] else 0)
        mask[:, :, :I0] = False  # rows before the chunk are not attended (the chunk has no row there)
        # 4. Ascending lists of kept key blocks, absolute numbering.
        seq_counts, seq_indices = compact_blocks(mask)  # (1, Hq, N), (1, Hq, N, N)
        # 5. Block-sparse attention of the chunk's rows (bottom-right causal through the absolute positions).
        out, lse = block_sparse_attention(q_abs, k_seq, v_seq, seq_counts, seq_indices, block_size, scale,
                                          mean_correction=mean_correction,
                                          key_means=kbar if mean_correction else None, return_lse=True)
        outs.append(out[0, prefix:])  # (Lq, Hq, D)
        lses.append(lse[0, :, prefix:])  # (Hq, Lq)

        first_blocks.append(I0)
        counts.append(seq_counts[0, :, I0:])  # (Hq, Mc)
        indices.append(seq_indices[0, :, I0:])  # (Hq, Mc, N)
        kbars.append(kbar[0, : k_len // block_size])  # the complete blocks: the next chunk's cache
        N = num_blocks(k_len, block_size)
        kept = kept + seq_counts.sum(dtype=torch.float64)
        causal += q.shape[1] * (N * (N + 1) - I0 * (I0 + 1)) // 2  # Hq * sum of (I + 1) over I = I0 .. N - 1

    stats = VarlenStats(first_blocks, counts, indices, kept.div(causal).float(), kbars) if return_stats else None
    return attention_outputs(torch.cat(outs, dim=0),  # (total_q, Hq, D) in q.dtype
                             torch.cat(lses, dim=1) if return_lse else None, stats)  # lse (Hq, total_q)


def pool_keys_after_cache(k_seq: torch.Tensor, cache: torch.Tensor | None, block_size: int) -> torch.Tensor:
    """Stage 1 for one sequence: kbar (1, N, Hkv, D) of k_seq (1, Lk, Hkv, D), the first n blocks taken from
    `cache` (n, Hkv, D) and the others pooled by `mean_pool_keys` (a partial last block over the keys it has).
    The cache ends on a block boundary, so the blocks after it are pooled exactly as in one call on k_seq."""
    n = 0 if cache is None else cache.shape[0]
    pooled = mean_pool_keys(k_seq[:, n * block_size :], block_size)  # (1, N - n, Hkv, D)
    if n == 0:
        return pooled
    return torch.cat([cache.unsqueeze(0), pooled], dim=1)


# --------------------------------------------------------------------------------------------------------------
# Input checks (docs/DESIGN.md section 3: TypeError / ValueError naming the argument)
# --------------------------------------------------------------------------------------------------------------
def check_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alpha, block_size,
                      sink_blocks, window_blocks, last_dense_blocks, softmax_scale, kbar_cache, is_last_chunk,
                      mean_correction, return_lse, return_stats, read_lengths: bool = True, **qkv_checks):
    """Validate every argument of `flash_prefill_varlen`. Returns (scale, lengths, last): lengths holds
    (q start, k start, q_len, k_len) per sequence, last one bool per sequence (is_last_chunk).

    read_lengths=False (triton_impl's validate=False): only what the host knows without reading a device value
    (types, shapes, dtypes, devices, max_seqlen >= 1, kbar_cache entries' shapes); lengths is then None.
    qkv_checks: dtypes and head_dims q, k, v may have (triton_impl narrows them, as for flash_prefill)."""
    check_varlen_qkv(q, k, v, **qkv_checks)
    for name, flag in (("mean_correction", mean_correction), ("return_lse", return_lse),
                       ("return_stats", return_stats)):
        check_flag(name, flag)
    check_selection_params(alpha, sink_blocks, window_blocks, last_dense_blocks, block_size)
    scale = resolve_scale(softmax_scale, q.shape[-1])
    if not read_lengths:
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            check_cu_seqlens_layout(name, cu, q)
        check_same_batch(cu_seqlens_q.shape[0] - 1, cu_seqlens_k.shape[0] - 1)
        check_max_seqlen("max_seqlen_q", max_seqlen_q, "cu_seqlens_q", 1)
        check_max_seqlen("max_seqlen_k", max_seqlen_k, "cu_seqlens_k", 1)
        check_kbar_cache(kbar_cache, k, None, block_size, batch=cu_seqlens_q.shape[0] - 1)
        return scale, None, check_is_last_chunk(is_last_chunk, cu_seqlens_q.shape[0] - 1)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_cu_seqlens_layout(name, cu, q)
    values = torch.cat([cu_seqlens_q, cu_seqlens_k]).tolist()  # both read at once: one host synchronisation
    starts_q, lens_q = check_cu_seqlens("cu_seqlens_q", values[: cu_seqlens_q.shape[0]], q.shape[0], "total_q")
    starts_k, lens_k = check_cu_seqlens("cu_seqlens_k", values[cu_seqlens_q.shape[0] :], k.shape[0], "total_k")
    check_same_batch(len(lens_q), len(lens_k))
    for b, (q_len, k_len) in enumerate(zip(lens_q, lens_k)):
        if q_len == 0:
            raise ValueError(f"cu_seqlens_q gives sequence {b} an empty chunk (q_len 0): every sequence of the batch "
                             f"needs at least one query row (leave finished sequences out of the batch)")
        if q_len > k_len:
            raise ValueError(f"sequence {b} has q_len {q_len} > k_len {k_len} (cu_seqlens_q, cu_seqlens_k): k and v "
                             f"must hold the whole key range, the cached prefix followed by the chunk's own keys")
    check_max_seqlen("max_seqlen_q", max_seqlen_q, "cu_seqlens_q", max(lens_q))
    check_max_seqlen("max_seqlen_k", max_seqlen_k, "cu_seqlens_k", max(lens_k))
    check_kbar_cache(kbar_cache, k, [k_len - q_len for q_len, k_len in zip(lens_q, lens_k)], block_size,
                     batch=len(lens_q))
    last = check_is_last_chunk(is_last_chunk, len(lens_q))
    return scale, list(zip(starts_q, starts_k, lens_q, lens_k)), last


def check_varlen_qkv(q, k, v, *, dtypes=ATTENTION_DTYPES, head_dims=None) -> None:
    """q (total_q, Hq, D), k and v (total_k, Hkv, D): one dtype of `dtypes`, one device, one head dim (of
    `head_dims` when given), Hkv dividing Hq."""
    check_qkv_tensors(q, k, v, ndim=3, kv_layout="(total_k, Hkv, D)", dtypes=dtypes)
    check_heads(q.shape[1], k.shape[1], q.shape[2], k.shape[2], head_dims)


def check_same_batch(batch_q: int, batch_k: int) -> None:
    if batch_q != batch_k:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got "
                         f"{batch_q + 1} and {batch_k + 1}")


def check_cu_seqlens_layout(name: str, cu, q) -> None:
    """cu int32 (batch + 1,) with batch >= 1, on q's device (nothing read from the device)."""
    check_tensor(name, cu, ndim=1, dtypes=(torch.int32,))
    check_same_device(q=q, **{name: cu})
    if cu.shape[0] < 2:
        raise ValueError(f"{name} must have length batch + 1 >= 2, got shape {tuple(cu.shape)}")


def check_cu_seqlens(name: str, values: list[int], total: int, total_name: str) -> tuple[list[int], list[int]]:
    """The values of a cu_seqlens that passed `check_cu_seqlens_layout`: 0 first, non-decreasing, last = total (the
    rows of q or of k). Returns (start, length) of every sequence."""
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    for b in range(len(values) - 1):
        if values[b + 1] < values[b]:
            raise ValueError(f"{name} must be non-decreasing, got {values[b + 1]} after {values[b]} "
                             f"(entries {b} and {b + 1})")
    if values[-1] != total:
        raise ValueError(f"{name} must end at {total_name} = {total} (the rows of "
                         f"{'q' if total_name == 'total_q' else 'k and v'}), got {values[-1]}")
    return values[:-1], [b - a for a, b in zip(values[:-1], values[1:])]


def check_max_seqlen(name: str, value, cu_name: str, longest: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < longest:
        raise ValueError(f"{name} must be >= the longest sequence of {cu_name} ({longest}), got {value}")


def check_kbar_cache(kbar_cache, k, prefixes: list[int] | None, block_size: int, batch: int) -> None:
    """None, or a list/tuple with one entry per sequence: None or (n_b, Hkv, D) in mean_pool_keys' dtype for k,
    on k's device, n_b <= the complete blocks of the cached prefix (prefix_b // Bs; unchecked without prefixes)."""
    if kbar_cache is None:
        return
    if not isinstance(kbar_cache, (list, tuple)):
        raise TypeError(f"kbar_cache must be None or a list with one entry per sequence, got "
                        f"{type(kbar_cache).__name__}")
    if len(kbar_cache) != batch:
        raise ValueError(f"kbar_cache must have one entry per sequence ({batch}), got {len(kbar_cache)}")
    _, Hkv, D = k.shape
    dtype = compute_dtype(k)
    for b, entry in enumerate(kbar_cache):
        name = f"kbar_cache[{b}]"
        if entry is None:
            continue
        if not isinstance(entry, torch.Tensor):
            raise TypeError(f"{name} must be None or a torch.Tensor, got {type(entry).__name__}")
        if entry.dim() != 3 or tuple(entry.shape[1:]) != (Hkv, D):
            raise ValueError(f"{name} must have shape (n, Hkv={Hkv}, D={D}), got {tuple(entry.shape)}")
        if entry.dtype != dtype:
            raise TypeError(f"{name} has dtype {entry.dtype}; expected {dtype} (mean_pool_keys' dtype for keys of "
                            f"dtype {k.dtype})")
        check_same_device(k=k, **{name: entry})
        if prefixes is not None and entry.shape[0] > prefixes[b] // block_size:
            prefix = prefixes[b]
            raise ValueError(f"{name} holds {entry.shape[0]} blocks, but sequence {b}'s cached prefix (k_len - q_len "
                             f"= {prefix} keys) has only {prefix // block_size} complete blocks of {block_size}")


def check_is_last_chunk(is_last_chunk, batch: int) -> list[bool]:
    """A bool for the whole batch, or a list/tuple of one bool per sequence."""
    if isinstance(is_last_chunk, (list, tuple)):
        if len(is_last_chunk) != batch:
            raise ValueError(f"is_last_chunk must be a bool or one bool per sequence ({batch}), got "
                             f"{len(is_last_chunk)} values")
        for b, flag in enumerate(is_last_chunk):
            check_flag(f"is_last_chunk[{b}]", flag)
        return list(is_last_chunk)
    return [check_flag("is_last_chunk", is_last_chunk)] * batch
