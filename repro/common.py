"""Helpers every benchmark in repro/ shares: where results go, the environment stamp, long-format CSV, markdown.

Where results go: every script writes into a run folder, `run_dir(experiment)` = repro/runs/<date>-<device>/
<experiment>/ (git-ignored), unless its --out-dir says otherwise. The committed results live in
repro/results/<experiment>/ (RESULTS_DIR; indexed in repro/results/README.md) and are only rewritten on purpose,
by pointing --out-dir there, so running a script never overwrites the committed evidence.

Every result file says what produced it: `environment_stamp()` records the device (GPU name or CPU model), the
torch / triton / python versions, the date and the git commit, and `write_long_csv` repeats the stamp on every
row, so rows from different machines can be concatenated and still be told apart.
"""

from __future__ import annotations

import contextlib
import csv
import os
import datetime as _dt
import platform
import re
import subprocess
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "repro" / "results"  # committed results, one folder per experiment
RUNS_DIR = ROOT / "repro" / "runs"        # git-ignored: what scripts write by default


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_slug(device_name: str) -> str:
    """"NVIDIA H200" -> "h200": a GPU's name as a file or folder name (lowercase words, "nvidia" dropped)."""
    words = [w for w in re.split(r"[^a-z0-9]+", device_name.lower()) if w and w != "nvidia"]
    return "_".join(words)


def run_dir(experiment: str | None = None, device: str | torch.device | None = None) -> Path:
    """The folder a run writes into, created on demand: repro/runs/<YYYY-MM-DD>-<device>/[<experiment>/].

    <device> is "cpu", or the GPU's slug ("h200") when `device` (default: CUDA when present) is a GPU; the date is
    UTC, as in the environment stamp. Runs of one day on one machine share the folder (a later run of a script
    replaces its files there).
    """
    device = torch.device(device or default_device())
    slug = device_slug(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu"
    path = RUNS_DIR / f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d}-{slug}"
    if experiment:
        path = path / experiment
    path.mkdir(parents=True, exist_ok=True)
    return path


def cpu_model() -> str:
    """The host CPU's model name (for results that depend on the host: launch overheads, CPU runs)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _git_commit() -> str:
    """Short commit of the repository, with "+dirty" when tracked files have uncommitted changes."""
    if os.environ.get("FLASHPREFILL_COMMIT"):  # set by runs on a copy of the tree without .git (the lent GPU)
        return os.environ["FLASHPREFILL_COMMIT"]

    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def environment_stamp(device: str | torch.device | None = None) -> dict[str, str]:
    """device, device_name (GPU name or CPU model), torch, triton, python, date (UTC), commit."""
    device = torch.device(device or default_device())
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_model()} ({torch.get_num_threads()} threads)"
    return {
        "device": device.type,
        "device_name": name,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": _git_commit(),
    }


STAMP_FIELDS = ("device", "device_name", "torch", "triton", "python", "date", "commit")  # environment_stamp's keys


def stamp_of(row: Mapping[str, str]) -> dict[str, str]:
    """The environment stamp a `write_long_csv` row carries (to redraw a report from its CSV)."""
    return {k: row[k] for k in STAMP_FIELDS}


def stamp_line(stamp: Mapping[str, str]) -> str:
    """One markdown line naming the machine and versions a result was measured with."""
    return (f"Measured on {stamp['device_name']} ({stamp['device']}), torch {stamp['torch']}, "
            f"triton {stamp['triton']}, python {stamp['python']}, commit {stamp['commit']}, {stamp['date']}.")


def write_long_csv(path: str | Path, rows: Iterable[Mapping], stamp: Mapping[str, str] | None = None) -> Path:
    """Write one measurement per row; every row gets the environment stamp's columns appended. A path ending in
    .gz is written gzip-compressed.

    Columns: the union of the rows' keys in first-seen order, then the stamp's; missing values are left empty.
    """
    path = Path(path)
    rows = list(rows)
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    columns += [key for key in (stamp or {}) if key not in columns]
    rows = [dict(r, **(stamp or {})) for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    with _open_text(path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_long_csv(path: str | Path) -> list[dict[str, str]]:
    """The rows `write_long_csv` wrote (a path ending in .gz is read through gzip)."""
    with _open_text(Path(path), "r") as f:
        return list(csv.DictReader(f))


def _open_text(path: Path, mode: str):
    """A text file for the csv module; gzip-compressed when the name ends in .gz (large per-prompt CSVs are
    committed that way), with a zero timestamp so that the same rows give the same bytes."""
    if path.suffix == ".gz":
        import gzip
        import io

        return io.TextIOWrapper(gzip.GzipFile(path, mode + "b", mtime=0), encoding="utf-8", newline="")
    return path.open(mode, newline="")


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's intra-op threads set to n inside the block, restored afterwards (None: unchanged). The reference's
    small tiles run several times faster on one thread of a small CPU (README)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def length_label(L) -> str:
    """8192 -> "8K" (as reports name lengths); lengths that are not whole K stay in tokens."""
    L = int(L)
    return f"{L // 1024}K" if L % 1024 == 0 else str(L)


def error_sums(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(||out - ref||^2, ||ref||^2) in float64: summed over layers before the square root, they give the relative
    error of several layers together."""
    return float((out.double() - ref.double()).pow(2).sum()), float(ref.double().pow(2).sum())


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A GitHub-flavoured markdown table; the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(map(str, header)) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def write_run_json(path: str | Path, info: Mapping) -> Path:
    """Write a run's metadata (what its CSV does not say: command line, wall time, what was skipped, the note)
    as indented JSON beside its CSV; --report-only and --append read it back with `read_run_json`."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_run_json(path: str | Path) -> dict:
    """The metadata `write_run_json` wrote; FileNotFoundError naming the file when there is none."""
    import json

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: it holds the run's command line, wall time, skipped work "
                                "and note, written by the run beside its CSV")
    return json.loads(path.read_text(encoding="utf-8"))


def fill_defaults(args, preset: Mapping) -> None:
    """Set every option of `preset` (a command's --quick or full-run defaults) that the command line left at None."""
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
