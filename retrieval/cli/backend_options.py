"""The ``--backend``, ``--qdrant-url``, ``--collection`` and ``--where`` options shared by index, search and serve.

``index build`` and ``index merge`` choose the backend the vectors go to; ``index add``, ``search`` and
``serve`` read it from the manifest, and the options there only check it (``--backend``) or reach the same
collection through another address (``--qdrant-url``, e.g. the cluster's internal name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from retrieval.cli.common import fail

BACKEND_HELP = (
    "Where the vectors live: 'faiss' (the default: an index.faiss file inside the index directory, searched "
    "in-process) or 'qdrant' (a Qdrant collection; needs --qdrant-url and `pip install "
    '"retrieval-engine\\[qdrant]"`). The index directory keeps the manifest and metadata either way.'
)
QDRANT_URL_HELP = (
    "Qdrant location with --backend qdrant: http(s)://HOST:PORT for a server or cluster (API key from "
    "$QDRANT_API_KEY), a local directory path for qdrant-client's embedded local mode (one process at a time), "
    "or :memory:. On search/serve/add: reach the index's collection through this address instead of the one "
    "recorded at build time."
)
COLLECTION_HELP = (
    "Qdrant collection name (an alias moved atomically to each new build); default: the index directory's name."
)
WHERE_HELP = (
    "Only return items whose label matches: LEVEL=VALUE or LEVEL=V1,V2 (e.g. coarse=shoes); the best k among "
    "them. Repeat for several levels (all must match)."
)


def backend_option(default: str | None = "faiss") -> Any:
    return typer.Option(default, "--backend", metavar="faiss|qdrant", help=BACKEND_HELP)


def qdrant_url_option() -> Any:
    return typer.Option(None, "--qdrant-url", metavar="URL", help=QDRANT_URL_HELP)


def collection_option() -> Any:
    return typer.Option(None, "--collection", metavar="NAME", help=COLLECTION_HELP)


def where_option() -> Any:
    return typer.Option(None, "--where", metavar="LEVEL=VALUE", help=WHERE_HELP)


def new_index_backend(
    backend: str, qdrant_url: str | None, collection: str | None, out: Path
) -> tuple[str, dict[str, Any]]:
    """``(backend, backend_options)`` for a new index at ``out`` (``index build`` / ``index merge``).

    Raises:
        typer.Exit: Qdrant options without ``--backend qdrant``, or ``--backend qdrant`` without a URL.
    """
    if backend != "qdrant":
        if qdrant_url is not None or collection is not None:
            raise fail("--qdrant-url and --collection go with --backend qdrant")
        return backend, {}
    if not qdrant_url:
        raise fail("--backend qdrant needs --qdrant-url (http://HOST:6333, a local directory, or :memory:)")
    return backend, {"url": qdrant_url, "collection": collection or out.resolve().name}


def parse_where(values: list[str] | None) -> Any:
    """The ``LabelFilter``s of repeated ``--where`` options (None when there are none).

    Raises:
        typer.Exit: a value that is not LEVEL=VALUE.
    """
    if not values:
        return None
    from indexing.vector_index import LabelFilter

    try:
        return [LabelFilter.parse(value) for value in values]
    except ValueError as exc:
        raise fail(str(exc)) from None
