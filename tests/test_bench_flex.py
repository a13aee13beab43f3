"""The CPU-checkable parts of repro/bench_flex.py: its command line, its masks at a target density, its summary table.
The timing itself needs a GPU (the lead's H200 run)."""

from __future__ import annotations

import pytest
import torch

from reference.selection import safety_net_mask
from repro import bench_flex
from repro.common import environment_stamp


def test_defaults_are_the_standard_sweep():
    args = bench_flex.parse_args([])
    assert args.lengths == [16384, 32768, 65536, 131072, 262144]
    assert args.densities == [0.035, 0.1]
    assert (args.q_heads, args.kv_heads, args.head_dim, args.mask_mod) == (32, 4, 128, "exact")
    assert args.out_dir is None and args.tag is None and args.repeats >= 1


def test_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_flex.parse_args(["--help"])
    assert exit_info.value.code == 0 and "flex_attention" in capsys.readouterr().out
    for bad in (["--densities", "0"], ["--repeats", "0"], ["--mask-mod", "none"]):
        with pytest.raises(SystemExit) as exit_info:
            bench_flex.parse_args(bad)
        assert exit_info.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_main_on_a_cpu_says_it_needs_a_gpu():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench_flex.main(["--lengths", "256"])


@pytest.mark.parametrize("target", [0.035, 0.1])
def test_random_lists_hit_the_target_density_with_the_forced_blocks(target):
    M = 512  # 64K tokens: the forced blocks are 3.1% of the causal ones, so both targets are reachable
    counts, indices, density = bench_flex.random_lists(4, M, target, seed=0, device="cpu")
    assert counts.shape == (1, 4, M) and indices.shape == (1, 4, M, M)
    assert abs(density - target) < 0.003
    listed = torch.zeros(1, 4, M, M + 1, dtype=torch.bool).scatter_(
        -1, torch.where(torch.arange(M) < counts.unsqueeze(-1), indices.long(), M), True)[..., :M]
    assert listed[..., safety_net_mask(M)].all()  # sinks, window with the diagonal, dense last rows
    assert not listed.triu(1).any()
    again = bench_flex.random_lists(4, M, target, seed=0, device="cpu")
    assert torch.equal(again[1], indices)  # seeded


def _rows():
    row = dict(B=1, Hq=32, Hkv=4, D=128, density=0.041, max_abs_diff_vs_ours=0.0078)
    return [dict(row, what="ours", L=65536, target_density=0.035, ms=2.0),
            dict(row, what="flex", L=65536, target_density=0.035, ms=5.0),
            dict(row, what="ours", L=16384, target_density=0.1, ms=1.0, density=0.124),
            dict(row, what="flex", L=16384, target_density=0.1, ms=1.5, density=0.124, max_abs_diff_vs_ours=0.5)]


def test_summary_table_gives_flex_over_ours_per_cell():
    table = bench_flex.summary_table(_rows())
    lines = table.splitlines()
    assert lines[0] == "| L | target | density | ours ms | flex ms | flex / ours | max abs diff |"
    assert lines[2] == "| 16K | 10.0% | 12.40% | 1.000 | 1.500 | 1.50 | 0.5 MISMATCH |"  # sorted by L
    assert lines[3] == "| 64K | 3.5% | 4.10% | 2.000 | 5.000 | 2.50 | 0.0078 |"


def test_summary_table_reads_its_csv_back(tmp_path):
    """The table is the same from the rows in memory and from the CSV's strings (a report redrawn later)."""
    from repro.common import read_long_csv, write_long_csv

    path = write_long_csv(tmp_path / "flex.csv", _rows(), environment_stamp("cpu"))
    assert bench_flex.summary_table(read_long_csv(path)) == bench_flex.summary_table(_rows())


def test_markdown_names_the_shape_and_the_machine():
    stamp = environment_stamp("cpu")
    text = bench_flex.markdown(bench_flex.summary_table(_rows()), stamp, bench_flex.parse_args([]))
    assert "Hq=32, Hkv=4, D=128" in text and "flex / ours" in text and stamp["torch"] in text
    assert text.rstrip().endswith(f"{stamp['date']}.")


# --------------------------------------------------------------------------------------------------------------
# repro/bench_flex_varlen.py: a packed batch of mixed lengths
# --------------------------------------------------------------------------------------------------------------
def test_varlen_arguments():
    from repro import bench_flex_varlen

    assert bench_flex_varlen.parse_args([]).lengths == [8192, 32768, 102400, 3072]
    for bad in (["--lengths", "100"], ["--lengths", "0"], ["--densities", "2"]):
        with pytest.raises(SystemExit) as exit_info:
            bench_flex_varlen.parse_args(bad)
        assert exit_info.value.code == 2


def test_varlen_lists_are_the_packed_lists_per_sequence():
    """The varlen lists (per sequence, its own block numbers) and the packed lists (block diagonal) list the same
    blocks, each sequence's mask keeps its forced blocks, and the density is kept / causal over the sequences."""
    from repro import bench_flex_varlen

    lengths = [512, 1024, 256]  # 4, 8, 2 blocks of 128
    (counts_v, indices_v), (counts_p, indices_p), density = bench_flex_varlen.packed_lists(
        2, lengths, 0.5, seed=0, device="cpu")
    assert counts_v.shape == (3, 2, 8) and indices_v.shape == (3, 2, 8, 8) and counts_p.shape == (1, 2, 14)
    offset = 0
    for b, n in enumerate(L // 128 for L in lengths):
        assert torch.equal(counts_v[b, :, :n], counts_p[0, :, offset:offset + n]) and not counts_v[b, :, n:].any()
        for h in range(2):
            for t in range(n):
                c = int(counts_v[b, h, t])
                assert torch.equal(indices_v[b, h, t, :c] + offset, indices_p[0, h, offset + t, :c])
                assert int(indices_v[b, h, t, c - 1]) == t  # the diagonal, always kept
        offset += n
    causal = sum(2 * n * (n + 1) // 2 for n in (4, 8, 2))
    assert density == pytest.approx(int(counts_p.sum()) / causal)


def test_varlen_summary_table():
    from repro import bench_flex_varlen

    row = dict(target_density=0.1, density=0.12, max_abs_diff_vs_ours=0.0)
    rows = [dict(row, what="ours", ms=2.0), dict(row, what="ours_packed", ms=1.9),
            dict(row, what="flex", ms=3.0, max_abs_diff_vs_ours=0.5)]
    table = bench_flex_varlen.summary_table(rows)
    assert "| 10.0% | 12.00% | 2.000 | 1.900 | 3.000 | 1.50 | 0.95 | 0.5 MISMATCH |" in table
