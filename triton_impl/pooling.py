"""Stage 1 in Triton: mean-pool every key block (twin of reference/pooling.py).

One program per (key block J, batch b, kv head h) reads the block's Bs x D keys once, in tiles of POOL_ROWS
rows, sums them in float32 and divides by the number of valid tokens. Memory-bound: it reads the keys once
(B x L x Hkv x D elements) and writes N x D floats per head.
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
    K, KBAR, KBAR_LO,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_ob, stride_on, stride_oh,
    L, H, out_scale,
    BLOCK_SIZE: tl.constexpr, POOL_ROWS: tl.constexpr, D: tl.constexpr, SPLIT: tl.constexpr, WIDE: tl.constexpr,
):
    J = widen(tl.program_id(0), WIDE)  # 64-bit offsets only when the keys need them
    bh = widen(tl.program_id(1), WIDE)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D)
    block_start = J * BLOCK_SIZE
    acc = tl.zeros([D], dtype=tl.float32)
    for r0 in range(0, BLOCK_SIZE, POOL_ROWS):
        rows = block_start + r0 + tl.arange(0, POOL_ROWS)
        ptrs = K + b * stride_kb + h * stride_kh + rows[:, None] * stride_kl + offs_d[None, :] * stride_kd
        tile = tl.load(ptrs, mask=(rows < L)[:, None], other=0.0)
        acc += tl.sum(tile.to(tl.float32), axis=0)
    valid = tl.minimum(L - block_start, BLOCK_SIZE)
    mean = acc / valid * out_scale
    out = b * stride_ob + J * stride_on + h * stride_oh + offs_d
    if SPLIT:  # hi + lo in the half dtype, for the score kernel's two tensor-core dots
        hi = mean.to(KBAR.dtype.element_ty)
        tl.store(KBAR + out, hi)
        tl.store(KBAR_LO + out, (mean - hi.to(tl.float32)).to(KBAR_LO.dtype.element_ty))
    else:
        tl.store(KBAR + out, mean)


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


def launch_mean_pool(k: torch.Tensor, block_size: int, *, out_scale: float = 1.0, split_dtype=None):
    """`mean_pool_keys` without the input checks (flash_prefill has made them already).

    flash_prefill asks for the score kernel's input directly: kbar x out_scale, as the pair (hi, lo) in
    split_dtype (fp16/bf16), or (x, x) in float32 when split_dtype is float32 (see scoring.split_kbar)."""
    B, L, H, D = k.shape
    N = num_blocks(L, block_size)
    split = split_dtype is not None and split_dtype != torch.float32
    kbar = new_output(B, N, H, D, dtype=split_dtype if split else torch.float32, device=k.device)
    kbar_lo = new_output(B, N, H, D, dtype=split_dtype, device=k.device) if split else kbar
    _mean_pool_kernel[(N, B * H)](
        k, kbar, kbar_lo, *k.stride(), *kbar.stride()[:3], L, H, out_scale,
        BLOCK_SIZE=block_size, POOL_ROWS=min(block_size, 64), D=D, SPLIT=split, WIDE=needs_wide_offsets(k),
    )
    if split_dtype is None:
        return kbar
    return kbar, kbar_lo
