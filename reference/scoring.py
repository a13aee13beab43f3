"""Stage 2 of FlashPrefill: instantaneous pattern discovery (paper Eq. 1-2).

For query block I and key block J, with s_iJ = scale * q_i . kbar_J over the queries i of I that *contribute* to J
(i >= (J+1) Bs - 1: the whole key block is visible to query i):

    m_IJ = max_i s_iJ                      (block max)
    S_IJ = sum_i exp(s_iJ - m_IJ)          (block sum of exponentials)
    M_I  = max_J m_IJ                      (row max, the global reweighting)
    Score_IJ = S_IJ exp(m_IJ - M_I) / (sum_J' S_IJ' exp(m_IJ' - M_I) + 1e-9)

Pairs without a contributing query (every J > I, the diagonal of a partial block, a partial last key block) score
exactly 0. Rows are independent, so the reference scores a few query blocks at a time and never holds an L x L
matrix: memory is O(chunk x Bs x N) per head.

NaN and inf: a NaN or +inf among the contributing logits of row I (from a NaN in q_i or kbar_J, say) makes S_IJ, M_I
and the normaliser NaN, so the whole causal part of the row (J <= I) scores NaN, as a softmax would; J > I still
scores 0. `select_blocks` then keeps every causal block of that row.
"""

from __future__ import annotations

import torch

from .pooling import compute_dtype, split_blocks
from .validation import check_block_size, check_kbar, num_blocks, resolve_scale

SCORE_EPS = 1e-9  # the epsilon of Eq. 2's normaliser
_CHUNK_ELEMENTS = 1 << 24  # scores held at once by the reference: about 64 MB of float32


def block_scores(q: torch.Tensor, kbar: torch.Tensor, block_size: int = 128,
                 softmax_scale: float | None = None) -> torch.Tensor:
    """Block importance scores of every (query block, key block) pair.

    Args:
        q: queries (B, L, Hq, D).
        kbar: pooled keys (B, N, Hkv, D) from `mean_pool_keys`; query head h reads kv head h // (Hq / Hkv).
        block_size: Bs.
        softmax_scale: None means 1 / sqrt(D).
    Returns:
        Score (B, Hq, M, N) float32 (float64 for float64 q), M = N = ceil(L / Bs); each row sums to 1 (up to the
        epsilon), is all zero, or is NaN over J <= I (see above).
    """
    check_block_size(block_size)
    check_kbar(q, kbar, block_size)
    return chunk_block_scores(q, kbar, block_size, resolve_scale(softmax_scale, q.shape[3]), first_row=0)


def chunk_block_scores(q: torch.Tensor, kbar: torch.Tensor, block_size: int, softmax_scale: float,
                       first_row: int = 0) -> torch.Tensor:
    """Stage 2 for queries q (B, L, Hq, D) of which only rows first_row .. L - 1 are real: `block_scores` with
    first_row = 0, and, for a chunk of a prompt prefilled over a cached prefix (reference/varlen.py), the chunk laid
    at its absolute rows after first_row rows of earlier chunks, which contribute nowhere:

        C_IJ = { i in I : first_row <= i < L and i >= (J + 1) Bs - 1 }

    Query blocks with no contributing row (every I < first_row // Bs) score all 0, and a partial first query block
    is scored from the rows it has. Inputs are not checked (block_scores checks them; varlen.py has its own checks).

    Returns:
        Score (B, Hq, M, N) float32 (float64 for float64 q), M = N = ceil(L / Bs).
    """
    B, L, Hq, D = q.shape
    Hkv = kbar.shape[2]
    M = N = num_blocks(L, block_size)
    dtype = compute_dtype(q)

    q_blocks = split_blocks(q, block_size)  # (B, Hq, M, Bs, D)
    kbar_per_q_head = kbar.to(dtype).repeat_interleave(Hq // Hkv, dim=2).permute(0, 2, 1, 3)  # (B, Hq, N, D)
    query_pos = torch.arange(M * block_size, device=q.device).view(M, block_size, 1)
    J = torch.arange(N, device=q.device)
    # Query i contributes to key block J iff it sees the whole block; padding queries and the rows of earlier chunks
    # (before first_row) contribute nowhere.
    contributes = ((query_pos >= (J + 1) * block_size - 1) & (query_pos < L)
                   & (query_pos >= first_row))  # (M, Bs, N)
    above_diagonal = J.view(1, N) > torch.arange(M, device=q.device).view(M, 1)  # (M, N)

    scores = torch.zeros(B, Hq, M, N, dtype=dtype, device=q.device)
    chunk = max(1, _CHUNK_ELEMENTS // (B * Hq * block_size * N))
    for I0 in range(first_row // block_size, M, chunk):
        I1 = min(M, I0 + chunk)
        # 1. s_iJ = scale * q_i . kbar_J for the queries of blocks I0..I1-1: (B, Hq, c, Bs, N)
        s = softmax_scale * torch.einsum("bhcrd,bhnd->bhcrn", q_blocks[:, :, I0:I1], kbar_per_q_head)
        s = s.masked_fill(~contributes[I0:I1], float("-inf"))
        # 2. Block max m_IJ and block sum S_IJ over the contributing queries (Eq. 1). Where nobody contributes,
        #    m = -inf is shifted by 0 instead (S = 0, not NaN); NaN and +inf propagate as in a softmax.
        m = s.amax(dim=3)  # (B, Hq, c, N)
        S = torch.exp(s - _no_key_to_zero(m).unsqueeze(3)).sum(dim=3)
        # 3. Reweight by the row max M_I and normalise over J (Eq. 2); nothing above the diagonal is scored.
        M_I = m.amax(dim=-1, keepdim=True)
        weighted = S * torch.exp(m - _no_key_to_zero(M_I))
        Score = weighted / (weighted.sum(dim=-1, keepdim=True) + SCORE_EPS)
        scores[:, :, I0:I1] = Score.masked_fill(above_diagonal[I0:I1], 0.0)
    return scores


def _no_key_to_zero(m: torch.Tensor) -> torch.Tensor:
    """A max to subtract before exp: 0 where it is -inf (no logit at all), else itself, NaN and +inf included."""
    return torch.where(m == float("-inf"), 0.0, m)
