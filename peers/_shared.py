"""What the two peer selectors share: parameter checks in the style of reference/validation.py (the message names
the argument), the causal block mask, and per-query-head GQA scores."""

from __future__ import annotations

import math

import torch


def check_real(name: str, value, *, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    too_low = value <= low if low_open else value < low
    if math.isnan(value) or too_low or value > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must lie in {bracket}{low:g}, {high:g}], got {value}")
    return value


def causal_blocks(M: int, device) -> torch.Tensor:
    I = torch.arange(M, device=device)
    return I.view(M, 1) >= I.view(1, M)  # (M, N): J <= I


def gqa_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * q k^T per query head: q (B, R, Hq, D), k (B, C, Hkv, D) -> (B, Hq, R, C); head h reads kv h // g."""
    B, R, Hq, D = q.shape
    Hkv = k.shape[2]
    g = Hq // Hkv
    s = torch.einsum("brhgd,bchd->bhgrc", q.reshape(B, R, Hkv, g, D), k)
    return scale * s.reshape(B, Hq, R, k.shape[1])
