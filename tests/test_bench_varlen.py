"""repro/bench_varlen.py: its command line, its causal block counts, its goals, and one end-to-end --quick run (tiny
shapes: fp16, Hq 4, Hkv 2, D 64, Bs 32; the kernels under the Triton interpreter on a CPU) writing its CSV, markdown
and JSON. The timings themselves need a GPU (the lead's H200 run)."""

from __future__ import annotations

import pytest
import torch

from repro import bench_varlen
from repro.common import read_long_csv, read_run_json


def test_defaults_are_issue_13s_shapes():
    args = bench_varlen.parse_args([])
    assert args.lengths == [8192, 32768, 102400, 3072]
    assert (args.chunked_length, args.chunk, args.alpha, args.repeats) == (262144, 16384, 0.12, 3)
    assert (args.q_heads, args.kv_heads, args.head_dim, args.block_size) == (32, 4, 128, 128)
    assert args.parts == ["batch", "chunked"] and args.out_dir is None and args.tag is None
    quick = bench_varlen.parse_args(["--quick"])
    assert (quick.q_heads, quick.kv_heads, quick.head_dim, quick.block_size, quick.repeats) == (4, 2, 64, 32, 1)
    assert quick.chunked_length % quick.chunk == 0 and quick.chunk % quick.block_size == 0
    assert bench_varlen.parse_args(["--quick", "--chunk", "96"]).chunk == 96  # explicit options win over --quick


def test_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_varlen.parse_args(["--help"])
    assert exit_info.value.code == 0 and "flash_prefill_varlen" in capsys.readouterr().out
    for bad in (["--repeats", "0"], ["--lengths", "0"], ["--chunk", "1000"], ["--chunk", "524288"],
                ["--parts", "none"], ["--q-heads", "6"]):
        with pytest.raises(SystemExit) as exit_info:
            bench_varlen.parse_args(bad)
        assert exit_info.value.code == 2, bad


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_main_on_a_cpu_without_quick_says_it_needs_a_gpu():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench_varlen.main(["--lengths", "256"])


def test_causal_blocks_of_chunks_add_up_to_the_whole_sequence():
    Hq, L, C, bs = 4, 1000, 256, 32  # the last chunk is shorter and ends in a partial block
    M = -(-L // bs)
    assert bench_varlen.causal_blocks(Hq, L, L, bs) == Hq * M * (M + 1) // 2
    chunks = [bench_varlen.causal_blocks(Hq, min(s + C, L) - s, min(s + C, L), bs) for s in range(0, L, C)]
    assert sum(chunks) == Hq * M * (M + 1) // 2


def test_goals_read_the_two_ratios():
    rows = [dict(part="batch", what="varlen", per_kept_vs_per_sequence=1.05),
            dict(part="batch", what="per_sequence", per_kept_vs_per_sequence=1.0),
            dict(part="chunked", what="chunked", ms_vs_one_shot="1.2")]  # as read back from the CSV
    assert bench_varlen.goals(rows) == dict(batch_per_kept_ratio=1.05, batch_goal_met=True, chunked_time_ratio=1.2,
                                            chunked_goal_met=False)
    assert bench_varlen.goals(rows[:2])["chunked_goal_met"] is None  # part B not run


def test_quick_run_writes_its_files(tmp_path):
    """The whole script at tiny sizes: correctness checks, interleaved rounds, both parts' rows and tables."""
    bench_varlen.main(["--quick", "--out-dir", str(tmp_path), "--tag", "v"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.csv", "v.json", "v.md"]
    rows = read_long_csv(tmp_path / "v.csv")
    columns = set(rows[0])
    assert {"part", "what", "ms", "runs", "kept_blocks", "causal_blocks", "density", "ns_per_kept_block",
            "per_kept_vs_per_sequence", "same_lists", "max_abs_diff", "matches", "ms_vs_one_shot",
            "density_vs_one_shot", "peak_mib", "output_mib", "device", "device_name", "commit"} <= columns

    batch = {r["what"]: r for r in rows if r["part"] == "batch"}
    assert set(batch) == {"varlen", "varlen_validate", "per_sequence"}
    assert all(float(r["ms"]) > 0 and r["matches"] == "True" and r["same_lists"] == "True" for r in batch.values())
    assert len({r["kept_blocks"] for r in batch.values()}) == 1  # the same lists: the same kept blocks
    assert float(batch["per_sequence"]["per_kept_vs_per_sequence"]) == 1.0

    chunked = {r["what"]: r for r in rows if r["part"] == "chunked" and r["what"] != "chunk"}
    chunks = [r for r in rows if r["what"] == "chunk"]
    assert set(chunked) == {"one_shot", "chunked"} and len(chunks) == int(chunked["chunked"]["chunks"]) == 3
    assert all(r["matches"] == "True" for r in [*chunked.values(), *chunks])  # block-aligned: the one-shot output
    assert sum(int(r["kept_blocks"]) for r in chunks) == int(chunked["chunked"]["kept_blocks"])
    assert sum(int(r["causal_blocks"]) for r in chunks) == int(chunked["one_shot"]["causal_blocks"])
    assert float(chunked["chunked"]["density"]) == pytest.approx(float(chunked["one_shot"]["density"]))

    text = (tmp_path / "v.md").read_text()
    assert text.startswith("# Varlen and chunked prefill: operator + selection, synthetic planted inputs, ")
    assert "MISMATCH." in text and "MISMATCH |" not in text  # the rule is stated, no row breaks it
    for table in (bench_varlen.batch_table, bench_varlen.chunked_table, bench_varlen.chunk_table):
        assert table(rows, 2e-3) in text or table(rows, 1.6e-2) in text  # redrawn from the CSV's strings
    info = read_run_json(tmp_path / "v.json")
    assert info["quick"] is True and info["command"].startswith("python -m repro.bench_varlen --quick")
    assert set(info["goals"]) >= {"batch_per_kept_ratio", "chunked_time_ratio", "batch_goal_met", "chunked_goal_met"}
