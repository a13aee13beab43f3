"""Stage 5 in Triton: causal attention over kept key blocks, and dense attention (twin of reference/attention.py).

One FlashAttention-2-style kernel, three ways of choosing the key blocks (MODE, a compile-time constant):

* PHYSICAL (`block_sparse_attention`): the program walks its compacted list indices[b, h, I, :counts] and loads
  only those K/V blocks: the loop runs counts times ("physical jump").
* LOGICAL (`block_sparse_attention_logical`): the program walks every causal block J = 0..I, reads the mask bit
  and branches over the block when it is 0: the loop runs I + 1 times ("logical skip").
* DENSE (`dense_attention`): every causal block, no bit to read.

Programs: one per (query tile of BLOCK_M rows, batch * query head), longest rows (the last query tiles) first
against the causal load imbalance. Query head h reads kv head h // group. Off-diagonal blocks need no mask at
all; only the diagonal block is masked (causality inside it, and the padding of a partial last block), and the
lists are ascending, so the diagonal block, when kept, is the last entry of the list.

Inner step in base 2: logits are scaled by scale * log2(e) and exponentiated with exp2.

K/V tiles: fetched by TMA (a tensor descriptor over k / v viewed as (B, L, Hkv * D)) when the layout allows it
(heads packed, 16-byte aligned), else by per-thread pointer loads; `tests/test_triton_attention.py` checks that
both give the same output to the bit. The H200 timings of both are in repro/NOTES.md.

Log-sum-exp (STORE_LSE, `return_lse=True`): the program already holds each row's running max m_i and sum l_i, in
base 2 (m_i is a max of scale x log2(e) x logits, l_i a sum of exp2(... - m_i)); the natural lse is
(m_i + log2 l_i) x ln 2, stored as one float32 per row into (B, Hq, L); a row that saw no key (l_i = 0) stores -inf.
The means of the mean correction are folded into the same m_i and l_i (bias log2 Bs), so the lse includes them. Off
(the default), nothing is computed or stored.

Mean correction (MEAN_CORRECTION; FlashPrefill V2, Eq. 6, formula in reference/attention.py), PHYSICAL and LOGICAL:
after its kept blocks, a program walks the block means k_bar_J, v_bar_J of every J < I in chunks of MEAN_CHUNK,
one (BLOCK_M x MEAN_CHUNK) logit tile and one PV dot per chunk, folded into the same online softmax with the bias
log2(Bs); the columns of the blocks the row keeps (and J >= I) get -inf, so each causal block is attended exactly
or stands in as its mean, never both. Which columns a row keeps: LOGICAL reads the chunk's mask bits; PHYSICAL
reads the window of its ascending list that can fall into the chunk (MEAN_CHUNK slots from the first one not yet
consumed) and turns it into a bit mask (`_listed_columns`), loading the next chunk's window one chunk ahead (its
start depends on this chunk's count). k_bar arrives pre-scaled by scale x log2(e) in q's dtype (the score kernel's
hi part of stage 1, reused), v_bar in q's dtype; both (B, N, Hkv, D), pointer loads (a kv head's means are
2 x 512 KiB at 256K tokens: L2-resident).
Work: ceil(I / MEAN_CHUNK) chunk tiles per query tile, each the FLOPs and exp2s of one 128 x 128 key block at
MEAN_CHUNK = 128 but with no HBM traffic: in all 1 / (rho Bs) of the sparse walk's FLOPs at density rho (22% at
3.5%, 8% at 10%); the counts and the H200 measurement are in repro/NOTES.md ("Mean correction").
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from reference.validation import check_block_layout, check_flag, num_blocks, resolve_scale

from reference.attention import attention_outputs, check_mean_correction

from .common import (LOG2E, VarlenLayout, check_inference_only, check_kernel_block_size, check_kernel_device,
                     check_kernel_qkv, dot_precision, launch, needs_wide_offsets, new_output, num_warps_for,
                     sequence_span, widen)
from .pooling import launch_mean_pool
from .scoring import split_kbar
from .validation import check_block_lists

FLOAT32_LOWEST: tl.constexpr = tl.constexpr(-3.4028234663852886e38)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # natural log = log2 x ln 2
# Which key blocks a program visits (compile-time constants of the kernel).
PHYSICAL, LOGICAL, DENSE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _load_kv_tile(K, V, b, kv_col, kv_row0, start, stride_kl, stride_vl, L,
                  BLOCK_N: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr, KV_DESCRIPTORS: tl.constexpr,
                  VARLEN: tl.constexpr):
    """Keys and values start .. start + BLOCK_N of one kv head, as (BLOCK_N, D) tiles; rows past L read as 0.

    KV_DESCRIPTORS: K and V are TMA tensor descriptors over (B, L, Hkv * D) and the tile is the box at
    (b, kv_row0 + start, kv_col): the copy engine fetches it and zero-fills rows past the tensor's end. Otherwise
    K and V point at the (b, kv head) slice and every thread computes its own addresses. VARLEN: the descriptors
    span the packed batch (b = 0, the sequence starting at row kv_row0), so rows past L belong to the next
    sequence: a masked tile zeroes them (its logits there are -inf, but 0 x a non-finite value would be NaN)."""
    if KV_DESCRIPTORS:
        row = tl.cast(kv_row0 + start, tl.int32)
        k = K.load([tl.cast(b, tl.int32), row, kv_col]).reshape(BLOCK_N, D)
        v = V.load([tl.cast(b, tl.int32), row, kv_col]).reshape(BLOCK_N, D)
        if VARLEN and MASKED:
            v = tl.where((start + tl.arange(0, BLOCK_N) < L)[:, None], v, 0.0)
    else:
        key_pos = start + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        if MASKED:  # the diagonal block: may run past L
            k = tl.load(K + key_pos[:, None] * stride_kl + offs_d[None, :], mask=(key_pos < L)[:, None], other=0.0)
            v = tl.load(V + key_pos[:, None] * stride_vl + offs_d[None, :], mask=(key_pos < L)[:, None], other=0.0)
        else:
            k = tl.load(K + key_pos[:, None] * stride_kl + offs_d[None, :])
            v = tl.load(V + key_pos[:, None] * stride_vl + offs_d[None, :])
    return k, v


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, q_pos, K, V, b, kv_col, kv_row0, start, stride_kl, stride_vl, L, qk_scale,
    BLOCK_N: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KV_DESCRIPTORS: tl.constexpr, VARLEN: tl.constexpr,
):
    """Fold keys start .. start + BLOCK_N into the running softmax state (acc, m_i, l_i) of the query tile."""
    k, v = _load_kv_tile(K, V, b, kv_col, kv_row0, start, stride_kl, stride_vl, L, BLOCK_N, D, MASKED,
                         KV_DESCRIPTORS, VARLEN)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # logits before the scale
    if MASKED:
        key_pos = start + tl.arange(0, BLOCK_N)
        visible = (key_pos[None, :] <= q_pos[:, None]) & (key_pos[None, :] < L)
        s = tl.where(visible, s, float("-inf"))
    # Running max in base 2 (qk_scale = scale * log2(e) > 0 commutes with max); exp2(s * qk_scale - m) is one FMA
    # per logit.
    # The running max starts at the lowest finite float32, not -inf: a tile whose logits are all -inf for a row (the
    # diagonal's causal mask, or infinite keys, which dense attention ignores) then gives exp2(-inf - m) = 0 rather
    # than exp2(-inf + inf) = NaN, with no test per tile.
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    correction = tl.exp2(m_i - m_new)
    l_i = l_i * correction + tl.sum(p, axis=1)
    acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attend_block(
    acc, m_i, l_i, q, q_pos, K, V, b, kv_col, kv_row0, J, stride_kl, stride_vl, L, qk_scale,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KV_DESCRIPTORS: tl.constexpr,
):
    """Fold in a whole off-diagonal key block J (no mask needed: every key is visible and < L)."""
    for n in tl.static_range(BLOCK_SIZE // BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, q_pos, K, V, b, kv_col, kv_row0,
                                     J * BLOCK_SIZE + n * BLOCK_N, stride_kl, stride_vl, L, qk_scale, BLOCK_N, D,
                                     False, DOT_PRECISION, KV_DESCRIPTORS, False)
    return acc, m_i, l_i


@triton.jit
def _listed_block(list_row, slot, n_off_diagonal, I, WIDE: tl.constexpr, CLAMP: tl.constexpr):
    """Off-diagonal key block id at list slot `slot` (0 past the end); CLAMP: clamped into [0, I - 1]."""
    J = tl.load(list_row + slot, mask=slot < n_off_diagonal, other=0)
    if CLAMP:
        J = tl.minimum(tl.maximum(J, 0), I - 1)
    return widen(J, WIDE)


@triton.jit
def _list_window(list_row, first, n_off_diagonal, WIDTH: tl.constexpr):
    """List slots first .. first + WIDTH - 1 of a row, -1 past its off-diagonal entries."""
    slot = first + tl.arange(0, WIDTH)
    return tl.load(list_row + slot, mask=slot < n_off_diagonal, other=-1)


@triton.jit
def _listed_columns(window, c0, MEAN_CHUNK: tl.constexpr):
    """(kept, consumed): kept (MEAN_CHUNK,) bool, True where block c0 + j is in `window` (a slice of an ascending
    list); consumed, how many window entries fall into the chunk. Each entry inside sets one bit of a MEAN_CHUNK-bit
    mask (int32 words; the ids are distinct, so the sum of their bits is their OR): one reduction of MEAN_CHUNK
    elements per word instead of a MEAN_CHUNK x MEAN_CHUNK comparison (int32 rather than int64 words: fewer
    registers in the columns' layout, which holds 32 columns per thread). Shift amounts stay in [0, 31] whatever
    the list holds (a malformed list gives a wrong row, never undefined arithmetic)."""
    rel = window - c0
    inside = (window >= 0) & (rel >= 0) & (rel < MEAN_CHUNK)  # -1 pads the window; c0 may be negative
    bit = tl.full(rel.shape, 1, tl.int32) << (rel & 31)
    col = tl.arange(0, MEAN_CHUNK)
    word = tl.zeros([MEAN_CHUNK], dtype=tl.int32)
    for w in tl.static_range(MEAN_CHUNK // 32 if MEAN_CHUNK >= 32 else 1):
        bits = tl.sum(tl.where(inside & ((rel >> 5) == w), bit, 0), axis=0)
        word = tl.where((col >> 5) == w, bits, word)
    kept = ((word >> (col & 31)) & 1) != 0
    return kept, tl.sum(inside.to(tl.int32), axis=0)


@triton.jit
def _attend_means(acc, m_i, l_i, q, KBAR, VBAR, b, kv_col, c0, stride_mn, kept, mean_bias,
                  MEAN_CHUNK: tl.constexpr, D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  MEAN_DESCRIPTORS: tl.constexpr):
    """Fold block means c0 .. c0 + MEAN_CHUNK - 1 (c0 + MEAN_CHUNK <= I; c0 may be negative) into the running
    softmax state: every J >= 0 that the row does not keep joins as one key k_bar_J (pre-scaled, so the dot is
    already a base-2 logit) with value v_bar_J and the bias log2(Bs) (its Bs keys). Rows J < 0 read as 0 (TMA
    zero-fills them) and are masked; no row J >= I is ever read, so a non-finite value there cannot reach the row
    through 0 x NaN."""
    J = c0 + tl.arange(0, MEAN_CHUNK)
    real = J >= 0
    if MEAN_DESCRIPTORS:  # (B, N, Hkv * D) views, box (1, MEAN_CHUNK, D)
        kbar = KBAR.load([tl.cast(b, tl.int32), tl.cast(c0, tl.int32), kv_col]).reshape(MEAN_CHUNK, D)
        vbar = VBAR.load([tl.cast(b, tl.int32), tl.cast(c0, tl.int32), kv_col]).reshape(MEAN_CHUNK, D)
    else:  # KBAR, VBAR point at the (b, kv head) slice
        offs_d = tl.arange(0, D)
        kbar = tl.load(KBAR + J[:, None] * stride_mn + offs_d[None, :], mask=real[:, None], other=0.0)
        vbar = tl.load(VBAR + J[:, None] * stride_mn + offs_d[None, :], mask=real[:, None], other=0.0)
    # Excluded columns get the bias -inf (added, which makes it the dot's initial accumulator: no extra where over
    # the tile). A kept block's NaN or +inf mean therefore still makes the row NaN, as the block itself does.
    bias = tl.where(real & ~kept, mean_bias, float("-inf"))
    s = tl.dot(q, tl.trans(kbar), input_precision=DOT_PRECISION) + bias[None, :]
    # As in _attend_tile: m starts finite, so an all -inf tile gives p = 0 and correction 1 (the row is unchanged
    # to the bit when the row keeps every block of the chunk).
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    correction = tl.exp2(m_i - m_new)
    l_i = l_i * correction + tl.sum(p, axis=1)
    acc = acc * correction[:, None] + tl.dot(p.to(vbar.dtype), vbar, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attention_kernel(
    Q, K, V, OUT, COUNTS, INDICES, MASK, VISITS, KBAR, VBAR, LSE, CU_Q, CU_K,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_ob, stride_ol, stride_oh,
    stride_lb, stride_lh, stride_lm,  # INDICES (or MASK) rows; COUNTS and VISITS are contiguous (B, Hq, M)
    stride_mb, stride_mn, stride_mh,  # KBAR and VBAR (B, N, Hkv, D), one layout
    L, M, HQ, GROUP, qk_scale, mean_bias, ROW0, CAPACITY, total_q, total_k,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    MODE: tl.constexpr, DOT_PRECISION: tl.constexpr, COUNT_VISITS: tl.constexpr, HEADS_FASTEST: tl.constexpr,
    PREFETCH_INDEX: tl.constexpr, WIDE: tl.constexpr, KV_DESCRIPTORS: tl.constexpr,
    MEAN_CORRECTION: tl.constexpr, MEAN_CHUNK: tl.constexpr, MEAN_DESCRIPTORS: tl.constexpr,
    STORE_LSE: tl.constexpr, VARLEN: tl.constexpr,
):
    TILES_PER_BLOCK: tl.constexpr = BLOCK_SIZE // BLOCK_M
    if HEADS_FASTEST:  # consecutive programs = the heads of one query tile: a GQA group shares K/V in L2
        bh = tl.program_id(0)
        tile = tl.num_programs(1) - 1 - tl.program_id(1)  # longest rows first
    else:
        bh = tl.program_id(1)
        tile = tl.num_programs(0) - 1 - tl.program_id(0)
    # This launch covers rows ROW0, ROW0 + 1, ... of COUNTS; their lists are rows 0, 1, ... of INDICES (or MASK).
    # Row t is query block t, or VARLEN query block I0 + t of sequence b (VarlenLayout); positions are absolute.
    tile = widen(tile + ROW0 * TILES_PER_BLOCK, WIDE)  # 64-bit offsets when L x Hq x D passes 2^31
    b = widen(bh, WIDE) // HQ
    h = widen(bh, WIDE) % HQ
    if VARLEN:  # sequence b: query rows P .. L - 1 at q[q_start:], keys 0 .. L - 1 at k[k_start:]
        q_start, k_start, P, L, I0, N = sequence_span(CU_Q, CU_K, b, total_q, total_k, BLOCK_SIZE, WIDE)
        row_t = tile // TILES_PER_BLOCK
        I = I0 + row_t
        tile = I * TILES_PER_BLOCK + tile % TILES_PER_BLOCK  # this sequence's absolute query tile
        dead = (I >= N) | ((tile + 1) * BLOCK_M <= P)  # no such block, or a tile of rows before the chunk
        # How such a program ends is chosen by register pressure on sm_90 (tools.hopper_compile checks every varlen
        # variant at the standard shape): with the means walk an early return spilled 8-24 words, without it the
        # masked form spilled 10. Masked: no rows (L = 0), nothing to walk (I = 0: no block before the diagonal,
        # an empty diagonal, no means), nothing stored.
        if MEAN_CORRECTION:
            I, tile, L = tl.where(dead, 0, I), tl.where(dead, 0, tile), tl.where(dead, 0, L)
        else:
            if dead:
                return
        Q = Q + (q_start - P) * stride_ql  # absolute row i is packed row q_start - P + i
        OUT = OUT + (q_start - P) * stride_ol
        kv_b, kv_row0 = 0, k_start  # the descriptors span the packed batch
        k_offset, v_offset = k_start * stride_kl, k_start * stride_vl
        lse_row = LSE + h * total_q + q_start - P  # LSE (Hq, total_q)
    else:
        P = 0
        I = tile // TILES_PER_BLOCK
        row_t = I
        Q = Q + b * stride_qb
        OUT = OUT + b * stride_ob
        kv_b, kv_row0 = b, 0
        k_offset, v_offset = b * stride_kb, b * stride_vb
        lse_row = LSE + (b * HQ + h) * L  # LSE (B, Hq, L)
    q_pos = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_here = q_pos < L
    if VARLEN:
        rows_here = rows_here & (q_pos >= P)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + h * stride_qh + q_pos[:, None] * stride_ql + offs_d[None, :], mask=rows_here[:, None], other=0.0)
    kv_col = (h // GROUP).to(tl.int32) * D  # the kv head's columns in the descriptors' (B, L, Hkv * D) view
    if not KV_DESCRIPTORS:
        K = K + k_offset + (h // GROUP) * stride_kh
        V = V + v_offset + (h // GROUP) * stride_vh
    row = b * stride_lb + h * stride_lh + (row_t - ROW0) * stride_lm
    stat = (b * HQ + h) * M + row_t

    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], FLOAT32_LOWEST, dtype=tl.float32)  # see _attend_tile
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Off-diagonal blocks, then the diagonal block with its mask.
    if MODE == PHYSICAL:
        # Lists are trusted (block_sparse_attention checks them only with validate=True), but whatever they hold the
        # walk stays in bounds, so a malformed list gives a wrong row, never a read outside q, k, v or the list: at
        # most min(I + 1, CAPACITY) entries are read, and the ids are clamped to [0, I - 1] for pointer loads. TMA
        # loads need no clamp (the copy engine zero-fills boxes outside the tensor), and there it cost 10% on the
        # H200 (repro/NOTES.md).
        count = tl.minimum(tl.maximum(tl.load(COUNTS + stat), 0), tl.minimum(I + 1, CAPACITY))
        last = tl.load(INDICES + row + tl.maximum(count - 1, 0), mask=count > 0, other=-1)
        has_diagonal = last == I
        n_off_diagonal = tl.minimum(count - has_diagonal.to(tl.int32), I)
        if PREFETCH_INDEX:  # the next block id is loaded one iteration ahead, so K/V addresses are known early
            J = _listed_block(INDICES + row, 0, n_off_diagonal, I, WIDE, not KV_DESCRIPTORS)
            for t in range(0, n_off_diagonal):
                J_next = _listed_block(INDICES + row, t + 1, n_off_diagonal, I, WIDE, not KV_DESCRIPTORS)
                acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, q_pos, K, V, kv_b, kv_col, kv_row0, J, stride_kl,
                                              stride_vl, L, qk_scale, BLOCK_SIZE, BLOCK_N, D, DOT_PRECISION,
                                              KV_DESCRIPTORS)
                J = J_next
        else:
            for t in range(0, n_off_diagonal):
                J = _listed_block(INDICES + row, t, n_off_diagonal, I, WIDE, not KV_DESCRIPTORS)
                acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, q_pos, K, V, kv_b, kv_col, kv_row0, J, stride_kl,
                                              stride_vl, L, qk_scale, BLOCK_SIZE, BLOCK_N, D, DOT_PRECISION,
                                              KV_DESCRIPTORS)
        visits = count
    elif MODE == LOGICAL:
        for J in range(0, I):
            if tl.load(MASK + row + J) != 0:
                acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, q_pos, K, V, kv_b, kv_col, kv_row0, J, stride_kl,
                                              stride_vl, L, qk_scale, BLOCK_SIZE, BLOCK_N, D, DOT_PRECISION,
                                              KV_DESCRIPTORS)
        has_diagonal = tl.load(MASK + row + I) != 0
        visits = I + 1
    else:
        for J in range(0, I):
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, q_pos, K, V, kv_b, kv_col, kv_row0, J, stride_kl,
                                          stride_vl, L, qk_scale, BLOCK_SIZE, BLOCK_N, D, DOT_PRECISION,
                                          KV_DESCRIPTORS)
        has_diagonal = I >= 0
        visits = I + 1
    if has_diagonal:
        diagonal_end = tl.minimum(tile * BLOCK_M + BLOCK_M, L)  # keys past this tile's last query are invisible
        for start in range(I * BLOCK_SIZE, diagonal_end, BLOCK_N):
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, q_pos, K, V, kv_b, kv_col, kv_row0, start, stride_kl,
                                         stride_vl, L, qk_scale, BLOCK_N, D, True, DOT_PRECISION, KV_DESCRIPTORS,
                                         VARLEN)

    # Mean correction: the blocks J < I that the row does not keep, as their means (module docstring). Not visits.
    # The chunks end at I (the first one starts below 0 unless MEAN_CHUNK divides I): no chunk reaches J >= I.
    if MEAN_CORRECTION:
        if not MEAN_DESCRIPTORS:
            KBAR = KBAR + b * stride_mb + (h // GROUP) * stride_mh
            VBAR = VBAR + b * stride_mb + (h // GROUP) * stride_mh
        chunks_start = I - tl.cdiv(I, MEAN_CHUNK) * MEAN_CHUNK
        if MODE == PHYSICAL:
            first = 0
            window = _list_window(INDICES + row, first, n_off_diagonal, MEAN_CHUNK)
            for c0 in range(chunks_start, I, MEAN_CHUNK):
                kept, consumed = _listed_columns(window, c0, MEAN_CHUNK)
                first += consumed
                window = _list_window(INDICES + row, first, n_off_diagonal, MEAN_CHUNK)  # next chunk's, early
                acc, m_i, l_i = _attend_means(acc, m_i, l_i, q, KBAR, VBAR, b, kv_col, c0, stride_mn, kept,
                                              mean_bias, MEAN_CHUNK, D, DOT_PRECISION, MEAN_DESCRIPTORS)
        else:
            for c0 in range(chunks_start, I, MEAN_CHUNK):
                columns = c0 + tl.arange(0, MEAN_CHUNK)
                kept = tl.load(MASK + row + columns, mask=columns >= 0, other=0) != 0
                acc, m_i, l_i = _attend_means(acc, m_i, l_i, q, KBAR, VBAR, b, kv_col, c0, stride_mn, kept,
                                              mean_bias, MEAN_CHUNK, D, DOT_PRECISION, MEAN_DESCRIPTORS)

    saw_no_key = l_i == 0.0
    l_i = tl.where(saw_no_key, 1.0, l_i)  # rows that saw no key give 0, as in the reference
    if STORE_LSE:  # LSE is a contiguous float32; rows past L (a partial last tile) are not stored
        # The natural log of the denominator, from base-2 m_i and l_i; -inf for a row that saw no key.
        lse = tl.where(saw_no_key, float("-inf"), (m_i + tl.log2(l_i)) * LN2)
        tl.store(lse_row + q_pos, lse, mask=rows_here)
    out = acc / l_i[:, None]
    tl.store(OUT + h * stride_oh + q_pos[:, None] * stride_ol + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=rows_here[:, None])
    if COUNT_VISITS:
        if tile % TILES_PER_BLOCK == 0:
            tl.store(VISITS + stat, visits)


# Launch configuration, tuned on an H200 (repro/NOTES.md): keys per tile, warps, pipeline stages, program order.
ATTENTION_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, num_warps=None, num_stages=3, heads_fastest=True,
                        prefetch_index=True, kv_descriptors=True, kv_descriptors_min_length=8192, mean_chunk=128)
MEAN_CHUNKS = (16, 32, 64, 128)  # means per chunk tile: at most a key tile (128), the registers of one


def kv_descriptor(x: torch.Tensor, block_n: int):
    """A TMA tensor descriptor over k or v (B, L, Hkv, D) viewed as (B, L, Hkv * D), one box = (1, block_n, D)
    keys of one kv head; None when the layout does not allow it (heads not packed, or not 16-byte aligned)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, L, H, D = x.shape
    aligned = x.data_ptr() % 16 == 0 and all(s * x.element_size() % 16 == 0 for s in x.stride()[:2])
    if x.stride(3) != 1 or x.stride(2) != D or not aligned:
        return None
    return TensorDescriptor(x, [B, L, H * D], [x.stride(0), x.stride(1), 1], [1, block_n, D])


def attention_tile_sizes(block_size: int, config=None) -> tuple[int, int]:
    """(BLOCK_M query rows, BLOCK_N keys) per tile; both divide the block size."""
    config = config or ATTENTION_CONFIG
    return min(block_size, config["BLOCK_M"]), min(block_size, config["BLOCK_N"])


def attention_means(k, v, block_size: int, scale: float, dtype: torch.dtype, key_means=None):
    """(kbar, vbar), the means the mean correction reads: (B, N, Hkv, D) in `dtype` (q's), kbar scaled by
    scale x log2(e) (the score kernel's hi part: `split_kbar`). One pooling launch reads K and V once; with
    key_means (mean_pool_keys' float32 kbar) only V is pooled."""
    if key_means is None:
        (kbar, _), vbar = launch_mean_pool(k, block_size, out_scale=scale * LOG2E, split_dtype=dtype, values=v)
        return kbar, vbar
    return split_kbar(key_means.float(), scale, dtype)[0], launch_mean_pool(v, block_size, out_dtype=dtype)


def launch_attention(q, k, v, block_size, scale, mode, *, counts=None, indices=None, mask=None,
                     return_visits=False, config=None, rows=None, out=None, means=None, return_lse=False, lse=None,
                     varlen: VarlenLayout | None = None):
    """The attention kernel without the input checks of the public functions (`flash_prefill`, the benchmarks and
    the tests call it directly). Launches over query blocks rows=(I0, I1) (default all M), writing into `out`
    (allocated when None). With rows, indices (or mask) hold the lists of those query blocks only, as rows
    0 .. I1 - I0 - 1; counts stays the whole (B, Hq, M).

    means: None, or (kbar, vbar) from `attention_means` for the same softmax scale: add the mean correction
    (PHYSICAL and LOGICAL). return_lse: also write the rows' lse into `lse`, a contiguous (B, Hq, L) float32
    (allocated when None; with rows, only those rows are written). Returns out [, lse] [, visits].

    varlen (PHYSICAL only): q, out (total_q, Hq, D) and k, v (total_k, Hkv, D) are packed batches laid out as the
    layout says; counts (batch, Hq, varlen.rows) and rows=(t0, t1) count its rows (row t of sequence b = query
    block I0_b + t, the lists absolute block numbers), means padded (batch, key_blocks, Hkv, D), lse (Hq, total_q)."""
    physical, logical = mode == PHYSICAL, mode == LOGICAL  # once: each tl.constexpr comparison is ~0.5 us of host time
    if varlen is not None:
        assert physical and not return_visits
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)  # (1, total, H, D): one packed "batch"
        out = out.unsqueeze(0) if out is not None else None
        B, M = varlen.batch, varlen.rows
        L, Hq, Hkv, D = q.shape[1], q.shape[2], k.shape[2], q.shape[3]
    else:
        B, L, Hq, Hkv, D = q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3]
        M = num_blocks(L, block_size)
    I0, I1 = rows or (0, M)
    # A key block larger than a tile (Bs = 256) is BLOCK_SIZE / BLOCK_N unrolled tiles per loop iteration, and the
    # software pipeline buffers num_stages iterations: 3 x 2 K/V tiles do not fit in shared memory (416 KiB at
    # D = 128), so such blocks run unpipelined. (A loop over tiles instead of blocks would keep 3 stages at every
    # block size, but cost 1-3.5% at Bs = 128 on the H200: repro/NOTES.md.)
    overrides = config or {}
    config = dict(ATTENTION_CONFIG, **overrides)
    BLOCK_M, BLOCK_N = attention_tile_sizes(block_size, config)
    if block_size > BLOCK_N and "num_stages" not in overrides:
        config["num_stages"] = 1
    tiles = (I1 - I0) * (block_size // BLOCK_M)
    # The kernels index the head dim with unit stride; anything else gets one copy here.
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if out is None:
        out = new_output(q.shape[0], L, Hq, D, dtype=q.dtype, device=q.device)
    visits = new_output(B, Hq, M, dtype=torch.int32, device=q.device) if return_visits else out
    lse_shape = (Hq, L) if varlen is not None else (B, Hq, L)
    if return_lse and lse is None:
        lse = new_output(*lse_shape, dtype=torch.float32, device=q.device)
    assert not return_lse or (lse.is_contiguous() and lse.dtype == torch.float32 and lse.shape == lse_shape)
    # What each row walks: its block list (PHYSICAL), its mask bits (LOGICAL), or nothing (DENSE). Pointers a mode
    # does not read are given `out` as a placeholder.
    lists = indices.contiguous() if physical else out
    bits = mask.contiguous().view(torch.int8) if logical else out
    row_strides = lists.stride()[:3] if physical else bits.stride()[:3] if logical else (0, 0, 0)
    counts = counts.contiguous() if physical else out
    grid = (B * Hq, tiles) if config["heads_fastest"] else (tiles, B * Hq)
    if means is not None:
        assert (physical or logical) and config["mean_chunk"] in MEAN_CHUNKS
        assert means[0].stride() == means[1].stride() and means[0].stride(-1) == 1
    kbar, vbar = means if means is not None else (out, out)  # placeholders when unused, as above
    mean_strides = kbar.stride()[:3] if means is not None else (0, 0, 0)
    kv = (k, v)
    # Host side, a descriptor costs ~30 us a launch (encoded by the launcher): more than it saves below 8K tokens,
    # where a call is bound by the host, not the GPU (repro/NOTES.md).
    longest = varlen.key_blocks * block_size if varlen is not None else L
    if config["kv_descriptors"] and longest >= config["kv_descriptors_min_length"]:
        descriptors = (kv_descriptor(k, BLOCK_N), kv_descriptor(v, BLOCK_N))
        kv = descriptors if None not in descriptors else kv
    mean_descriptors = means is not None and kv[0] is not k  # the means the same way as K/V (registers: NOTES.md)
    if mean_descriptors:
        descriptors = (kv_descriptor(kbar, config["mean_chunk"]), kv_descriptor(vbar, config["mean_chunk"]))
        mean_descriptors = None not in descriptors
        kbar, vbar = descriptors if mean_descriptors else (kbar, vbar)
    cu_q, cu_k = (varlen.cu_q, varlen.cu_k) if varlen is not None else (out, out)
    launch(_attention_kernel, grid,
        q, *kv, out, counts, lists, bits, visits, kbar, vbar, lse if return_lse else out, cu_q, cu_k,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        *row_strides,
        *mean_strides,
        L, M, Hq, Hq // Hkv, scale * LOG2E, math.log2(block_size), I0, lists.shape[-1] if physical else M,
        *((varlen.total_q, varlen.total_k) if varlen is not None else (0, 0)),
        BLOCK_SIZE=block_size, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, D=D,
        MODE=mode.value, DOT_PRECISION=dot_precision(q.dtype), COUNT_VISITS=return_visits,
        HEADS_FASTEST=config["heads_fastest"], PREFETCH_INDEX=config["prefetch_index"],
        WIDE=needs_wide_offsets(q, k, v, out, lists, bits, *(means or ()), *((lse,) if return_lse else ())),
        KV_DESCRIPTORS=kv[0] is not k, MEAN_CORRECTION=means is not None, MEAN_CHUNK=config["mean_chunk"],
        MEAN_DESCRIPTORS=mean_descriptors, STORE_LSE=return_lse, VARLEN=varlen is not None,
        num_warps=config["num_warps"] or num_warps_for(BLOCK_M, D), num_stages=config["num_stages"],
    )
    out = out[0] if varlen is not None else out
    return attention_outputs(out, lse if return_lse else None, visits if return_visits else None)


def _check_attention_args(q, k, v, block_size, softmax_scale):
    """The checks every attention entry point shares; returns the resolved softmax scale."""
    check_kernel_block_size(block_size)
    D = check_kernel_qkv(q, k, v)[-1]
    return resolve_scale(softmax_scale, D)


def _checked_means(q, k, v, block_size, softmax_scale, mean_correction, key_means):
    """Check the mean-correction arguments; the kernel's means (attention_means) with it, None without."""
    check_mean_correction(k, block_size, mean_correction, key_means)
    if not mean_correction:
        return None
    if key_means is not None:
        check_kernel_device(key_means=key_means)
        check_inference_only(key_means=key_means)
    return attention_means(k, v, block_size, softmax_scale, q.dtype, key_means)


def block_sparse_attention(q, k, v, counts, indices, block_size: int = 128, softmax_scale: float | None = None, *,
                           return_visits: bool = False, validate: bool = False, mean_correction: bool = False,
                           key_means: torch.Tensor | None = None, return_lse: bool = False):
    """Causal attention over the listed key blocks only (physical skip). Same contract as the reference;
    visits (B, Hq, M) int32 counts the loop iterations of each row, measured inside the kernel.

    validate: check the lists first (counts in range, ids ascending and causal, as reference.block_sparse_attention
    always does) and raise ValueError on a malformed one; one extra kernel and one host synchronisation, which cost
    +21% of the call at 16K tokens on an H200 (repro/NOTES.md), so it is opt-in. Without it the lists are trusted,
    as FlashAttention trusts cu_seqlens: lists from `compact_blocks` / `select_and_compact` are valid by
    construction. A malformed list then gives wrong rows but never a read out of bounds (the kernel clamps what it
    reads to the causal blocks).

    mean_correction: add every pruned causal block J < I as its mean key and value (V2's Eq. 6, as the reference);
    the means are pooled here (K and V in one pass), or only V when key_means, mean_pool_keys' kbar
    (B, N, Hkv, D), is given.

    return_lse: also return lse (B, Hq, L) float32, the log of each row's softmax denominator, taken from the
    kernel's running max and sum (-inf for an empty row). Returns out [, lse] [, visits], as the reference."""
    softmax_scale = _check_attention_args(q, k, v, block_size, softmax_scale)
    check_flag("return_lse", return_lse)
    check_block_layout(q, block_size=block_size, counts=counts, indices=indices)
    check_kernel_device(counts=counts, indices=indices)
    means = _checked_means(q, k, v, block_size, softmax_scale, mean_correction, key_means)
    if validate:
        check_block_lists(counts, indices)
    return launch_attention(q, k, v, block_size, softmax_scale, PHYSICAL, counts=counts, indices=indices,
                            return_visits=return_visits, means=means, return_lse=return_lse)


def block_sparse_attention_logical(q, k, v, mask, block_size: int = 128, softmax_scale: float | None = None, *,
                                   return_visits: bool = False, mean_correction: bool = False,
                                   key_means: torch.Tensor | None = None, return_lse: bool = False):
    """Same output (and lse) as `block_sparse_attention` (to the bit, mean correction included), visiting every
    causal block and branching on its mask bit."""
    softmax_scale = _check_attention_args(q, k, v, block_size, softmax_scale)
    check_flag("return_lse", return_lse)
    check_block_layout(q, block_size=block_size, mask=mask)
    check_kernel_device(mask=mask)
    means = _checked_means(q, k, v, block_size, softmax_scale, mean_correction, key_means)
    return launch_attention(q, k, v, block_size, softmax_scale, LOGICAL, mask=mask, return_visits=return_visits,
                            means=means, return_lse=return_lse)


def dense_attention(q, k, v, softmax_scale: float | None = None, *, return_lse: bool = False):
    """Exact causal GQA attention (the same kernel visiting every causal block); out [, lse (B, Hq, L) float32]."""
    softmax_scale = _check_attention_args(q, k, v, 128, softmax_scale)
    check_flag("return_lse", return_lse)
    return launch_attention(q, k, v, 128, softmax_scale, DENSE, return_lse=return_lse)
