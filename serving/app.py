"""The HTTP API: upload an image, get its nearest gallery items as JSON.

``create_app(settings)`` builds the FastAPI application without loading anything; the index
and the query encoder are opened in the app's ``lifespan`` (at server start-up) and closed at
shutdown, so importing this module or building the app is cheap and side-effect free.
Decoding and inference run in the thread pool, keeping the event loop free to accept other
requests while a query is embedded. Bad input (not an image, empty, too large, bad ``k``)
gets a 4xx JSON ``{"detail": ...}``, never a 500 with a traceback.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoint annotations at runtime, and
# they refer to ``settings`` in the enclosing function, which a string annotation cannot resolve.
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from indexing.errors import NotCalibratedError, UnknownGranularityError
from retrieval.data.images import CorruptImageError, decode_image_bytes
from serving.engine import SearchEngine
from serving.limits import BodySizeLimitMiddleware, too_large_message
from serving.settings import ServeSettings

__all__ = ["create_app", "serve"]

logger = logging.getLogger(__name__)

#: Allowance for multipart framing and the small form fields on top of the image itself.
_MULTIPART_OVERHEAD = 64 * 1024


def create_app(settings: ServeSettings, engine: SearchEngine | None = None) -> FastAPI:
    """Build the FastAPI application for ``settings`` (the engine is opened when the server starts).

    An already opened ``engine`` may be handed in (the CLI opens it first to report errors cleanly);
    the app then uses it instead of opening a second one, and closes it at shutdown.

    Endpoints:
        ``POST /v1/search``: multipart form with a file field ``image``, an optional ``k``
        (form field or query parameter, 1..``max_k``, default ``default_k``) and an optional
        ``granularity`` (form field or query parameter: a calibrated level; only hits above its
        threshold are returned, up to ``k``); returns ``{"k", "took_ms", "hits": [{"id", "score",
        "path", "labels"[, "level"][, "extra"]}]}`` (plus ``"granularity"`` when one was asked). Hits of a
        calibrated index carry ``level``. An unknown level is a 422, a granularity asked of an
        uncalibrated index a 400, each with a JSON ``{"detail": message}``. With ``min_score`` (form
        field or query parameter, a cosine similarity in [-1, 1]) every item scoring above it is returned
        (a range search; ``k`` then caps the hits, default ``max_k``), and the answer says whether FAISS's
        native range search or the k-NN fallback ran (``"range_search"``); with ``granularity`` too, a 422.
        ``GET /v1/healthz``: ``{"status": "ok", "count", "encoder_id", "query_encoder_id", "dim"}``.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        opened = engine or SearchEngine.open(settings.index, settings.query_encoder, runtime=settings.runtime)
        logger.info("serving %r", opened)
        app.state.engine = opened
        try:
            yield
        finally:
            opened.close()

    app = FastAPI(title="retrieval-engine", version="1", lifespan=lifespan)
    app.state.settings = settings
    max_bytes = settings.max_upload_bytes
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=max_bytes + _MULTIPART_OVERHEAD, upload_limit=max_bytes)

    @app.post("/v1/search")
    async def search(
        request: Request,
        image: Annotated[UploadFile, File(description="the query image (JPEG, PNG, ...)")],
        k_form: Annotated[int | None, Form(alias="k", ge=1, le=settings.max_k)] = None,
        k_query: Annotated[int | None, Query(alias="k", ge=1, le=settings.max_k)] = None,
        granularity_form: Annotated[str | None, Form(alias="granularity", max_length=64)] = None,
        granularity_query: Annotated[str | None, Query(alias="granularity", max_length=64)] = None,
        min_score_form: Annotated[float | None, Form(alias="min_score", ge=-1.0, le=1.0)] = None,
        min_score_query: Annotated[float | None, Query(alias="min_score", ge=-1.0, le=1.0)] = None,
    ) -> dict[str, Any]:
        start = time.perf_counter()
        engine: SearchEngine = request.app.state.engine
        granularity = granularity_form or granularity_query
        min_score = min_score_form if min_score_form is not None else min_score_query
        # with min_score, k caps the hits (default: max_k); otherwise it is the number of nearest items
        k = k_form or k_query or (settings.max_k if min_score is not None else settings.default_k)
        if granularity is not None and min_score is not None:
            raise HTTPException(status_code=422, detail="give either granularity or min_score, not both")
        if granularity is not None:
            try:
                engine.index_dir.threshold(granularity)  # answer before reading and decoding the upload
            except UnknownGranularityError as exc:
                raise HTTPException(status_code=422, detail=str(exc)) from None
            except NotCalibratedError as exc:
                raise HTTPException(status_code=400, detail=str(exc)) from None
        name = image.filename or "<upload>"
        data = await image.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HTTPException(status_code=413, detail=f"{name}: {too_large_message(max_bytes)}")
        try:
            query = await run_in_threadpool(decode_image_bytes, data, name)
        except CorruptImageError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        body: dict[str, Any] = {"k": k}
        if min_score is None:
            results = await run_in_threadpool(engine.search, [query], k, granularity)
        else:
            results, fallback = await run_in_threadpool(engine.search_above, [query], min_score, k)
            body["min_score"] = min_score
            body["range_search"] = "knn_fallback" if fallback else "native"
        if granularity is not None:
            body["granularity"] = granularity
        body["took_ms"] = round((time.perf_counter() - start) * 1000.0, 3)
        body["hits"] = [hit.to_dict() for hit in results[0]]
        return body

    @app.get("/v1/healthz")
    async def healthz(request: Request) -> dict[str, Any]:
        engine: SearchEngine = request.app.state.engine
        return {
            "status": "ok",
            "count": engine.count,
            "encoder_id": engine.encoder_id,
            "query_encoder_id": engine.query_encoder.encoder_id,
            "dim": engine.dim,
        }

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default handler echoes each bad input back; for an upload that is the whole file.
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": errors})

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this handler, so the server logs the traceback once; the client gets JSON.
        return JSONResponse(status_code=500, content={"detail": "internal server error; see the server log"})

    return app


def serve(settings: ServeSettings) -> None:
    """Open the engine, then run the API with uvicorn on ``settings.host:settings.port`` until interrupted.

    The engine is opened before uvicorn starts, so a wrong path or a mismatched query encoder fails here
    with one clear message rather than as a start-up traceback from the lifespan, and the app then serves
    with that engine instead of loading the index and the model a second time.

    Raises:
        indexing.IndexFormatError: no readable index at ``settings.index``.
        serving.runtimes.QueryEncoderError: the query encoder cannot be found or opened.
        serving.engine.EncoderMismatchError: the query encoder does not embed into the index's space.
    """
    import uvicorn

    engine = SearchEngine.open(settings.index, settings.query_encoder, runtime=settings.runtime)
    uvicorn.run(create_app(settings, engine=engine), host=settings.host, port=settings.port)
