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

from .common import (HEAD_DIMS, KERNEL_DTYPES, check_inference_only, check_kernel_dtype,
                     check_kernel_block_size, check_kernel_device, needs_wide_offsets, new_output, widen)


@triton.jit
def _mean_pool_kernel(
    K, KBAR, KBAR_LO, V, VBAR,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    stride_ob, stride_on, stride_oh,
    L, H, out_scale,
    BLOCK_SIZE: tl.constexpr, POOL_ROWS: tl.constexpr, D: tl.constexpr, SPLIT: tl.constexpr, POOL_V: tl.constexpr,
    WIDE: tl.constexpr,
):
    J = widen(tl.program_id(0), WIDE)  # 64-bit offsets only when the keys need them
    bh = widen(tl.program_id(1), WIDE)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D)
    block_start = J * BLOCK_SIZE
    acc = tl.zeros([D], dtype=tl.float32)
    vacc = tl.zeros([D], dtype=tl.float32)
    for r0 in range(0, BLOCK_SIZE, POOL_ROWS):
        rows = block_start + r0 + tl.arange(0, POOL_ROWS)
        ptrs = K + b * stride_kb + h * stride_kh + rows[:, None] * stride_kl + offs_d[None, :] * stride_kd
        tile = tl.load(ptrs, mask=(rows < L)[:, None], other=0.0)
        acc += tl.sum(tile.to(tl.float32), axis=0)
        if POOL_V:
            ptrs = V + b * stride_vb + h * stride_vh + rows[:, None] * stride_vl + offs_d[None, :] * stride_vd
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
                     out_dtype=torch.float32, values: torch.Tensor | None = None):
    """`mean_pool_keys` without the input checks (flash_prefill has made them already).

    flash_prefill asks for the score kernel's input directly: kbar x out_scale, as the pair (hi, lo) in
    split_dtype (fp16/bf16), or (x, x) in float32 when split_dtype is float32 (see scoring.split_kbar). Without
    split_dtype: kbar x out_scale in out_dtype (B, N, H, D).

    values (B, L, H, D), same shape as k: also pool them in the same pass and return (kbar result, vbar), vbar the
    unscaled block means of the values (B, N, H, D) in split_dtype (out_dtype without it): the means of the mean
    correction."""
    B, L, H, D = k.shape
    N = num_blocks(L, block_size)
    split = split_dtype is not None and split_dtype != torch.float32
    dtype = split_dtype if split_dtype is not None else out_dtype
    kbar = new_output(B, N, H, D, dtype=dtype, device=k.device)
    kbar_lo = new_output(B, N, H, D, dtype=split_dtype, device=k.device) if split else kbar
    vbar = new_output(B, N, H, D, dtype=dtype, device=k.device) if values is not None else kbar
    v = values if values is not None else k
    _mean_pool_kernel[(N, B * H)](
        k, kbar, kbar_lo, v, vbar, *k.stride(), *v.stride(), *kbar.stride()[:3], L, H, out_scale,
        BLOCK_SIZE=block_size, POOL_ROWS=min(block_size, 64), D=D, SPLIT=split, POOL_V=values is not None,
        WIDE=needs_wide_offsets(k, v),
    )
    result = (kbar, kbar_lo) if split_dtype is not None else kbar
    return (result, vbar) if values is not None else result
