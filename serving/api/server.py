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

__all__ = ["ServerStartError", "free_port", "running_server", "serve_process"]


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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (for a server in another process, which must bind it itself)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextmanager
def serve_process(
    serve_args: list[str],
    port: int | None = None,
    env: dict[str, str] | None = None,
    ready_timeout_s: float = 120.0,
    cwd: str | None = None,
) -> Iterator[tuple[str, Any]]:
    """Run ``retrieval serve`` as its own process on 127.0.0.1; yield ``(base URL, Popen)`` once it is ready.

    The deployment path exactly (the CLI, ``uvicorn.run``, the process's own memory), for benchmarks and tests
    that measure or kill the server. Readiness is ``GET /v1/readyz`` answering 200 (engine open, warmed up).

    Args:
        serve_args: arguments after ``retrieval serve`` (``--index``...). ``--port`` is added unless ``port`` is
            ``0``, which means the port comes from ``env`` (``RETRIEVAL_PORT``).
        port: the port to pass; default a free one.
        env: the process environment (default: this one's).
        ready_timeout_s: how long to wait for readiness.
        cwd: the working directory.

    Raises:
        ServerStartError: the process exited or was not ready in time (its stderr's tail is in the message).
    """
    import http.client
    import os
    import subprocess
    import sys

    environment = dict(os.environ if env is None else env)
    if port == 0:
        port = int(environment["RETRIEVAL_PORT"])
        args = list(serve_args)
    else:
        port = port or free_port()
        args = [*serve_args, "--port", str(port)]
    command = [sys.executable, "-c", "from retrieval.cli.main import main; main()", "serve", *args]
    process = subprocess.Popen(
        command, cwd=cwd, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if process.poll() is not None:
                raise ServerStartError(
                    f"retrieval serve exited with {process.returncode}: {process.stderr.read()[-2000:]}"
                )
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                connection.request("GET", "/v1/readyz")
                ready = connection.getresponse().status == 200
                connection.close()
                if ready:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ServerStartError(f"retrieval serve was not ready within {ready_timeout_s:g} s")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
