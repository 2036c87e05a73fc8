"""The optional API key: a shared secret in the ``X-API-Key`` header.

The comparison takes the same time whatever the key sent, so response timing does not reveal how
many leading characters were right. Health, readiness, the page and the docs stay open (a load
balancer and a browser reach them without the key); everything that reveals or searches the index
needs it. ``api_key_dependencies`` returns no dependency at all when no key is configured, so an
open server neither pays for the check nor advertises a security scheme in its OpenAPI document.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader

__all__ = ["API_KEY_HEADER", "INVALID_KEY_MESSAGE", "api_key_dependencies", "require_api_key"]

API_KEY_HEADER = "X-API-Key"
INVALID_KEY_MESSAGE = "missing or invalid API key"

_scheme = APIKeyHeader(
    name=API_KEY_HEADER, auto_error=False, description="the server's API key (setting api_key / RETRIEVAL_API_KEY)"
)


async def require_api_key(request: Request, key: Annotated[str | None, Security(_scheme)]) -> None:
    """Refuse the request with 401 unless it carries the configured key (compared in constant time)."""
    expected: bytes | None = request.app.state.api_key
    if expected is None:
        return
    if key is None or not hmac.compare_digest(key.encode("utf-8", "surrogateescape"), expected):
        raise HTTPException(status_code=401, detail=INVALID_KEY_MESSAGE, headers={"WWW-Authenticate": API_KEY_HEADER})


def api_key_dependencies(api_key_set: bool) -> list:
    """The dependencies to put on a protected router: the key check when a key is configured, else none."""
    return [Depends(require_api_key)] if api_key_set else []
