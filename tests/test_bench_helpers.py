"""The CPU-checkable parts of the benchmarks' shared helpers (repro/masks.py, repro/timing.py) and scripts."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE

import triton_impl
from reference.synthetic import planted_qkv
from repro.masks import alpha_for_density
from repro.timing import measure_call


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


def test_measure_call_excludes_the_warm_up():
    calls = []
    result, ms, peak = measure_call(lambda: calls.append(1) or len(calls), "cpu", repeats=3)
    assert result == 1 and len(calls) == 4 and ms >= 0 and peak is None


def test_controlled_masks_keep_the_forced_blocks_and_the_causal_triangle():
    from reference.selection import safety_net_mask
    from repro.masks import controlled_mask, full_causal_mask, group_shared_mask

    M = 32
    mask = controlled_mask(2, 4, M, 0.3, seed=0, device="cpu")
    assert mask.shape == (2, 4, M, M) and not mask.triu(1).any() and mask[..., safety_net_mask(M)].all()
    assert torch.equal(mask, controlled_mask(2, 4, M, 0.3, seed=0, device="cpu"))  # seeded
    shared = group_shared_mask(8, 2, M, 0.3, seed=0, device="cpu")
    assert shared.shape == (1, 8, M, M) and torch.equal(shared[0, 0], shared[0, 3])
    assert torch.equal(full_causal_mask(4, M, device="cpu")[0, 1], torch.ones(M, M, dtype=torch.bool).tril())


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


def test_row_length_fit_recovers_the_costs_it_is_given(monkeypatch):
    """tune_kernels.row_length_fit on banded lists, with every launch timed as a known cost per kept block-head plus
    one per program: the fit returns those two costs, and each band's row has its kept blocks."""
    from repro import tune_kernels
    from triton_impl import attention

    per_block_ns, per_program_ns, seen = 15.0, 40.0, {}

    def launch(q, k, v, block_size, scale, mode, *, counts, indices):
        seen["counts"] = counts

    def timed(fn):
        fn()
        counts = seen["counts"]
        return (per_block_ns * int(counts.sum()) + per_program_ns * counts.numel()) * 1e-6

    monkeypatch.setattr(attention, "launch_attention", launch)
    monkeypatch.setattr(tune_kernels, "bench_ms", timed)
    L, Hq = 1024, 2
    q = torch.zeros(1, L, Hq, 64, dtype=torch.float16, device=DEVICE)
    rows = tune_kernels.row_length_fit(q, q, q, L, cudnn_ns=14.0, widths=(1, 2, 4))
    fit = {r["what"]: r["ns_per_block"] for r in rows if r["what"].startswith("fit")}
    assert abs(fit["fit: ns per kept block-head"] - per_block_ns) < 1e-6
    assert abs(fit["fit: ns per program"] - per_program_ns) < 1e-6
    M = L // 128
    assert [r["blocks"] for r in rows[:3]] == [Hq * sum(min(w, I + 1) for I in range(M)) for w in (1, 2, 4)]


def test_plot_short_rows_redraws_the_committed_fit_into_the_run_folder(tmp_path, monkeypatch):
    """The short-rows figure is drawn from the committed H200 CSV into the run folder; the fit it draws (a per kept
    block, b per program) reproduces every banded measurement within 10%."""
    from repro import common, plot_short_rows

    committed = common.RESULTS_DIR / "kernel_tuning"
    before = {p.name: p.stat().st_mtime_ns for p in committed.iterdir()}
    monkeypatch.setattr(common, "RUNS_DIR", tmp_path)
    plot_short_rows.main([])
    assert (common.run_dir("kernel_tuning") / "short_rows_band_fit_h200.png").stat().st_size > 10_000
    assert {p.name: p.stat().st_mtime_ns for p in committed.iterdir()} == before
    lengths = plot_short_rows.by_length(common.read_long_csv(plot_short_rows.DEFAULT_CSV))
    assert len(lengths) == 3
    for fit in lengths.values():
        assert len(fit["band"]) == 6 and len(fit["random"]) == 2
        for per_row, ns in fit["band"]:
            assert abs(fit["a"] + fit["b"] / per_row - ns) < 0.1 * ns


def test_stamp_of_reads_back_what_write_long_csv_stamped(tmp_path):
    from repro import common

    stamp = common.environment_stamp("cpu")
    assert tuple(stamp) == common.STAMP_FIELDS
    path = common.write_long_csv(tmp_path / "rows.csv", [dict(x=1)], stamp)
    assert common.stamp_of(common.read_long_csv(path)[0]) == stamp


def test_tune_kernels_without_a_gpu_says_so(monkeypatch):
    """Every mode of repro.tune_kernels times native kernels: on a machine without a GPU it stops with a message
    instead of failing inside torch."""
    from repro import tune_kernels

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        tune_kernels.main(["--scores"])
