"""Where a Qdrant index's vectors live, and the one client per place that every index there shares.

A *location* string, recorded in the manifest as ``url``, names the place:

- ``http://HOST:PORT`` or ``https://HOST:PORT``: a Qdrant server or cluster; the API key, if any, comes from
  the ``QDRANT_API_KEY`` environment variable and is never written anywhere;
- ``:memory:``: qdrant-client's in-process store, shared by every ``:memory:`` index of the process and gone
  when the process ends (tests, demos);
- a directory path (``DIR``, or ``path:DIR`` where the path could be read as ``HOST:PORT``): qdrant-client's local
  mode, an exact (brute-force) search over a store kept in ``DIR``, recorded as an absolute path. Local mode
  locks ``DIR`` for one process, so this module keeps one client per location per process
  (``acquire_connection``), shared by every index opened on it and kept open until the process ends or
  ``close_client`` (another process can use the directory only then). It also pickles the points it stores, so
  ``DIR`` must be as trusted as the code that reads it.

qdrant-client is an optional dependency (the ``qdrant`` extra): it is imported on first use (``import_qdrant``),
and its absence is a ``QdrantNotInstalledError`` that names the extra.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import threading
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from retrieval.errors import UserFacingError

__all__ = [
    "API_KEY_ENV",
    "MEMORY",
    "QdrantConnection",
    "QdrantConnectionError",
    "QdrantLocation",
    "QdrantNotInstalledError",
    "acquire_connection",
    "close_client",
    "import_qdrant",
    "release_connection",
]

logger = logging.getLogger(__name__)

#: Environment variable holding the API key of a Qdrant server (read when connecting, never stored).
API_KEY_ENV = "QDRANT_API_KEY"
#: The location of qdrant-client's in-process store.
MEMORY = ":memory:"
#: Optional prefix of a local-mode location (``path:DIR``), for a path that could be read as ``HOST:PORT``.
_PATH_PREFIX = "path:"


class QdrantNotInstalledError(UserFacingError, ImportError):
    """qdrant-client (the ``qdrant`` extra) is not installed."""


class QdrantConnectionError(UserFacingError, ConnectionError):
    """The Qdrant server of a location cannot be reached (down, wrong address, network)."""


def import_qdrant() -> tuple[Any, Any]:
    """``(QdrantClient, models)``, imported on first use: qdrant-client is an optional dependency."""
    try:
        from qdrant_client import QdrantClient, models
    except ImportError as exc:
        raise QdrantNotInstalledError(
            f'the qdrant backend needs qdrant-client: pip install "retrieval-engine[qdrant]" ({exc})'
        ) from exc
    return QdrantClient, models


# ---------------------------------------------------------------------------------------------- locations


@dataclass(frozen=True)
class QdrantLocation:
    """A parsed location string (see the module docstring for the syntax).

    Attributes:
        kind: "server" (HTTP(S) URL), "memory" (``:memory:``) or "path" (local mode in a directory).
        url: the canonical string: the server URL without credentials or trailing slash, ``:memory:``, or the
            absolute directory. It is what the manifest records and what keys the client cache.
    """

    kind: Literal["server", "memory", "path"]
    url: str

    @classmethod
    def parse(cls, text: str) -> QdrantLocation:
        """Parse ``http(s)://HOST[:PORT]``, ``:memory:``, ``DIR`` or ``path:DIR``.

        Raises:
            ValueError: an empty string, another URL scheme, or ``HOST:PORT`` without ``http://`` (the message
                shows the forms).
        """
        forms = "http(s)://HOST:PORT, :memory: or a directory (path:DIR)"
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"a Qdrant location is {forms}; got {text!r}")
        text = text.strip()
        if text == MEMORY:
            return cls("memory", MEMORY)
        if text.startswith(_PATH_PREFIX):
            directory = text[len(_PATH_PREFIX) :]
            if not directory:
                raise ValueError("a local Qdrant location needs a directory: path:DIR")
            return cls("path", str(Path(directory).expanduser().resolve()))
        parts = urlsplit(text)
        if parts.scheme in ("http", "https") and parts.hostname:
            host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
            netloc = host if parts.port is None else f"{host}:{parts.port}"  # drops any user:password@
            return cls("server", urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", "")))
        if "://" in text:
            raise ValueError(f"a Qdrant location is {forms}; got {text!r} (only http and https URLs are supported)")
        if re.fullmatch(r"[\w.-]+:\d+", text):
            raise ValueError(f"a Qdrant location is {forms}; got {text!r}: did you mean http://{text}?")
        return cls("path", str(Path(text).expanduser().resolve()))

    @property
    def is_local(self) -> bool:
        """Whether qdrant-client itself holds the data (``:memory:`` or a directory): exact search, one process."""
        return self.kind != "server"

    def make_client(self) -> Any:
        """A new ``QdrantClient`` for this location (local mode takes the directory's lock here)."""
        client_class, _ = import_qdrant()
        if self.kind == "memory":
            return client_class(location=MEMORY, force_disable_check_same_thread=True)
        if self.kind == "path":
            directory = self.url
            try:
                # every call is serialised by QdrantConnection.lock, so sharing the SQLite handle is safe
                return client_class(path=directory, force_disable_check_same_thread=True)
            except RuntimeError as exc:  # the directory is locked by another process
                raise QdrantConnectionError(f"cannot open the local Qdrant store {directory}: {exc}") from exc
        api_key = os.environ.get(API_KEY_ENV) or None
        return client_class(url=self.url, api_key=api_key, check_compatibility=False)


# ---------------------------------------------------------------------------------------------- client cache


@dataclass
class QdrantConnection:
    """One client per location per process, shared by every ``QdrantIndex`` on it.

    Local mode is not thread-safe (numpy arrays grow under a search, one SQLite handle), so its calls are
    serialised by ``lock``; a server client is thread-safe and its calls run concurrently.
    """

    location: QdrantLocation
    client: Any
    users: int = 0
    lock: threading.RLock = field(default_factory=threading.RLock)

    def guard(self) -> AbstractContextManager[Any]:
        return self.lock if self.location.is_local else nullcontext()

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``client.<method>(...)``, serialised for local mode.

        An unreachable server, or one refusing the credentials, is a ``QdrantConnectionError``.
        """
        from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

        try:
            with self.guard():
                return getattr(self.client, method)(*args, **kwargs)
        except ResponseHandlingException as exc:
            raise QdrantConnectionError(f"cannot reach Qdrant at {self.location.url}: {exc}") from exc
        except UnexpectedResponse as exc:
            if exc.status_code in (401, 403):
                raise QdrantConnectionError(
                    f"Qdrant at {self.location.url} refused the request ({exc.status_code} {exc.reason_phrase}): "
                    f"set {API_KEY_ENV} to a key with access"
                ) from exc
            raise


_CONNECTIONS: dict[str, QdrantConnection] = {}
_CONNECTIONS_LOCK = threading.Lock()
_EXIT_HOOK_REGISTERED = False


def acquire_connection(location: QdrantLocation) -> QdrantConnection:
    """The shared connection of ``location``, created on first use; pair each call with ``release_connection``."""
    global _EXIT_HOOK_REGISTERED
    with _CONNECTIONS_LOCK:
        connection = _CONNECTIONS.get(location.url)
        if connection is None:
            connection = QdrantConnection(location, location.make_client())
            _CONNECTIONS[location.url] = connection
            if not _EXIT_HOOK_REGISTERED:  # registered on first use, not on import
                atexit.register(_close_all)
                _EXIT_HOOK_REGISTERED = True
        connection.users += 1
        return connection


def _close_all() -> None:
    """Close every cached client at interpreter exit, while qdrant-client can still import what closing needs
    (left to garbage collection, local mode's ``close`` fails with "sys.meta_path is None")."""
    with _CONNECTIONS_LOCK:
        connections = list(_CONNECTIONS.values())
        _CONNECTIONS.clear()
    for connection in connections:
        try:
            connection.client.close()
        except Exception as exc:  # at exit: report, and go on closing the others
            logger.debug("closing the Qdrant client of %s at exit failed: %s", connection.location.url, exc)


def release_connection(connection: QdrantConnection) -> None:
    """Drop one user. The client stays open (and cached) for the next index on the location, and for whoever
    holds it (``QdrantIndex.client``); ``close_client`` closes it."""
    with _CONNECTIONS_LOCK:
        connection.users -= 1


def close_client(url: str) -> bool:
    """Close the cached client of a location when no open index uses it; returns whether one was closed.

    For a local directory this releases its lock, so another process can open it while this one goes on.

    Raises:
        ValueError: a bad location, or an index on it is still open.
    """
    location = QdrantLocation.parse(url)
    with _CONNECTIONS_LOCK:
        connection = _CONNECTIONS.get(location.url)
        if connection is None:
            return False
        if connection.users > 0:
            raise ValueError(f"{connection.users} open index(es) still use the Qdrant client of {location.url}")
        del _CONNECTIONS[location.url]
        with connection.guard():
            connection.client.close()
        return True
