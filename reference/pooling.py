"""Stage 1 of FlashPrefill: the mean proxy of every key block.

    kbar_J = (1 / |J|) * sum_{j in J} k_j          (|J| = number of *valid* tokens of key block J)

Scoring the L queries against N = ceil(L / Bs) pooled keys instead of L keys is what makes pattern discovery
cheap: the score stage moves (L/Bs) x L scores per head instead of L x L.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .validation import ATTENTION_DTYPES, check_block_size, check_tensor, num_blocks


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else is accumulated in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def split_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, L, H, D) -> (B, H, N, Bs, D) in the accumulation dtype, zero-padded to N whole blocks."""
    B, L, H, D = x.shape
    N = num_blocks(L, block_size)
    padded = F.pad(x.to(compute_dtype(x)), (0, 0, 0, 0, 0, N * block_size - L))
    return padded.view(B, N, block_size, H, D).permute(0, 3, 1, 2, 4)


def mean_pool_keys(k: torch.Tensor, block_size: int = 128) -> torch.Tensor:
    """Mean-pool the keys of every block of `block_size` tokens.

    Args:
        k: keys (B, L, Hkv, D).
        block_size: Bs, a power of two >= 16.
    Returns:
        kbar (B, N, Hkv, D), N = ceil(L / Bs), float32 (float64 for float64 keys). The last block may be
        partial: it is averaged over its valid tokens only.
    """
    check_tensor("k", k, ndim=4, dtypes=ATTENTION_DTYPES)
    check_block_size(block_size)
    B, L, Hkv, D = k.shape
    N = num_blocks(L, block_size)
    # 1. Sum the tokens of each block (padding tokens are zeros and add nothing).
    sums = split_blocks(k, block_size).sum(dim=3)  # (B, Hkv, N, D)
    # 2. Divide by the number of valid tokens: Bs, except in a partial last block.
    starts = torch.arange(N, device=k.device) * block_size
    valid = (L - starts).clamp(max=block_size).to(sums.dtype)
    kbar = sums / valid.view(1, 1, N, 1)
    return kbar.permute(0, 2, 1, 3).contiguous()  # (B, N, Hkv, D)
