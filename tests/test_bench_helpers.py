"""The CPU-checkable parts of the GPU benchmark scripts (repro/bench_speed.py)."""

from __future__ import annotations

import torch
from helpers import DEVICE

import triton_impl
from reference.synthetic import planted_qkv
from repro.bench_speed import alpha_for_density


def _scores(L=2048, block_size=64):
    q, k, _ = planted_qkv(1, L, 4, 1, 64, seed=0, dtype=torch.float32, device=DEVICE)
    return triton_impl.block_scores(q, triton_impl.mean_pool_keys(k, block_size), block_size)


def test_alpha_for_density_hits_a_reachable_target():
    scores = _scores()
    floor = float(triton_impl.causal_block_density(triton_impl.select_and_compact(scores, 1.0)[0]))
    target = floor + 0.1
    alpha, rho = alpha_for_density(scores, target, tolerance=0.02)
    assert abs(rho - target) <= 0.02
    assert rho == float(triton_impl.causal_block_density(triton_impl.select_and_compact(scores, alpha)[0]))


def test_alpha_for_density_below_the_forced_blocks_is_none():
    scores = _scores()
    floor = float(triton_impl.causal_block_density(triton_impl.select_and_compact(scores, 1.0)[0]))
    assert alpha_for_density(scores, floor / 2) is None
