"""Run an app with uvicorn in a background thread of this process, on a free loopback port.

The benchmark and the tests need a real server (real sockets, real HTTP parsing) that they can
start and stop around their own code; ``retrieval serve`` uses ``uvicorn.run`` in the foreground.
The socket is bound before uvicorn starts, so the port is known and nothing races for it.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["ServerStartError", "running_server"]


class ServerStartError(RuntimeError):
    """uvicorn did not come up (the lifespan failed, see the log) within the time allowed."""


@contextmanager
def running_server(
    app: Any, host: str = "127.0.0.1", start_timeout_s: float = 60.0, **uvicorn_options: Any
) -> Iterator[str]:
    """Serve ``app`` on ``host`` at a free port in a daemon thread; yield its base URL; stop it on exit.

    Args:
        app: an ASGI application (``serving.app.create_app(...)``).
        host: the interface to bind; loopback by default.
        start_timeout_s: how long to wait for the lifespan start-up.
        uvicorn_options: passed to ``uvicorn.Config`` (e.g. ``log_level``, ``http``).

    Raises:
        ServerStartError: the server thread ended or did not start in time.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    options = {"log_level": "warning", "lifespan": "on", **uvicorn_options}
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=f"uvicorn-{port}")
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise ServerStartError(f"the server on {host}:{port} did not start (see the log above)")
            time.sleep(0.02)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
