"""`bash repro/run_all.sh` writes into its run folder and leaves the committed results alone.

The script runs in a copy of the working tree made into a fresh git repository (the tree's tracked and untracked,
not ignored, files, committed there), so it exercises the files as they are now, committed or not, and cannot touch
this checkout. One real step runs (RUN_ALL_STEPS=walkthrough, ~20 s on a small CPU); afterwards `git status` in the
copy must be clean: nothing under repro/results/ rewritten, nothing untracked left outside the ignored run folder.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("git") is None or shutil.which("bash") is None,
                                reason="needs git and bash")


def git(*args, cwd) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> Path:
    """The working tree's files (git ls-files: tracked and untracked, not ignored), committed in a new repository."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the test copies the files git lists")
    dest = tmp_path_factory.mktemp("run_all") / "repo"
    for name in git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT).split("\0"):
        src = ROOT / name
        if name and src.is_file():  # a tracked file deleted in the working tree is not copied
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    git("init", "-q", cwd=dest)
    git("add", "-A", cwd=dest)
    git("-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false",
        "commit", "-q", "-m", "working tree", cwd=dest)
    return dest


def run_all(repo: Path, timeout: float = 240, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("RUN_DIR", "RUN_ALL_STEPS")}
    environ.update(PYTHON=sys.executable, **env)
    return subprocess.run(["bash", "repro/run_all.sh"], cwd=repo, env=environ, capture_output=True, text=True,
                          timeout=timeout)


def test_a_step_writes_into_the_run_folder_and_git_stays_clean(copy):
    result = run_all(copy, RUN_ALL_STEPS="walkthrough")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    printed = re.findall(r"^run folder: (.+)$", result.stdout, re.M)
    assert len(printed) == 2 and printed[0] == printed[1], result.stdout  # at the start and in the summary
    run_folder = Path(printed[0])
    assert run_folder.is_relative_to(copy / "repro" / "runs")
    png = run_folder / "walkthrough" / "walkthrough_toy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "  walkthrough/walkthrough_toy.png" in result.stdout  # the summary lists what the run wrote
    assert "reference vs triton check" not in result.stdout  # only the selected step ran
    assert git("status", "--porcelain", cwd=copy) == ""


def test_refuses_a_run_folder_inside_the_committed_results(copy):
    result = run_all(copy, timeout=120, RUN_ALL_STEPS="walkthrough", RUN_DIR="repro/results/new_run")
    assert result.returncode == 2 and "inside repro/results/" in result.stderr
    assert not (copy / "repro" / "results" / "new_run").exists()


def test_unknown_step_names_the_steps(copy):
    result = run_all(copy, timeout=120, RUN_ALL_STEPS="walkthrough speeed")
    assert result.returncode == 2 and 'unknown step "speeed"' in result.stderr and "speed" in result.stderr
