"""Stages 3-4 in Triton: dynamic thresholding (paper Eq. 3) and compaction (twin of reference/selection.py).

Sort-free and compile-free. Every kernel runs one program per (query block I, batch b, query head h) row:

* `select_blocks`  pass 1 reduces the row max m_I over the causal blocks J <= I, pass 2 writes
                   keep = J <= I and (NOT(Score < alpha * m_I) or forced);
* `compact_blocks` walks the mask row in tiles, turns the keep bits into list slots with a prefix sum
                   (tl.cumsum) plus a running offset, scatters J into indices[slot], and writes -1 past count;
* `select_and_compact` (used by `flash_prefill`) does both in one program: row max, threshold, prefix sum,
                   list. The (B, Hq, M, N) mask is never written.

NaN: a NaN score in the causal part of a row makes m_I NaN and keeps every causal block of the row (the reference's
contract, reference/selection.py). The kernels track "this row has a NaN" explicitly instead of relying on
tl.maximum, which propagates NaN under the interpreter and drops it on the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from reference.validation import check_mask, check_scores, check_selection_params

from .common import (VarlenLayout, check_inference_only, check_kernel_device, launch, needs_wide_offsets, new_output,
                     sequence_span, widen)

TILE_N = 128  # key blocks per tile of a row


@triton.jit
def _row_ids(HQ, WIDE: tl.constexpr):
    """(query block I, batch b, head h) of this program; 64-bit when Hq x M x N passes 2^31 (1M tokens)."""
    bh = widen(tl.program_id(1), WIDE)
    return widen(tl.program_id(0), WIDE), bh // HQ, bh % HQ


@triton.jit
def _row_max(row, I, TILE: tl.constexpr):
    """m_I = max over J <= I of Score_IJ, NaN if one of them is NaN. Nothing above the diagonal is read."""
    best = tl.full([TILE], float("-inf"), dtype=tl.float32)
    has_nan = tl.zeros([TILE], dtype=tl.int32)
    for j0 in range(0, I + 1, TILE):
        J = j0 + tl.arange(0, TILE)
        score = tl.load(row + J, mask=J <= I, other=float("-inf"))
        is_nan = score != score
        has_nan = tl.maximum(has_nan, is_nan.to(tl.int32))
        best = tl.maximum(best, tl.where(is_nan, float("-inf"), score))
    return tl.where(tl.max(has_nan, axis=0) > 0, float("nan"), tl.max(best, axis=0))


@triton.jit
def _keep(score, J, I, M, threshold, sink_blocks, window_blocks, last_dense_blocks):
    """Keep bits of the key blocks J of row I of M query blocks, given their scores: causal and (not below
    alpha * m_I, or a sink, window or dense row). "Not below" rather than ">=": a NaN score or a NaN threshold keeps
    the block."""
    forced = (J < sink_blocks) | (I - J < window_blocks) | (I >= M - last_dense_blocks)
    below = score < threshold
    return (J <= I) & ((below == 0) | forced)


@triton.jit
def _keep_tile(row, J, I, M, threshold, sink_blocks, window_blocks, last_dense_blocks):
    """`_keep` on the scores stored in row."""
    score = tl.load(row + J, mask=J <= I, other=0.0)
    return _keep(score, J, I, M, threshold, sink_blocks, window_blocks, last_dense_blocks)


@triton.jit
def _append_kept(list_row, J, keep, count):
    """Write the kept J of one tile at list slots count, count + 1, ...; return the new count."""
    keep_i = keep.to(tl.int32)
    slot = count + tl.cumsum(keep_i, axis=0) - 1
    tl.store(list_row + slot, J, mask=keep)
    return count + tl.sum(keep_i, axis=0)


@triton.jit
def _pad_list(list_row, count, M, TILE: tl.constexpr):
    """Write -1 into list slots count .. M - 1 (as the reference does): no stale block id is left behind."""
    for j0 in range(count - count % TILE, M, TILE):
        slot = j0 + tl.arange(0, TILE)
        tl.store(list_row + slot, -1, mask=(slot >= count) & (slot < M))


@triton.jit
def _select_kernel(
    SCORES, MASK, stride_sb, stride_sh, stride_sm, stride_mb, stride_mh, stride_mm,
    M, HQ, alpha, sink_blocks, window_blocks, last_dense_blocks, TILE: tl.constexpr, WIDE: tl.constexpr,
):
    I, b, h = _row_ids(HQ, WIDE)
    row = SCORES + b * stride_sb + h * stride_sh + I * stride_sm
    mask_row = MASK + b * stride_mb + h * stride_mh + I * stride_mm
    threshold = alpha * _row_max(row, I, TILE)
    for j0 in range(0, M, TILE):
        J = j0 + tl.arange(0, TILE)
        keep = _keep_tile(row, J, I, M, threshold, sink_blocks, window_blocks, last_dense_blocks)
        tl.store(mask_row + J, keep.to(tl.int8), mask=J < M)


@triton.jit
def _compact_kernel(
    MASK, COUNTS, INDICES, stride_mb, stride_mh, stride_mm, stride_ib, stride_ih, stride_im,
    M, HQ, TILE: tl.constexpr, WIDE: tl.constexpr,
):
    I, b, h = _row_ids(HQ, WIDE)
    mask_row = MASK + b * stride_mb + h * stride_mh + I * stride_mm
    list_row = INDICES + b * stride_ib + h * stride_ih + I * stride_im
    count = tl.zeros([], dtype=tl.int32)
    for j0 in range(0, M, TILE):
        J = j0 + tl.arange(0, TILE)
        keep = tl.load(mask_row + J, mask=J < M, other=0) != 0
        count = _append_kept(list_row, J, keep, count)
    _pad_list(list_row, count, M, TILE)
    tl.store(COUNTS + (b * HQ + h) * M + I, count)


@triton.jit
def _select_compact_kernel(
    SCORES, COUNTS, INDICES, CU_Q, CU_K, LAST_DENSE, stride_sb, stride_sh, stride_sm, stride_ib, stride_ih, stride_im,
    M, ROWS, HQ, alpha, sink_blocks, window_blocks, last_dense_blocks, ROW0, total_q, total_k,
    TILE: tl.constexpr, WIDE: tl.constexpr, PAD_LISTS: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # Rows ROW0, ROW0 + 1, ... of the (B, Hq, ROWS, M) problem live in rows 0, 1, ... of SCORES and INDICES
    # (flash_prefill's chunks of query blocks); COUNTS is the whole (B, Hq, ROWS). Row t is query block t, or
    # VARLEN query block I0 + t of sequence b (none past its N blocks; its own last_dense_blocks).
    local = widen(tl.program_id(0), WIDE)
    bh = widen(tl.program_id(1), WIDE)
    t, b, h = ROW0 + local, bh // HQ, bh % HQ
    if VARLEN:
        _, _, _, _, I0, N = sequence_span(CU_Q, CU_K, b, total_q, total_k, BLOCK_SIZE, WIDE)
        I = I0 + t
        if I >= N:
            return
        last_dense_blocks = tl.load(LAST_DENSE + b)
    else:
        I, N = t, M
    row = SCORES + b * stride_sb + h * stride_sh + local * stride_sm
    list_row = INDICES + b * stride_ib + h * stride_ih + local * stride_im
    threshold = alpha * _row_max(row, I, TILE)
    count = tl.zeros([], dtype=tl.int32)
    for j0 in range(0, I + 1, TILE):  # nothing above the diagonal is ever kept
        J = j0 + tl.arange(0, TILE)
        keep = _keep_tile(row, J, I, N, threshold, sink_blocks, window_blocks, last_dense_blocks)
        count = _append_kept(list_row, J, keep, count)
    if PAD_LISTS:  # lists a user sees; the attention kernel reads only the first count slots
        _pad_list(list_row, count, M, TILE)
    tl.store(COUNTS + (b * HQ + h) * ROWS + t, count)


def _check_selection_args(scores, alpha, sink_blocks, window_blocks, last_dense_blocks):
    check_scores(scores)
    check_kernel_device(scores=scores)
    check_inference_only(scores=scores)
    return check_selection_params(alpha, sink_blocks, window_blocks, last_dense_blocks), scores.float().contiguous()


def select_blocks(scores: torch.Tensor, alpha: float = 0.12, sink_blocks: int = 2, window_blocks: int = 4,
                  last_dense_blocks: int = 2) -> torch.Tensor:
    """mask (B, Hq, M, N) bool of the kept blocks. Same contract as the reference."""
    alpha, scores = _check_selection_args(scores, alpha, sink_blocks, window_blocks, last_dense_blocks)
    B, Hq, M, _ = scores.shape
    mask = new_output(B, Hq, M, M, dtype=torch.bool, device=scores.device)
    launch(_select_kernel, (M, B * Hq),
        scores, mask.view(torch.int8), *scores.stride()[:3], *mask.stride()[:3],
        M, Hq, alpha, sink_blocks, window_blocks, last_dense_blocks, TILE=TILE_N,
        WIDE=needs_wide_offsets(scores, mask),
    )
    return mask


def compact_blocks(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """counts (B, Hq, M) int32 and ascending lists indices (B, Hq, M, N) int32, -1 past counts."""
    check_mask(mask)
    check_kernel_device(mask=mask)
    mask = mask.contiguous()
    B, Hq, M, _ = mask.shape
    counts = new_output(B, Hq, M, dtype=torch.int32, device=mask.device)
    indices = new_output(B, Hq, M, M, dtype=torch.int32, device=mask.device)
    launch(_compact_kernel, (M, B * Hq),
        mask.view(torch.int8), counts, indices, *mask.stride()[:3], *indices.stride()[:3], M, Hq, TILE=TILE_N,
        WIDE=needs_wide_offsets(mask, indices),
    )
    return counts, indices


def select_and_compact(scores: torch.Tensor, alpha: float = 0.12, sink_blocks: int = 2, window_blocks: int = 4,
                       last_dense_blocks: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """compact_blocks(select_blocks(scores, ...)) in one kernel, without writing the mask."""
    alpha, scores = _check_selection_args(scores, alpha, sink_blocks, window_blocks, last_dense_blocks)
    return launch_select_and_compact(scores, alpha, sink_blocks, window_blocks, last_dense_blocks)


def launch_select_and_compact(scores, alpha, sink_blocks, window_blocks, last_dense_blocks, *, row0: int = 0,
                              counts: torch.Tensor | None = None, pad_lists: bool = True,
                              varlen: VarlenLayout | None = None):
    """`select_and_compact` without the input checks; scores must be contiguous float32.

    scores may hold only query blocks row0 .. row0 + scores.shape[2] - 1 (flash_prefill's chunks): their lists
    come back in a buffer of the same shape, their counts go into `counts` (B, Hq, M), allocated when None.
    pad_lists=False leaves the slots past counts unwritten (flash_prefill's attention never reads them): it saves
    writing the rest of every list, up to the whole int32 (B, Hq, rows, M) buffer.

    varlen: scores are `launch_block_scores`' varlen rows (batch, Hq, rows, key_blocks), row t of sequence b its
    query block I0_b + t; counts (batch, Hq, varlen.rows); each sequence gets its own last_dense_blocks (the
    layout's, which replace the argument) and its own number of blocks. Rows past a sequence's last block are not
    written (neither list nor count)."""
    B, Hq, rows, M = scores.shape  # M = N: the full number of blocks (varlen: of the longest sequence)
    count_rows = varlen.rows if varlen is not None else M
    if counts is None:
        counts = new_output(B, Hq, count_rows, dtype=torch.int32, device=scores.device)
    indices = new_output(B, Hq, rows, M, dtype=torch.int32, device=scores.device)
    cu_q, cu_k, last = (varlen.cu_q, varlen.cu_k, varlen.last_dense) if varlen is not None else (counts,) * 3
    launch(_select_compact_kernel, (rows, B * Hq),
        scores, counts, indices, cu_q, cu_k, last, *scores.stride()[:3], *indices.stride()[:3],
        M, count_rows, Hq, alpha, sink_blocks, window_blocks, last_dense_blocks, row0,
        *((varlen.total_q, varlen.total_k) if varlen is not None else (0, 0)), TILE=TILE_N,
        WIDE=needs_wide_offsets(scores, indices), PAD_LISTS=pad_lists, VARLEN=varlen is not None,
        BLOCK_SIZE=varlen.block_size if varlen is not None else 1,
    )
    return counts, indices
