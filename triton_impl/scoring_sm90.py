"""Stages 2-4 for Hopper in Gluon: `scoring._block_scores_kernel` with its tile loads issued ahead by TMA.

The Triton kernel's score tile is latency-bound (repro/NOTES.md, sessions 14-15): each tile loads its hi / lo pooled
keys through registers into shared memory, runs the two wgmma, waits for them and reduces, one step after the other,
and only the other CTAs of the SM hide the chain. This kernel is the same program written in Gluon, where the copies
are explicit:

  * q and the row's hi / lo tiles arrive by TMA (no trip through registers); each tile's copies are issued as soon
    as the previous tile's dots have read its ring slot, so they land while that tile is reduced;
  * one ring slot (64 KiB of shared memory with q at D = 128, 151-168 registers): three CTAs per SM. A second slot, or
    the next tile's dots issued before this tile's reductions (FlashAttention-3's overlap, two accumulators live),
    cost a CTA per SM and measured slower (repro/NOTES.md, session 15).

Everything else is the Triton kernel's arithmetic in the same order and layouts (hi dot first, lo accumulated onto
it; the same reductions; the same selection), so the two kernels give the same scores and lists bit for bit;
tests/test_scoring_sm90.py checks that on the GPU.

Covers flash_prefill's standard path: fp16 / bf16 q, head dim 64 or 128, block size 128, one padded batch (not
varlen), 32-bit offsets. `scoring._launch` takes it for those on an sm_90 GPU from SM90_MIN_LENGTH tokens on (below
that its launch, three TMA descriptors through `kernel[grid]`, costs more host time than the kernel saves) and the
Triton kernel otherwise.
"""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from reference.scoring import SCORE_EPS

from .common import interpreting

# The CTA-wide barrier (bar.sync): `gl.thread_barrier` in Triton 3.6, `gl.barrier` from 3.8 on.
_cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier

SM90_CONFIG = dict(BLOCK_N=64, STAGES=1, num_warps=4)  # measured on an H200: repro/NOTES.md, session 15
SM90_MIN_LENGTH = 32768


def sm90_available(device: torch.device) -> bool:
    """A Hopper (sm_90) GPU, where the kernel's wgmma and TMA exist, and no Triton interpreter."""
    if device.type != "cuda" or interpreting():
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) == (9, 0)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@gluon.jit
def _issue_load(desc, smem, ready, t, kbar_row0, kv_col, pred, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """TMA copy of tile t's hi or lo pooled keys into ring slot t % STAGES (only where pred)."""
    slot = t % STAGES
    bar = ready.index(slot)
    mbarrier.expect(bar, desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(desc, [kbar_row0 + t * BLOCK_N, kv_col], bar, smem.index(slot), pred=pred)


@gluon.jit
def _tile_logits(hi_smem, lo_smem, ready_hi, ready_lo, q_t, zero, t, STAGES: gl.constexpr):
    """s = hi . q^T + lo . q^T of tile t (pooled keys x queries, base 2), once its copies have landed; the Triton
    kernel's order: lo accumulated onto hi."""
    slot = t % STAGES
    phase = (t // STAGES) & 1
    mbarrier.wait(ready_hi.index(slot), phase)
    acc = warpgroup_mma(hi_smem.index(slot), q_t, zero, use_acc=False, is_async=True)
    mbarrier.wait(ready_lo.index(slot), phase)
    acc = warpgroup_mma(lo_smem.index(slot), q_t, acc, is_async=True)
    return warpgroup_mma_wait(0, deps=[acc])


@gluon.jit
def _normalised(row, key_blocks, I, safe_max, denom, EPS: gl.constexpr):
    """scoring._normalised: Score_IJ = 2^(u_IJ - M_I) / (Z_I + eps); exactly 0 for J > I."""
    causal = key_blocks <= I
    u = gl.load(row + key_blocks, mask=causal, other=float("-inf"))
    return gl.where(causal, gl.exp2(u - safe_max) / (denom + EPS), 0.0)


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _block_scores_sm90_kernel(
    Q, q_desc, hi_desc, lo_desc, SCORES, COUNTS, INDICES,
    stride_qb, stride_ql, stride_qh,
    stride_sb, stride_sh, stride_sm,
    stride_ib, stride_ih, stride_im,
    L, N, HQ, GROUP, ROW0,
    alpha, sink_blocks, window_blocks, last_dense_blocks,
    BLOCK_SIZE: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr, EPS: gl.constexpr,
    SELECT: gl.constexpr, PAD_LISTS: gl.constexpr, Q_TMA: gl.constexpr, num_warps: gl.constexpr,
):
    BLOCK_M: gl.constexpr = BLOCK_SIZE
    # The Triton kernel's layouts: the wgmma accumulator (pooled keys x queries), a row-major tile for q's load,
    # one lane per key block for the selection passes.
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    q_load: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [num_warps, 1], [1, 0])
    lanes: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    keys_of_tile: gl.constexpr = gl.SliceLayout(1, mma)
    queries_of_tile: gl.constexpr = gl.SliceLayout(0, mma)

    bh = gl.program_id(0)  # heads vary fastest: a GQA group shares kbar in L2
    local = gl.num_programs(1) - 1 - gl.program_id(1)  # longest rows first
    b = bh // HQ
    h = bh % HQ
    I = ROW0 + local
    q_base = Q + b * stride_qb + h * stride_qh
    row = SCORES + b * stride_sb + h * stride_sh + local * stride_sm
    kbar_row0 = b * N  # the descriptors view kbar (B, N, Hkv, D) as (B N, Hkv D)
    kv_col = (h // GROUP) * D
    num_tiles = gl.cdiv(I + 1, BLOCK_N)
    block_is_full = (I + 1) * BLOCK_SIZE <= L
    unmasked_end = gl.where(block_is_full, (I // BLOCK_N) * BLOCK_N, 0)

    # q and a ring of STAGES hi / lo tiles in shared memory, filled by TMA; q's copy and the first tiles' go out
    # together.
    hi_smem = gl.allocate_shared_memory(hi_desc.dtype, [STAGES, BLOCK_N, D], hi_desc.layout)
    lo_smem = gl.allocate_shared_memory(lo_desc.dtype, [STAGES, BLOCK_N, D], lo_desc.layout)
    ready_hi = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ready_lo = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready_hi.index(i), count=1)
        mbarrier.init(ready_lo.index(i), count=1)
    if Q_TMA:
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        q_smem = gl.allocate_shared_memory(q_desc.dtype, [BLOCK_M, D], q_desc.layout)
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b * L + I * BLOCK_SIZE, h * D], q_bar, q_smem)
    for i in gl.static_range(STAGES):
        _issue_load(hi_desc, hi_smem, ready_hi, i, kbar_row0, kv_col, i < num_tiles, BLOCK_N, STAGES)
        _issue_load(lo_desc, lo_smem, ready_lo, i, kbar_row0, kv_col, i < num_tiles, BLOCK_N, STAGES)
    if Q_TMA:
        mbarrier.wait(q_bar, 0)
        mbarrier.invalidate(q_bar)
    else:  # q not contiguous: through registers, zeros past L
        q_rows = I * BLOCK_SIZE + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, q_load))
        q_cols = gl.arange(0, D, layout=gl.SliceLayout(0, q_load))
        q = gl.load(q_base + q_rows[:, None] * stride_ql + q_cols[None, :], mask=(q_rows < L)[:, None], other=0.0)
        q_smem = gl.allocate_shared_memory(q.dtype, [BLOCK_M, D],
                                           gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], q.dtype), q)
        fence_async_shared()
    q_t = q_smem.permute((1, 0))

    key_offsets = gl.arange(0, BLOCK_N, layout=keys_of_tile)
    row_pos = I * BLOCK_SIZE + gl.arange(0, BLOCK_M, layout=queries_of_tile)

    # Pass 1 (scoring._score_tile / _fold_tile), one tile of BLOCK_N key blocks at a time.
    zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)
    row_max = gl.full([], float("-inf"), gl.float32)
    denom = gl.zeros([], gl.float32)
    for t in range(num_tiles):
        s = _tile_logits(hi_smem, lo_smem, ready_hi, ready_lo, q_t, zero, t, STAGES)
        _cta_barrier()  # every warp's share of the dots has read the slot before it is refilled
        more = t + STAGES < num_tiles
        _issue_load(hi_desc, hi_smem, ready_hi, t + STAGES, kbar_row0, kv_col, more, BLOCK_N, STAGES)
        _issue_load(lo_desc, lo_smem, ready_lo, t + STAGES, kbar_row0, kv_col, more, BLOCK_N, STAGES)

        key_blocks = t * BLOCK_N + key_offsets
        if t * BLOCK_N >= unmasked_end:
            contributes = (row_pos[None, :] >= (key_blocks[:, None] + 1) * BLOCK_SIZE - 1) & (row_pos[None, :] < L)
            s = gl.where(contributes, s, float("-inf"))
        m = gl.maximum(gl.full([BLOCK_N], float("-inf"), gl.float32, layout=keys_of_tile), gl.max(s, axis=1))
        m_safe = gl.where(m == float("-inf"), 0.0, m)
        # As _fold_tile's first (and, with BLOCK_M = Bs, only) step from m = -inf, S = 0: the same bits.
        S = gl.zeros([BLOCK_N], gl.float32, layout=keys_of_tile) * gl.exp2(float("-inf") - m_safe) + \
            gl.sum(gl.exp2(s - m_safe[:, None]), axis=1)
        u = gl.where(S == 0, float("-inf"), m + gl.log2(gl.where(S == 0, 1.0, S)))
        gl.store(row + key_blocks, u, mask=key_blocks < N)
        new_max = gl.maximum(row_max, gl.max(m, axis=0))
        safe_max = gl.where(new_max == float("-inf"), 0.0, new_max)
        denom = denom * gl.exp2(row_max - safe_max) + gl.sum(gl.exp2(u - safe_max), axis=0)
        row_max = new_max
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready_hi.index(i))
        mbarrier.invalidate(ready_lo.index(i))
    _cta_barrier()  # pass 1's u were stored in the accumulator's layout; the passes below read another one
    safe_max = gl.where(row_max == float("-inf"), 0.0, row_max)

    offsets = gl.arange(0, BLOCK_N, layout=lanes)
    if SELECT:
        best = gl.full([BLOCK_N], float("-inf"), gl.float32, layout=lanes)
        has_nan = gl.zeros([BLOCK_N], gl.int32, layout=lanes)
        for j0 in range(0, I + 1, BLOCK_N):
            key_blocks = j0 + offsets
            score = _normalised(row, key_blocks, I, safe_max, denom, EPS)
            is_nan = score != score
            has_nan = gl.maximum(has_nan, is_nan.to(gl.int32))
            best = gl.maximum(best, gl.where(is_nan | (key_blocks > I), float("-inf"), score))
        threshold = alpha * gl.where(gl.max(has_nan, axis=0) > 0, float("nan"), gl.max(best, axis=0))
        list_row = INDICES + b * stride_ib + h * stride_ih + local * stride_im
        count = gl.zeros([], gl.int32)
        for j0 in range(0, I + 1, BLOCK_N):
            J = j0 + offsets
            score = _normalised(row, J, I, safe_max, denom, EPS)
            # selection._keep and _append_kept
            forced = (J < sink_blocks) | (I - J < window_blocks) | (I >= N - last_dense_blocks)
            below = score < threshold
            keep = (J <= I) & ((below == 0) | forced)
            keep_i = keep.to(gl.int32)
            slot = count + gl.associative_scan(keep_i, 0, _add) - 1
            gl.store(list_row + slot, J, mask=keep)
            count = count + gl.sum(keep_i, axis=0)
        if PAD_LISTS:  # selection._pad_list
            for j0 in range(count - count % BLOCK_N, N, BLOCK_N):
                slot = j0 + offsets
                gl.store(list_row + slot, -1, mask=(slot >= count) & (slot < N))
        gl.store(COUNTS + (b * HQ + h) * N + ROW0 + local, count)  # counts (B, Hq, M), M = N
    else:
        for j0 in range(0, N, BLOCK_N):
            key_blocks = j0 + offsets
            gl.store(row + key_blocks, _normalised(row, key_blocks, I, safe_max, denom, EPS), mask=key_blocks < N)


def _descriptor(x: torch.Tensor, box_rows: int) -> TensorDescriptor:
    """A TMA descriptor over a contiguous (B, rows, H, D) tensor viewed as (B rows, H D), box (box_rows, D): q by
    query blocks, kbar's hi / lo parts by tiles of pooled keys."""
    B, rows, H, D = x.shape
    dtype = gl.float16 if x.dtype == torch.float16 else gl.bfloat16
    layout = gl.NVMMASharedLayout.get_default_for([box_rows, D], dtype)
    return TensorDescriptor(x, [B * rows, H * D], [H * D, 1], [box_rows, D], layout)


def launch_sm90(q, hi, lo, scores, counts, indices, block_size, rows, net, pad_lists, config=None):
    """The kernel's launch, arguments as scoring._launch has them (not varlen: M = N query and key blocks, counts
    (B, Hq, M), lists N wide); config: SM90_CONFIG overrides."""
    config = dict(SM90_CONFIG, **(config or {}))
    B, L, Hq, D = q.shape
    N = hi.shape[1]
    I0, I1 = rows
    hi_desc, lo_desc = (_descriptor(x, config["BLOCK_N"]) for x in (hi, lo))
    q_tma = q.is_contiguous() and q.data_ptr() % 16 == 0  # what a (B L, Hq D) descriptor can describe
    q_desc = _descriptor(q, block_size) if q_tma else hi_desc  # unused then: any descriptor fills the slot
    _block_scores_sm90_kernel[(B * Hq, I1 - I0)](
        q, q_desc, hi_desc, lo_desc, scores, counts, indices,
        q.stride(0), q.stride(1), q.stride(2), *scores.stride()[:3], *indices.stride()[:3],
        L, N, Hq, Hq // hi.shape[2], I0, *net,
        BLOCK_SIZE=block_size, BLOCK_N=config["BLOCK_N"], D=D, STAGES=config["STAGES"], EPS=SCORE_EPS,
        SELECT=indices is not scores, PAD_LISTS=pad_lists, Q_TMA=q_tma, num_warps=config["num_warps"],
    )
