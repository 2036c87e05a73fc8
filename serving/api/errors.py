"""Error answers: always ``{"detail": ...}`` JSON, never a stack trace, an echoed upload or a server path.

The routers map the errors they expect to 4xx with path-free messages. These handlers are the net
under them: a validation error lists where and what (not the offending input, which for an upload is
the whole file; ``min_score`` says it must be a finite number in [-1, 1], NaN included); a full admission
queue is a 503 with ``Retry-After``; a query encoder producing NaN/infinity (a corrupt model) is a 500
that says so; any other ``UserFacingError`` becomes a 400; all of them have the server's own paths
(index directory, query encoder) replaced. Anything else is a 500 that points at the server log.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from indexing import IndexFormatError
from retrieval.errors import UserFacingError
from serving.admission import OverloadedError
from serving.engine import NonFiniteEmbeddingError

__all__ = ["INTERNAL_ERROR_MESSAGE", "install_error_handlers", "redact_paths"]

logger = logging.getLogger(__name__)

INTERNAL_ERROR_MESSAGE = "internal server error; see the server log"
#: Validation messages replaced per field: pydantic's own say "should be less than or equal to 1" for NaN.
_FIELD_MESSAGES = {"min_score": "min_score must be a finite number in [-1, 1]"}


def _message(error: dict) -> str:
    loc = error.get("loc") or ()
    field = loc[-1] if loc else None
    if field in _FIELD_MESSAGES and error.get("type") != "missing":
        return _FIELD_MESSAGES[field]
    return error["msg"]


def redact_paths(message: str, paths: Iterable[Path | None]) -> str:
    """``message`` with each given server path (as given, absolute, resolved; longest first) made ``<server>``."""
    forms = set()
    for path in paths:
        if path is None:
            continue
        forms.update({str(path), str(Path(path).resolve()), str(Path(path).absolute())})
    for form in sorted(forms, key=len, reverse=True):
        if form and form not in (".", "/"):
            message = message.replace(form, "<server>")
    return message


def install_error_handlers(app: FastAPI, server_paths: Iterable[Path | None]) -> None:
    """Register the handlers above on ``app``; ``server_paths`` are redacted from user-facing messages."""
    paths = list(server_paths)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default handler echoes each bad input back; for an upload that is the whole file.
        errors = [{"loc": list(e["loc"]), "msg": _message(e), "type": e["type"]} for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": errors})

    @app.exception_handler(OverloadedError)
    async def overloaded(request: Request, exc: OverloadedError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)}
        return JSONResponse(status_code=503, content={"detail": str(exc)}, headers=headers)

    @app.exception_handler(NonFiniteEmbeddingError)
    async def broken_encoder(request: Request, exc: NonFiniteEmbeddingError) -> JSONResponse:
        logger.error("%s", exc)  # the operator must see it: every image query fails until the model is replaced
        return JSONResponse(status_code=500, content={"detail": redact_paths(str(exc), paths)})

    @app.exception_handler(IndexFormatError)
    async def damaged_index(request: Request, exc: IndexFormatError) -> JSONResponse:
        logger.error("%s", exc)  # found during a search (a score guard, an unreadable metadata row): the operator acts
        detail = f"the served index is damaged: {redact_paths(str(exc), paths)}"
        return JSONResponse(status_code=500, content={"detail": detail})

    @app.exception_handler(UserFacingError)
    async def user_error(request: Request, exc: UserFacingError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": redact_paths(str(exc), paths)})

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this handler, so the server logs the traceback once; the client gets JSON.
        return JSONResponse(status_code=500, content={"detail": INTERNAL_ERROR_MESSAGE})
