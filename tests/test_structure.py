"""Structure rules of DESIGN.md §8 that a test can hold: no import circles among the project's packages
(function-local imports included, which is how a circle hides), packages import only the layers below them,
and files readable whole."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("model", "parallel", "pretrain", "data_prep", "slurm", "inference")


def imports_of(path: Path) -> set[str]:
    """Project modules a file imports anywhere in it (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def module_graph(package: str) -> dict[str, set[str]]:
    files = {f"{package}.{p.stem}": p for p in (ROOT / package).glob("*.py") if p.stem != "__init__"}
    return {name: {m for m in imports_of(path) if m in files and m != name} for name, path in files.items()}


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circles(package):
    graph = module_graph(package)
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


# What each package may import (function-local imports included): the model and the data tools at the bottom,
# training above them, decoding above training, job submission on top. Decoding-only code (inference/) must
# never become a dependency of a trainer or of the model definition.
LAYERS = {
    "data_prep": set(),
    "model": set(),
    "parallel": {"model"},
    "pretrain": {"data_prep", "model", "parallel"},
    "inference": {"data_prep", "model", "parallel", "pretrain"},
    "slurm": {"data_prep", "model", "parallel", "pretrain", "inference"},
}


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_only_layers_below(package):
    wrong = sorted((str(path.relative_to(ROOT)), module) for path in (ROOT / package).rglob("*.py")
                   for module in imports_of(path)
                   if (top := module.split(".")[0]) in LAYERS and top != package and top not in LAYERS[package])
    assert not wrong, wrong


def test_parallel_files_are_readable_whole():
    long = {p.name: n for p in (ROOT / "parallel").glob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
