"""Structured synthetic Q/K/V with the attention patterns real long-context heads show.

Random Gaussian q and k give almost uniform block scores (every key block looks alike), so they exercise the
arithmetic but not the selection. `planted_qkv` plants, per head, the patterns the FlashPrefill paper and its
peers describe, in dedicated feature dimensions of k (what a key offers) and q (what a head looks for):

* attention sinks   the first `sink_tokens` keys share a direction that every query looks for;
* local decay       RoPE-like Fourier features of the position, so q_i . k_j ~ sum_f cos(w_f (i - j)),
                    large for nearby tokens and decaying with distance;
* slashes           the same features shifted by an offset d: q_i . k_j ~ sum_f cos(w_f (i - d - j)), a diagonal
                    line at i - j = d;
* vertical stripes  a few random key positions (runs of `stripe_width` tokens) share a direction that some
                    heads look for;
* noise             Gaussian in the remaining dimensions.

Every figure that uses these inputs must say "synthetic". The strengths are logits (before the softmax scale is
applied they are multiplied by sqrt(D), so that scale * q . k has the stated size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PlantedPatterns:
    """Parameters of `planted_qkv`. Strengths are in logits (units of scale * q . k)."""

    sink_tokens: int = 16
    sink_strength: float = 8.0
    local_strength: float = 6.0
    local_frequencies: int = 8  # Fourier features of the position; needs 2 * local_frequencies <= D - 2
    local_width: float = 64.0  # tokens: the highest frequency is 2 pi / (4 * local_width)
    slash_fraction: float = 0.5  # fraction of query heads with a slash
    slash_strength: float = 5.0
    stripes: int = 6  # vertical stripes (key positions) per kv head
    stripe_width: int = 1  # tokens per stripe; mean pooling dilutes a stripe by stripe_width / Bs
    stripe_fraction: float = 0.5  # fraction of query heads that look at the stripes
    stripe_strength: float = 7.0
    noise: float = 1.0  # std of q and k in the remaining dimensions


def planted_qkv(
    batch: int,
    length: int,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    *,
    patterns: PlantedPatterns = PlantedPatterns(),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, L, Hq, D), k and v (B, L, Hkv, D) with planted sinks, local decay, slashes and vertical stripes.

    Deterministic for a given seed (generated on the CPU in float32, then moved to `device` and `dtype`).
    """
    p = patterns
    F = p.local_frequencies
    if head_dim < 2 * F + 2:
        raise ValueError(f"head_dim must be >= {2 * F + 2} for {F} local frequencies, got {head_dim}")
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be divisible by kv_heads ({kv_heads})")
    gen = torch.Generator().manual_seed(seed)
    B, L, Hq, Hkv, D = batch, length, q_heads, kv_heads, head_dim
    root = math.sqrt(math.sqrt(D))  # q . k = logit * sqrt(D) once both sides carry root * sqrt(strength)

    q = p.noise * torch.randn(B, L, Hq, D, generator=gen)
    k = p.noise * torch.randn(B, L, Hkv, D, generator=gen)
    v = torch.randn(B, L, Hkv, D, generator=gen)
    SINK, STRIPE, POS = 0, 1, slice(2, 2 + 2 * F)  # feature dimensions

    # Attention sinks: every query looks for the sink direction, only the first tokens carry it.
    k[:, :, :, SINK] = 0.0
    k[:, : p.sink_tokens, :, SINK] = root
    q[:, :, :, SINK] = root * p.sink_strength

    # Vertical stripes: a few random key positions per kv head; some query heads look for them.
    k[:, :, :, STRIPE] = 0.0
    for h in range(Hkv):
        positions = torch.randint(p.sink_tokens, max(L, p.sink_tokens + 1), (p.stripes,), generator=gen)
        for start in positions.clamp(max=L - 1).tolist():
            k[:, start : start + p.stripe_width, h, STRIPE] = root
    looks_at_stripes = torch.rand(Hq, generator=gen) < p.stripe_fraction
    q[:, :, :, STRIPE] = root * p.stripe_strength * looks_at_stripes.float()

    # Local decay and slashes: RoPE-like features, geometric frequencies from 2 pi / (4 width) down to ~ 2 pi / L.
    lowest = 2 * math.pi / max(4 * L, 8 * p.local_width)
    highest = 2 * math.pi / (4 * p.local_width)
    freqs = torch.logspace(math.log10(highest), math.log10(lowest), F)
    pos = torch.arange(L, dtype=torch.float32)
    k_angles = pos[:, None] * freqs  # (L, F)
    k[:, :, :, POS] = root * torch.cat([k_angles.cos(), k_angles.sin()], dim=-1)[None, :, None] / math.sqrt(F)
    has_slash = torch.rand(Hq, generator=gen) < p.slash_fraction
    offsets = torch.randint(p.sink_tokens, max(L // 4, p.sink_tokens + 1), (Hq,), generator=gen).float()
    q_pos = torch.zeros(L, Hq, 2 * F)
    for h in range(Hq):
        local = p.local_strength * _fourier(pos, freqs)
        slash = p.slash_strength * _fourier(pos - offsets[h], freqs) if has_slash[h] else 0.0
        q_pos[:, h] = local + slash
    q[:, :, :, POS] = root * q_pos[None] / math.sqrt(F)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))  # type: ignore[return-value]


def _fourier(pos: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    angles = pos[:, None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)
