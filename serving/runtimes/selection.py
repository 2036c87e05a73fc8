"""``open_query_encoder``: pick the registered runtime that accepts a path, by what the path is, not by its suffix.

Runtimes are asked in ``SELECTION_ORDER``, then any other registered runtime in name order:

1. ``tensorrt``: a file with a valid ``<file>.json`` sidecar (reads a small JSON file);
2. ``onnxruntime``: an ORT-format file (8 bytes read) or an ONNX file with query-encoder metadata
   (parsed with ``onnx``, no session);
3. ``torch``: a directory holding the checkpoint files (file names only).

The cheapest, most specific probes come first, and none of them imports torch or builds a session,
so choosing the runtime for an ONNX file costs milliseconds; only the chosen runtime loads its framework.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from serving.runtimes.base import RUNTIMES, QueryEncoder, QueryEncoderError, QueryEncoderRuntime

__all__ = ["SELECTION_ORDER", "open_query_encoder", "runtime_for", "selection_order"]

#: The order in which runtimes are asked whether they accept a path (see the module docstring for why).
SELECTION_ORDER = ("tensorrt", "onnxruntime", "torch")


def selection_order() -> list[str]:
    """The registered runtime names in the order they are asked: ``SELECTION_ORDER``, then the rest by name."""
    names = RUNTIMES.names()
    return [name for name in SELECTION_ORDER if name in names] + [n for n in names if n not in SELECTION_ORDER]


def runtime_for(path: str | Path) -> str:
    """The name of the first runtime (in ``selection_order``) that accepts ``path``.

    Raises:
        QueryEncoderError: the path does not exist, or no runtime accepts it; the message names the path and
            what each runtime expects, with the reason it refused.
    """
    path = Path(path)
    if not path.exists():
        raise QueryEncoderError(f"query encoder not found: {path}")
    refusals = []
    for name in selection_order():
        reason = RUNTIMES.get(name).reject_reason(path)
        if reason is None:
            return name
        reason = " ".join(reason.replace(str(path), path.name).split())  # the header names the full path once
        refusals.append(f"{name} expects {RUNTIMES.get(name).expects}; here: {reason}")
    raise QueryEncoderError(  # one line: the CLI prints it as one `error:` line, a log as one record
        f"no query-encoder runtime can open {path}: " + "; ".join(refusals) + ". Forcing a runtime "
        "(runtime=NAME, CLI --runtime NAME) shows that runtime's own error."
    )


def open_query_encoder(path: str | Path, runtime: str | None = None, **options: Any) -> QueryEncoder:
    """Open a query encoder with the runtime that accepts ``path``, or with the one named.

    Args:
        path: a checkpoint directory, an exported ``.onnx``/``.ort`` file, or a TensorRT engine with its sidecar.
        runtime: a name in ``RUNTIMES`` to force a runtime (its own checks then report what is wrong).
        options: passed to the runtime (``device``, ``providers``, ``batch_size``, ``threads``, as it takes).

    Raises:
        QueryEncoderError: the path does not exist, no runtime accepts it, the chosen runtime takes none of
            ``options``, or it cannot open the path.
        retrieval.registry.UnknownNameError: an unknown ``runtime`` name (the message lists the valid ones).
    """
    path = Path(path)
    if runtime is None:
        runtime = runtime_for(path)
    elif not path.exists():
        RUNTIMES.get(runtime)  # an unknown name is reported before a missing path
        raise QueryEncoderError(f"query encoder not found: {path}")
    cls = RUNTIMES.get(runtime)
    _check_options(runtime, cls, options)
    return cls(path, **options)  # type: ignore[return-value]


def _check_options(name: str, cls: type[QueryEncoderRuntime], options: dict[str, Any]) -> None:
    """Refuse options the runtime does not take, naming the ones it does (instead of a bare ``TypeError``)."""
    parameters = list(inspect.signature(cls.__init__).parameters.values())[2:]  # past self and path
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    takes = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise QueryEncoderError(
            f"runtime {name!r} takes no option {', '.join(unknown)}; it takes: {', '.join(takes) or '(none)'}"
        )
