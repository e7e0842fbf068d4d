"""The remote code of an exported HF folder: pretrain/hf_remote/modeling_recyclegpt.py and, beside it, the
project's own decode loop, so `recycle_generate` runs the very loop `inference.generate` runs.

The loop's files are found by reading imports: inference/decoding.py, model/draft_vocab.py (the folder's draft
vocabulary, handed to the loop) and every `inference.*` / `model.*` module they import, directly or inside a
function, recursively (today: decoding, drafting, rows, sampling, draft_policy, step_costs, kv_cache,
draft_vocab, strides). They are copied flat next to the modeling file with each `from inference.X import` /
`from model.X import` rewritten to `from .X import`: transformers' remote-code loader copies a module's
relative imports along with it (`dynamic_module_utils.get_relative_import_files`), from a local folder and from
the Hub alike. Anything else they import must be torch, safetensors or the standard library: a loader of the
folder has transformers (which requires safetensors) and torch, not this project; `RemoteCodeError` says which file broke that rule.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELING_FILE = Path(__file__).resolve().parent / "hf_remote" / "modeling_recyclegpt.py"
LOOP_ROOTS = ("inference.decoding", "model.draft_vocab")
PROJECT_PACKAGES = ("inference", "model")          # shipped when the loop imports them
ALLOWED = {"torch", "safetensors", "__future__"} | set(sys.stdlib_module_names)


class RemoteCodeError(Exception):
    """A decode-loop file imports something the HF folder cannot ship."""


def _source(module: str) -> Path:
    return ROOT / (module.replace(".", "/") + ".py")


def _project_imports(module: str) -> list[tuple[int, str]]:
    """(line number, module) of every project import in `module`'s file; refuses the ones a sibling-file copy
    cannot satisfy."""
    path = _source(module)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.ImportFrom):
            raise RemoteCodeError(f"{path.relative_to(ROOT)}:{node.lineno}: relative import; the decode loop's "
                                  "files import each other as `from inference.X import ...` (rewritten on export)")
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in PROJECT_PACKAGES and isinstance(node, ast.ImportFrom) and name.count(".") == 1:
                found.append((node.lineno, name))
            elif top in PROJECT_PACKAGES or top not in ALLOWED:
                raise RemoteCodeError(
                    f"{path.relative_to(ROOT)}:{node.lineno} imports {name}, which an exported HF folder cannot ship "
                    "(its remote code may use torch, safetensors and the standard library, and project modules as "
                    "`from inference.X import` / `from model.X import`)")
    return found


def decode_loop_modules() -> list[str]:
    """inference.decoding, model.draft_vocab and every project module they need, in discovery order."""
    order, todo = [], list(LOOP_ROOTS)
    while todo:
        module = todo.pop(0)
        if module in order:
            continue
        order.append(module)
        todo += [name for _, name in _project_imports(module)]
    names = [m.rsplit(".", 1)[1] for m in order]
    clash = {n for n in names if names.count(n) > 1} | ({MODELING_FILE.stem} & set(names))
    if clash:
        raise RemoteCodeError(f"the decode loop's modules {sorted(order)} share the file name(s) {sorted(clash)} "
                              "once copied into one folder; rename one")
    return order


def shipped_source(module: str) -> str:
    """`module`'s text with its project imports made relative to the folder (`from .X import`)."""
    lines = _source(module).read_text(encoding="utf-8").splitlines(keepends=True)
    for lineno, name in _project_imports(module):
        line, target = lines[lineno - 1], f"from {name} import"
        if target not in line:
            raise RemoteCodeError(f"{_source(module).relative_to(ROOT)}:{lineno}: write the import of {name} "
                                  f"on one line as `{target} ...` so the exporter can rewrite it")
        lines[lineno - 1] = line.replace(target, f"from .{name.rsplit('.', 1)[1]} import", 1)
    return "".join(lines)


def write_remote_code(folder: Path) -> list[str]:
    """The modeling file and the decode loop's files into `folder`; returns the file names written."""
    written = [MODELING_FILE.name]
    (folder / MODELING_FILE.name).write_text(MODELING_FILE.read_text(encoding="utf-8"), encoding="utf-8")
    for module in decode_loop_modules():
        name = module.rsplit(".", 1)[1] + ".py"
        (folder / name).write_text(shipped_source(module), encoding="utf-8")
        written.append(name)
    return written
