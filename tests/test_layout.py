"""The package's dependency direction and shape, as the design fixes them.

kernels ← passes ← compiler ← cli, with plugins (runtime glue) below compiler: a folder
imports only the folders to its left (and ``models``, ``files``, which import nothing of
ours but kernels). Checked on the source, so a new import that points the wrong way, or a
cycle, fails here with the file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "files": set(),
    "kernels": {"files"},
    "models": {"kernels"},
    "passes": {"kernels"},
    "plugins": {"kernels", "files"},
    "compiler": {"kernels", "passes", "plugins", "models", "files"},
    "cli": {"compiler", "models", "kernels", "plugins", "files"},
}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level folder) of every import of our own package in ``path``."""
    folder = path.relative_to(ROOT).parts
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = list(folder[:-1])[: len(folder) - node.level]
                parts = [*base, *(node.module or "").split(".")] if node.module else base
                names = [parts[0]] if parts else [a.name for a in node.names]
            elif (node.module or "").startswith("ultramem."):
                names = [node.module.split(".")[1]]
            else:
                continue
            out += [(node.lineno, n) for n in names if n]
        elif isinstance(node, ast.Import):
            out += [
                (node.lineno, a.name.split(".")[1])
                for a in node.names
                if a.name.startswith("ultramem.")
            ]
    return out


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_imports_point_one_way(folder: str) -> None:
    files = [ROOT / "files.py"] if folder == "files" else sorted((ROOT / folder).rglob("*.py"))
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {target}"
        for path in files
        for line, target in _imports(path)
        if target != folder and target in ALLOWED and target not in ALLOWED[folder]
    ]
    assert not wrong, "; ".join(wrong)


def test_compiler_shows_its_stages() -> None:
    modules = [p.name for p in (ROOT / "compiler").glob("*.py") if p.name != "__init__.py"]
    assert len(modules) <= 10, modules
    packages = {p.name for p in (ROOT / "compiler").iterdir() if (p / "__init__.py").is_file()}
    assert {"onnx", "tensorrt", "parity", "bench"} <= packages


def test_pass_helpers_are_private() -> None:
    """Every public module in passes/ is a pass named after its function (or base/lookups)."""
    for path in (ROOT / "passes").glob("*.py"):
        if path.name.startswith("_") or path.stem in ("base", "lookups"):
            continue
        tree = ast.parse(path.read_text())
        functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert path.stem in functions, f"passes/{path.name} is not a pass named after its file"
