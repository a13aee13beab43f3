"""repro.bench_host without a GPU: its arguments, its refusal on a CPU, and its report from rows shaped like a GPU
run's (the measurement itself needs CUDA: repro/results/ holds the H200 run)."""

from __future__ import annotations

import pytest
import torch

from repro import bench_host
from repro.common import environment_stamp


def test_arguments_are_checked():
    assert bench_host.parse_args([]).lengths == [4096, 8192]
    for bad in (["--lengths", "64"], ["--calls", "0"]):
        with pytest.raises(SystemExit):
            bench_host.parse_args(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_refuses_to_run_without_a_gpu():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench_host.main(["--lengths", "4096"])


def test_report_has_the_goal_every_length_and_the_profile():
    rows = [dict(section="gpu", L=4096, what="sdpa_cudnn", ms=0.26, vs_cudnn=1.0),
            dict(section="gpu", L=4096, what="flash_prefill eager", ms=0.31, vs_cudnn=0.31 / 0.26),
            dict(section="host", L=4096, what="argument checks", ms=0.05)]
    profiles = {4096: [["jit.py:700 run", 4, 0.02, 0.2]]}
    text = bench_host.report(rows, profiles, environment_stamp("cpu"), dict(command="python -m repro.bench_host",
                                                                              calls=10, host_cpu="Some CPU"))
    for needle in ("Goal (issue 14)", "Host CPU: Some CPU", "## 4K", "flash_prefill eager", "1.19", "argument checks",
                   "jit.py:700 run"):
        assert needle in text, needle
