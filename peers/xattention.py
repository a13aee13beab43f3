"""XAttention's block selection (Xu et al., ICML 2025, arXiv 2503.16428), written by us from the paper.

Every block is scored by the sum of its strided antidiagonals of softmax(Q K^T), and each query block keeps the
fewest key blocks whose cumulative score reaches a fraction tau (`threshold`) of its row. Returns FlashPrefill's
list format (see peers/__init__.py). The estimate runs a few query blocks at a time (`_XATTN_CHUNK_ELEMENTS`) to
bound memory at long L; the chunking changes no value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reference.pooling import compute_dtype
from reference.selection import compact_blocks
from reference.validation import check_block_size, check_count, check_qkv, num_blocks, resolve_scale

from ._shared import causal_blocks, check_real, gqa_scores

# Paper defaults (xattention_select's docstring says where each comes from).
XATTENTION_DEFAULTS = dict(threshold=0.9, stride=8, block_size=128)


def _check_stride(stride, block_size) -> None:
    check_block_size(block_size)
    check_count("stride", stride, minimum=1)
    if block_size % stride or stride & (stride - 1):
        raise ValueError(f"stride must be a power of two dividing block_size={block_size}, got {stride}")


def check_xattention_params(*, threshold=0.9, stride=8, block_size=128, keep_sink=True,
                            keep_diagonal=True) -> float:
    """Validate XAttention's parameters (without tensors); return the threshold as a float."""
    threshold = check_real("threshold", threshold, low=0.0, high=1.0, low_open=True)
    for name, flag in (("keep_sink", keep_sink), ("keep_diagonal", keep_diagonal)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    _check_stride(stride, block_size)
    return threshold


_XATTN_CHUNK_ELEMENTS = 1 << 26  # strided scores held at once: 256 MB of float32


def xattention_block_scores(q, k, *, stride: int = 8, block_size: int = 128, softmax_scale: float | None = None):
    """XAttention's antidiagonal block scores A (B, Hq, M, N), float32: A[I, J] = sum over the strided rows r in
    query block I and strided columns c in key block J of softmax_c(scale / S * sum_s q[rS + S-1-s] . k[cS + s]).
    Each strided row that holds a real query sums to 1 over J <= I; see `xattention_select`."""
    B, L, Hq, Hkv, D = check_qkv(q, k, k)
    _check_stride(stride, block_size)
    scale = resolve_scale(softmax_scale, D)
    S, Bs, device = stride, block_size, q.device
    M = num_blocks(L, Bs)
    Lp, n, per_block = M * Bs, M * Bs // S, Bs // S
    dtype = compute_dtype(q)
    pad = (0, 0, 0, 0, 0, Lp - L)
    # Strided reshape: row r of q_t concatenates q[rS + S-1], ..., q[rS] (reversed), column c of k_t concatenates
    # k[cS], ..., k[cS + S-1]; their dot product is the sum of one antidiagonal of the S x S tile (r, c).
    # q_t stays in q's dtype (the reshape copies it: 2 GiB in bf16 at 256K, Hq = 32) and each chunk converts its
    # own rows; the conversion is exact, so this changes no value.
    q_t = F.pad(q, pad).view(B, n, S, Hq, D).flip(2).permute(0, 1, 3, 2, 4).reshape(B, n, Hq, S * D)
    k_t = F.pad(k.to(dtype), pad).view(B, n, S, Hkv, D).permute(0, 1, 3, 2, 4).reshape(B, n, Hkv, S * D)
    valid_cols = -(-L // S)  # strided columns holding at least one real key
    scores = torch.zeros(B, Hq, M, M, dtype=dtype, device=device)
    # Whole query blocks per chunk, so every chunk sums into whole rows of A.
    blocks_per_chunk = max(1, _XATTN_CHUNK_ELEMENTS // (B * Hq * per_block * n))
    for I0 in range(0, M, blocks_per_chunk):
        I1 = min(M, I0 + blocks_per_chunk)
        r0, r1 = I0 * per_block, I1 * per_block
        cols = min(r1, valid_cols)  # causal at stride level: column c <= row r; no fully padded columns
        logits = gqa_scores(q_t[:, r0:r1].to(dtype), k_t[:, :cols], scale / S)  # (B, Hq, rows, cols)
        r = torch.arange(r0, r1, device=device).view(-1, 1)
        c = torch.arange(cols, device=device).view(1, -1)
        p = torch.softmax(logits.masked_fill(c > r, float("-inf")), dim=-1)
        p = p * (r * S < L).to(dtype)  # strided rows made only of padding queries count nothing
        Nc = num_blocks(cols * S, Bs)
        p = F.pad(p, (0, Nc * per_block - cols)).view(B, Hq, I1 - I0, per_block, Nc, per_block)
        scores[:, :, I0:I1, :Nc] = p.sum(dim=(3, 5))
    return scores


def xattention_select(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    threshold: float = 0.9,
    stride: int = 8,
    block_size: int = 128,
    softmax_scale: float | None = None,
    keep_sink: bool = True,
    keep_diagonal: bool = True,
):
    """XAttention's block selection (Xu et al., ICML 2025, Sec. 2.1-2.2), per query head.

    Notation: S stride; Bs block size (S divides Bs); M = N = ceil(L / Bs); scale = softmax_scale or 1/sqrt(D);
    head h reads kv head h // (Hq / Hkv).

    1. Antidiagonal scoring: split Q K^T into S x S tiles and keep, in each tile, the sum along one antidiagonal
       (lower-left to upper-right). Every token row and every token column of the tile is hit once, so both vertical
       and slash patterns show up in the sum. Done as one GEMM on strided reshapes: Qt[r] = (q[rS+S-1], ..., q[rS]),
       Kt[c] = (k[cS], ..., k[cS+S-1]); logits[r, c] = scale / S * Qt[r] . Kt[c] (the 1/S makes it the mean of S
       logits); causal at stride level (c <= r); P = softmax_c(logits).
    2. Block scores: A[I, J] = sum of P[r, c] over the Bs/S strided rows of I and the Bs/S strided columns of J.
    3. Threshold block selection: per row I, keep the forced blocks (J = 0 and J = I), then the other key blocks in
       descending A[I, J] while the mass kept *before* a block is < tau * sum_J A[I, J]: the fewest blocks whose
       cumulative score reaches tau (the block that crosses tau is kept). Blocks above the diagonal never count.

    Paper defaults: block_size 128, stride S = 8 for language (16 for video), threshold tau = 0.9. Safety
    convention (official code and the OpenVINO port): the first key block (attention sink) and the diagonal block
    are always kept. Simplifications (ours): no per-head threshold prediction (the paper's optional dynamic
    programming step); one uniform tau for all heads; the estimate is exact in float32 rather than fused Triton.

    Args:
        q: (B, L, Hq, D); k: (B, L, Hkv, D).
        threshold: tau in (0, 1]; 1 keeps every causal block with non-zero score (plus the forced ones).
        stride: S, a power of two dividing block_size. keep_sink, keep_diagonal: the forced blocks.
    Returns:
        counts (B, Hq, M) int32, indices (B, Hq, M, N) int32.
    """
    threshold = check_xattention_params(threshold=threshold, stride=stride, block_size=block_size,
                                        keep_sink=keep_sink, keep_diagonal=keep_diagonal)
    scores = xattention_block_scores(q, k, stride=stride, block_size=block_size, softmax_scale=softmax_scale)
    B, Hq, M, _ = scores.shape
    causal = causal_blocks(M, q.device)
    I = torch.arange(M, device=q.device).view(M, 1)
    J = torch.arange(M, device=q.device).view(1, M)
    forced = ((J == 0) & keep_sink) | ((J == I) & keep_diagonal)
    forced = forced & causal
    total = scores.sum(dim=-1, keepdim=True)
    forced_mass = (scores * forced).sum(dim=-1, keepdim=True)
    others = scores.masked_fill(forced | ~causal, -1.0)  # never ranked above a causal candidate
    values, order = others.sort(dim=-1, descending=True, stable=True)
    before = forced_mass + values.clamp_min(0).cumsum(dim=-1) - values.clamp_min(0)
    kept_sorted = (values >= 0) & (before < threshold * total)
    mask = torch.zeros_like(kept_sorted).scatter_(-1, order, kept_sorted) | forced
    return compact_blocks(mask & causal)
