"""The differential-testing rules, shared by tests/ and `python -m repro.check_triton`.

* Outputs follow FlashAttention's rule: with a float64 oracle `ref` and a PyTorch result `pt` computed in the
  input's own precision, on the same inputs and the same block set, max |out - ref| <= 2 max |pt - ref| + 1e-5.
* Block sets must be identical except at threshold ties: |Score - alpha * row max| <= TIE_TOLERANCE * row max,
  and at most MAX_TIE_FRACTION of the blocks.
"""

from __future__ import annotations

import math

import torch

TIE_TOLERANCE = 1e-4
MAX_TIE_FRACTION = 0.01


def mask_from_lists(counts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(B, Hq, M) counts + (B, Hq, M, C) lists -> (B, Hq, M, C) bool mask; entries past counts are not read."""
    N = indices.shape[-1]
    listed = torch.arange(N, device=counts.device) < counts.unsqueeze(-1)
    slots = torch.where(listed, indices.long(), N)  # unlisted entries go to a spare column, cut off below
    mask = torch.zeros(*indices.shape[:-1], N + 1, dtype=torch.bool, device=counts.device)
    return mask.scatter_(-1, slots, True)[..., :N]


def block_set_differences(mask, ref_mask, ref_scores, alpha) -> tuple[int, int]:
    """(blocks that differ, of which not at a threshold tie)."""
    differ = mask != ref_mask
    row_max = ref_scores.amax(-1, keepdim=True)
    tie = (ref_scores - alpha * row_max).abs() <= TIE_TOLERANCE * row_max
    return int(differ.sum()), int((differ & ~tie).sum())


def block_sets_agree(mask, ref_mask, ref_scores, alpha) -> bool:
    n_differ, n_off_tie = block_set_differences(mask, ref_mask, ref_scores, alpha)
    return n_off_tie == 0 and n_differ <= MAX_TIE_FRACTION * mask.numel() + 1


def naive_attention(q, k, v, block_mask, block_size: int, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """softmax(scale q k^T) v over the causal tokens of the kept blocks, computed entirely in `dtype`.

    q (B, L, Hq, D), k/v (B, L, Hkv, D), block_mask (B, Hq, M, N). Query rows are processed in chunks, so no
    (L, L) matrix is held. Rows with no visible key give 0. Returns (B, L, Hq, D) in `dtype`.
    """
    B, L, Hq, D = q.shape
    group = Hq // k.shape[2]
    qd = q.to(dtype).transpose(1, 2)
    kd = k.to(dtype).repeat_interleave(group, dim=2).transpose(1, 2)
    vd = v.to(dtype).repeat_interleave(group, dim=2).transpose(1, 2)
    out = torch.zeros_like(qd)
    rows = max(1, (1 << 25) // (B * Hq * L))
    key_pos = torch.arange(L, device=q.device)
    for i0 in range(0, L, rows):
        i1 = min(L, i0 + rows)
        query_pos = torch.arange(i0, i1, device=q.device)
        kept = block_mask[:, :, query_pos // block_size][..., key_pos // block_size]  # (B, Hq, c, L)
        visible = kept & (key_pos[None, :] <= query_pos[:, None])
        s = (qd[:, :, i0:i1] @ kd.transpose(-1, -2)) * scale
        p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
        out[:, :, i0:i1] = p @ vd
    return out.transpose(1, 2)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64; NaN if either has a NaN."""
    d = (a.double() - b.double()).abs()
    return float("nan") if d.isnan().any() else float(d.max()) if d.numel() else 0.0


def flash_rule(out, q, k, v, block_mask, block_size: int, scale: float | None = None) -> tuple[bool, float, float]:
    """(ok, max |out - ref64|, max |pt - ref64|) for FlashAttention's rule on the block set `block_mask`."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    ref = naive_attention(q, k, v, block_mask, block_size, scale, torch.float64)
    pt = naive_attention(q, k, v, block_mask, block_size, scale, q.dtype)
    err, pt_err = max_abs_diff(out, ref), max_abs_diff(pt, ref)
    return err <= 2 * pt_err + 1e-5, err, pt_err  # False for NaN
