"""The toy example behind `python -m reference` and notebooks/01_algorithm_walkthrough.ipynb.

One head of planted-pattern Q/K/V (`reference.synthetic`) that shows every pattern at once: attention sinks, a
local band, one vertical stripe and one slash. `run_toy` pushes it through stages 1-5 and keeps every
intermediate result, plus two diagnostics the figures quote: the logical vs physical block visits and the share
of the exact attention probability that falls inside the kept blocks.
"""

from __future__ import annotations

import numpy as np
import torch

from reference.attention import block_sparse_attention, block_sparse_attention_logical, dense_attention
from reference.pooling import compute_dtype, mean_pool_keys
from reference.scoring import block_scores
from reference.selection import causal_block_density, compact_blocks, select_blocks
from reference.synthetic import PlantedPatterns, planted_qkv
from reference.validation import check_block_layout, check_qkv, num_blocks, resolve_scale

from .panels import DROPPED, keep_reasons

# One head that looks at the sinks and at one stripe, and has a slash. The stripe is a run of tokens: mean pooling
# divides a single-token stripe by Bs, and the block scores would not see it at all.
TOY_PATTERNS = PlantedPatterns(stripes=1, stripe_width=48, stripe_fraction=1.0, stripe_strength=5.0,
                               slash_fraction=1.0)


def toy_qkv(length: int = 2048, *, seed: int = 0, head_dim: int = 64, patterns: PlantedPatterns = TOY_PATTERNS):
    """q, k, v of shape (1, length, 1, head_dim), float32, every planted pattern in the one head. Synthetic."""
    return planted_qkv(1, length, 1, 1, head_dim, patterns=patterns, seed=seed)


@torch.no_grad()
def kept_attention_mass(q, k, mask, block_size: int, softmax_scale: float | None = None) -> torch.Tensor:
    """Share of each query's exact causal softmax probability that lies in its kept key blocks.

    1.0 means the sparse output equals the dense one for that query; 1 - mass is what the selection dropped.
    Args: q (B, L, Hq, D); k (B, L, Hkv, D); mask (B, Hq, M, N) bool from `select_blocks`;
        softmax_scale: None means 1 / sqrt(D).
    Returns: (B, L, Hq) in float32 (float64 for float64 q). One query block at a time (no L x L matrix).
    """
    B, L, Hq, Hkv, D = check_qkv(q, k, k)
    check_block_layout(q, block_size=block_size, mask=mask)
    scale = resolve_scale(softmax_scale, D)
    dtype = compute_dtype(q)
    k_per_q_head = k.to(dtype).repeat_interleave(Hq // Hkv, dim=2)  # (B, L, Hq, D)
    key_block = torch.arange(L, device=q.device) // block_size
    mass = torch.empty(B, L, Hq, dtype=dtype, device=q.device)
    for I in range(num_blocks(L, block_size)):
        i0, i1 = I * block_size, min(L, (I + 1) * block_size)
        s = scale * torch.einsum("bihd,bjhd->bhij", q[:, i0:i1].to(dtype), k_per_q_head[:, :i1])
        causal = torch.arange(i1, device=q.device).view(1, -1) <= torch.arange(i0, i1, device=q.device).view(-1, 1)
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)  # (B, Hq, rows, i1)
        kept = mask[:, :, I, key_block[:i1]]  # (B, Hq, i1): the mask bit of each key's block
        mass[:, i0:i1] = (p * kept.unsqueeze(2)).sum(-1).transpose(1, 2)
    return mass


@torch.no_grad()
def run_toy(length: int = 2048, alpha: float = 0.12, block_size: int = 64, seed: int = 0, *, sink_blocks: int = 2,
            window_blocks: int = 4, last_dense_blocks: int = 2) -> dict:
    """Stages 1-5 on the toy; returns every intermediate result and the diagnostics as a dict."""
    q, k, v = toy_qkv(length, seed=seed)
    kbar = mean_pool_keys(k, block_size)  # 1. mean proxy kbar_J
    scores = block_scores(q, kbar, block_size)  # 2. Score_IJ (Eq. 1-2)
    mask = select_blocks(scores, alpha, sink_blocks, window_blocks, last_dense_blocks)  # 3. Eq. 3 + safety net
    counts, indices = compact_blocks(mask)  # 4. compacted lists
    out, visits_physical = block_sparse_attention(q, k, v, counts, indices, block_size, return_visits=True)  # 5.
    out_logical, visits_logical = block_sparse_attention_logical(q, k, v, mask, block_size, return_visits=True)
    dense = dense_attention(q, k, v)
    reasons = keep_reasons(scores[0, 0], alpha, sink_blocks, window_blocks, last_dense_blocks)
    # The picture restates select_blocks to tell the reasons apart; it must agree with it exactly.
    if not np.array_equal(reasons > DROPPED, mask[0, 0].cpu().numpy()):
        raise AssertionError("keep_reasons disagrees with select_blocks")
    mass = kept_attention_mass(q, k, mask, block_size)
    return dict(
        q=q, k=k, v=v, kbar=kbar, scores=scores, mask=mask, counts=counts, indices=indices, reasons=reasons,
        out=out, out_logical=out_logical, dense=dense, visits_physical=visits_physical,
        visits_logical=visits_logical, kept_mass=mass, density=float(causal_block_density(counts)),
        logical_vs_physical=float((out - out_logical).abs().max()), sparse_vs_dense=float((out - dense).abs().max()),
    )
