"""A request-body size limit enforced while the body streams in, before it is parsed or stored.

Starlette's multipart parser spools a whole upload to memory/disk before the endpoint sees
it, so a limit checked inside the endpoint comes too late to protect the server. This ASGI
middleware refuses a declared ``Content-Length`` over the limit without reading the body,
and counts the bytes of bodies without one (chunked uploads), aborting at the limit.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.exceptions import HTTPException

__all__ = ["BodySizeLimitMiddleware", "BodyTooLargeError"]

Scope = dict[str, Any]
Message = dict[str, Any]


class BodyTooLargeError(HTTPException):
    """Raised from ``receive`` when the streamed body passes the limit; FastAPI renders it as a 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=too_large_message(limit))


def too_large_message(limit: int) -> str:
    return f"upload too large: the limit is {limit / (1024 * 1024):g} MiB"


class BodySizeLimitMiddleware:
    """Answer 413 to HTTP requests whose body exceeds ``max_body_bytes``.

    Args:
        app: the ASGI application to protect.
        max_body_bytes: the largest accepted body, multipart framing included.
        upload_limit: the limit to name in the error message (the file limit the user configured).
    """

    def __init__(self, app: Any, max_body_bytes: int, upload_limit: int | None = None) -> None:
        self.app = app
        self.max_body_bytes = int(max_body_bytes)
        self.upload_limit = int(upload_limit if upload_limit is not None else max_body_bytes)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._reject(send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLargeError(self.upload_limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLargeError:
            if started:
                raise
            await self._reject(send)

    async def _reject(self, send: Any) -> None:
        body = json.dumps({"detail": too_large_message(self.upload_limit)}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
