"""Stage 5 in FP8 (e4m3): block-sparse attention with quantised Q, K, V and P, as Hopper's FP8 tensor cores run it.

Opt-in (`block_sparse_attention_fp8`, or `flash_prefill(..., fp8=True)`): the selection (stages 1-4) is unchanged and
runs in the model's dtype; only the attention over the kept blocks is quantised. This file is the contract that the
Triton twin (triton_impl/fp8.py) follows operation for operation, so the two can be compared closely.

Quantisation, one scale per block of Bs rows of one head (the granularity of the lists, so a kept block costs one
scale per operand):

    s_X[b, h, J] = 2^E,  E = e(amax_J) - 8,  e(a) = frexp's exponent (a = f 2^e, f in [0.5, 1))      (1)
    X8 = round_e4m3(X / s_X)                                                                          (2)

for X = Q (per query block and query head), K and V (per key block and kv head). A power-of-two scale makes (2)
exact before the rounding, so any implementation that rounds to nearest even gets the same X8 to the bit;
|X / s_X| < 2^8, under e4m3's largest finite 448. (E is clamped into [-126, 126]; an all-zero block gets scale 1.)

The walk is FlashAttention's online softmax in base 2 (the kernels' form), per kept key block J of query block I:

    S = (Q8 K8^T) s_Q[I] s_K[J] x scale x log2(e)          (float32 accumulation)                     (3)
    m' = max(m, rowmax S);  P = 2^(S - m');  l = l 2^(m - m') + rowsum P                               (4)
    acc = acc 2^(m - m') + (round_e4m3(2^8 P) V8) s_V[J] / 2^8                                        (5)

and out = acc / l. P in [0, 1] is multiplied by 2^8 before its rounding (a power of two: exact) so that weights
down to 2^-14 keep e4m3's 3 mantissa bits instead of falling into its subnormals (below 2^-6); the row sum l is
taken over the unrounded P. Error: each rounding is relative, at most 2^-4 of its operand; the outputs' error
against exact attention is measured in tests/test_fp8.py and repro/bench_fp8.py next to the bf16 kernel's.

NaN and inf: a block holding one gets the scale NaN (its e4m3 values are then meaningless), so every row that reads
the block is NaN: coarser than dense attention, where a non-finite key reaches only the rows that see it
(docs/DESIGN.md section 2), but never a finite wrong number. Returns out in q's dtype; no lse, no mean correction
(refused by the callers).
"""

from __future__ import annotations

import math

import torch

from .attention import _BlockedQKV, _check_sparse_args
from .pooling import split_blocks
from .validation import check_block_layout, check_block_lists, num_blocks

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
P_SCALE = 256.0  # 2^8: P is rounded as 2^8 P (module docstring, Eq. 5)
SCALE_EXPONENT_RANGE = (-126, 126)  # 2^E and 2^-E both normal float32
FLOAT32_LOWEST = torch.finfo(torch.float32).min  # the running max starts finite, as in the kernels


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest float8_e4m3fn (ties to even), as float8_e4m3fn. Clamped to +-448 first: torch's cast
    does not saturate (a value past 448 would become NaN), the GPU's cvt.satfinite does."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def block_scale_exponents(amax: torch.Tensor) -> torch.Tensor:
    """E of Eq. 1 for every block's amax: frexp's exponent minus 8, clamped; 0 for an all-zero block."""
    E = (torch.frexp(amax).exponent - 8).clamp(*SCALE_EXPONENT_RANGE)  # amax in its own dtype: no rounding first
    return torch.where(amax == 0, 0, E)


def quantize_blocks(x: torch.Tensor, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1-2 for x (B, L, H, D): (x8 (B, L, H, D) float8_e4m3fn, scale (B, H, N) float32, powers of two), with
    x ~= x8 x scale of its block; N = ceil(L / Bs), a partial last block scaled by its valid rows. A block holding a
    NaN or inf gets the scale NaN."""
    blocks = split_blocks(x, block_size)  # (B, H, N, Bs, D), zero-padded, float32 (float64 stays float64)
    E = block_scale_exponents(blocks.abs().amax(dim=(-1, -2)))  # (B, H, N)
    x8 = round_e4m3(blocks * torch.exp2(-E.to(blocks.dtype))[..., None, None])  # exact scaling, one rounding
    B, L, H, D = x.shape
    x8 = x8.permute(0, 2, 3, 1, 4).reshape(B, -1, H, D)[:, :L]  # back to (B, L, H, D)
    finite = torch.isfinite(blocks).all(dim=-1).all(dim=-1)
    return x8, torch.where(finite, torch.exp2(E.float()), float("nan"))  # a non-finite block: scale NaN


def block_sparse_attention_fp8(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    counts: torch.Tensor,
    indices: torch.Tensor,
    block_size: int = 128,
    softmax_scale: float | None = None,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Causal attention over the listed key blocks, with Q, K, V and P in e4m3 (module docstring, Eq. 1-5).

    Args:
        q: (B, L, Hq, D); k, v: (B, L, Hkv, D), finite.
        counts (B, Hq, M) int32, indices (B, Hq, M, N) int32: the lists, as `block_sparse_attention` takes them.
        block_size: Bs, which is also the quantisation block; softmax_scale: None means 1 / sqrt(D).
        validate: check the lists first (ValueError on a malformed one), as `block_sparse_attention`.
    Returns:
        out (B, L, Hq, D) in q.dtype; a row whose list is empty gives 0.
    """
    scale = _check_sparse_args(q, k, v, block_size, softmax_scale)
    check_block_layout(q, block_size=block_size, counts=counts, indices=indices)
    if validate:
        check_block_lists(counts, indices)
    (q8, s_q), (k8, s_k), (v8, s_v) = (quantize_blocks(x, block_size) for x in (q, k, v))
    blocks = _BlockedQKV(q8.float(), k8.float(), v8.float(), block_size)  # the e4m3 values, exactly, in float32
    b, kv_head = blocks.batch_idx, blocks.kv_head_idx  # (B, 1), (1, Hq): key block J of (b, h) is [b, kv_head, J]
    qk_scale = scale * math.log2(math.e)
    results = []
    for I in range(num_blocks(q.shape[1], block_size)):
        q_I = blocks.q[:, :, I]  # (B, Hq, Bs, D)
        m = torch.full(q_I.shape[:-1], FLOAT32_LOWEST, device=q.device)  # (B, Hq, Bs)
        l = torch.zeros_like(m)
        acc = torch.zeros_like(q_I)
        row_counts = counts[:, :, I]
        for t in range(int(row_counts.max())):
            active = t < row_counts
            J = torch.where(active, indices[:, :, I, t], 0).long()  # (B, Hq)
            k_J, v_J = blocks.key_block(J)
            tile_scale = qk_scale * s_q[:, :, I] * s_k[b, kv_head, J]  # powers of two times qk_scale: exact
            s = (q_I @ k_J.transpose(-1, -2)) * tile_scale[..., None, None]  # (3)
            s = s.masked_fill(~blocks.visible(I, J, active), float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1))  # (4); m is finite, so exp2 never sees -inf - (-inf)
            p = torch.exp2(s - m_new.unsqueeze(-1))
            correction = torch.exp2(m - m_new)
            l = l * correction + p.sum(dim=-1)
            p8 = round_e4m3(p * P_SCALE).float()  # (5)
            acc = acc * correction.unsqueeze(-1) + (p8 @ v_J) * (s_v[b, kv_head, J] / P_SCALE)[..., None, None]
            m = m_new
        results.append(acc / torch.where(l == 0, 1.0, l).unsqueeze(-1))  # a row that saw no key: acc = 0
    return blocks.output(results, q.dtype)
