"""A restricted unpickler for the official benchmark files that exist only as Python pickles.

The engine never unpickles its own artifacts (safetensors, JSON, SQLite, ``.npy``), but a few public
benchmarks ship their ground truth or training layout only as a pickle: Revisited Oxford/Paris
(``gnd_roxford5k.pkl``, ``gnd_rparis6k.pkl``, :mod:`retrieval.data.revisited`) and the SfM-120k
training set (``retrieval-SfM-120k.pkl``, :mod:`retrieval.data.sfm120k`). Unpickling runs code named
by the file, so these are read only through :func:`read_restricted_pickle`, whose unpickler resolves
nothing but numpy's array reconstruction and a few builtin types: a tampered file is refused instead
of executed. Every such exception to "never unpickle" goes through this one module.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.data.datasets import DatasetError

__all__ = ["RestrictedUnpickler", "find_release_pickle", "read_restricted_pickle"]

# The globals that pickles of numpy arrays and scalars name (numpy 2 moved numpy.core to numpy._core;
# protocol 5 rebuilds arrays with _frombuffer), and the one protocol 0-2 use for bytes.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    *((f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
    ("_codecs", "encode"),
}
_BUILTINS = {"dict", "list", "tuple", "str", "int", "float", "bytes"}


def _safe_dtype(*args: Any) -> np.dtype:
    """``numpy.dtype`` for the unpickler, refusing object dtypes (their items would be arbitrary objects)."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("object arrays are not allowed")
    return dtype


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only numpy array reconstruction and a few builtin types; every other global is refused.

    Dicts, lists, tuples, strings and numbers need no global at all; numpy arrays need the constructors
    in ``_ALLOWED_GLOBALS``, whose arguments are themselves restricted (the array class must be
    ``numpy.ndarray``, the dtype must not hold Python objects).
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            if name == "dtype":
                return _safe_dtype
            return super().find_class(module, name)
        if module in ("builtins", "__builtin__") and name in _BUILTINS:
            return super().find_class("builtins", name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def read_restricted_pickle(path: str | Path, what: str) -> Any:
    """Unpickle an official benchmark file with :class:`RestrictedUnpickler`.

    Args:
        path: the pickle file.
        what: what the file is, for error messages (e.g. ``"ground-truth"``, ``"SfM-120k"``).

    Raises:
        DatasetError: the file is unreadable, truncated, or names a global other than the allowed ones
            (the message names the file and says why; the refused global is never called).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
        # latin1 lets Python 2 pickles of numpy arrays load; it changes nothing for Python 3 pickles.
        return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise DatasetError(f"{path}: not an official {what} pickle ({exc})") from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise DatasetError(f"{path}: unreadable {what} pickle ({type(exc).__name__}: {exc})") from None


def find_release_pickle(root: str | Path, name: str, filename: str, what: str, hint: str) -> Path:
    """The official pickle ``filename`` in ``root`` or in ``root/<name>`` (a release unpacked into its own folder).

    Raises:
        DatasetError: in neither place; the message names both paths tried and how to get the files.
    """
    root = Path(root)
    candidates = [root, root / name]
    found = next((c for c in candidates if (c / filename).is_file()), None)
    if found is None:
        tried = ", ".join(str(c / filename) for c in candidates)
        raise DatasetError(f"{name} {what} not found; tried {tried} ({hint})")
    return found / filename
