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
    from repro.ab_attention import launcher

    assert all(callable(launcher(m)) for m in versions.values())
    with pytest.raises(SystemExit, match="NAME=DIR"):
        load_versions([str(tmp_path)])


def test_run_dir_is_one_dated_folder_per_device_under_an_ignored_root(tmp_path, monkeypatch):
    import datetime
    import shutil
    import subprocess

    from repro import common

    assert common.device_slug("NVIDIA H200") == "h200"
    assert common.device_slug("NVIDIA GeForce RTX 4090") == "geforce_rtx_4090"
    assert common.RUNS_DIR == common.ROOT / "repro" / "runs"
    monkeypatch.setattr(common, "RUNS_DIR", tmp_path)
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    path = common.run_dir("speed", "cpu")
    assert path == tmp_path / f"{today}-cpu" / "speed" and path.is_dir()
    assert common.run_dir(device="cpu") == path.parent
    if shutil.which("git") and (common.ROOT / ".git").exists():  # what the scripts write is never committed
        ignored = subprocess.run(["git", "check-ignore", "-q", "repro/runs/any/file.csv"], cwd=common.ROOT)
        assert ignored.returncode == 0, "repro/runs/ is not in .gitignore"


def test_plot_speed_redraws_the_committed_run_into_the_run_folder(tmp_path, monkeypatch):
    """The default re-plot reads the committed H200 CSV and writes into the run folder, not next to the CSV; its
    summary is the committed one (same numbers, same text)."""
    from repro import common, plot_speed

    committed = common.RESULTS_DIR / "speed"
    before = {p.name: p.stat().st_mtime_ns for p in committed.iterdir()}
    monkeypatch.setattr(common, "RUNS_DIR", tmp_path)
    plot_speed.main([])
    out = common.run_dir("speed")
    assert sorted(p.name for p in out.iterdir()) == [f"speed_h200_{s}" for s in
                                                     ("density.png", "speedup.png", "stages.png", "summary.md")]
    assert (out / "speed_h200_summary.md").read_text() == (committed / "speed_h200_summary.md").read_text()
    assert {p.name: p.stat().st_mtime_ns for p in committed.iterdir()} == before
