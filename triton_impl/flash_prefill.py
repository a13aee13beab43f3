"""FlashPrefill end to end in Triton (twin of reference/flash_prefill.py).

One pooling launch, then two launches per chunk of query blocks; no host synchronisation, no sort, no torch.compile:
pool (stage 1) -> score + threshold + compaction (stages 2-4, one kernel: scoring.launch_scores_and_select) ->
block-sparse attention (5).

Mean correction (opt-in): stage 1 pools V in the same pass as K (one launch, K read once), and the attention reads
the score kernel's scaled kbar (its hi part) as k_bar: nothing is pooled twice. Selection is unchanged.

Selection memory, in bytes, for B=1, Hq=32, Hkv=4, D=128, Bs=128 (M = N = L / 128), if done in one piece:

    intermediate                          formula              256K (M=2048)    1M (M=8192)
    kbar (hi + lo in q's dtype)           B N Hkv D 4          4 MiB            16 MiB
    scores (float32)                      B Hq M N 4           512 MiB          8 GiB
    indices (int32)                       B Hq M N 4           512 MiB          8 GiB
    counts (int32)                        B Hq M 4             256 KiB          1 MiB

The (B, Hq, M, N) mask is never materialised (select and compact are fused). Rows of query blocks are
independent, so scores and indices are made for a chunk of C query blocks at a time (B Hq C N x 8 bytes) and
that chunk's attention runs before the next chunk is scored: C is the largest count that keeps the two buffers
within `max_selection_bytes` (default 1 GiB: one chunk up to 256K, 16 chunks of 512 query blocks at 1M).
"""

from __future__ import annotations

import torch

from reference.attention import attention_outputs
from reference.flash_prefill import FlashPrefillStats, check_flash_prefill_args
from reference.selection import causal_block_density
from reference.validation import check_count, num_blocks

from .attention import PHYSICAL, launch_attention
from .common import HEAD_DIMS, KERNEL_DTYPES, LOG2E, check_kernel_block_size, check_kernel_runs_on, new_output
from .fp8 import check_fp8_args, launch_fp8_attention, quantize_qkv
from .pooling import launch_mean_pool
from .scoring import launch_scores_and_select

MAX_SELECTION_BYTES = 1 << 30  # scores + indices of one chunk of query blocks
_BYTES_PER_PAIR = 4 + 4  # float32 score + int32 list slot per (query block, key block) pair


def query_block_chunks(B: int, Hq: int, M: int, max_selection_bytes: int, rows: int | None = None
                       ) -> list[tuple[int, int]]:
    """[(I0, I1), ...] covering query blocks 0 .. rows - 1 (default M), each chunk's scores + indices over M key
    blocks within the budget (at least one query block per chunk)."""
    rows = M if rows is None else rows
    step = max(1, max_selection_bytes // (B * Hq * M * _BYTES_PER_PAIR))
    return [(i0, min(i0 + step, rows)) for i0 in range(0, rows, step)]


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
    max_selection_bytes: int = MAX_SELECTION_BYTES,
    return_lse: bool = False,
    fp8: bool = False,
):
    """Block-sparse causal prefill attention with FlashPrefill's selection. Same contract as the reference, plus
    `max_selection_bytes`, the budget of the per-chunk selection buffers (see the module docstring).

    With return_stats the full (B, Hq, M, N) int32 lists are kept as well (4 B Hq M N bytes, beyond the budget),
    -1 past counts as in the reference: the selection kernel then also writes the slots past counts, which the
    attention never reads and the path without stats leaves unwritten (up to 4 B Hq M N bytes of stores saved).

    Inference-only: the kernels have no backward (RuntimeError when autograd would track q, k or v).
    mean_correction: as the reference (V2's Eq. 6); costs one more read of V in stage 1 and the means walk in the
    attention kernel (triton_impl/attention.py).
    return_lse: also return lse (B, Hq, L) float32 (each chunk's attention writes its rows). Returns
    out [, lse] [, stats], as the reference.
    fp8: stage 5 in e4m3 (triton_impl/fp8.py: Q, K, V quantised once, three launches before the first chunk; needs
    compute capability 9.0+ and block_size 64 or 128); the selection is unchanged."""
    scale = check_flash_prefill_args(q, k, v, alpha, block_size, sink_blocks, window_blocks, last_dense_blocks,
                                     softmax_scale, mean_correction, return_lse, fp8, dtypes=KERNEL_DTYPES,
                                     head_dims=HEAD_DIMS)
    check_kernel_block_size(block_size)
    check_kernel_runs_on(q, k, v)
    if fp8:
        check_fp8_args(q, block_size)
    check_count("max_selection_bytes", max_selection_bytes, minimum=1)
    B, L, Hq, D = q.shape
    M = num_blocks(L, block_size)
    # Inputs are checked once, above; the stages launch their kernels directly (no per-stage re-checks).
    # 1. mean proxy, scaled by scale x log2(e) and split into the score kernel's (hi, lo) pair; with mean correction
    #    the values' means too, and the attention reuses hi as k_bar (attention.attention_means makes the same pair)
    if mean_correction:
        kbar_parts, vbar = launch_mean_pool(k, block_size, out_scale=scale * LOG2E, split_dtype=q.dtype, values=v)
        means = (kbar_parts[0], vbar)
    else:
        kbar_parts = launch_mean_pool(k, block_size, out_scale=scale * LOG2E, split_dtype=q.dtype)
        means = None
    counts = new_output(B, Hq, M, dtype=torch.int32, device=q.device)
    out = new_output(B, L, Hq, D, dtype=q.dtype, device=q.device)
    lse = new_output(B, Hq, L, dtype=torch.float32, device=q.device) if return_lse else None
    all_indices = new_output(B, Hq, M, M, dtype=torch.int32, device=q.device) if return_stats else None
    quantized = quantize_qkv(q, k, v, block_size) if fp8 else None
    for rows in query_block_chunks(B, Hq, M, max_selection_bytes):
        _, indices = launch_scores_and_select(q, kbar_parts, block_size, alpha, sink_blocks, window_blocks,
                                              last_dense_blocks, rows=rows, counts=counts,
                                              pad_lists=return_stats)  # 2-4. Eq. 1-3 in one launch
        if fp8:  # 5. physical skip, in e4m3
            launch_fp8_attention(quantized, L, block_size, scale, counts, indices, out=out, rows=rows)
        else:  # 5. physical skip
            launch_attention(q, k, v, block_size, scale, PHYSICAL, counts=counts, indices=indices, rows=rows,
                             out=out, means=means, return_lse=return_lse, lse=lse)
        if all_indices is not None:
            all_indices[:, :, rows[0]:rows[1]] = indices
        del indices  # before the next chunk allocates its own
    stats = FlashPrefillStats(counts, all_indices, causal_block_density(counts)) if return_stats else None
    return attention_outputs(out, lse, stats)
