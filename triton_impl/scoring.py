"""Stage 2 in Triton: block scores, paper Eq. 1-2 (twin of reference/scoring.py).

One program per (query block I, batch b, query head h) computes one row of the block-score matrix. Its work is
the causal part of s = q_I kbar^T: Bs x D x (I + 1) multiply-adds, so the whole stage costs 1/Bs of dense
attention's Q K^T.

Two passes over the row, holding nothing but the float32 output row itself:
  pass 1, for J <= I in tiles of BLOCK_N pooled keys: s_iJ in base 2 (log2(e) folded into the scale), m_IJ and
          S_IJ over the contributing queries, stored as u_IJ = m_IJ + log2 S_IJ, with the running row max M_I
          and the running denominator Z_I = sum_J S_IJ 2^(m_IJ - M_I) (online, as in FlashAttention);
  pass 2, for every J: Score_IJ = 2^(u_IJ - M_I) / (Z_I + 1e-9), written over u; 0 where nobody contributes.

Precision: q is exact in its own dtype; kbar is float32 and arrives pre-scaled by scale x log2(e) (the pooling
kernel or `split_kbar` folds the scale in once, so no tile multiplies by it). For fp16/bf16 q the dot runs on the
tensor cores as q . hi + q . lo, hi = the scaled kbar rounded to q's dtype and lo its rounding error, both made
once per key block rather than in every tile: accurate to about 2^-16 relative, so block sets match the float32
reference except at genuine threshold ties.

NaN and inf: a NaN or +inf logit among the contributing queries of (I, J) makes S_IJ, u_IJ and therefore Z_I NaN,
so the whole causal part of row I (J <= I) scores NaN, as in the reference; J > I always scores 0. This follows from
the sums alone, never from tl.maximum's NaN handling (the interpreter propagates NaN, the GPU drops it).

Masks: a tile of key blocks entirely below the diagonal of a full query block needs none (every query sees every
key of those blocks), so each row runs its tiles unmasked and only its last tile (the one holding J = I, and the
padding of a partial last query block) with the mask.

On an sm_90 GPU from 32K tokens on, flash_prefill's standard path runs this same program written in Gluon
(scoring_sm90.py: its tile loads issued ahead by TMA, the same scores and lists bit for bit); `_takes_sm90_path`
decides.
"""

from __future__ import annotations

import functools
import warnings

import torch
import triton
import triton.language as tl

from reference.scoring import SCORE_EPS
from reference.validation import check_kbar, num_blocks, resolve_scale

from .common import (HEAD_DIMS, KERNEL_DTYPES, LOG2E, VarlenLayout, check_inference_only, check_kernel_block_size,
                     check_kernel_device, check_kernel_dtype, dot_precision, launch, needs_wide_offsets, new_output,
                     sequence_span, widen)
from .selection import _append_kept, _keep, _pad_list


@triton.jit
def _scores_t(q, hi_ptrs, lo_ptrs, key_blocks, row_pos, L, P,
              BLOCK_SIZE: tl.constexpr, SPLIT_KBAR: tl.constexpr, MASKED: tl.constexpr,
              DOT_PRECISION: tl.constexpr, VARLEN: tl.constexpr):
    """(BLOCK_N, BLOCK_M) base-2 logits, transposed (pooled keys x queries) so that the reductions over the
    queries run along axis 1, inside a warp. MASKED: -inf where the query does not contribute (it does iff it
    sees the whole key block: i >= (J + 1) Bs - 1, and i < L; VARLEN: and P <= i, a row of the chunk)."""
    if SPLIT_KBAR:
        s = tl.dot(tl.load(hi_ptrs), tl.trans(q)) + tl.dot(tl.load(lo_ptrs), tl.trans(q))
    else:
        s = tl.dot(tl.load(hi_ptrs), tl.trans(q), input_precision=DOT_PRECISION)
    if MASKED:
        contributes = (row_pos[None, :] >= (key_blocks[:, None] + 1) * BLOCK_SIZE - 1) & (row_pos[None, :] < L)
        if VARLEN:
            contributes = contributes & (row_pos[None, :] >= P)
        s = tl.where(contributes, s, float("-inf"))
    return s


@triton.jit
def _load_rows(q_base, row_pos, stride_ql, stride_qd, L, P, D: tl.constexpr, VARLEN: tl.constexpr):
    """Query rows row_pos, 0 outside [0, L) (VARLEN: outside [P, L), the rows of the chunk)."""
    offs_d = tl.arange(0, D)
    valid = row_pos < L
    if VARLEN:
        valid = valid & (row_pos >= P)
    return tl.load(q_base + row_pos[:, None] * stride_ql + offs_d[None, :] * stride_qd, mask=valid[:, None],
                   other=0.0)


@triton.jit
def _fold_tile(m, S, q_base, hi_ptrs, lo_ptrs, key_blocks, I, stride_ql, stride_qd, L, P, q_block,
               BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, SPLIT_KBAR: tl.constexpr,
               MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, VARLEN: tl.constexpr):
    """m_IJ, S_IJ of a tile of key blocks, over the query rows of block I (BLOCK_M at a time)."""
    for r0 in tl.static_range(0, BLOCK_SIZE, BLOCK_M):
        row_pos = I * BLOCK_SIZE + r0 + tl.arange(0, BLOCK_M)
        if BLOCK_M == BLOCK_SIZE:
            q = q_block
        else:
            q = _load_rows(q_base, row_pos, stride_ql, stride_qd, L, P, D, VARLEN)
        s = _scores_t(q, hi_ptrs, lo_ptrs, key_blocks, row_pos, L, P, BLOCK_SIZE, SPLIT_KBAR, MASKED, DOT_PRECISION,
                      VARLEN)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # Shift by 0 where no query contributes yet (exp2(-inf - 0) = 0, not NaN); a NaN logit makes S NaN through
        # the sum whatever tl.maximum did with it.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        S = S * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
        m = m_new
    return m, S


@triton.jit
def _score_tile(row_max, denom, j0, row, q_base, KBAR_HI, KBAR_LO, kbar_offset, stride_kn, I, stride_ql, stride_qd,
                L, P, N, q_block, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                D: tl.constexpr, SPLIT_KBAR: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
                VARLEN: tl.constexpr):
    """Key blocks j0 .. j0 + BLOCK_N - 1 of row I: store their u_IJ, fold them into (M_I, Z_I)."""
    key_blocks = j0 + tl.arange(0, BLOCK_N)
    kbar_rows = kbar_offset + tl.minimum(key_blocks, N - 1)[:, None] * stride_kn + tl.arange(0, D)[None, :]
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    S = tl.zeros([BLOCK_N], dtype=tl.float32)
    m, S = _fold_tile(m, S, q_base, KBAR_HI + kbar_rows, KBAR_LO + kbar_rows, key_blocks, I, stride_ql, stride_qd,
                      L, P, q_block, BLOCK_SIZE, BLOCK_M, D, SPLIT_KBAR, MASKED, DOT_PRECISION, VARLEN)
    # S == 0: no contributing query; a NaN S stays NaN (S > 0 would turn it into "no query").
    u = tl.where(S == 0, float("-inf"), m + tl.log2(tl.where(S == 0, 1.0, S)))
    tl.store(row + key_blocks, u, mask=key_blocks < N)
    new_max = tl.maximum(row_max, tl.max(m, axis=0))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    denom = denom * tl.exp2(row_max - safe_max) + tl.sum(tl.exp2(u - safe_max), axis=0)
    return new_max, denom


@triton.jit
def _normalised(row, key_blocks, I, safe_max, denom, EPS: tl.constexpr):
    """Score_IJ = 2^(u_IJ - M_I) / (Z_I + eps) of the key blocks of one tile, from the u_IJ of pass 1 in row;
    exactly 0 for J > I, whatever the row holds there."""
    causal = key_blocks <= I
    u = tl.load(row + key_blocks, mask=causal, other=float("-inf"))
    return tl.where(causal, tl.exp2(u - safe_max) / (denom + EPS), 0.0)


@triton.jit
def _block_scores_kernel(
    Q, KBAR_HI, KBAR_LO, SCORES, CU_Q, CU_K, COUNTS, INDICES, LAST_DENSE,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh,
    stride_sb, stride_sh, stride_sm,
    stride_ib, stride_ih, stride_im,
    L, N, HQ, GROUP, ROW0, total_q, total_k, COUNT_ROWS, LIST_WIDTH,
    alpha, sink_blocks, window_blocks, last_dense_blocks,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    SPLIT_KBAR: tl.constexpr, DOT_PRECISION: tl.constexpr, EPS: tl.constexpr, WIDE: tl.constexpr,
    VARLEN: tl.constexpr, SELECT: tl.constexpr, PAD_LISTS: tl.constexpr,
):
    bh = widen(tl.program_id(0), WIDE)  # heads vary fastest: a GQA group shares kbar in L2
    local = widen(tl.num_programs(1) - 1 - tl.program_id(1), WIDE)  # longest rows first
    b = bh // HQ
    h = bh % HQ
    # This launch scores rows ROW0 .. ROW0 + num_programs(1) - 1 into rows 0, 1, ... of SCORES. Row t is query
    # block t; VARLEN: query block I0 + t of sequence b (none past its last block), whose rows P .. L - 1 sit at
    # q[q_start:] (the row of absolute position i is q_start - P + i), padded kbar (batch, key_blocks, Hkv, D).
    if VARLEN:
        q_start, _, P, L, I0, N = sequence_span(CU_Q, CU_K, b, total_q, total_k, BLOCK_SIZE, WIDE)
        I = I0 + ROW0 + local
        if I >= N:
            return
        q_base = Q + (q_start - P) * stride_ql + h * stride_qh
    else:
        P = 0
        I = ROW0 + local
        q_base = Q + b * stride_qb + h * stride_qh
    kbar_offset = b * stride_kb + (h // GROUP) * stride_kh
    row = SCORES + b * stride_sb + h * stride_sh + local * stride_sm
    if BLOCK_M == BLOCK_SIZE:  # the whole query block fits one tile: load it once
        q_block = _load_rows(q_base, I * BLOCK_SIZE + tl.arange(0, BLOCK_M), stride_ql, stride_qd, L, P, D, VARLEN)
    else:
        q_block = tl.zeros([BLOCK_M, D], dtype=Q.dtype.element_ty)  # unused
    # Tiles that end below the diagonal of a full query block need no mask; the rest (one tile) does.
    block_is_full = (I + 1) * BLOCK_SIZE <= L
    if VARLEN:  # and not the partial first block of a chunk that starts inside it
        block_is_full = block_is_full & (I * BLOCK_SIZE >= P)
    unmasked_end = tl.where(block_is_full, (I // BLOCK_N) * BLOCK_N, 0)

    # Pass 1: u_IJ = m_IJ + log2 S_IJ for J <= I, the running row max M_I and the running denominator Z_I.
    row_max = tl.full([], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([], dtype=tl.float32)
    for j0 in range(0, unmasked_end, BLOCK_N):
        row_max, denom = _score_tile(row_max, denom, j0, row, q_base, KBAR_HI, KBAR_LO, kbar_offset, stride_kn, I,
                                     stride_ql, stride_qd, L, P, N, q_block, BLOCK_SIZE, BLOCK_M, BLOCK_N, D,
                                     SPLIT_KBAR, False, DOT_PRECISION, VARLEN)
    for j0 in range(unmasked_end, I + 1, BLOCK_N):
        row_max, denom = _score_tile(row_max, denom, j0, row, q_base, KBAR_HI, KBAR_LO, kbar_offset, stride_kn, I,
                                     stride_ql, stride_qd, L, P, N, q_block, BLOCK_SIZE, BLOCK_M, BLOCK_N, D,
                                     SPLIT_KBAR, True, DOT_PRECISION, VARLEN)
    # The u of pass 1 were stored by whichever threads held them in the dot's layout; the loads below are another
    # layout, so the whole program syncs first (bar.sync orders the block's global stores before its loads).
    tl.debug_barrier()
    safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)

    if SELECT:
        # Stages 3-4 in the same program (selection.py's rules, the same arithmetic): pass 2 reduces the row max m_I
        # of the causal scores (NaN if one is NaN), pass 3 keeps J when not below alpha x m_I or forced and appends
        # it to the row's list. Both recompute Score_IJ from u (the same instructions, so the same bits as a store
        # and a reload); the scores are never written.
        best = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        has_nan = tl.zeros([BLOCK_N], dtype=tl.int32)
        for j0 in range(0, I + 1, BLOCK_N):
            key_blocks = j0 + tl.arange(0, BLOCK_N)
            score = _normalised(row, key_blocks, I, safe_max, denom, EPS)
            is_nan = score != score
            has_nan = tl.maximum(has_nan, is_nan.to(tl.int32))
            best = tl.maximum(best, tl.where(is_nan | (key_blocks > I), float("-inf"), score))
        threshold = alpha * tl.where(tl.max(has_nan, axis=0) > 0, float("nan"), tl.max(best, axis=0))
        if VARLEN:
            last_dense_blocks = tl.load(LAST_DENSE + b)  # 0 for a chunk that does not end its prompt
        list_row = INDICES + b * stride_ib + h * stride_ih + local * stride_im
        count = tl.zeros([], dtype=tl.int32)
        for j0 in range(0, I + 1, BLOCK_N):
            key_blocks = j0 + tl.arange(0, BLOCK_N)
            keep = _keep(_normalised(row, key_blocks, I, safe_max, denom, EPS), key_blocks, I, N, threshold,
                         sink_blocks, window_blocks, last_dense_blocks)
            count = _append_kept(list_row, key_blocks, keep, count)
        if PAD_LISTS:
            _pad_list(list_row, count, LIST_WIDTH, BLOCK_N)
        tl.store(COUNTS + (b * HQ + h) * COUNT_ROWS + ROW0 + local, count)
    else:
        # Pass 2: normalise (a NaN Z_I makes the whole causal row NaN). Non-contributing pairs score 0; J > I was
        # never computed and scores exactly 0 whatever the row holds.
        for j0 in range(0, N, BLOCK_N):
            key_blocks = j0 + tl.arange(0, BLOCK_N)
            tl.store(row + key_blocks, _normalised(row, key_blocks, I, safe_max, denom, EPS), mask=key_blocks < N)


# Launch configuration: BLOCK_M query rows x BLOCK_N pooled keys per tile, warps, a register cap (maxnreg, see
# `_register_cap`). Tuned on an H200 (repro/NOTES.md).
SCORE_CONFIG = dict(BLOCK_N=64, num_warps=4, num_stages=1, maxnreg=128)


def _register_cap(config: dict, block_size: int, wide: bool) -> dict:
    """The launch's maxnreg option. Capped at 128, four CTAs of 4 warps share an SM instead of three (the kernel
    takes ~150 registers uncapped and the tile is latency-bound: -5.5 to -10% on an H200, repro/NOTES.md session
    14). Not applied where ptxas would spill at that cap (`python -m tools.hopper_compile`): block size 256 and
    64-bit offsets."""
    if not config.get("maxnreg") or block_size > 128 or wide:
        return {}
    return {"maxnreg": config["maxnreg"]}


def _takes_sm90_path(q, hi, block_size, varlen, wide, config) -> bool:
    """Whether this launch goes to the Gluon kernel of scoring_sm90.py (the same lists, its tile loads issued ahead
    by TMA): on an sm_90 GPU, for flash_prefill's standard path (fp16 / bf16, D 64 / 128, Bs 128, not varlen, 32-bit
    offsets, q contiguous in D) from SM90_MIN_LENGTH tokens on. config["sm90"]: None decides by length, False keeps
    the Triton kernel, True or a dict of SM90_CONFIG overrides takes the Gluon kernel at every length (A/B, tests)."""
    sm90 = _sm90_scores()
    wanted = config.get("sm90")
    if sm90 is None or wanted is False or varlen is not None or wide or block_size != 128:
        return False
    if wanted is None and q.shape[1] < sm90.SM90_MIN_LENGTH:
        return False
    return (q.dtype in (torch.float16, torch.bfloat16) and q.shape[3] in (64, 128) and q.stride(3) == 1
            and hi.data_ptr() % 16 == 0 and sm90.sm90_available(q.device))


@functools.cache
def _sm90_scores():
    """The module triton_impl.scoring_sm90, or None (warned once) where this Triton's Gluon lacks what it uses:
    the Triton kernel then scores every call."""
    try:
        from . import scoring_sm90
    except (ImportError, AttributeError) as err:  # Gluon is experimental: its names move between Triton releases
        warnings.warn(f"the Gluon score kernel for sm_90 is unavailable with Triton {triton.__version__} ({err}); "
                      "the Triton score kernel runs instead (12-14% slower from 32K tokens on an H200, repro/NOTES.md)",
                      stacklevel=3)
        return None
    return scoring_sm90


def score_tile_sizes(block_size: int, config=None) -> tuple[int, int]:
    """(BLOCK_M query rows, BLOCK_N pooled keys) per tile."""
    return min(block_size, 128), (config or SCORE_CONFIG)["BLOCK_N"]


def block_scores(q: torch.Tensor, kbar: torch.Tensor, block_size: int = 128, softmax_scale: float | None = None, *,
                 _config: dict | None = None) -> torch.Tensor:
    """Score (B, Hq, M, N) float32 of every (query block, key block) pair. Same contract as the reference."""
    check_kernel_block_size(block_size)
    check_kbar(q, kbar, block_size, dtypes=KERNEL_DTYPES)
    check_kernel_device(q=q, kbar=kbar)
    check_kernel_dtype(q=q)
    check_inference_only(q=q, kbar=kbar)
    B, L, Hq, D = q.shape
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim {D} is not supported; expected one of {HEAD_DIMS}")
    kbar_parts = split_kbar(kbar.float(), resolve_scale(softmax_scale, D), q.dtype)
    return launch_block_scores(q, kbar_parts, block_size, _config)


def split_kbar(kbar: torch.Tensor, scale: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo), contiguous: kbar x scale x log2(e) as hi + lo in `dtype` (fp16/bf16), or (x, x) in float32 for
    float32 q. The score kernel's input; the pooling kernel makes the same pair directly (`launch_mean_pool`)."""
    x = (kbar.float() * (scale * LOG2E)).contiguous()
    if dtype == torch.float32:
        return x, x
    hi = x.to(dtype)
    return hi, (x - hi.float()).to(dtype)


def launch_block_scores(q: torch.Tensor, kbar_parts: tuple[torch.Tensor, torch.Tensor], block_size: int,
                        _config: dict | None = None, *, rows: tuple[int, int] | None = None,
                        varlen: VarlenLayout | None = None) -> torch.Tensor:
    """`block_scores` without the input checks, on the scaled (hi, lo) pair of `split_kbar` / `launch_mean_pool`.

    rows=(I0, I1) scores only query blocks I0 <= I < I1, into a (B, Hq, I1 - I0, N) buffer (flash_prefill's
    chunks); None scores all M.

    varlen: q is a packed (total_q, Hq, D) batch, kbar_parts padded (batch, key_blocks, Hkv, D) (launch_mean_pool);
    rows=(t0, t1) then counts the layout's rows of every sequence (row t = query block I0_b + t), into a
    (batch, Hq, t1 - t0, key_blocks) buffer; entries past a sequence's blocks are not written."""
    return _launch(q, kbar_parts, block_size, _config, rows, varlen)


def launch_scores_and_select(q: torch.Tensor, kbar_parts: tuple[torch.Tensor, torch.Tensor], block_size: int,
                             alpha: float, sink_blocks: int, window_blocks: int, last_dense_blocks: int, *,
                             rows: tuple[int, int] | None = None, counts: torch.Tensor | None = None,
                             pad_lists: bool = True, varlen: VarlenLayout | None = None,
                             _config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stages 2-4 in one launch: (counts, indices), exactly what `selection.launch_select_and_compact` returns for
    the scores of `launch_block_scores` with the same arguments (the same arithmetic, the scores never written).
    flash_prefill's path: one launch and one kernel fewer per chunk than the two stages apart.

    counts: the whole (B, Hq, M) buffer (varlen: (batch, Hq, varlen.rows)) that the rows' counts go into, allocated
    when None; indices come back as (B, Hq, I1 - I0, N). pad_lists, varlen: as launch_select_and_compact's."""
    selection = dict(alpha=float(alpha), sink_blocks=sink_blocks, window_blocks=window_blocks,
                     last_dense_blocks=last_dense_blocks, counts=counts, pad_lists=pad_lists)
    return _launch(q, kbar_parts, block_size, _config, rows, varlen, selection)


def _launch(q, kbar_parts, block_size, config, rows, varlen, selection=None):
    """The score kernel's launch: scores (selection None), or (counts, indices) with the selection's arguments."""
    hi, lo = kbar_parts
    if varlen is not None:
        q = q.unsqueeze(0)  # (1, total_q, Hq, D): the kernel finds each sequence through the layout
        B, M, N = varlen.batch, varlen.rows, varlen.key_blocks
    else:
        B, M, N = q.shape[0], num_blocks(q.shape[1], block_size), num_blocks(q.shape[1], block_size)
    _, L, Hq, D = q.shape
    I0, I1 = rows or (0, M)
    # Fused, the buffer holds pass 1's u_IJ, which only the program of its row reads back.
    scores = new_output(B, Hq, I1 - I0, N, dtype=torch.float32, device=q.device)
    config = dict(SCORE_CONFIG, **(config or {}))
    BLOCK_M, BLOCK_N = score_tile_sizes(block_size, config)
    cu_q, cu_k, last_dense = ((varlen.cu_q, varlen.cu_k, varlen.last_dense) if varlen is not None
                              else (scores, scores, scores))
    if selection is not None:
        counts = selection["counts"]
        if counts is None:
            counts = new_output(B, Hq, M, dtype=torch.int32, device=q.device)
        indices = new_output(B, Hq, I1 - I0, N, dtype=torch.int32, device=q.device)
        net = [selection[name] for name in ("alpha", "sink_blocks", "window_blocks", "last_dense_blocks")]
        pad_lists = selection["pad_lists"]
    else:
        counts = indices = scores  # unused
        net, pad_lists = [0.0, 0, 0, 0], False
    wide = needs_wide_offsets(q, scores, indices)
    if _takes_sm90_path(q, hi, block_size, varlen, wide, config):
        overrides = config["sm90"] if isinstance(config.get("sm90"), dict) else None
        _sm90_scores().launch_sm90(q, hi, lo, scores, counts, indices, block_size, (I0, I1), net, pad_lists,
                                   overrides)
        return scores if selection is None else (counts, indices)
    launch(_block_scores_kernel, (B * Hq, I1 - I0),
        q, hi, lo, scores, cu_q, cu_k, counts, indices, last_dense, *q.stride(), *hi.stride()[:3],
        *scores.stride()[:3], *indices.stride()[:3],
        L, N, Hq, Hq // hi.shape[2], I0, *((varlen.total_q, varlen.total_k) if varlen is not None else (0, 0)),
        M, N, *net,
        BLOCK_SIZE=block_size, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, D=D,
        SPLIT_KBAR=q.dtype != torch.float32, DOT_PRECISION=dot_precision(q.dtype), EPS=SCORE_EPS,
        WIDE=wide, VARLEN=varlen is not None, SELECT=selection is not None,
        PAD_LISTS=pad_lists, num_warps=config["num_warps"], num_stages=config["num_stages"],
        **_register_cap(config, block_size, wide),
    )
    return scores if selection is None else (counts, indices)
