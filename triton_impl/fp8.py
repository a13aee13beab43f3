"""Stage 5 in FP8 (e4m3) on Hopper (twin of reference/fp8.py, whose Eq. 1-5 this file follows operation for operation).

Two kernels:

* `_quantize_kernel`, one program per (block J, batch x head) of one tensor: the block's amax, its power-of-two
  scale (Eq. 1, built from amax's exponent bits) and its e4m3 tile (Eq. 2). Output layouts, zero past L (Lp = N Bs):
  q8 and k8 (B, Lp, H, D); v8 transposed, (B, Hkv, D, Lp). Hopper's 8-bit wgmma reads both operands K-major, and
  the reduction of the PV product runs over the keys, so V's keys must be the contiguous dimension (as in
  FlashAttention-3; for the QK product, K's head dim already is). V8^T's keys are also reordered within each slice
  of 32 (`pv_key_slots`, "P stays in its registers" below).
* `_fp8_attention_kernel`: the physical walk of triton_impl/attention.py for the case it was tuned for, one program
  per (query block, batch x head), the heads of a query block in consecutive programs (a GQA group shares K/V in
  L2), longest rows first, the next list id loaded one iteration ahead. K8 and V8^T come through TMA descriptors.
  Per kept block: one e4m3 dot for the logits, scaled by s_Q s_K x scale x log2(e) (one scalar per block: the
  scales are per block), the online softmax in float32 as in the bf16 kernel, P rounded to e4m3 as 2^8 P, one e4m3
  dot with V8 and the scale s_V / 2^8. The key tile is a whole block (BLOCK_N = Bs) and the query tile a whole
  block or, at Bs = 128 up to FP8_SHORT_MAX_LENGTH tokens, half of one, so one scale per operand covers a tile: Bs is
  64 or 128 here (the 8-bit wgmma reduces over at least 32 elements, and a larger block would not fit a tile's
  registers).

P stays in its registers. The PV wgmma reads P from registers in the 8-bit A-operand layout, where thread t of a
quad (lane mod 4) holds keys 4t .. 4t+3 and 16+4t .. 16+4t+3 of each slice of 32 keys; the QK wgmma leaves S, and so
P, in the float32 accumulator layout, where the same thread holds keys 2t, 2t+1, 8+2t, 9+2t, 16+2t, ... Converting
one layout into the other moves P between threads (Triton 3.6: 24 shuffles and 16 byte permutes per thread and
tile). Instead the kernel relabels P's keys so that every thread already holds the keys the A operand wants from it
(`_as_pv_operand`: a reshape and a permute that compile to no instructions) and the quantiser stores V8^T's keys in
the same order: P V sums over the keys in any order, so the product is the same. In the bits of a key's offset
within its slice of 32, [4][3][2:1][0] -> [4][2:1][3][0].

Accumulation: Triton 3.6 leaves Hopper's e4m3 wgmma on its own accumulator (max_num_imprecise_acc = 2^30: never
promoted to float32 inside a dot), which keeps fewer mantissa bits than float32 over a dot's 64-128 terms, as in
FlashAttention-3's FP8 forward. Part of the small kernel-vs-reference difference on the GPU; the float64 error of
the output is dominated by the e4m3 operands (repro/bench_fp8.py measures both).

Bytes: a kept block of one head moves 2 Bs D bytes of K8 and V8 instead of 4 Bs D (bf16), and the e4m3 wgmma runs
at twice the bf16 rate; the softmax (exp2, max, sum) is the same work, plus P's conversion to e4m3 (no shuffle:
"P stays in its registers" above). Quantising reads Q, K, V once and writes half of that (1.3 ms at 256K tokens on
an H200).
Measured (H200, standard shape): 1.30-1.47x the bf16 kernel per kept block at 64K-256K, not the 2x the bytes and
MMA rate suggest: the compiled loop runs the two dots and the softmax one after the other (repro/NOTES.md,
sessions 10 and 16).

Under the Triton interpreter (CPU tests) the cast float32 -> e4m3 of numpy-emulated Triton does not round correctly
(a mantissa that rounds up does not carry into the exponent); EMULATE_CAST then rounds to the e4m3 grid in float32
arithmetic first, so the cast itself is exact. On a GPU the cast is the hardware's cvt (round to nearest even,
saturating), EMULATE_CAST off.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from reference.fp8 import E4M3_MAX, P_SCALE
from reference.validation import check_block_layout, check_flag, check_tensor, num_blocks

from .attention import FLOAT32_LOWEST, _check_attention_args, _listed_block
from .common import (HEAD_DIMS, KERNEL_DTYPES, LOG2E, check_inference_only, check_kernel_device, check_kernel_dtype,
                     launch, needs_wide_offsets, new_output, num_warps_for, widen)
from .validation import check_block_lists

FP8_BLOCK_SIZES = (64, 128)  # a key tile is one block (module docstring)
# num_warps None: 8 for Bs = 128 (4 spill at D = 64), else 4. imprecise_acc: tl.dot's max_num_imprecise_acc, None
# (Triton's default on sm_90: never promote the e4m3 wgmma's accumulator to float32) or the K-steps between promotions.
FP8_CONFIG = dict(num_stages=3, num_warps=None, imprecise_acc=None, block_m=None)  # block_m None: Bs
# Up to FP8_SHORT_MAX_LENGTH tokens at Bs = 128: query tiles of half a block at 2 stages (4 warps, 72 KiB: three
# CTAs per SM, which hide each other's per-program start-up), 6-23% faster at 16K-64K on an H200, even at 128K 3.5%,
# 2% slower at 128K 10% and 11% at 256K 10% (each K/V block is fetched by both halves). repro/NOTES.md, session 16.
FP8_SHORT_CONFIG = dict(FP8_CONFIG, num_stages=2, block_m=64)
FP8_SHORT_MAX_LENGTH = 65536
_E4M3_MAX: tl.constexpr = tl.constexpr(E4M3_MAX)
_P_SCALE: tl.constexpr = tl.constexpr(P_SCALE)
_ROUND_MAGIC: tl.constexpr = tl.constexpr(12582912.0)  # 1.5 x 2^23: (y + it) - it rounds |y| < 2^22 to even


@triton.jit
def _pv_key_slot(key):
    """Where V8^T stores key `key` (an offset along L): bits [3] and [2:1] of it change places (module docstring)."""
    return (key & ~15) | (((key >> 1) & 3) << 2) | (((key >> 3) & 1) << 1) | (key & 1)


def pv_key_slots(length: int, device=None) -> torch.Tensor:
    """`_pv_key_slot` of keys 0 .. length - 1 (length a multiple of 32): V8^T[..., pv_key_slots(Lp)] is V8^T with
    its keys back in their natural order. The same expression, evaluated by torch (`fn`: the undecorated function)."""
    return _pv_key_slot.fn(torch.arange(length, device=device))


def _emulate_cast() -> bool:
    """EMULATE_CAST under the interpreter. Reads TRITON_INTERPRET itself rather than calling common.interpreting(),
    which tools.hopper_compile patches to True while it compiles the GPU kernels (see common.check_kernel_dtype)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _to_e4m3(x, EMULATE_CAST: tl.constexpr):
    """float32 x -> float8e4nv, rounded to nearest even; |x| <= 448 (both callers scale into range)."""
    if EMULATE_CAST:  # the interpreter: round |x| on the grid of its binade first (module docstring)
        bits = x.to(tl.int32, bitcast=True)
        exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # e4m3 has no binade below 2^-6 (subnormals)
        step_bits = exponent - 3  # 3 mantissa bits
        step = ((step_bits + 127) << 23).to(tl.float32, bitcast=True)
        inverse = ((127 - step_bits) << 23).to(tl.float32, bitcast=True)
        magnitude = ((tl.abs(x) * inverse + _ROUND_MAGIC) - _ROUND_MAGIC) * step
        magnitude = tl.minimum(magnitude, _E4M3_MAX)
        # x's sign bit on the rounded magnitude (bits, not a negation: -0 must stay -0, byte 0x80, as in torch)
        x = (magnitude.to(tl.int32, bitcast=True) | ((bits >> 31) << 31)).to(tl.float32, bitcast=True)
    return x.to(tl.float8e4nv)


@triton.jit
def _quantize_kernel(
    X, X8, SCALE,
    stride_xb, stride_xl, stride_xh,
    stride_8b, stride_8l, stride_8h, stride_8d,
    L, H, N,
    BLOCK_SIZE: tl.constexpr, D: tl.constexpr, EMULATE_CAST: tl.constexpr, PV_ORDER: tl.constexpr,
    WIDE: tl.constexpr,
):
    J = widen(tl.program_id(0), WIDE)
    bh = widen(tl.program_id(1), WIDE)
    b = bh // H
    h = bh % H
    pos = J * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, D)
    x = tl.load(X + b * stride_xb + h * stride_xh + pos[:, None] * stride_xl + offs_d[None, :],
                mask=(pos < L)[:, None], other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    # Eq. 1: frexp's exponent of amax is its biased exponent - 126 (a subnormal amax gives -126, clamped as in the
    # reference); the scale and its inverse are built from their exponent bits, so x / scale is exact.
    E = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126 - 8
    E = tl.where(amax == 0, 0, tl.minimum(tl.maximum(E, -126), 126))
    scale = ((E + 127) << 23).to(tl.float32, bitcast=True)
    # A NaN or inf anywhere makes the sum of x * 0 NaN (max would skip a NaN): the block's scale is then NaN.
    scale = tl.where(tl.sum(tl.sum(x * 0.0, axis=1), axis=0) == 0.0, scale, float("nan"))
    inverse = ((127 - E) << 23).to(tl.float32, bitcast=True)
    x8 = _to_e4m3(x * inverse, EMULATE_CAST)  # Eq. 2
    slot = _pv_key_slot(pos) if PV_ORDER else pos  # V8^T: keys in the order P's registers hold them
    tl.store(X8 + b * stride_8b + h * stride_8h + slot[:, None] * stride_8l + offs_d[None, :] * stride_8d, x8)
    tl.store(SCALE + bh * N + J, scale)


def launch_quantize(x: torch.Tensor, block_size: int, *, transpose: bool = False):
    """Eq. 1-2 for x (B, L, H, D): (x8, scale (B, H, N) float32). x8 is (B, Lp, H, D), or (B, H, D, Lp) with
    transpose (the layout of V8, keys in the order `pv_key_slots` gives), zero in rows L .. Lp - 1 (Lp = N Bs)."""
    B, L, H, D = x.shape
    N = num_blocks(L, block_size)
    Lp = N * block_size
    if transpose:
        x8 = torch.empty(B, H, D, Lp, dtype=torch.float8_e4m3fn, device=x.device)
        strides = (x8.stride(0), 1, x8.stride(1), x8.stride(2))  # (b, row, head, d)
    else:
        x8 = torch.empty(B, Lp, H, D, dtype=torch.float8_e4m3fn, device=x.device)
        strides = (x8.stride(0), x8.stride(1), x8.stride(2), 1)
    scale = new_output(B, H, N, dtype=torch.float32, device=x.device)
    x = x if x.stride(-1) == 1 else x.contiguous()
    launch(_quantize_kernel, (N, B * H),
        x, x8, scale, x.stride(0), x.stride(1), x.stride(2), *strides, L, H, N,
        BLOCK_SIZE=block_size, D=D, EMULATE_CAST=_emulate_cast(), PV_ORDER=transpose, WIDE=needs_wide_offsets(x, x8),
        num_warps=num_warps_for(block_size, D),
    )
    return x8, scale


def quantize_blocks(x: torch.Tensor, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.fp8.quantize_blocks in one kernel launch: (x8 (B, L, H, D) float8_e4m3fn, scale (B, H, N)), equal
    to the reference's to the bit (the scales are powers of two)."""
    _check_fp8_block_size(block_size)
    check_tensor("x", x, ndim=4, dtypes=KERNEL_DTYPES)
    if x.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"x's last dim (the head dim) must be one of {HEAD_DIMS}, got {x.shape[-1]}")
    check_kernel_device(x=x)
    check_kernel_dtype(x=x)
    check_inference_only(x=x)
    x8, scale = launch_quantize(x, block_size)
    return x8[:, : x.shape[1]], scale


@triton.jit
def _as_pv_operand(p8):
    """P8 (BLOCK_M, BLOCK_N) with key j relabelled _pv_key_slot(j), V8^T's order: in the A-operand layout of the PV
    wgmma, each thread then holds the values it already has in the accumulator layout (module docstring)."""
    BLOCK_M: tl.constexpr = p8.shape[0]
    BLOCK_N: tl.constexpr = p8.shape[1]
    # a key's offset in its slice of 32: bits [4] [3] [2:1] [0] -> [4] [2:1] [3] [0]
    return p8.reshape(BLOCK_M, BLOCK_N // 32, 2, 2, 4, 2).permute(0, 1, 2, 4, 3, 5).reshape(BLOCK_M, BLOCK_N)


@triton.jit
def _fp8_attend_block(
    acc, m_i, l_i, q8, q_pos, K8, VT8, b, kv_col, vt_row, start, tile_scale, v_scale, L,
    BLOCK: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr, EMULATE_CAST: tl.constexpr,
    IMPRECISE_ACC: tl.constexpr,
):
    """Fold key block start .. start + BLOCK into the running softmax state (Eq. 3-5)."""
    k = K8.load([b, tl.cast(start, tl.int32), kv_col]).reshape(BLOCK, D)
    vt = VT8.load([vt_row, tl.cast(start, tl.int32)])  # (D, BLOCK): keys contiguous
    s = tl.dot(q8, tl.trans(k), max_num_imprecise_acc=IMPRECISE_ACC)  # float32 out (accumulation: docstring)
    if MASKED:  # the diagonal block: causality, and the zero rows past L
        key_pos = start + tl.arange(0, BLOCK)
        s = tl.where((key_pos[None, :] <= q_pos[:, None]) & (key_pos[None, :] < L), s, float("-inf"))
    # tile_scale = s_Q s_K scale log2(e) > 0 commutes with max; exp2(s x tile_scale - m) is one FMA per logit.
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * tile_scale)
    p = tl.exp2(s * tile_scale - m_new[:, None])
    correction = tl.exp2(m_i - m_new)
    l_i = l_i * correction + tl.sum(p, axis=1)
    pv = tl.dot(_as_pv_operand(_to_e4m3(p * _P_SCALE, EMULATE_CAST)), tl.trans(vt), max_num_imprecise_acc=IMPRECISE_ACC)
    acc = acc * correction[:, None] + pv * (v_scale / _P_SCALE)
    return acc, m_new, l_i


@triton.jit
def _fp8_attention_kernel(
    Q8, K8, VT8, SQ, SK, SV, OUT, COUNTS, INDICES,
    stride_qb, stride_ql, stride_qh,
    stride_ob, stride_ol, stride_oh,
    stride_lb, stride_lh, stride_lm,
    L, M, HQ, HKV, GROUP, qk_scale, ROW0, CAPACITY,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, EMULATE_CAST: tl.constexpr,
    IMPRECISE_ACC: tl.constexpr, WIDE: tl.constexpr,
):
    TILES_PER_BLOCK: tl.constexpr = BLOCK // BLOCK_M
    bh = widen(tl.program_id(0), WIDE)
    tile = widen(tl.num_programs(1) - 1 - tl.program_id(1), WIDE)  # longest rows first
    t_row = tile // TILES_PER_BLOCK
    I = t_row + ROW0  # query block; its list is row t_row of INDICES (rows ROW0 .. of COUNTS, as attention.py)
    b = bh // HQ
    h = bh % HQ
    kv_head = h // GROUP
    q_pos = I * BLOCK + (tile % TILES_PER_BLOCK) * BLOCK_M + tl.arange(0, BLOCK_M)  # this tile's rows of block I
    offs_d = tl.arange(0, D)
    q8 = tl.load(Q8 + b * stride_qb + h * stride_qh + q_pos[:, None] * stride_ql + offs_d[None, :])  # zero past L
    stat = (b * HQ + h) * M + I
    scales = (b * HKV + kv_head) * M  # SK, SV (B, Hkv, M)
    q_scale = qk_scale * tl.load(SQ + stat)
    kv_col = (kv_head * D).to(tl.int32)  # K8's columns in its (B, Lp, Hkv * D) view
    vt_row = ((b * HKV + kv_head) * D).to(tl.int32)  # V8^T's rows in its (B Hkv D, Lp) view
    bi = tl.cast(b, tl.int32)
    row = INDICES + b * stride_lb + h * stride_lh + t_row * stride_lm

    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], FLOAT32_LOWEST, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # The list walk of attention.py's PHYSICAL mode: at most min(I + 1, CAPACITY) entries read, whatever the list
    # holds; TMA zero-fills a box outside the tensor, so a malformed id gives a wrong row, never a wild read.
    count = tl.minimum(tl.maximum(tl.load(COUNTS + stat), 0), tl.minimum(I + 1, CAPACITY))
    last = tl.load(row + tl.maximum(count - 1, 0), mask=count > 0, other=-1)
    has_diagonal = last == I
    n_off_diagonal = tl.minimum(count - has_diagonal.to(tl.int32), I)
    J = _listed_block(row, 0, n_off_diagonal, I, WIDE, True)
    for t in range(0, n_off_diagonal):
        J_next = _listed_block(row, t + 1, n_off_diagonal, I, WIDE, True)  # one iteration ahead
        acc, m_i, l_i = _fp8_attend_block(acc, m_i, l_i, q8, q_pos, K8, VT8, bi, kv_col, vt_row, J * BLOCK,
                                          q_scale * tl.load(SK + scales + J), tl.load(SV + scales + J), L,
                                          BLOCK, D, False, EMULATE_CAST, IMPRECISE_ACC)
        J = J_next
    if has_diagonal:
        acc, m_i, l_i = _fp8_attend_block(acc, m_i, l_i, q8, q_pos, K8, VT8, bi, kv_col, vt_row, I * BLOCK,
                                          q_scale * tl.load(SK + scales + I), tl.load(SV + scales + I), L,
                                          BLOCK, D, True, EMULATE_CAST, IMPRECISE_ACC)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # a row that saw no key gives 0
    out = acc / l_i[:, None]
    tl.store(OUT + b * stride_ob + h * stride_oh + q_pos[:, None] * stride_ol + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=(q_pos < L)[:, None])


def fp8_config(L: int, block_size: int) -> dict:
    """The launch configuration `launch_fp8_attention` starts from for a sequence of L tokens."""
    return FP8_SHORT_CONFIG if block_size == 128 and L <= FP8_SHORT_MAX_LENGTH else FP8_CONFIG


def fp8_descriptors(k8: torch.Tensor, vt8: torch.Tensor, block: int):
    """TMA descriptors of K8 (B, Lp, Hkv, D) as (B, Lp, Hkv D), box (1, block, D), and of V8^T (B, Hkv, D, Lp) as
    (B Hkv D, Lp), box (D, block). Both buffers come from launch_quantize: contiguous, rows of 64 or 128 bytes."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, Lp, Hkv, D = k8.shape
    k_desc = TensorDescriptor(k8, [B, Lp, Hkv * D], [k8.stride(0), k8.stride(1), 1], [1, block, D])
    v_desc = TensorDescriptor(vt8.view(B * Hkv * D, Lp), [B * Hkv * D, Lp], [Lp, 1], [D, block])
    return k_desc, v_desc


def quantize_qkv(q, k, v, block_size: int):
    """(q8, k8, v8^T, s_q, s_k, s_v): the three quantised operands of the attention kernel."""
    (q8, s_q), (k8, s_k), (vt8, s_v) = (launch_quantize(q, block_size), launch_quantize(k, block_size),
                                        launch_quantize(v, block_size, transpose=True))
    return q8, k8, vt8, s_q, s_k, s_v


def launch_fp8_attention(quantized, L: int, block_size: int, scale: float, counts, indices, *, out,
                         rows=None, config=None):
    """The FP8 attention kernel without checks, on `quantize_qkv`'s output, writing out (B, L, Hq, D). rows=(I0, I1)
    and the lists as in launch_attention (rows 0 .. I1 - I0 - 1 of indices are query blocks I0 ..)."""
    q8, k8, vt8, s_q, s_k, s_v = quantized
    config = dict(fp8_config(L, block_size), **(config or {}))
    B, _, Hq, D = q8.shape
    Hkv = k8.shape[2]
    M = s_q.shape[-1]
    I0, I1 = rows or (0, M)
    indices = indices if indices.stride(-1) == 1 else indices.contiguous()
    k_desc, v_desc = fp8_descriptors(k8, vt8, block_size)
    block_m = config["block_m"] or block_size
    assert block_size % block_m == 0
    launch(_fp8_attention_kernel, (B * Hq, (I1 - I0) * (block_size // block_m)),
        q8, k_desc, v_desc, s_q, s_k, s_v, out, counts, indices,
        q8.stride(0), q8.stride(1), q8.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        indices.stride(0), indices.stride(1), indices.stride(2),
        L, M, Hq, Hkv, Hq // Hkv, scale * LOG2E, I0, indices.shape[-1],
        BLOCK=block_size, BLOCK_M=block_m, D=D, EMULATE_CAST=_emulate_cast(), IMPRECISE_ACC=config["imprecise_acc"],
        WIDE=needs_wide_offsets(q8, out, indices),
        num_warps=config["num_warps"] or (8 if block_m == 128 else 4), num_stages=config["num_stages"],
    )
    return out


def _check_fp8_block_size(block_size) -> None:
    if block_size not in FP8_BLOCK_SIZES:
        raise ValueError(f"block_size {block_size} is not supported by the FP8 attention kernel; expected one of "
                         f"{', '.join(map(str, FP8_BLOCK_SIZES))} (its key tiles are whole blocks)")


def check_fp8_args(q, block_size) -> None:
    """What the FP8 path adds to the kernels' checks: its block sizes, and a Hopper GPU (e4m3 wgmma and TMA)."""
    _check_fp8_block_size(block_size)
    if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) < (9, 0):
        name = torch.cuda.get_device_name(q.device)
        raise RuntimeError(f"fp8 attention needs a Hopper GPU or newer (compute capability 9.0+: e4m3 wgmma and TMA, "
                           f"e.g. an H100 or H200); {name} has {torch.cuda.get_device_capability(q.device)}")


def block_sparse_attention_fp8(q, k, v, counts, indices, block_size: int = 128, softmax_scale: float | None = None,
                               *, validate: bool = False):
    """reference.fp8.block_sparse_attention_fp8 in Triton: Q, K, V quantised per block to e4m3 (three launches), then
    the listed blocks walked with e4m3 dots (one launch). Lists are trusted unless validate=True, as in
    `block_sparse_attention`. Returns out (B, L, Hq, D) in q.dtype."""
    scale = _check_attention_args(q, k, v, block_size, softmax_scale)
    check_fp8_args(q, block_size)
    check_block_layout(q, block_size=block_size, counts=counts, indices=indices)
    check_kernel_device(counts=counts, indices=indices)
    check_flag("validate", validate)
    if validate:
        check_block_lists(counts, indices)
    B, L, Hq, D = q.shape
    out = new_output(B, L, Hq, D, dtype=q.dtype, device=q.device)
    return launch_fp8_attention(quantize_qkv(q, k, v, block_size), L, block_size, scale, counts.contiguous(),
                                indices, out=out)
