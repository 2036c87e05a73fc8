"""Helpers shared by the CLI commands: console output, JSON printing and the error boundary."""

from __future__ import annotations

import functools
import inspect
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

if TYPE_CHECKING:
    from retrieval.evaluation.report import EvaluationReport

__all__ = [
    "computes",
    "console",
    "err_console",
    "fail",
    "print_json",
    "print_side_by_side",
    "recipe_overrides",
    "user_errors",
]

#: Results go to stdout without hard wraps, so a printed command or path can be pasted as it is (tables still
#: fit the terminal); messages on stderr wrap for reading.
console = Console(soft_wrap=True)
err_console = Console(stderr=True)


def print_json(data: Any) -> None:
    """Print machine-readable output on stdout, nothing else on that stream."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` to stderr and return the exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn errors written for the user into one ``error:`` line and exit status 2, not a traceback."""
    from retrieval.errors import UserFacingError

    try:
        yield
    except UserFacingError as exc:
        raise fail(str(exc)) from None
    except FileNotFoundError as exc:
        raise fail(f"file not found: {exc.filename or exc}") from None
    except KeyboardInterrupt:
        raise fail("interrupted", code=130) from None


def print_side_by_side(reports: dict[str, EvaluationReport], query_id: str, gallery_id: str, title: str) -> None:
    """Print the reports of an asymmetric evaluation in one table, with a line saying which encoder is where.

    ``reports`` are keyed by ``retrieval.evaluation.asymmetric.MODES`` (symmetric, asymmetric, teacher).
    """
    from retrieval.evaluation.report import format_side_by_side

    console.print(
        f"symmetric: query encoder {query_id} on both sides; asymmetric: its queries against gallery "
        f"encoder {gallery_id}; teacher: {gallery_id} on both sides",
        highlight=False,
        soft_wrap=True,
    )
    console.print(format_side_by_side(reports, title=title), highlight=False, soft_wrap=True)


def recipe_overrides(set_values: list[str], options: dict[str, object]) -> list[str]:
    """``--set`` overrides followed by one ``key=value`` for every command-line option that was given.

    ``options`` maps config keys to option values (``{"out_dir": out, "backbone_weights": weights}``);
    ``None`` means the option was not given and the recipe's value stands. Options come last, so they win.
    """
    return [*set_values, *(f"{key}={value}" for key, value in options.items() if value is not None)]


def computes(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` with a ``--threads N`` option (default: ``RETRIEVAL_THREADS``) that caps its CPU threads.

    Every command that computes (trains, embeds, searches, exports, serves) is registered through this, so the
    option reads the same everywhere and lives in one place; see :mod:`retrieval.threads` for why it matters on
    shared machines. The limit is applied before the command body runs, i.e. before it imports torch, FAISS or
    ONNX Runtime.
    """
    from retrieval.threads import THREADS_ENV

    option = typer.Option(
        None,
        "--threads",
        envvar=THREADS_ENV,
        min=1,
        help="CPU threads for torch, FAISS and ONNX Runtime (default: all cores). On a busy shared machine 1-2 "
        "threads are often several times faster.",
    )
    threads_parameter = inspect.Parameter(
        "threads", inspect.Parameter.KEYWORD_ONLY, default=option, annotation=int | None
    )

    @functools.wraps(command)
    def with_threads(*args: Any, threads: int | None = None, **kwargs: Any) -> Any:
        if threads is not None:
            from retrieval.threads import limit_compute_threads

            limit_compute_threads(threads)
        return command(*args, **kwargs)

    signature = inspect.signature(command, eval_str=True)
    with_threads.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), threads_parameter]
    )
    with_threads.__annotations__ = {**command.__annotations__, "threads": int | None}
    return with_threads
