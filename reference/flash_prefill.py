"""FlashPrefill end to end: stages 1-5 composed (docs/DESIGN.md section 2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import attention_outputs, block_sparse_attention
from .fp8 import block_sparse_attention_fp8
from .pooling import mean_pool_keys
from .scoring import block_scores
from .selection import causal_block_density, compact_blocks, select_blocks
from .validation import check_flag, check_qkv, check_selection_params, resolve_scale

# alpha per model from the official V1 code (docs/DESIGN.md section 2).
PAPER_ALPHA = {
    "Llama-3.1-8B": 0.18,
    "Qwen2.5-7B": 0.08,
    "Qwen3-30B-A3B": 0.12,
    "Qwen2.5-VL": 0.10,
    "Qwen3-VL-30B": 0.22,
}


@dataclass
class FlashPrefillStats:
    """What the selection kept. counts (B, Hq, M) int32, indices (B, Hq, M, N) int32 (-1 past counts),
    density: 0-d float32 tensor, kept causal blocks / all causal blocks over B and Hq."""

    counts: torch.Tensor
    indices: torch.Tensor
    density: torch.Tensor


def check_flash_prefill_args(q, k, v, alpha, block_size, sink_blocks, window_blocks, last_dense_blocks, softmax_scale,
                             mean_correction=False, return_lse=False, fp8=False, **qkv_checks) -> float:
    """Validate every argument of `flash_prefill`; return the softmax scale."""
    D = check_qkv(q, k, v, **qkv_checks)[-1]
    check_flag("mean_correction", mean_correction)
    check_flag("return_lse", return_lse)
    check_flag("fp8", fp8)
    if fp8 and (mean_correction or return_lse):
        raise ValueError("fp8=True runs without mean_correction and return_lse (the FP8 attention has neither); "
                         "set them to False or use fp8=False")
    check_selection_params(alpha, sink_blocks, window_blocks, last_dense_blocks, block_size)
    return resolve_scale(softmax_scale, D)


def flash_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    alpha: float = 0.12,
    block_size: int = 128,
    sink_blocks: int = 2,
    window_blocks: int = 4,
    last_dense_blocks: int = 2,
    softmax_scale: float | None = None,
    return_stats: bool = False,
    mean_correction: bool = False,
    return_lse: bool = False,
    fp8: bool = False,
):
    """Block-sparse causal prefill attention with FlashPrefill's selection.

    Args:
        q: (B, L, Hq, D); k, v: (B, L, Hkv, D).
        alpha: dynamic threshold (Eq. 3); 0 is dense attention.
        block_size: Bs. sink_blocks, window_blocks, last_dense_blocks: the safety net, in blocks.
        softmax_scale: None means 1 / sqrt(D).
        return_stats: also return a `FlashPrefillStats`.
        mean_correction: FlashPrefill V2's Eq. 6 (opt-in): every pruned block below the diagonal joins the softmax as
            its mean key and value, weighted by its size (reference/attention.py), k_bar being stage 1's kbar. The
            selection is unchanged.
        return_lse: also return lse (B, Hq, L), the log of each row's softmax denominator over what it attended
            (reference/attention.py).
        fp8: run stage 5 with Q, K, V and P quantised to e4m3 (reference/fp8.py; opt-in, the selection unchanged);
            not with mean_correction or return_lse.
    Returns:
        out (B, L, Hq, D) in q.dtype [, lse float32 (float64 for float64 inputs)] [, stats].
    """
    scale = check_flash_prefill_args(q, k, v, alpha, block_size, sink_blocks, window_blocks, last_dense_blocks,
                                     softmax_scale, mean_correction, return_lse, fp8)
    kbar = mean_pool_keys(k, block_size)  # 1. mean proxy of each key block
    scores = block_scores(q, kbar, block_size, scale)  # 2. block scores (Eq. 1-2)
    mask = select_blocks(scores, alpha, sink_blocks, window_blocks, last_dense_blocks)  # 3. threshold (Eq. 3)
    counts, indices = compact_blocks(mask)  # 4. compacted block lists
    if fp8:  # 5. physical skip, in e4m3
        out = block_sparse_attention_fp8(q, k, v, counts, indices, block_size, scale, validate=False)
    else:  # 5. physical skip
        out = block_sparse_attention(q, k, v, counts, indices, block_size, scale,
                                     mean_correction=mean_correction, key_means=kbar if mean_correction else None,
                                     return_lse=return_lse)
    out, lse = out if return_lse else (out, None)
    stats = FlashPrefillStats(counts, indices, causal_block_density(counts)) if return_stats else None
    return attention_outputs(out, lse, stats)
