"""The notebooks and the `python -m reference` picture run headless, start to finish, without errors.

Every notebook in notebooks/ is executed with nbclient (kernel python3) from its own folder, as a user opening it
in Jupyter would run it; the notebooks find the repository root themselves. Outputs are not written back. The
notebooks are committed executed, so that their figures show where the repository is browsed: a test checks that
every code cell of the committed files has its outputs (refresh them with
`jupyter nbconvert --to notebook --execute --inplace notebooks/*.ipynb`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))




def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no .ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_executed(path):
    """The committed file holds a clean top-to-bottom run: outputs in every code cell, executed in order, no error,
    at least one figure, no path of the machine that ran it, and small enough to browse."""
    import sysconfig

    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    blank = [i for i, c in enumerate(code) if not c.outputs]
    assert not blank, (f"code cells {blank} have no outputs: run `jupyter nbconvert --to notebook --execute "
                       f"--inplace {path.relative_to(ROOT)}`")
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "not one run from the top"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure"
    text = "\n".join(o.get("text", "") + "".join(str(v) for k, v in o.get("data", {}).items() if k.startswith("text/"))
                     for o in outputs)
    for folder in {str(ROOT), sysconfig.get_paths()["purelib"]}:
        assert folder not in text, f"an output names {folder}"
    assert path.stat().st_size < 2_500_000, "keep the figures small (dpi)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    # Run as in Jupyter, with the inline backend: an MPLBACKEND from the environment would override it.
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # raises CellExecutionError, with the failing cell and traceback, on any error
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors


@pytest.mark.parametrize("present", [False, True], ids=["without", "with"])
def test_sparsity_notebook_accuracy_section(present, tmp_path, monkeypatch):
    """Notebook 03 shows sparsity_accuracy.md when a results folder has it and says so when it does not
    (FLASHPREFILL_RESULTS points that section at a temporary folder)."""
    monkeypatch.delenv("MPLBACKEND", raising=False)
    monkeypatch.setenv("FLASHPREFILL_RESULTS", str(tmp_path))
    if present:
        (tmp_path / "sparsity_accuracy.md").write_text(
            "# title\n\n## 4096 tokens (1 prompts per setting)\n\n| selector | setting |\n|:---|---:|\n"
            "| XAttention | threshold 0.9 |\n\n![figure](sparsity_accuracy.png)\n")
    path = ROOT / "notebooks" / "03_sparsity.ipynb"
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    texts = "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/markdown", ""))
                      for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    if present:
        assert "| XAttention | threshold 0.9 |" in texts and "![figure]" not in texts
    else:
        assert "no accuracy-matched results in" in texts


def test_python_m_reference_writes_png(tmp_path):
    out = tmp_path / "walkthrough.png"
    # From another folder, with the repository on the path (as after `pip install -e .`).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(
        [sys.executable, "-m", "reference", "--out", str(out), "--length", "512", "--block-size", "32"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "density" in result.stdout and "physical" in result.stdout
