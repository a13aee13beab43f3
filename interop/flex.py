"""FlexAttention interop: FlashPrefill's block lists as a `torch.nn.attention.flex_attention.BlockMask`.

The mapping (docs/DESIGN.md section 3, "FlexAttention interop"), with BLOCK_SIZE = Bs and one BlockMask row per
(b, query head h, query block I), so per-head lists and a batch carry over as they are:

* a listed key block J < I is a **full** block (full_kv_num_blocks / full_kv_indices): every key of J precedes
  every query of I, so the compiled kernel attends it without evaluating the mask_mod;
* the listed diagonal block J = I is a **partial** block (kv_num_blocks / kv_indices): the mask_mod decides per
  token, kv_idx <= q_idx;
* seq_lengths = (L, L): a last block shorter than Bs is masked by flex_attention itself;
* GQA: the BlockMask has Hq heads, k and v Hkv heads; `flex_block_sparse_attention` passes enable_gqa.

The mask_mod is kv_idx <= q_idx AND "block (I, J) is listed" (by default). Compiled flex_attention evaluates it
only inside partial blocks, i.e. on the diagonal, where it is the causal mask. Eager flex_attention, however,
ignores the block lists and evaluates the mask_mod on every (query, key) pair: the list lookup is what makes the
same BlockMask give the same output there (and in the CPU tests). `exact_mask_mod=False` drops the lookup and its
captured (B, Hq, M, M) bool tensor; the mask is then right only under torch.compile.

torch and reference/ only; `torch.nn.attention.flex_attention` is imported on first use, so `import interop` works
without it.
"""

from __future__ import annotations

import torch

from reference.flash_prefill import FlashPrefillStats
from reference.selection import compact_blocks, listed_blocks
from reference.validation import (check_block_lists, check_block_size, check_count, check_flag, check_qkv,
                                  check_same_device, check_tensor, num_blocks, resolve_scale)


def _flex_module():
    """torch.nn.attention.flex_attention, or an ImportError that says which torch has it."""
    try:
        from torch.nn.attention import flex_attention
    except ImportError as err:
        raise ImportError(f"FlexAttention interop needs torch >= 2.5 (torch.nn.attention.flex_attention); this is "
                          f"torch {torch.__version__}") from err
    return flex_attention


def _lists_of(stats_or_lists) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(stats_or_lists, FlashPrefillStats):
        return stats_or_lists.counts, stats_or_lists.indices
    if isinstance(stats_or_lists, (tuple, list)) and len(stats_or_lists) == 2:
        return stats_or_lists[0], stats_or_lists[1]
    raise TypeError(f"stats_or_lists must be a FlashPrefillStats or a (counts, indices) pair, got "
                    f"{type(stats_or_lists).__name__}")


def to_block_mask(stats_or_lists, seq_len: int, block_size: int = 128, *, exact_mask_mod: bool = True,
                  validate: bool = True):
    """A FlashPrefill selection as a FlexAttention BlockMask (BLOCK_SIZE = block_size).

    Args:
        stats_or_lists: a `FlashPrefillStats` (flash_prefill(..., return_stats=True)) or a (counts, indices) pair:
            counts (B, Hq, M) int32, indices (B, Hq, M, C) int32, 1 <= C <= M, as `compact_blocks` returns them
            (only indices[..., :counts] is read).
        seq_len: L, the sequence length the lists were made for; M must be ceil(L / block_size).
        block_size: Bs, a power of two >= 16.
        exact_mask_mod: True: mask_mod = causal AND listed, exact under eager and compiled flex_attention; False:
            causal only (module docstring).
        validate: check the lists (counts in range, ids ascending and causal; one host sync per rule); False trusts
            them (no sync; whatever lies above the diagonal is dropped all the same).
    Returns:
        BlockMask of shape (B, Hq, L, L) on the lists' device: per row I, full_kv_num_blocks (B, Hq, M) int32 and
        full_kv_indices (B, Hq, M, M) int32 hold the listed J < I (ascending), kv_num_blocks (B, Hq, M) int32 is 1
        where the diagonal is listed (else 0) and kv_indices[..., I, 0] = I. Entries past a row's count are 0.

    Example (q (B, L, Hq, D), k and v (B, L, Hkv, D)):
        out, stats = reference.flash_prefill(q, k, v, return_stats=True)
        mask = to_block_mask(stats, q.shape[1], 128)
        out_flex = flex_block_sparse_attention(q, k, v, mask)  # == out, up to rounding
    """
    counts, indices = _lists_of(stats_or_lists)
    check_count("seq_len", seq_len, minimum=1)
    check_block_size(block_size)
    check_flag("exact_mask_mod", exact_mask_mod)
    check_flag("validate", validate)
    check_tensor("counts", counts, ndim=3, dtypes=(torch.int32,))
    check_tensor("indices", indices, ndim=4, dtypes=(torch.int32,))
    M = num_blocks(seq_len, block_size)
    if counts.shape[-1] != M:
        raise ValueError(f"counts must have M = ceil(seq_len / block_size) = {M} query blocks for seq_len={seq_len} "
                         f"and block_size={block_size}, got shape {tuple(counts.shape)}")
    check_same_device(counts=counts, indices=indices)
    if tuple(indices.shape[:3]) != tuple(counts.shape) or not 1 <= indices.shape[3] <= M:
        raise ValueError(f"indices must have shape (B, Hq, M={M}, C) with 1 <= C <= M and (B, Hq) of counts "
                         f"{tuple(counts.shape[:2])}, got {tuple(indices.shape)}")
    if validate:
        check_block_lists(counts, indices)
    BlockMask = _flex_module().BlockMask

    # (B, Hq, M, M) bool; cut to the lower triangle so that unvalidated lists can never make a block above the
    # diagonal a full block (a full block is attended without the causal mask_mod).
    causal = torch.ones(M, M, dtype=torch.bool, device=counts.device).tril()
    listed = listed_blocks(counts, indices) & causal
    diagonal = torch.eye(M, dtype=torch.bool, device=listed.device)
    # Full blocks: the listed J < I, compacted again (drops the diagonal, pads every row to M columns).
    full_counts, full_indices = compact_blocks(listed & ~diagonal)
    # Partial blocks: the diagonal alone, where listed.
    partial_counts = listed.diagonal(dim1=-2, dim2=-1).to(torch.int32).contiguous()
    partial_indices = torch.zeros_like(full_indices)
    partial_indices[..., 0] = torch.arange(M, dtype=torch.int32, device=listed.device)
    # -1 past counts is never read, but valid ids are safer for a kernel that prefetches the next entry.
    full_indices.clamp_(min=0)

    if exact_mask_mod:
        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & listed[b, h, q_idx // block_size, kv_idx // block_size]
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx

    return BlockMask.from_kv_blocks(partial_counts, partial_indices, full_counts, full_indices,
                                    BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(seq_len, seq_len))


def flex_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask,
                                softmax_scale: float | None = None, *, flex_fn=None) -> torch.Tensor:
    """flex_attention on this repository's layout: block-sparse causal attention with a `to_block_mask` mask.

    Args:
        q: (B, L, Hq, D); k, v: (B, L, Hkv, D), Hq divisible by Hkv (GQA: enable_gqa is passed when Hq != Hkv).
        block_mask: a BlockMask of shape (B or 1, Hq or 1, L, L), on q's device.
        softmax_scale: None means 1 / sqrt(D).
        flex_fn: the flex_attention to call; None is torch's eager one (an unfused implementation that holds
            B Hq L^2 scores: small inputs only). Pass `torch.compile(flex_attention)` for the fused kernel.
    Returns:
        out (B, L, Hq, D) in q.dtype: a transposed view of flex_attention's (B, Hq, L, D) output (no copy).
    """
    B, L, Hq, Hkv, D = check_qkv(q, k, v)
    scale = resolve_scale(softmax_scale, D)
    flex = _flex_module()
    if not isinstance(block_mask, flex.BlockMask):
        raise TypeError(f"block_mask must be a torch.nn.attention.flex_attention.BlockMask (to_block_mask makes one), "
                        f"got {type(block_mask).__name__}")
    mB, mH, mL, mS = block_mask.shape
    if mB not in (1, B) or mH not in (1, Hq) or (mL, mS) != (L, L):
        raise ValueError(f"block_mask must have shape (B={B} or 1, Hq={Hq} or 1, L={L}, L={L}) for q of shape "
                         f"{tuple(q.shape)}, got {tuple(block_mask.shape)}")
    if block_mask.kv_num_blocks.device != q.device:
        raise ValueError(f"block_mask must be on q's device {q.device}, got {block_mask.kv_num_blocks.device}")
    fn = flex_fn if flex_fn is not None else flex.flex_attention
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, scale=scale,
             enable_gqa=Hq != Hkv)
    return out.transpose(1, 2)
