"""FlashPrefill end to end in Triton (twin of reference/flash_prefill.py).

Four launches, no host synchronisation, no sort, no torch.compile:
pool (stage 1) -> score (stage 2) -> fused threshold + compaction (stages 3-4) -> block-sparse attention (5).

Selection memory, in bytes, for B=1, Hq=32, Hkv=4, D=128, Bs=128 (M = N = L / 128):

    intermediate                          formula              256K (M=2048)    1M (M=8192)
    kbar (float32)                        B N Hkv D 4          4 MiB            16 MiB
    scores (float32)                      B Hq M N 4           512 MiB          8 GiB
    indices (int32)                       B Hq M N 4           512 MiB          8 GiB
    counts (int32)                        B Hq M 4             256 KiB          1 MiB

The (B, Hq, M, N) mask is never materialised (select and compact are fused); scores and indices are the two
M x N intermediates.
"""

from __future__ import annotations

import torch

from reference.flash_prefill import FlashPrefillStats, check_flash_prefill_args
from reference.selection import causal_block_density

from .attention import PHYSICAL, _launch
from .common import HEAD_DIMS, KERNEL_DTYPES, check_kernel_device
from .pooling import launch_mean_pool
from .scoring import launch_block_scores
from .selection import launch_select_and_compact


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
):
    """Block-sparse causal prefill attention with FlashPrefill's selection. Same contract as the reference."""
    scale = check_flash_prefill_args(q, k, v, alpha, block_size, sink_blocks, window_blocks, last_dense_blocks,
                                     softmax_scale, dtypes=KERNEL_DTYPES, head_dims=HEAD_DIMS)
    check_kernel_device(q=q, k=k, v=v)
    # Inputs are checked once, above; the stages launch their kernels directly (no per-stage re-checks).
    kbar = launch_mean_pool(k, block_size)  # 1. mean proxy
    scores = launch_block_scores(q, kbar, block_size, scale)  # 2. Eq. 1-2
    counts, indices = launch_select_and_compact(scores, float(alpha), sink_blocks, window_blocks,
                                                last_dense_blocks)  # 3-4
    del scores
    out = _launch(q, k, v, block_size, scale, PHYSICAL, counts=counts, indices=indices)  # 5. physical skip
    if return_stats:
        return out, FlashPrefillStats(counts, indices, causal_block_density(counts))
    return out
