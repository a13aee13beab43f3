"""`python -m repro.mean_correction` end to end at tiny sizes on a CPU (a fake activation dump, block 32), and its
verdict computed from the rows: rows where the correction is worse must turn "Yes" into "No" and be listed.
"""

from __future__ import annotations

import pytest
import torch

from repro import mean_correction as mc
from repro.common import read_long_csv

STAMP = dict(device="cpu", device_name="test CPU (1 threads)", torch="t", triton="t", python="p", date="d",
             commit="c")


def fake_dump(folder, L=400, layers=(0, 3)):
    """Random q/k/v in load_activations' format (Hq=4, Hkv=2, D=64): the real-activation code path, no model."""
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    for layer in layers:
        q, k, v = (torch.randn(1, L, h, 64, generator=gen).half() for h in (4, 2, 2))
        torch.save(dict(q=q, k=k, v=v, meta=dict(layer=layer)), folder / f"fake_L{L}_layer{layer:02d}.pt")
    return folder


TINY = ["--block-size", "32", "--alphas", "0.3", "0.9", "--long-alphas", "0.9", "--long-above", "300",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mc")
    mc.main([*TINY, "--real-lengths", "256", "1000", "--synthetic-lengths", "256",
             "--activations", str(fake_dump(tmp / "acts")), "--out-dir", str(tmp / "out")])
    out = tmp / "out"
    return out, read_long_csv(out / "mean_correction.csv"), (out / "mean_correction.md").read_text()


def test_tiny_run_writes_csv_md_png_json(tiny_run):
    out, rows, md = tiny_run
    assert sorted(p.name for p in out.iterdir()) == ["mean_correction.csv", "mean_correction.json",
                                                     "mean_correction.md", "mean_correction.png"]
    assert (out / "mean_correction.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for column in ("input", "layer", "L", "alpha", "density", "rel_error_plain", "rel_error_corrected", "ratio",
                   "block_size", "sink_blocks", "window_blocks", "last_dense_blocks", "impl", "device", "commit"):
        assert column in rows[0], column
    real = [r for r in rows if r["input"] == mc.REAL]
    syn = [r for r in rows if r["input"] == mc.SYNTHETIC]
    # 1000 is capped to the dump (400 tokens, the full dump, above --long-above: the long alphas only).
    assert sorted({(int(r["L"]), r["alpha"]) for r in real}) == [(256, "0.3"), (256, "0.9"), (400, "0.9")]
    assert {r["full_dump"] for r in real if r["L"] == "400"} == {"True"}
    assert sorted(r["layer"] for r in real if r["L"] == "256" and r["alpha"] == "0.3") == ["0", "3", "all"]
    assert sorted(r["alpha"] for r in syn) == ["0.3", "0.9"] and {r["layer"] for r in syn} == {""}
    for r in rows:
        plain, corrected = float(r["rel_error_plain"]), float(r["rel_error_corrected"])
        assert 0 < float(r["density"]) <= 1 and plain >= 0 and corrected >= 0
        if r["ratio"]:
            assert float(r["ratio"]) == pytest.approx(corrected / plain)
    # the all-layer error: sqrt(sum of squared errors / sum of squared norms)
    agg = next(r for r in real if r["layer"] == "all" and r["L"] == "256" and r["alpha"] == "0.9")
    layers = [r for r in real if r["layer"] != "all" and r["L"] == "256" and r["alpha"] == "0.9"]
    ref2 = sum(float(r["ref2"]) for r in layers)
    assert float(agg["rel_error_plain"]) == pytest.approx((sum(float(r["err2_plain"]) for r in layers) / ref2) ** 0.5)
    for text in ("## Is the corrected error lower at every measured point?", "**Synthetic**", "float32",
                 "Operator level", "not task accuracy", "Triton kernels refuse", "H200", "### Per layer",
                 "400 = the full dump", "Measured on"):
        assert text in md, text


def test_real_part_skipped_without_dumps(tmp_path, capsys):
    mc.main([*TINY, "--synthetic-lengths", "256", "--activations", str(tmp_path / "absent"),
             "--out-dir", str(tmp_path)])
    assert "Skipped: no SmolLM2 activation dumps" in capsys.readouterr().out
    rows = read_long_csv(tmp_path / "mean_correction.csv")
    assert rows and all(r["input"] == mc.SYNTHETIC for r in rows)
    assert "Skipped: no SmolLM2 activation dumps" in (tmp_path / "mean_correction.md").read_text()


def point(input_, L, alpha, density, plain, corrected, layer=""):
    return dict(what="error", input=input_, layer=layer, L=L, alpha=alpha, density=density, rel_error_plain=plain,
                rel_error_corrected=corrected, ratio=corrected / plain if plain else "", B=1, Hq=8, Hkv=2, D=64,
                dtype="float32", seed=0, full_dump="")


def test_verdict_is_computed_from_the_rows():
    better = [point(mc.SYNTHETIC, 4096, 0.1, 0.5, 0.10, 0.09), point(mc.SYNTHETIC, 4096, 0.3, 0.4, 0.20, 0.18)]
    md = mc.render_markdown(better, STAMP)
    assert "**Yes** at the (input, length, alpha) points: lower at all 2 measured points" in md
    assert "**No**" not in md

    worse = better + [point(mc.SYNTHETIC, 8192, 0.5, 0.25, 0.20, 0.25), point(mc.SYNTHETIC, 8192, 0.3, 0.3, 0.1, 0.1)]
    md = mc.render_markdown(worse, STAMP)
    assert "**No**: lower at 2 of 4 measured (input, length, alpha) points" in md and "**2 exceptions**" in md
    assert "- **synthetic** L=8K alpha=0.5: density 25.0%, error 0.2000 plain -> 0.2500 corrected (ratio 1.250)" in md
    assert "L=8K alpha=0.3" in md  # equal errors are not "lower"
    assert "**Yes**" not in md

    unpruned = better + [point(mc.SYNTHETIC, 2048, 0.02, 1.0, 0.0, 0.0)]
    assert "Not compared: 1 point(s) at density 100%" in mc.render_markdown(unpruned, STAMP)


def test_verdict_names_the_layers_where_the_correction_hurts():
    real = [point(mc.REAL, 2048, 0.1, 0.5, 0.010, 0.020, layer=0), point(mc.REAL, 2048, 0.1, 0.5, 0.10, 0.08, layer=1),
            point(mc.REAL, 2048, 0.1, 0.5, 0.09, 0.078, layer="all")]
    md = mc.render_markdown(real, STAMP, layers=[0, 1])
    assert "**Yes** at the (input, length, alpha) points" in md and "**Not in every layer**" in md
    assert "lower at 1 of 2 (layer, length, alpha) points; **higher in single layers**: layer 0 at 1 of 1" in md


def test_help_documents_the_grid(capsys):
    with pytest.raises(SystemExit):
        mc.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "0.02 0.05 0.08 0.12 0.18 0.3 0.5 at lengths <= 4096" in text and "0.05 0.12 0.3 0.5 above" in text
