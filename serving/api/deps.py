"""Request dependencies shared by the routers: the opened engine, the micro-batcher and the admission gates.

They live on ``app.state`` from the lifespan on; before that (or after shutdown) a request gets a
503 that says the server is starting, instead of an ``AttributeError`` turned into a 500.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request

from serving.admission import AdmissionGate
from serving.engine import SearchEngine

__all__ = ["NOT_READY_MESSAGE", "Gates", "get_batcher", "get_engine", "get_gates"]

NOT_READY_MESSAGE = "the search engine is not open yet; retry shortly"


def get_engine(request: Request) -> SearchEngine:
    """The app's opened ``SearchEngine``; 503 while there is none."""
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise HTTPException(status_code=503, detail=NOT_READY_MESSAGE, headers={"Retry-After": "1"})
    return engine


def get_batcher(request: Request) -> Any:
    """The app's ``MicroBatcher`` of image queries; 503 while there is none."""
    batcher = getattr(request.app.state, "batcher", None)
    if batcher is None:
        raise HTTPException(status_code=503, detail=NOT_READY_MESSAGE, headers={"Retry-After": "1"})
    return batcher


@dataclass(frozen=True)
class Gates:
    """The admission gates of image queries: places for whole queries, and for decodes within them."""

    queries: AdmissionGate
    decodes: AdmissionGate


def get_gates(request: Request) -> Gates:
    """The app's admission gates (``serving.admission``); 503 while there are none."""
    queries = getattr(request.app.state, "query_gate", None)
    decodes = getattr(request.app.state, "decode_gate", None)
    if queries is None or decodes is None:
        raise HTTPException(status_code=503, detail=NOT_READY_MESSAGE, headers={"Retry-After": "1"})
    return Gates(queries, decodes)
