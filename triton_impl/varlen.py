"""FlashPrefill for serving-style calls in Triton: packed variable-length batches and chunked prefill over a cached
prefix (twin of reference/varlen.py, whose docstring has the layout, the positions and the one-sequence view).

The same launches per chunk of query-block rows as `flash_prefill` (pool, score + select + compact, attend),
each kernel running in its VARLEN mode (`common.VarlenLayout`): a program reads its sequence's bounds from
cu_seqlens (`common.sequence_span`) and works at absolute positions, so nothing is copied into a one-sequence view.

* Grid: FlashAttention's. Row t of sequence b is its query block I0_b + t; the launches cover
  rows = ceil(max_seqlen_q / Bs) + 1 rows per sequence (a chunk's first block may be partial), key blocks up to
  ceil(max_seqlen_k / Bs). Programs past a sequence's last block return at once. The host never reads cu_seqlens
  (with validate=False): the selection and the attention run without a host synchronisation.
* kbar: float32 (batch, key_blocks, Hkv, D), padded per sequence. Blocks given by kbar_cache are copied in and not
  pooled again; the score kernel's (hi, lo) pair is made from it by `split_kbar`, whether a block was cached or
  pooled here, so a chunked prefill sees the same kbar as a one-shot varlen call.
* Lists: counts (batch, Hq, rows), per chunk of rows the lists (batch, Hq, rows in chunk, key_blocks), absolute
  block ids; `max_selection_bytes` bounds scores + lists of a chunk of rows, as in `flash_prefill`.
* Attention: the physical walk over those lists; rows before the chunk's first position are neither loaded nor
  stored. K/V tiles come by TMA over the packed (total_k, Hkv * D) view, the diagonal tile zeroing what belongs to
  the next sequence.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from reference.attention import attention_outputs
from reference.validation import check_count
from reference.varlen import VarlenStats, check_varlen_args

from .attention import PHYSICAL, launch_attention
from .common import (HEAD_DIMS, KERNEL_DTYPES, VarlenLayout, check_kernel_block_size, check_kernel_runs_on,
                     new_output)
from .flash_prefill import MAX_SELECTION_BYTES, query_block_chunks
from .pooling import launch_mean_pool
from .scoring import launch_scores_and_select, split_kbar


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
    validate: bool = True,
    max_selection_bytes: int = MAX_SELECTION_BYTES,
):
    """Block-sparse causal prefill attention with FlashPrefill's selection, on a packed batch of chunks. Same
    contract as the reference (q (total_q, Hq, D), k, v (total_k, Hkv, D), int32 cu_seqlens; returns out [, lse
    (Hq, total_q) float32] [, VarlenStats]), plus:

    validate: True (default) reads cu_seqlens once (one host synchronisation) and refuses bad lengths with the
        reference's errors. False trusts them, as FlashAttention does, for a serving loop: no host synchronisation
        (without return_stats), the grid sized from max_seqlen_q / max_seqlen_k. The kernels clamp what they read
        to each sequence's rows, so bad lengths then give wrong rows, never a read outside q, k, v; rows of a
        sequence longer than max_seqlen_q are not computed.
    max_selection_bytes: the budget of scores + lists of one chunk of query-block rows (as `flash_prefill`).

    kbar_cache entries and VarlenStats.kbar are float32 (mean_pool_keys' dtype for fp16/bf16 keys)."""
    scale, lengths, last = check_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                             alpha, block_size, sink_blocks, window_blocks, last_dense_blocks,
                                             softmax_scale, kbar_cache, is_last_chunk, mean_correction, return_lse,
                                             return_stats, read_lengths=validate is True, dtypes=KERNEL_DTYPES,
                                             head_dims=HEAD_DIMS)
    check_kernel_args(q, k, v, block_size, validate, max_selection_bytes)
    layout = varlen_layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_size, kbar_cache,
                           [last_dense_blocks if flag else 0 for flag in last])
    Hq, D = q.shape[1], q.shape[2]

    # 1. kbar of every key block (float32): the cached blocks copied in, the others pooled; the scaled (hi, lo)
    #    pair for the score kernel, and with mean correction the values' means (hi is the attention's k_bar).
    kbar = new_output(layout.batch, layout.key_blocks, k.shape[1], D, dtype=torch.float32, device=q.device)
    for b, entry in enumerate(kbar_cache or ()):
        if entry is not None and entry.shape[0] > 0:
            kbar[b, : entry.shape[0]] = entry
    launch_mean_pool(k, block_size, varlen=layout, out=kbar)
    kbar_parts = split_kbar(kbar, scale, q.dtype)
    means = None
    if mean_correction:
        every_block = dataclasses.replace(layout, first_pooled=torch.zeros_like(layout.first_pooled))
        means = (kbar_parts[0], launch_mean_pool(v, block_size, out_dtype=q.dtype, varlen=every_block))

    counts = torch.zeros(layout.batch, Hq, layout.rows, dtype=torch.int32, device=q.device)  # 0 past a sequence
    out = new_output(*q.shape, dtype=q.dtype, device=q.device)
    lse = new_output(Hq, q.shape[0], dtype=torch.float32, device=q.device) if return_lse else None
    all_indices = (torch.full((layout.batch, Hq, layout.rows, layout.key_blocks), -1, dtype=torch.int32,
                              device=q.device) if return_stats else None)
    for rows in query_block_chunks(layout.batch, Hq, layout.key_blocks, max_selection_bytes, rows=layout.rows):
        _, indices = launch_scores_and_select(q, kbar_parts, block_size, alpha, sink_blocks, window_blocks,
                                              last_dense_blocks, rows=rows, counts=counts, pad_lists=return_stats,
                                              varlen=layout)  # 2-4. Eq. 1-3 in one launch, absolute block ids
        launch_attention(q, k, v, block_size, scale, PHYSICAL, counts=counts, indices=indices, rows=rows, out=out,
                         means=means, return_lse=return_lse, lse=lse, varlen=layout)  # 5. physical skip
        if all_indices is not None:
            all_indices[:, :, rows[0]:rows[1]] = indices
        del indices
    stats = varlen_stats(layout, lengths, counts, all_indices, kbar) if return_stats else None
    return attention_outputs(out, lse, stats)


def check_kernel_args(q, k, v, block_size, validate, max_selection_bytes) -> None:
    """What the kernels add to the reference's checks (which took the kernels' dtypes and head dims): the block
    sizes they are built for, the device and its dtypes, no autograd; validate a bool; the selection budget."""
    check_kernel_block_size(block_size)
    check_kernel_runs_on(q, k, v)
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be a bool, got {type(validate).__name__}")
    check_count("max_selection_bytes", max_selection_bytes, minimum=1)


def device_ints(values: list[int], device: torch.device) -> torch.Tensor:
    """int32 tensor of host values on `device`, through pinned memory (an asynchronous copy: no host sync)."""
    host = torch.tensor(values, dtype=torch.int32)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def varlen_layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_size, kbar_cache,
                  last_dense: list[int]) -> VarlenLayout:
    """The kernels' view of the batch, from host values only (shapes, the max_seqlen ints, kbar_cache's shapes)."""
    batch = cu_seqlens_q.shape[0] - 1
    key_blocks = -(-max_seqlen_k // block_size)
    cached = [0 if entry is None else entry.shape[0] for entry in (kbar_cache or [None] * batch)]
    return VarlenLayout(
        cu_q=cu_seqlens_q, cu_k=cu_seqlens_k, batch=batch, total_q=q.shape[0], total_k=k.shape[0],
        block_size=block_size, rows=min(-(-max_seqlen_q // block_size) + 1, key_blocks), key_blocks=key_blocks,
        first_pooled=device_ints(cached, q.device), last_dense=device_ints(last_dense, q.device),
    )


def varlen_stats(layout: VarlenLayout, lengths, counts, all_indices, kbar) -> VarlenStats:
    """The reference's VarlenStats from the padded per-row buffers (reads the lengths: one host sync when the call
    did not validate)."""
    if lengths is None:
        values = torch.cat([layout.cu_q, layout.cu_k]).tolist()  # one host synchronisation
        starts_q, starts_k = values[: layout.batch + 1], values[layout.batch + 1 :]
        lengths = [(starts_q[b], starts_k[b], starts_q[b + 1] - starts_q[b], starts_k[b + 1] - starts_k[b])
                   for b in range(layout.batch)]
    Bs, Hq = layout.block_size, counts.shape[1]
    first_blocks, seq_counts, seq_indices, kbars = [], [], [], []
    kept, causal = counts.sum(dtype=torch.float64), 0
    for b, (_, _, q_len, k_len) in enumerate(lengths):
        I0, N = (k_len - q_len) // Bs, -(-k_len // Bs)
        first_blocks.append(I0)
        seq_counts.append(counts[b, :, : N - I0])  # (Hq, Mc)
        seq_indices.append(all_indices[b, :, : N - I0, :N])  # (Hq, Mc, N), -1 past counts
        kbars.append(kbar[b, : k_len // Bs])  # the complete blocks: the next chunk's kbar_cache
        causal += Hq * (N * (N + 1) - I0 * (I0 + 1)) // 2
    return VarlenStats(first_blocks, seq_counts, seq_indices, kept.div(causal).float(), kbars)
