"""Stage 2 in Triton: block scores, paper Eq. 1-2 (twin of reference/scoring.py).

One program per (query block I, batch b, query head h) computes one row of the block-score matrix. Its work is
the causal part of s = q_I kbar^T: Bs x D x (I + 1) multiply-adds, so the whole stage costs 1/Bs of dense
attention's Q K^T.

Two passes over the row, holding nothing but the float32 output row itself:
  pass 1, for J <= I in tiles of BLOCK_N pooled keys: s_iJ in base 2 (log2(e) folded into the scale), m_IJ and
          S_IJ over the contributing queries, stored as u_IJ = m_IJ + log2 S_IJ, with the running row max M_I
          and the running denominator Z_I = sum_J S_IJ 2^(m_IJ - M_I) (online, as in FlashAttention);
  pass 2, for every J: Score_IJ = 2^(u_IJ - M_I) / (Z_I + 1e-9), written over u; 0 where nobody contributes.

Precision: q is exact in its own dtype, kbar is float32. For fp16/bf16 q the dot runs on the tensor cores as
q . hi(kbar) + q . lo(kbar), hi = kbar rounded to q's dtype and lo its rounding error: accurate to about 2^-16
relative, so block sets match the float32 reference except at genuine threshold ties.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from reference.scoring import SCORE_EPS
from reference.validation import check_block_size, check_kbar, num_blocks, resolve_scale

from .common import (HEAD_DIMS, KERNEL_DTYPES, LOG2E, check_kernel_device, dot_precision, needs_wide_offsets,
                     new_output, widen)


@triton.jit
def _scores_t(q, kbar_ptrs, key_blocks, row_pos, L, qk_scale,
              BLOCK_SIZE: tl.constexpr, SPLIT_KBAR: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(BLOCK_N, BLOCK_M) base-2 logits, transposed (pooled keys x queries) so that the reductions over the
    queries run along axis 1, inside a warp. -inf where the query does not contribute (it does iff it sees the
    whole key block: i >= (J + 1) Bs - 1, and i < L)."""
    kbar = tl.load(kbar_ptrs)  # (BLOCK_N, D) float32
    if SPLIT_KBAR:
        hi = kbar.to(q.dtype)
        lo = (kbar - hi.to(tl.float32)).to(q.dtype)
        s = tl.dot(hi, tl.trans(q)) + tl.dot(lo, tl.trans(q))
    else:
        s = tl.dot(kbar, tl.trans(q.to(tl.float32)), input_precision=DOT_PRECISION)
    contributes = (row_pos[None, :] >= (key_blocks[:, None] + 1) * BLOCK_SIZE - 1) & (row_pos[None, :] < L)
    return tl.where(contributes, s * qk_scale, float("-inf"))


@triton.jit
def _load_rows(q_base, row_pos, stride_ql, stride_qd, L, D: tl.constexpr):
    offs_d = tl.arange(0, D)
    return tl.load(q_base + row_pos[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                   mask=(row_pos < L)[:, None], other=0.0)


@triton.jit
def _block_scores_kernel(
    Q, KBAR, SCORES,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh,
    stride_sb, stride_sh, stride_sm,
    L, N, HQ, GROUP, qk_scale, ROW0,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    SPLIT_KBAR: tl.constexpr, DOT_PRECISION: tl.constexpr, EPS: tl.constexpr, WIDE: tl.constexpr,
):
    bh = widen(tl.program_id(0), WIDE)  # heads vary fastest: a GQA group shares kbar in L2
    local = widen(tl.num_programs(1) - 1 - tl.program_id(1), WIDE)  # longest rows first
    I = ROW0 + local  # this launch scores query blocks ROW0 .. ROW0 + num_programs(1) - 1 into rows 0, 1, ...
    b = bh // HQ
    h = bh % HQ
    offs_n = tl.arange(0, BLOCK_N)
    q_base = Q + b * stride_qb + h * stride_qh
    kbar_base = KBAR + b * stride_kb + (h // GROUP) * stride_kh
    row = SCORES + b * stride_sb + h * stride_sh + local * stride_sm
    if BLOCK_M == BLOCK_SIZE:  # the whole query block fits one tile: load it once
        q_block = _load_rows(q_base, I * BLOCK_SIZE + tl.arange(0, BLOCK_M), stride_ql, stride_qd, L, D)

    # Pass 1: u_IJ = m_IJ + log2 S_IJ for J <= I, the running row max M_I and the running denominator Z_I.
    row_max = tl.full([], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([], dtype=tl.float32)
    for j0 in range(0, I + 1, BLOCK_N):
        key_blocks = j0 + offs_n
        kbar_ptrs = kbar_base + tl.minimum(key_blocks, N - 1)[:, None] * stride_kn + tl.arange(0, D)[None, :]
        m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        S = tl.zeros([BLOCK_N], dtype=tl.float32)
        for r0 in range(0, BLOCK_SIZE, BLOCK_M):  # the query rows of block I, BLOCK_M at a time
            row_pos = I * BLOCK_SIZE + r0 + tl.arange(0, BLOCK_M)
            if BLOCK_M == BLOCK_SIZE:
                q = q_block
            else:
                q = _load_rows(q_base, row_pos, stride_ql, stride_qd, L, D)
            s = _scores_t(q, kbar_ptrs, key_blocks, row_pos, L, qk_scale, BLOCK_SIZE, SPLIT_KBAR, DOT_PRECISION)
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            S = S * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
            m = m_new
        u = tl.where(S > 0, m + tl.log2(tl.where(S > 0, S, 1.0)), float("-inf"))
        tl.store(row + key_blocks, u, mask=key_blocks < N)
        new_max = tl.maximum(row_max, tl.max(m, axis=0))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        denom = denom * tl.exp2(row_max - safe_max) + tl.sum(tl.exp2(u - safe_max), axis=0)
        row_max = new_max

    # Pass 2: normalise. J > I was never computed and scores exactly 0, as do non-contributing pairs.
    safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    for j0 in range(0, N, BLOCK_N):
        key_blocks = j0 + offs_n
        u = tl.load(row + key_blocks, mask=key_blocks <= I, other=float("-inf"))
        tl.store(row + key_blocks, tl.exp2(u - safe_max) / (denom + EPS), mask=key_blocks < N)


# Launch configuration: BLOCK_M query rows x BLOCK_N pooled keys per tile, warps. Tuned on an H200 (repro/NOTES.md).
SCORE_CONFIG = dict(BLOCK_N=64, num_warps=4)


def score_tile_sizes(block_size: int, config=None) -> tuple[int, int]:
    """(BLOCK_M query rows, BLOCK_N pooled keys) per tile."""
    return min(block_size, 128), (config or SCORE_CONFIG)["BLOCK_N"]


def block_scores(q: torch.Tensor, kbar: torch.Tensor, block_size: int = 128, scale: float | None = None, *,
                 _config: dict | None = None) -> torch.Tensor:
    """Score (B, Hq, M, N) float32 of every (query block, key block) pair. Same contract as the reference."""
    check_block_size(block_size)
    check_kbar(q, kbar, block_size, dtypes=KERNEL_DTYPES)
    check_kernel_device(q=q, kbar=kbar)
    B, L, Hq, D = q.shape
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim {D} is not supported; expected one of {HEAD_DIMS}")
    return launch_block_scores(q, kbar.float().contiguous(), block_size, resolve_scale(scale, D, name="scale"),
                               _config)


def launch_block_scores(q: torch.Tensor, kbar: torch.Tensor, block_size: int, scale: float,
                        _config: dict | None = None, *, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """`block_scores` without the input checks; kbar must be contiguous float32.

    rows=(I0, I1) scores only query blocks I0 <= I < I1, into a (B, Hq, I1 - I0, N) buffer (flash_prefill's
    chunks); None scores all M."""
    B, L, Hq, D = q.shape
    M = N = num_blocks(L, block_size)
    I0, I1 = rows or (0, M)
    scores = new_output(B, Hq, I1 - I0, N, dtype=torch.float32, device=q.device)
    config = dict(SCORE_CONFIG, **(_config or {}))
    BLOCK_M, BLOCK_N = score_tile_sizes(block_size, config)
    _block_scores_kernel[(B * Hq, I1 - I0)](
        q, kbar, scores, *q.stride(), *kbar.stride()[:3], *scores.stride()[:3],
        L, N, Hq, Hq // kbar.shape[2], scale * LOG2E, I0,
        BLOCK_SIZE=block_size, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, D=D,
        SPLIT_KBAR=q.dtype != torch.float32, DOT_PRECISION=dot_precision(q.dtype), EPS=SCORE_EPS,
        WIDE=needs_wide_offsets(q, scores), num_warps=config["num_warps"],
    )
    return scores
