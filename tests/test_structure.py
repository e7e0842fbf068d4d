"""Structure rules of DESIGN.md §8 that a test can hold: no import circles among the project's packages
(function-local imports included, which is how a circle hides), and files readable whole."""
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


def test_parallel_files_are_readable_whole():
    long = {p.name: n for p in (ROOT / "parallel").glob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
