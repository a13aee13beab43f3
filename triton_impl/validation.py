"""What the public entry points check on the GPU: block lists (twin of reference/validation.py, whose rules these are;
the argument checks themselves are the reference's, shared)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from reference.validation import BAD_COUNTS, BAD_INDEX, NOT_ASCENDING

from .common import launch, needs_wide_offsets, widen


# What a bad list is, by the bit the check kernel sets (the rules of reference.validation.check_block_lists).
LIST_ERRORS = {1: BAD_COUNTS, 2: BAD_INDEX, 4: NOT_ASCENDING}


@triton.jit
def _check_lists_kernel(COUNTS, INDICES, ERRORS, stride_cb, stride_ch, stride_cm, stride_lb, stride_lh, stride_lm,
                        stride_ln, C, HQ, TILE: tl.constexpr, WIDE: tl.constexpr):
    """One program per list (query block I, batch * head): OR the LIST_ERRORS bits of what is wrong with it into
    ERRORS[0]. Reads counts[I] and the first counts[I] entries of the list, nothing else."""
    I = tl.program_id(0)
    bh = widen(tl.program_id(1), WIDE)
    b, h = bh // HQ, bh % HQ
    count = tl.load(COUNTS + b * stride_cb + h * stride_ch + I * stride_cm)
    code = ((count < 0) | (count > tl.minimum(I + 1, C))).to(tl.int32)
    listed_end = tl.minimum(tl.maximum(count, 0), C)
    row = INDICES + b * stride_lb + h * stride_lh + widen(I, WIDE) * stride_lm
    for j0 in range(0, listed_end, TILE):
        slot = j0 + tl.arange(0, TILE)
        listed = slot < listed_end
        J = tl.load(row + slot * stride_ln, mask=listed, other=0)
        previous = tl.load(row + (slot - 1) * stride_ln, mask=listed & (slot > 0), other=-1)
        out_of_range = tl.max((listed & ((J < 0) | (J > I))).to(tl.int32), axis=0)
        not_ascending = tl.max((listed & (J <= previous)).to(tl.int32), axis=0)
        code = code | (out_of_range * 2) | (not_ascending * 4)
    tl.atomic_or(ERRORS, code, mask=code != 0)


def check_block_lists(counts: torch.Tensor, indices: torch.Tensor) -> None:
    """reference.validation.check_block_lists in one kernel launch and one host synchronisation (reading a single
    int32), instead of several passes over the lists, each synchronising (repro/NOTES.md has the cost)."""
    B, Hq, M = counts.shape
    errors = torch.zeros(1, dtype=torch.int32, device=counts.device)
    launch(_check_lists_kernel, (M, B * Hq),
        counts, indices, errors, *counts.stride(), *indices.stride(), indices.shape[-1], Hq,
        TILE=128, WIDE=needs_wide_offsets(indices),
    )
    code = int(errors.item())  # the one host synchronisation
    for bit, message in LIST_ERRORS.items():
        if code & bit:
            raise ValueError(message)
