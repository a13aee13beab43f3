"""Stage 1 in Triton: mean-pool every key block (twin of reference/pooling.py).

One program per (key block J, batch b, kv head h) reads the block's Bs x D keys once, in tiles of POOL_ROWS
rows, sums them in float32 and divides by the number of valid tokens. Memory-bound: it reads the keys once
(B x L x Hkv x D elements) and writes N x D floats per head.

With mean correction (FlashPrefill V2, Eq. 6) the same programs also pool the values, in the same pass: the
attention kernel needs k_bar (the score kernel's scaled hi part, reused) and v_bar; pooling V costs one more read
of V (B x L x Hkv x D elements, ~0.1 ms at 256K tokens on an H200), no second read of K.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from reference.validation import check_tensor, num_blocks

from .common import (HEAD_DIMS, KERNEL_DTYPES, VarlenLayout, check_inference_only, check_kernel_block_size,
                     check_kernel_device, check_kernel_dtype, launch, needs_wide_offsets, new_output, sequence_span,
                     widen)


@triton.jit
def _mean_pool_kernel(
    K, KBAR, KBAR_LO, V, VBAR, CU_Q, CU_K, FIRST_POOLED,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    stride_ob, stride_on, stride_oh,
    L, H, out_scale, total_q, total_k,
    BLOCK_SIZE: tl.constexpr, POOL_ROWS: tl.constexpr, D: tl.constexpr, SPLIT: tl.constexpr, POOL_V: tl.constexpr,
    WIDE: tl.constexpr, VARLEN: tl.constexpr,
):
    J = widen(tl.program_id(0), WIDE)  # 64-bit offsets only when the keys need them
    bh = widen(tl.program_id(1), WIDE)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D)
    if VARLEN:  # sequence b's keys start at row k_start of the packed k; blocks past its end or cached: nothing
        _, k_start, _, L, _, N = sequence_span(CU_Q, CU_K, b, total_q, total_k, BLOCK_SIZE, WIDE)
        if (J >= N) | (J < tl.load(FIRST_POOLED + b)):
            return
        K = K + k_start * stride_kl
        V = V + k_start * stride_vl
    else:
        K = K + b * stride_kb
        V = V + b * stride_vb
    block_start = J * BLOCK_SIZE
    acc = tl.zeros([D], dtype=tl.float32)
    vacc = tl.zeros([D], dtype=tl.float32)
    for r0 in range(0, BLOCK_SIZE, POOL_ROWS):
        rows = block_start + r0 + tl.arange(0, POOL_ROWS)
        ptrs = K + h * stride_kh + rows[:, None] * stride_kl + offs_d[None, :] * stride_kd
        tile = tl.load(ptrs, mask=(rows < L)[:, None], other=0.0)
        acc += tl.sum(tile.to(tl.float32), axis=0)
        if POOL_V:
            ptrs = V + h * stride_vh + rows[:, None] * stride_vl + offs_d[None, :] * stride_vd
            vacc += tl.sum(tl.load(ptrs, mask=(rows < L)[:, None], other=0.0).to(tl.float32), axis=0)
    valid = tl.minimum(L - block_start, BLOCK_SIZE)
    mean = acc / valid * out_scale
    out = b * stride_ob + J * stride_on + h * stride_oh + offs_d
    if SPLIT:  # hi + lo in the half dtype, for the score kernel's two tensor-core dots
        hi = mean.to(KBAR.dtype.element_ty)
        tl.store(KBAR + out, hi)
        tl.store(KBAR_LO + out, (mean - hi.to(tl.float32)).to(KBAR_LO.dtype.element_ty))
    else:
        tl.store(KBAR + out, mean.to(KBAR.dtype.element_ty))
    if POOL_V:  # unscaled, in VBAR's dtype (the attention kernel's PV dot takes it as it is)
        tl.store(VBAR + out, (vacc / valid).to(VBAR.dtype.element_ty))


def mean_pool_keys(k: torch.Tensor, block_size: int = 128) -> torch.Tensor:
    """kbar (B, N, Hkv, D) float32: the mean of the valid keys of every block. Same contract as the reference."""
    check_tensor("k", k, ndim=4, dtypes=KERNEL_DTYPES)
    check_kernel_block_size(block_size)
    check_kernel_device(k=k)
    check_kernel_dtype(k=k)
    check_inference_only(k=k)
    B, L, H, D = k.shape
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim {D} is not supported; expected one of {HEAD_DIMS}")
    return launch_mean_pool(k, block_size)


def launch_mean_pool(k: torch.Tensor, block_size: int, *, out_scale: float = 1.0, split_dtype=None,
                     out_dtype=torch.float32, values: torch.Tensor | None = None, varlen: VarlenLayout | None = None,
                     out: torch.Tensor | None = None):
    """`mean_pool_keys` without the input checks (flash_prefill has made them already).

    flash_prefill asks for the score kernel's input directly: kbar x out_scale, as the pair (hi, lo) in
    split_dtype (fp16/bf16), or (x, x) in float32 when split_dtype is float32 (see scoring.split_kbar). Without
    split_dtype: kbar x out_scale in out_dtype (B, N, H, D).

    values (B, L, H, D), same shape as k: also pool them in the same pass and return (kbar result, vbar), vbar the
    unscaled block means of the values (B, N, H, D) in split_dtype (out_dtype without it): the means of the mean
    correction.

    varlen: k (and values) are a packed (total_k, H, D) batch laid out as the layout says; the means come back
    padded per sequence, (batch, key_blocks, H, D), sequence b's blocks at [b, :N_b] (rows past N_b unwritten), and
    blocks J < first_pooled[b] are not written either: pass `out` (that shape, out_dtype) holding them. No split, no
    values (pool V as k with a layout whose first_pooled is 0)."""
    if varlen is not None:
        assert split_dtype is None and values is None and (out is None or out.dtype == out_dtype)
        k = k.unsqueeze(0)  # (1, total_k, H, D): the kernel finds each sequence through the layout
        B, N = varlen.batch, varlen.key_blocks
    else:
        B, N = k.shape[0], num_blocks(k.shape[1], block_size)
    _, L, H, D = k.shape
    split = split_dtype is not None and split_dtype != torch.float32
    dtype = split_dtype if split_dtype is not None else out_dtype
    kbar = out if out is not None else new_output(B, N, H, D, dtype=dtype, device=k.device)
    kbar_lo = new_output(B, N, H, D, dtype=split_dtype, device=k.device) if split else kbar
    vbar = new_output(B, N, H, D, dtype=dtype, device=k.device) if values is not None else kbar
    v = values if values is not None else k
    cu_q, cu_k, first = (varlen.cu_q, varlen.cu_k, varlen.first_pooled) if varlen is not None else (kbar,) * 3
    launch(_mean_pool_kernel, (N, B * H),
        k, kbar, kbar_lo, v, vbar, cu_q, cu_k, first, *k.stride(), *v.stride(), *kbar.stride()[:3], L, H, out_scale,
        *((varlen.total_q, varlen.total_k) if varlen is not None else (0, 0)),
        BLOCK_SIZE=block_size, POOL_ROWS=min(block_size, 64), D=D, SPLIT=split, POOL_V=values is not None,
        WIDE=needs_wide_offsets(k, v, kbar), VARLEN=varlen is not None,
    )
    result = (kbar, kbar_lo) if split_dtype is not None else kbar
    return (result, vbar) if values is not None else result
