"""Imports flow one way (STYLE rule 1) and importing a package has no heavy side effects."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The core utilities every layer may use, then: package -> the project packages it may import.
CORE = {
    "retrieval.config",
    "retrieval.registry",
    "retrieval.atomic",
    "retrieval.errors",
    "retrieval.resources",
    "retrieval.threads",
}
ALLOWED = {
    "retrieval.data": CORE | {"retrieval.data"},
    "retrieval.evaluation": CORE | {"retrieval.data", "retrieval.evaluation"},
    "models": CORE | {"models", "retrieval.data"},
    "training": CORE | {"training", "models", "retrieval.data", "retrieval.evaluation"},
    "indexing": CORE | {"indexing", "models", "retrieval.data", "retrieval.evaluation"},
    "serving": CORE | {"serving", "indexing", "models", "retrieval.data", "retrieval.evaluation"},
}
PROJECT_ROOTS = ("retrieval", "models", "training", "indexing", "serving")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return {n for n in names if n.split(".")[0] in PROJECT_ROOTS}


def _package_of(module: str) -> str | None:
    for package in sorted(ALLOWED, key=len, reverse=True):
        if module == package or module.startswith(package + "."):
            return package
    return None


def _allowed(imported: str, allowed: set[str]) -> bool:
    return any(imported == a or imported.startswith(a + ".") for a in allowed)


def test_imports_flow_one_way():
    violations = []
    for path in sorted(ROOT.glob("*/**/*.py")):
        if path.parts[len(ROOT.parts)] not in PROJECT_ROOTS:
            continue
        module = _module_name(path)
        package = _package_of(module)
        if package is None:  # retrieval/cli and the core modules may import anything below them
            continue
        for imported in _project_imports(path):
            if not _allowed(imported, ALLOWED[package]):
                violations.append(f"{module} imports {imported}")
    assert not violations, "imports pointing back up the layers:\n" + "\n".join(violations)


@pytest.mark.parametrize("package", ["retrieval", "retrieval.cli.main", "models", "training", "indexing", "serving"])
def test_import_has_no_heavy_side_effects(package):
    """Importing a package builds nothing: no FastAPI app, no FAISS, no ONNX Runtime session."""
    code = (
        f"import sys, {package}; "
        "heavy = [m for m in ('faiss', 'onnxruntime', 'uvicorn') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"importing {package} pulled in {out.stdout.strip()}"
