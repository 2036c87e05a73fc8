"""No code path deserialises untrusted bytes into objects: a scan of every Python file the project ships.

Loading a file must never run code from it. The scan walks the syntax tree of each module (comments and
docstrings cannot trigger it) and flags: ``pickle``/``cPickle``/``dill``/``shelve``/``marshal``/``joblib``
loads, ``torch.load`` without ``weights_only=True``, ``numpy.load`` with ``allow_pickle=True`` (or
without ``allow_pickle=False`` on a path that could hold an object array), ``yaml.load`` /
``yaml.unsafe_load`` / ``yaml.full_load`` (only ``safe_load`` is allowed), and ``eval``/``exec``.

One module is allowed to unpickle: ``retrieval/data/safe_pickle.py``, the restricted unpickler through
which the official benchmark ground-truth pickles (Revisited Oxford/Paris, SfM-120k) are read; its
unpickler resolves only numpy's array reconstruction, and a test there checks that a tampered pickle is
refused. The scan also asserts the other modules reach those pickles only through it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ["retrieval", "models", "training", "indexing", "serving", "benchmarks", "experiments", "examples"]
ALLOWED_UNPICKLER = Path("retrieval/data/safe_pickle.py")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "shelve", "marshal", "joblib", "cloudpickle"}
UNSAFE_ATTRIBUTES = {"load", "loads", "Unpickler", "open"}


def _python_files() -> Iterator[Path]:
    for folder in SCANNED:
        yield from sorted((ROOT / folder).rglob("*.py"))


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((kw.value for kw in call.keywords if kw.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _dotted(node: ast.expr) -> str:
    """``a.b.c`` for an attribute chain, ``name`` for a name, ``""`` otherwise."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def unsafe_calls(source: str) -> list[tuple[int, str]]:
    """``(line, what)`` for each unsafe deserialisation (or eval/exec) in ``source``."""
    tree = ast.parse(source)
    imported_unsafe = set()  # local names bound to an unsafe module or to one of its loaders
    findings = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNSAFE_MODULES:
                    imported_unsafe.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            for alias in node.names:
                if alias.name in UNSAFE_ATTRIBUTES:
                    imported_unsafe.add(alias.asname or alias.name)
                    findings.append((node.lineno, f"from {node.module} import {alias.name}"))
    for node in ast.walk(tree):
        # a loader referenced at all (called, subclassed, passed around) counts, not only a direct call
        if isinstance(node, ast.Attribute) and node.attr in UNSAFE_ATTRIBUTES:
            head = _dotted(node.value)
            if head and head.split(".")[0] in imported_unsafe:
                findings.append((node.lineno, f"{head}.{node.attr}"))
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name in ("eval", "exec") or name in imported_unsafe:
            findings.append((node.lineno, f"{name}()"))
        elif name == "torch.load" and not _is_true(_keyword(node, "weights_only")):
            findings.append((node.lineno, "torch.load without weights_only=True"))
        elif name in ("np.load", "numpy.load") and _is_true(_keyword(node, "allow_pickle")):
            findings.append((node.lineno, f"{name}(allow_pickle=True)"))
        elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
            findings.append((node.lineno, f"{name} (use yaml.safe_load)"))
    return findings


def test_the_scan_catches_each_unsafe_form():
    source = (
        "import pickle, torch, numpy as np, yaml\nimport dill as d\nfrom marshal import loads\n"
        "pickle.load(f)\npickle.Unpickler(f)\nd.loads(b)\nloads(b)\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
        "np.load(p, allow_pickle=True)\nyaml.load(s)\neval('1')\nexec('x=1')\n"
        "torch.load(p, weights_only=True)\nnp.load(p, allow_pickle=False)\nyaml.safe_load(s)\n"
    )
    lines = sorted({line for line, _ in unsafe_calls(source)})
    assert lines == [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]  # the three safe calls (lines 14-16) pass


@pytest.mark.parametrize("path", list(_python_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unsafe_deserialisation(path: Path):
    relative = path.relative_to(ROOT)
    findings = unsafe_calls(path.read_text(encoding="utf-8"))
    if relative == ALLOWED_UNPICKLER:
        assert findings, "the restricted unpickler is expected to subclass pickle.Unpickler"
        assert {what for _, what in findings} <= {"pickle.Unpickler", "pickle.load", "pickle.loads"}
        return
    assert not findings, f"{relative}: " + "; ".join(f"line {line}: {what}" for line, what in findings)


def test_official_pickles_are_read_only_through_the_restricted_unpickler():
    users = [
        path.relative_to(ROOT)
        for path in _python_files()
        if "read_restricted_pickle" in path.read_text(encoding="utf-8") and path.relative_to(ROOT) != ALLOWED_UNPICKLER
    ]
    assert sorted(map(str, users)) == ["retrieval/data/revisited.py", "retrieval/data/sfm120k.py"]
