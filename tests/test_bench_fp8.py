"""repro/bench_fp8.py: its command line, its pure helpers (sweep labels, errors, per-kept ratios, goals, report), and
end-to-end --quick runs (fp16, Hq 2, Hkv 1, D 64, Bs 64; the kernels under the Triton interpreter on a CPU, which
conftest switches on): the correctness gate, the rows and the three files. The timings themselves need a GPU."""

from __future__ import annotations

import math

import pytest
import torch

from repro import bench_fp8
from repro.common import read_long_csv, read_run_json

STAMP = dict(device="cuda", device_name="NVIDIA H200", torch="t", triton="t", python="p", date="d", commit="c")


def test_defaults_are_issue_14s_sizes_and_quick_is_tiny():
    args = bench_fp8.parse_args([])
    assert args.lengths == [65536, 131072, 262144] and args.densities == [0.035, 0.10]
    assert args.check_lengths == [4096, 16384] and max(args.check_lengths) >= 16384
    assert args.whole_lengths == [262144] and args.whole_density == 0.035 and args.repeats == 3
    assert args.stages == [] and args.warps == [] and args.out_dir is None
    quick = bench_fp8.parse_args(["--quick"])
    assert quick.lengths == [256] and quick.repeats == 1 and quick.whole_lengths == [256]
    assert bench_fp8.parse_args(["--quick", "--lengths", "128"]).lengths == [128]  # explicit options win
    assert bench_fp8.parse_args(["--whole-lengths"]).whole_lengths == []  # skip the whole call


@pytest.mark.parametrize("bad", [["--repeats", "0"], ["--lengths", "0"], ["--densities", "0"],
                                 ["--whole-density", "1.5"], ["--stages", "x"]])
def test_bad_arguments_exit_2(bad):
    with pytest.raises(SystemExit) as exit_info:
        bench_fp8.parse_args(bad)
    assert exit_info.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_main_on_a_cpu_without_quick_says_it_needs_a_gpu():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench_fp8.main(["--lengths", "256"])


def test_sweep_configs_label_each_combination():
    assert bench_fp8.sweep_configs([], []) == {}
    assert bench_fp8.sweep_configs([2, 3], [8]) == {"fp8 s2 w8": dict(num_stages=2, num_warps=8),
                                                    "fp8 s3 w8": dict(num_stages=3, num_warps=8)}
    assert bench_fp8.sweep_configs([4], []) == {"fp8 s4": dict(num_stages=4)}
    assert bench_fp8.sweep_configs([], [4]) == {"fp8 w4": dict(num_warps=4)}
    assert bench_fp8.sweep_configs([2, 3], [], [32], [64]) == {
        "fp8 s2 m64": dict(num_stages=2, block_m=64), "fp8 s3 m64": dict(num_stages=3, block_m=64),
        "fp8 acc32": dict(imprecise_acc=32)}


def test_abs_errors_and_nan():
    a = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16)
    assert bench_fp8.abs_errors(a, torch.tensor([1.0, 2.5, 2.0], dtype=torch.float64)) == (1.0, 0.5)
    worst, mean = bench_fp8.abs_errors(torch.tensor([float("nan"), 0.0]), torch.zeros(2))
    assert math.isnan(worst) and math.isnan(mean) and not worst <= bench_fp8.MAX_DIFF  # NaN fails the gate


def test_per_kept_ratios():
    row = bench_fp8.per_kept(2.0, 1000, 0.05, 3.0, {"sdpa_flash": 90.0, "sdpa_cudnn": 80.0})
    assert row == dict(ns_per_kept_block_head=2000.0, speedup_vs_bf16=1.5, per_kept_vs_cudnn=2.0 / (0.05 * 80.0))
    assert bench_fp8.per_kept(2.0, 1000, 0.05, 3.0, {})["per_kept_vs_cudnn"] == ""  # no cuDNN: blank


def op(L, version, speedup, target=0.035):
    return dict(section="operator", L=L, target_density=target, density=0.04, kept_blocks=1000, version=version,
                ms=1.0, ns_per_kept_block_head=1000.0, speedup_vs_bf16=speedup, per_kept_vs_cudnn=1.2)


def whole(version, vs_fa2, bisected=True, L=262144, target=0.035):
    return dict(section="whole", L=L, target_density=target, density=0.036, kept_blocks=99, alpha=0.2,
                alpha_bisected=bisected, version=version, ms=30.0, speedup_vs_bf16=1.0, speedup_vs_fa2=vs_fa2,
                speedup_vs_cudnn=vs_fa2 / 1.5)


def gpu_like_rows():
    return [op(16384, "fp8", 1.1), op(65536, "bf16", 1.0), op(65536, "fp8", 1.8), op(262144, "fp8", 1.7, 0.1),
            op(65536, "fp8+quantize", 1.5), op(262144, "fp8 s4", 1.9), whole("bf16", 40.0), whole("fp8", 55.0),
            dict(section="dense", L=262144, density=1.0, version="sdpa_cudnn", ms=1000.0)]


def test_goals_read_the_rows_in_memory_and_from_csv_strings():
    goals = bench_fp8.goals(gpu_like_rows())
    assert goals == dict(operator_min_speedup=1.7, operator_goal_met=True, operator_min_speedup_with_quantize=1.5,
                         operator_goal_met_with_quantize=False, whole_speedup_vs_fa2=55.0, whole_density=0.036,
                         whole_goal_met=True)  # 16K is outside 64K-256K, the sweep rows are not "fp8"
    as_csv = [{key: str(value) for key, value in r.items()} for r in gpu_like_rows()]
    assert bench_fp8.goals(as_csv) == goals
    unbisected = bench_fp8.goals([whole("fp8", 60.0, bisected=False)])
    assert unbisected["whole_speedup_vs_fa2"] == 60.0 and unbisected["whole_goal_met"] is None
    assert bench_fp8.goals([whole("fp8", 60.0, target=0.1)])["whole_speedup_vs_fa2"] is None  # not at 3.5%
    assert set(bench_fp8.goals([]).values()) == {None}


def test_report_states_goals_against_measurements():
    rows = gpu_like_rows()
    info = dict(quick=False, shape=bench_fp8.SHAPE, dtype="bfloat16", repeats=3, whole_density=0.035, skipped=[],
                time_budget_s=420.0, goals=bench_fp8.goals(rows))
    text = bench_fp8.summary(rows, STAMP, info)
    assert text.startswith("# FP8 (e4m3) vs bf16 attention: operator only and with selection, synthetic planted "
                           "inputs, NVIDIA H200\n")
    assert "- goal: fp8 >= 1.6x bf16 per kept block at 64K-256K (operator only). Measured: smallest speedup 1.70x" \
        in text and "1.50x with its quantisation: **not met**" in text
    assert "- goal: flash_prefill(fp8=True) >= 50x FA2 at 256K, 3.5% (with selection). Measured: 55.0x at density " \
           "3.60%: **met**" in text
    assert "| 64K | 0.035 | 4.00% | 1000 | fp8 | 1.000 | 1000.0 | 1.80 | 1.20 |" in text
    assert "| 256K | sdpa_cudnn | 1000.000 |" in text and "| 256K | 0.2 | True | 3.60% | fp8 | 30.000 |" in text
    assert "Skipped" not in text
    info["skipped"] = ["whole L=262144"]
    assert "Skipped (time budget 420.0 s): whole L=262144." in bench_fp8.summary(rows, STAMP, info)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_fp8")
    bench_fp8.main(["--quick", "--stages", "2", "3", "--warps", "4", "--out-dir", str(out)])
    return out, read_long_csv(out / "bench_fp8.csv")


def test_quick_run_writes_its_files(quick_run):
    out, rows = quick_run
    assert sorted(p.name for p in out.iterdir()) == ["bench_fp8.csv", "bench_fp8.md", "run.json"]
    assert {"section", "L", "version", "ms", "kept_blocks", "density", "ns_per_kept_block_head", "speedup_vs_bf16",
            "per_kept_vs_cudnn", "speedup_vs_fa2", "device", "device_name", "commit"} <= set(rows[0])
    info = read_run_json(out / "run.json")
    assert info["command"].startswith("python -m repro.bench_fp8 --quick") and info["skipped"] == []
    assert info["tolerances"] == dict(max=bench_fp8.MAX_DIFF, mean_share=bench_fp8.MEAN_SHARE)
    assert set(info["configs"]) == {"fp8 s2 w4", "fp8 s3 w4"} and "goals" in info
    text = (out / "bench_fp8.md").read_text()
    for heading in ("## Goals (issue 14)", "## Correctness (before timing)", "## Operator speed",
                    "## Dense baselines", "## Whole call", "--quick: the code path", "Measured on"):
        assert heading in text, heading


def test_quick_run_checks_fp8_against_the_reference_and_fp64(quick_run):
    _, rows = quick_run
    check = [r for r in rows if r["section"] == "check"]
    assert sorted({int(r["L"]) for r in check}) == [200, 320]
    assert {r["version"] for r in check} == {"fp8", "bf16", "reference fp8", "fp8 s2 w4", "fp8 s3 w4"}
    for r in check:
        assert 0 < float(r["max_error_vs_fp64"]) < 1 and float(r["mean_error_vs_fp64"]) <= float(r["max_error_vs_fp64"])
        if r["version"].startswith("fp8"):
            emulated = next(b for b in check if b["L"] == r["L"] and b["version"] == "reference fp8")
            assert r["ok"] == "True" and float(r["max_diff_vs_reference"]) <= bench_fp8.MAX_DIFF
            assert float(r["mean_diff_vs_reference"]) <= bench_fp8.MEAN_SHARE * float(emulated["mean_error_vs_fp64"])
            bf16 = next(b for b in check if b["L"] == r["L"] and b["version"] == "bf16")
            assert float(r["max_error_ratio"]) == pytest.approx(float(r["max_error_vs_fp64"])
                                                                / float(bf16["max_error_vs_fp64"]))


def test_quick_run_times_every_version_on_the_same_lists(quick_run):
    _, rows = quick_run
    operator = [r for r in rows if r["section"] == "operator"]
    assert {r["version"] for r in operator} == {"bf16", "fp8", "fp8+quantize", "fp8 s2 w4", "fp8 s3 w4"}
    assert len({r["kept_blocks"] for r in operator}) == 1 and all(float(r["ms"]) > 0 for r in operator)
    assert next(r for r in operator if r["version"] == "fp8 s3 w4")["config"] == "num_stages=3 num_warps=4"
    bf16 = next(r for r in operator if r["version"] == "bf16")
    for r in operator:
        assert float(r["speedup_vs_bf16"]) == pytest.approx(float(bf16["ms"]) / float(r["ms"]))
        assert float(r["ns_per_kept_block_head"]) == pytest.approx(float(r["ms"]) * 1e6 / int(r["kept_blocks"]))
    calls = {r["version"]: r for r in rows if r["section"] == "whole"}
    assert set(calls) == {"bf16", "fp8"} and calls["fp8"]["kept_blocks"] == calls["bf16"]["kept_blocks"]
    assert calls["fp8"]["alpha_bisected"] == "False"  # 4 blocks: the forced blocks alone exceed 3.5%


def test_a_failed_check_exits_before_timing(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_fp8, "MAX_DIFF", -1.0)
    with pytest.raises(SystemExit, match="leaves the reference at L=200") as exit_info:
        bench_fp8.main(["--quick", "--check-lengths", "200", "--out-dir", str(tmp_path)])
    assert exit_info.value.code not in (0, None) and not any(tmp_path.iterdir())


def test_time_budget_skips_and_records(tmp_path):
    bench_fp8.main(["--quick", "--check-lengths", "200", "--time-budget", "0", "--out-dir", str(tmp_path)])
    info = read_run_json(tmp_path / "run.json")
    assert info["skipped"] == ["operator L=256", "whole L=256"]
    assert {r["section"] for r in read_long_csv(tmp_path / "bench_fp8.csv")} == {"check"}
    assert "Skipped (time budget 0.0 s): operator L=256, whole L=256." in (tmp_path / "bench_fp8.md").read_text()
