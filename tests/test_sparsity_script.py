"""`python -m repro.sparsity` end to end at tiny sizes (the CUDA run's code path, with the Triton kernels under the
interpreter on a CPU): output files named by the tag, Triton and reference FlashPrefill rows with equal densities,
"synthetic" and "paper" labels, the real-activation part skipped without dumps and run on a small fake dump, the
figure panels drawing rows read back from a CSV, and a loud failure when the Triton density departs from the
reference.
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


def test_settings_keep_the_csv_vocabulary():
    """The block_selectors settings give the CSV columns of the runs committed before them: selector (display
    name), param, value, setting (the label) and impl."""
    columns = [(s.name, s.param, s.value, s.label, sparsity.impl_label(s)) for s in sparsity.TRITON_SETTINGS]
    assert columns == [
        ("FlashPrefill", "alpha", 0.12, "FlashPrefill alpha=0.12 (V1 default)", "Triton kernels"),
        ("FlashPrefill", "alpha", 0.1, "FlashPrefill alpha=0.1 (V2 paper)", "Triton kernels"),
        ("FlashPrefill", "alpha", 0.12, "FlashPrefill alpha=0.12 (V1 default), reference stages",
         "reference stages (PyTorch)"),
        ("FlexPrefill", "gamma", 0.9, "FlexPrefill gamma=0.9 tau=0.1 (paper default)",
         "PyTorch (ours; no Triton version)"),
        ("XAttention", "threshold", 0.9, "XAttention tau=0.9 S=8 (paper default)", "PyTorch (ours; no Triton version)"),
    ]
    assert [(s.label, sparsity.impl_label(s)) for s in sparsity.DEFAULT_SETTINGS[:2]] == [
        ("FlashPrefill alpha=0.12 (V1 default)", sparsity.REFERENCE),
        ("FlashPrefill alpha=0.1 (V2 paper)", sparsity.REFERENCE)]
    assert sparsity.DEFAULT_SETTINGS[2:] == sparsity.TRITON_SETTINGS[3:]
    sweep = sparsity.sweep_settings()
    assert len(sweep) == 21 and {sparsity.impl_label(s) for s in sweep} == {sparsity.REFERENCE, sparsity.PYTORCH}
    assert sweep[0].label == "FlashPrefill alpha=0.02 (sweep)"
    assert sweep[-1].label == "XAttention threshold=0.99 (sweep)"


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


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """One run with the real-activation part on a fake dump: (folder, rows read back from its CSV, markdown)."""
    tmp_path = tmp_path_factory.mktemp("real")
    rows, md = run(tmp_path, "--real-lengths", "512", "1100", "--activations", str(fake_dump(tmp_path / "acts")))
    return tmp_path, rows, md


def test_real_activation_part_on_a_fake_dump(real_run):
    tmp_path, rows, md = real_run
    real = [r for r in rows if r["input"].startswith("real") and r["layer"] == "all" and "sweep" not in r["setting"]]
    assert {int(r["L"]) for r in real} == {512, 1100}
    assert {r["impl"] for r in real if r["selector"] == "FlashPrefill"} == {sparsity.REFERENCE}
    assert len([r for r in rows if r["what"] == "error_matched"]) == 3
    assert "## Error-matched settings" in md and (tmp_path / "t_error.png").exists()


def test_panels_draw_rows_read_back_from_a_csv(real_run):
    """The panels notebook 03 lays side by side draw a CSV's string rows: this run's, the same rows without the
    `impl` column (CSVs written before it: impl_of labels them), and a run without real activations."""
    import io

    from matplotlib.figure import Figure

    _, rows, _ = real_run
    no_impl = [{k: v for k, v in r.items() if k != "impl"} for r in rows]
    synthetic = [r for r in rows if r["input"] == sparsity.SYNTHETIC]
    n_settings = len({r["setting"] for r in synthetic})
    for case in (rows, no_impl, synthetic):
        fig = Figure(figsize=(16, 4))
        axes = fig.subplots(1, 4)
        sparsity.synthetic_density_panel(axes[0], case, run="t")
        sparsity.real_density_panel(axes[1], case, run="t")
        sparsity.selection_time_panel(axes[2], case, run="t")
        assert sparsity.error_panel(axes[3], case, run="t") == (case is not synthetic)
        fig.savefig(io.BytesIO(), format="png")
        assert len(axes[0].get_lines()) == n_settings + 3  # + the paper's three 256K stars
        assert "synthetic planted_qkv — t" in axes[0].get_title()
        times = [t.get_text() for t in axes[2].get_legend().get_texts()]
        assert len(times) == n_settings and all(t.endswith("]") for t in times)
        if case is synthetic:
            assert "not measured" in axes[1].texts[0].get_text() and not axes[3].get_lines()
        else:
            assert len(axes[1].get_lines()) == len(sparsity.DEFAULT_SETTINGS)
            assert "L = 1100" in axes[3].get_title()
            # one line per selector's sweep, one star per default setting
            assert len(axes[3].get_lines()) == len(sparsity.MATCH_GRID) + len(sparsity.DEFAULT_SETTINGS)
    assert any(sparsity.PYTORCH in t for t in times)
    assert sparsity.error_figure(synthetic) is None
    assert sparsity.error_figure(rows) is not None and sparsity.density_figure(no_impl) is not None


def test_synthetic_only_skips_the_real_part(tmp_path):
    rows, md = run(tmp_path, "--synthetic-only")
    assert all(r["input"] == sparsity.SYNTHETIC for r in rows)
    assert "Skipped (--synthetic-only)." in md


def test_density_mismatch_fails_loudly(tmp_path, monkeypatch):
    import triton_impl

    def diagonal_only(scores, *args):  # a broken Triton selection kernel: the diagonal blocks only
        B, H, M, _ = scores.shape
        return compact_blocks(torch.eye(M, dtype=torch.bool, device=scores.device).expand(B, H, M, M))

    # The Triton FlashPrefill selector (block_selectors.flashprefill_select_triton) calls it through the package.
    monkeypatch.setattr(triton_impl, "select_and_compact", diagonal_only)
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
