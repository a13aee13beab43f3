"""Block masks and selections at a chosen density, shared by the GPU benchmarks (bench_speed, ab_attention,
tune_kernels, bench_public_call).

* `controlled_mask`    random block mask: the forced blocks (sinks, window, dense last rows) plus random other
                       causal blocks, aiming at a target causal density; independent per (batch, query head).
* `group_shared_mask`  the same, one mask per kv head shared by the query heads of its GQA group (the L2-friendly
                       case: the K/V tiles one head fetches are the ones its group needs).
* `full_causal_mask`   every causal block, as a (1, Hq, M, M) view (the list walk's worst case, density 1).
* `alpha_for_density`  FlashPrefill's own selection at a target density: the alpha, found by bisection, at which
                       `triton_impl.select_and_compact` keeps about that fraction of the causal blocks.

Masks are (B, Hq, M, M) bool over query blocks x key blocks; `triton_impl.compact_blocks` turns them into lists.
"""

from __future__ import annotations

import torch

from reference.selection import safety_net_mask

__all__ = ["controlled_mask", "group_shared_mask", "full_causal_mask", "alpha_for_density"]


def controlled_mask(B: int, Hq: int, M: int, target: float, seed: int, device="cuda") -> torch.Tensor:
    """(B, Hq, M, M) bool: forced blocks plus random causal blocks, aiming at `target` causal density."""
    forced = safety_net_mask(M, device=device)
    causal = torch.ones(M, M, dtype=torch.bool, device=device).tril()
    n_causal, n_forced = M * (M + 1) / 2, int(forced.sum())
    p = max(0.0, (target * n_causal - n_forced) / max(n_causal - n_forced, 1))
    gen = torch.Generator(device=device).manual_seed(seed)
    extra = torch.rand(B, Hq, M, M, generator=gen, device=device) < p
    return (extra & causal) | forced


def group_shared_mask(Hq: int, Hkv: int, M: int, target: float, seed: int, device="cuda") -> torch.Tensor:
    """(1, Hq, M, M) bool: one controlled_mask per kv head, shared by the Hq / Hkv query heads of its GQA group
    (the K/V tiles one head fetches are the ones its group needs: the L2-friendly case)."""
    return controlled_mask(1, Hkv, M, target, seed, device=device).repeat_interleave(Hq // Hkv, dim=1)


def full_causal_mask(Hq: int, M: int, device="cuda") -> torch.Tensor:
    """(1, Hq, M, M) bool, every causal block: an expanded view of one (M, M) lower triangle (call .contiguous()
    before compacting it)."""
    return torch.ones(M, M, dtype=torch.bool, device=device).tril().expand(1, Hq, M, M)


def alpha_for_density(scores, target: float, tolerance: float = 5e-4, steps: int = 30):
    """(alpha, realised density) with the selection of `scores` keeping about `target` of the causal blocks, found
    by bisection (the kept fraction falls as alpha rises); None when even alpha = 1 keeps more (forced blocks)."""
    import triton_impl

    def density(alpha):
        return float(triton_impl.causal_block_density(triton_impl.select_and_compact(scores, alpha)[0]))

    lo, hi = 0.0, 1.0
    if density(hi) > target:
        return None
    for _ in range(steps):
        mid = (lo + hi) / 2
        rho = density(mid)
        if abs(rho - target) <= tolerance:
            return mid, rho
        lo, hi = (mid, hi) if rho > target else (lo, mid)
    return hi, density(hi)
