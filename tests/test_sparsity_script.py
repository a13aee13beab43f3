"""`python -m repro.sparsity` end to end at tiny sizes (the CUDA run's code path, with the Triton kernels under the
interpreter on a CPU): output files named by the tag, Triton and reference FlashPrefill rows with equal densities,
"synthetic" and "paper" labels, the real-activation part skipped without dumps and run on a small fake dump, and a
loud failure when the Triton density departs from the reference.
"""

from __future__ import annotations

import pytest
import torch

from reference import compact_blocks
from repro import sparsity
from repro.common import read_long_csv

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
SMALL = ["--device", DEVICE, "--lengths", "1024", "--repeats", "1"]  # 8 x 8 blocks: seconds under the interpreter


def run(tmp_path, *extra):
    sparsity.main([*SMALL, "--out-dir", str(tmp_path), "--tag", "t", *extra])
    return read_long_csv(tmp_path / "t.csv"), (tmp_path / "t.md").read_text()


def fake_dump(folder, L=1100, layers=(0, 3)):
    """Random q/k/v in load_activations' format (Hq=4, Hkv=2, D=64): the real-activation code path, no model."""
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    for layer in layers:
        q, k, v = (torch.randn(1, L, h, 64, generator=gen) for h in (4, 2, 2))
        torch.save(dict(q=q, k=k, v=v, meta=dict(layer=layer)), folder / f"fake_L{L}_layer{layer:02d}.pt")
    return folder


def test_output_tag_keeps_gpu_and_cpu_results_apart():
    assert sparsity.output_tag({"device": "cpu", "device_name": "AMD EPYC"}) == "sparsity"
    assert sparsity.output_tag({"device": "cuda", "device_name": "NVIDIA H200"}) == "sparsity_h200"


def test_measure_call_excludes_the_warm_up():
    calls = []
    result, ms, peak = sparsity.measure_call(lambda: calls.append(1) or len(calls), "cpu", repeats=3)
    assert result == 1 and len(calls) == 4 and ms >= 0 and peak is None


def test_synthetic_run_with_triton_and_reference_rows(tmp_path, capsys):
    rows, md = run(tmp_path, "--activations", str(tmp_path / "absent"))
    assert {p.name for p in tmp_path.iterdir()} == {"t.csv", "t.md", "t_density.png"}
    assert "Skipped: no SmolLM2 activation dumps" in capsys.readouterr().out
    fp = {r["impl"]: float(r["density"]) for r in rows if r["selector"] == "FlashPrefill" and r["value"] == "0.12"}
    assert set(fp) == {sparsity.TRITON, sparsity.REFERENCE}
    assert fp[sparsity.TRITON] == pytest.approx(fp[sparsity.REFERENCE], abs=sparsity.DENSITY_TOLERANCE)
    assert {r["impl"] for r in rows if r["selector"] != "FlashPrefill"} == {sparsity.PYTORCH}
    assert all(r["input"] == sparsity.SYNTHETIC and 0 < float(r["density"]) <= 1 for r in rows)
    for text in ("**synthetic**", "3.5% (paper)", "8.4% (paper)", "18.5% (paper)", "agree within", "no Triton version"):
        assert text in md


def test_real_activation_part_on_a_fake_dump(tmp_path):
    rows, md = run(tmp_path, "--real-lengths", "512", "1100", "--activations", str(fake_dump(tmp_path / "acts")))
    real = [r for r in rows if r["input"].startswith("real") and r["layer"] == "all" and "sweep" not in r["setting"]]
    assert {int(r["L"]) for r in real} == {512, 1100}
    assert {r["impl"] for r in real if r["selector"] == "FlashPrefill"} == {sparsity.REFERENCE}
    assert len([r for r in rows if r["what"] == "error_matched"]) == 3
    assert "## Error-matched settings" in md and (tmp_path / "t_error.png").exists()


def test_synthetic_only_skips_the_real_part(tmp_path):
    rows, md = run(tmp_path, "--synthetic-only")
    assert all(r["input"] == sparsity.SYNTHETIC for r in rows)
    assert "Skipped (--synthetic-only)." in md


def test_density_mismatch_fails_loudly(tmp_path, monkeypatch):
    def diagonal_only(q, k, alpha):  # a broken "Triton" selector: the diagonal blocks only
        M = -(-q.shape[1] // sparsity.BLOCK)
        return compact_blocks(torch.eye(M, dtype=torch.bool, device=q.device).expand(q.shape[0], q.shape[2], M, M))

    monkeypatch.setitem(sparsity.SELECT, ("FlashPrefill", sparsity.TRITON), diagonal_only)
    with pytest.raises(SystemExit, match="FAIL: Triton and reference FlashPrefill densities differ"):
        run(tmp_path, "--synthetic-only")
    assert (tmp_path / "t.csv").exists() and not (tmp_path / "t.md").exists()


def test_default_output_is_the_run_folder(tmp_path, monkeypatch):
    """Without --out-dir the files go into the run folder (repro/runs/<date>-<device>/sparsity/), never into the
    committed repro/results/."""
    from repro import common

    monkeypatch.setattr(common, "RUNS_DIR", tmp_path)
    sparsity.main([*SMALL, "--synthetic-only", "--tag", "t"])
    out = common.run_dir("sparsity", DEVICE)
    assert sorted(p.name for p in out.iterdir()) == ["t.csv", "t.md", "t_density.png"]
