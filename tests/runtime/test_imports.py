"""The runtime's import rule, checked on the source (the CLI tests check it at run time).

runtime/ may import the standard library, numpy, onnxruntime, tokenizers, Pillow
and itself; never torch, transformers, onnx or the export / sparsezip packages.
The GPU packages (tensorrt, cuda-python's `cuda`) only inside a function: the
module imports without them and fails, with the install hint, only when used.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

RUNTIME = Path(__file__).resolve().parents[2] / "runtime"
ALLOWED = {"numpy", "onnxruntime", "tokenizers", "PIL"}
LAZY_ONLY = {"tensorrt", "cuda"}
PACKAGE = "sparsezip_deploy.runtime"


def imported_modules(path: Path, top_level_only: bool = False) -> set[str]:
    package = ".".join([PACKAGE, *path.relative_to(RUNTIME).parent.parts])
    names = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lazy = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(f)}
    for node in ast.walk(tree):
        if top_level_only and id(node) in lazy:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            else:
                names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted(RUNTIME.rglob("*.py")), ids=lambda p: str(p.relative_to(RUNTIME)))
def test_runtime_imports_only_what_an_edge_device_has(path):
    for name in imported_modules(path):
        root = name.split(".")[0]
        ok = (name == PACKAGE or name.startswith(PACKAGE + ".") or root in ALLOWED | LAZY_ONLY
              or root in sys.stdlib_module_names or root == "__future__")
        assert ok, f"{path.name} imports {name}"
    eager = {name.split(".")[0] for name in imported_modules(path, top_level_only=True)} & LAZY_ONLY
    assert not eager, f"{path.name} imports {sorted(eager)} at module level"
