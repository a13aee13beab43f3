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


def test_ab_attention_imports_each_version_under_its_own_name(tmp_path):
    import shutil
    from pathlib import Path

    import pytest

    from repro.ab_attention import load_versions

    shutil.copytree(Path(triton_impl.__file__).parent, tmp_path / "triton_impl")
    versions = load_versions([f"copy={tmp_path}"])
    assert list(versions) == ["copy", "working tree"]
    assert versions["copy"] is not versions["working tree"]
    assert versions["copy"].__name__ != versions["working tree"].__name__
    assert all(hasattr(m, "_launch") for m in versions.values())
    with pytest.raises(SystemExit, match="NAME=DIR"):
        load_versions([str(tmp_path)])
