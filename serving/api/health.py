"""Liveness, readiness and what is served: ``/v1/healthz``, ``/v1/readyz`` and ``/v1/index``.

Liveness answers as soon as the process serves HTTP (an orchestrator restarts a server that stops
answering it); readiness only once the index and the query encoder are open and a warm-up query has
run (a load balancer sends traffic only then). Neither needs the API key; ``/v1/index`` does, since
it describes the gallery.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from serving.api.deps import get_engine
from serving.api.schemas import ErrorBody, Health, IndexDescription, Readiness
from serving.engine import SearchEngine

__all__ = ["health_router", "index_router"]


def health_router() -> APIRouter:
    """``GET /v1/healthz`` and ``GET /v1/readyz`` (no API key)."""
    router = APIRouter(prefix="/v1", tags=["operations"])

    @router.get("/healthz", response_model=Health, summary="Liveness")
    async def healthz() -> Health:
        return Health(status="ok")

    @router.get(
        "/readyz",
        response_model=Readiness,
        summary="Readiness",
        responses={503: {"model": ErrorBody, "description": "still opening or warming up"}},
    )
    async def readyz(request: Request) -> Readiness | JSONResponse:
        state = request.app.state
        engine = getattr(state, "engine", None)
        if engine is None or not getattr(state, "ready", False):
            detail = getattr(state, "not_ready_reason", None) or "starting: the engine is opening or warming up"
            return JSONResponse(status_code=503, content={"detail": detail}, headers={"Retry-After": "1"})
        return Readiness(status="ready", count=engine.count, query_encoder_id=engine.query_encoder.encoder_id)

    return router


def index_router(dependencies: list) -> APIRouter:
    """``GET /v1/index``: the served index and encoders (needs the API key when one is set)."""
    router = APIRouter(prefix="/v1", tags=["index"], dependencies=dependencies)

    @router.get("/index", response_model=IndexDescription, summary="What this server searches")
    async def describe_index(engine: Annotated[SearchEngine, Depends(get_engine)]) -> IndexDescription:
        return IndexDescription(**engine.describe())

    return router
