"""Interop: FlashPrefill's selections handed to other attention kernels.

flex.py  `to_block_mask` turns a selection (FlashPrefillStats or counts + indices) into a FlexAttention BlockMask;
         `flex_block_sparse_attention` runs flex_attention with it on this repository's (B, L, H, D) layout.
"""

from .flex import flex_block_sparse_attention, to_block_mask

__all__ = ["to_block_mask", "flex_block_sparse_attention"]
