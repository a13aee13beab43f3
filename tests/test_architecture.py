"""The import graph follows docs/ARCHITECTURE.md: each folder imports only the folders below it, no module imports
itself back through others (no cycles, counting imports inside functions too), `reference/` stays the paper's
listing (no peers, no plotting), and no module grows past MAX_LINES.

The graph is read from the source with `ast`, so nothing is imported and the test takes well under a second.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# What each folder may import, besides itself, the standard library and third-party packages.
MAY_IMPORT = {
    "reference": set(),
    "triton_impl": {"reference"},
    "peers": {"reference"},
    "viz": {"reference"},
    "tools": {"reference", "triton_impl"},
    "block_selectors": {"reference", "triton_impl", "peers"},
    "flashprefill_hf": {"reference", "triton_impl", "block_selectors"},
    "interop": {"reference"},
    "repro": {"reference", "triton_impl", "peers", "viz", "tools", "block_selectors", "flashprefill_hf", "interop"},
}
PACKAGES = tuple(MAY_IMPORT)
# The maths of the method needs no plotting library: only the picture-drawing folders and the experiments import it.
NO_MATPLOTLIB = ("reference", "triton_impl", "peers", "block_selectors", "tools", "flashprefill_hf", "interop")
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = source_modules()


def imports_of(name: str, path: Path) -> set[str]:
    """Every module `name` imports (at the top or inside a function), resolved to the longest known module name
    (a package's __init__ when the name is a package or a symbol in it)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # `from pkg import module` imports pkg.module; `from pkg import symbol` imports pkg.
            found |= {f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target
                      for alias in node.names}
    return {_known(m) for m in found if m.split(".")[0] in PACKAGES}


def _known(module: str) -> str:
    while module and module not in MODULES and "." in module:
        module = module.rpartition(".")[0]
    return module


def folder(module: str) -> str:
    return module.split(".")[0]


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def is_script(module: str) -> bool:
    """A `__main__` module is a command-line script: nothing imports it, so it may import any folder."""
    return module.rpartition(".")[2] == "__main__"


def test_the_graph_sees_every_folder():
    assert {folder(m) for m in MODULES} == set(PACKAGES)
    assert len(MODULES) > 40


@pytest.mark.parametrize("pkg", PACKAGES)
def test_each_folder_imports_only_the_folders_below_it(pkg):
    upward = sorted(f"{m} -> {dep}" for m, deps in GRAPH.items() if folder(m) == pkg and not is_script(m)
                    for dep in deps if folder(dep) != pkg and folder(dep) not in MAY_IMPORT[pkg])
    assert not upward, f"{pkg}/ may import only {sorted(MAY_IMPORT[pkg]) or 'nothing of ours'}: " + "; ".join(upward)


# repro/'s shared pieces (docs/ARCHITECTURE.md): they import each other at most, never an experiment.
REPRO_SHARED = ("repro", "repro.common", "repro.paper", "repro.timing", "repro.masks", "repro.accuracy.tasks",
                "repro.accuracy.scoring", "repro.harness", "repro.capture", "repro.stats")


@pytest.mark.parametrize("module", REPRO_SHARED)
def test_repro_shared_pieces_import_no_experiment(module):
    assert module in MODULES
    experiments = sorted(d for d in GRAPH[module] if folder(d) == "repro" and d not in REPRO_SHARED
                         and d != "repro.accuracy")  # the accuracy package's __init__ (a docstring)
    assert not experiments, f"{module} imports {experiments}"


def test_no_module_imports_a_script():
    assert not [f"{m} -> {d}" for m, deps in GRAPH.items() for d in deps if is_script(d)]


def test_no_import_cycles():
    """Depth-first search for a back edge; reports one cycle."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for dep in sorted(GRAPH.get(m, ())):
            if dep == m or is_package_of(dep, m):
                continue  # a module importing its own package's __init__ (or itself) is not a cycle of ours
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def is_package_of(package: str, module: str) -> bool:
    return module.startswith(package + ".") and MODULES.get(package, Path()).name == "__init__.py"


def test_reference_is_the_paper_alone():
    """reference/ holds FlashPrefill's stages only: no peers' selectors, no pictures (its __main__ script draws
    through viz/), nothing that is not a stage, its checks or its synthetic inputs."""
    stems = {p.stem for p in (ROOT / "reference").glob("*.py")}
    assert stems == {"__init__", "__main__", "pooling", "scoring", "selection", "attention", "flash_prefill",
                     "validation", "synthetic",
                     "varlen",  # the serving layout (packed batches, chunks) of the same stages
                     "fp8"}, stems  # stage 5 with e4m3 operands
    defined = {node.name for m, p in MODULES.items() if folder(m) == "reference"
               for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, ast.FunctionDef)}
    assert not [f for f in defined if any(w in f for w in ("flexprefill", "xattention", "plot", "draw"))]


@pytest.mark.parametrize("pkg", NO_MATPLOTLIB)
def test_the_method_needs_no_plotting_library(pkg):
    users = [m for m, p in MODULES.items() if folder(m) == pkg and not is_script(m)
             and any(i.startswith("matplotlib") for i in _all_imports(p))]
    assert not users, f"{users} import matplotlib"


def _all_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module)
    return out


def test_no_module_is_too_long():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them, docs/ARCHITECTURE.md says where): {long}"


def test_twins_mirror_each_other():
    """Every stage file of triton_impl has its reference twin of the same name (plus common.py); a `_sm90` suffix
    marks the same stage written in Gluon for Hopper (scoring_sm90.py: its twin is reference/scoring.py)."""
    kernels = {p.stem.removesuffix("_sm90") for p in (ROOT / "triton_impl").glob("*.py")} - {"__init__", "common"}
    assert kernels <= {p.stem for p in (ROOT / "reference").glob("*.py")}, kernels
