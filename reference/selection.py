"""Stages 3-4 of FlashPrefill: dynamic thresholding (paper Eq. 3) and compaction into block lists.

    m_I = max_{J' <= I} Score_IJ'                                          the row max, over causal blocks only
    keep(I, J)  iff  J <= I  and  ( NOT(Score_IJ < alpha * m_I)            the dynamic threshold
                                    or J < sink_blocks                     attention sinks
                                    or I - J < window_blocks               local window (keeps the diagonal)
                                    or I >= M - last_dense_blocks )        the last query blocks stay dense

One max-reduction per row, no sort (top-k) and no cumulative sum over sorted scores (top-p): the long tail below
alpha * max is dropped completely. The kept J of each row are then compacted into an ascending list so that the
attention kernel jumps straight to them ("physical skip").

For scores from `block_scores` (>= 0, exactly 0 above the diagonal) "NOT(<)" is ">=" and the causal max is the row
max. The contract also fixes what user-supplied scores do: whatever lies above the diagonal is ignored, and a NaN
anywhere in the causal part of a row makes m_I NaN and keeps every causal block of the row (NaN compares false), so a
NaN in q or k reaches the output as dense attention would have it (docs/DESIGN.md section 2).
"""

from __future__ import annotations

import torch

from .validation import check_lists, check_mask, check_scores, check_selection_params


def safety_net_mask(M: int, sink_blocks: int = 2, window_blocks: int = 4, last_dense_blocks: int = 2,
                     device: str | torch.device | None = None) -> torch.Tensor:
    """(M, M) bool: the causal blocks kept whatever the scores (sinks, local window, dense last query blocks)."""
    I = torch.arange(M, device=device).view(M, 1)
    J = torch.arange(M, device=device).view(1, M)
    forced = (J < sink_blocks) | (I - J < window_blocks) | (I >= M - last_dense_blocks)
    return forced & (J <= I)


def select_blocks(
    scores: torch.Tensor,
    alpha: float = 0.12,
    sink_blocks: int = 2,
    window_blocks: int = 4,
    last_dense_blocks: int = 2,
) -> torch.Tensor:
    """Keep mask of every (query block, key block) pair.

    Args:
        scores: Score (B, Hq, M, N) from `block_scores`, M == N; only the causal part J <= I is read.
        alpha: threshold relative to the row max m_I, taken over the causal blocks J <= I; 0 keeps every causal
            block.
        sink_blocks, window_blocks (>= 1), last_dense_blocks: the forced blocks of the safety net.
    Returns:
        mask (B, Hq, M, N) bool, never above the diagonal. A row with a NaN score keeps all its causal blocks.
    """
    check_scores(scores)
    alpha = check_selection_params(alpha, sink_blocks, window_blocks, last_dense_blocks)
    M = scores.shape[-1]
    causal = torch.ones(M, M, dtype=torch.bool, device=scores.device).tril()

    # 1. Row max m_I over the causal blocks only (amax propagates NaN).
    row_max = scores.masked_fill(~causal, float("-inf")).amax(dim=-1, keepdim=True)
    # 2. Dynamic threshold (Eq. 3), as "not below": a NaN score or max keeps the block.
    not_below = ~(scores < alpha * row_max)
    # 3. Safety net: sinks, local window, dense last rows.
    forced = safety_net_mask(M, sink_blocks, window_blocks, last_dense_blocks, device=scores.device)
    # 4. Causality.
    return causal & (not_below | forced)


def compact_blocks(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact every row of the mask into an ascending list of kept key blocks.

    Args:
        mask: (B, Hq, M, N) bool.
    Returns:
        counts (B, Hq, M) int32: kept blocks per row;
        indices (B, Hq, M, N) int32: indices[..., :counts] are the kept J in ascending order, -1 past counts (as
        in triton_impl).
    """
    check_mask(mask)
    N = mask.shape[-1]
    counts = mask.sum(dim=-1, dtype=torch.int32)
    # Slot of each kept block in its row's list = number of kept blocks before it (an exclusive prefix sum);
    # dropped blocks are sent to a spare column N that is cut off afterwards.
    slot = torch.where(mask, mask.cumsum(dim=-1) - 1, N)
    J = torch.arange(N, dtype=torch.int32, device=mask.device).expand(mask.shape)
    indices = torch.full((*mask.shape[:-1], N + 1), -1, dtype=torch.int32, device=mask.device)
    indices.scatter_(-1, slot, J)
    return counts, indices[..., :N].contiguous()


def select_and_compact(scores: torch.Tensor, alpha: float = 0.12, sink_blocks: int = 2, window_blocks: int = 4,
                       last_dense_blocks: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Stages 3-4 in one call: `compact_blocks(select_blocks(scores, ...))`, (counts, indices) as compact_blocks.

    The twin of `triton_impl.select_and_compact`, which does both in one kernel without writing the mask."""
    return compact_blocks(select_blocks(scores, alpha, sink_blocks, window_blocks, last_dense_blocks))


def lists_to_mask(counts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The inverse of `compact_blocks`: counts (B, Hq, M) int32 + lists (B, Hq, M, C) int32 -> mask (B, Hq, M, M).

    Only indices[..., :counts] are read (what lies past counts, -1 or anything else, is ignored), so lists of any
    selector read back, narrow ones (C < M) included. The lists must follow the rules `block_sparse_attention`
    checks (ascending, causal); a ValueError says which one is broken."""
    check_lists(counts, indices)
    return listed_blocks(counts, indices)


def listed_blocks(counts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """`lists_to_mask` without its checks, for callers that validated the lists already."""
    M, C = counts.shape[-1], indices.shape[-1]
    listed = torch.arange(C, device=counts.device) < counts.unsqueeze(-1)
    slots = torch.where(listed, indices.long(), M)  # unlisted entries go to a spare column, cut off below
    mask = torch.zeros(*counts.shape, M + 1, dtype=torch.bool, device=counts.device)
    return mask.scatter_(-1, slots, True)[..., :M]


def causal_block_density(counts: torch.Tensor) -> torch.Tensor:
    """Kept causal blocks / all causal blocks over B and Hq, as a 0-d float32 tensor (no host sync)."""
    B, Hq, M = counts.shape
    return counts.sum(dtype=torch.float64).div(B * Hq * M * (M + 1) / 2).float()
