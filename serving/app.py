"""The HTTP API: upload an image (or send an on-device embedding), get its nearest gallery items as JSON.

``create_app(settings)`` builds the FastAPI application without loading anything; the index and the
query encoder are opened in the app's ``lifespan`` (at server start-up) and closed at shutdown, so
importing this module or building the app is cheap and side-effect free. The routes live in
``serving.api`` (one router per concern); this module assembles them with the middleware (metrics,
CORS, body-size limit), the error handlers, the micro-batcher and the admission gates (``serving.admission``:
image queries and decodes running at once, a bounded queue, 503 beyond). Decoding and inference run in a
worker thread, keeping the event loop free to accept other requests while a batch is embedded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import anyio.to_thread
from fastapi import FastAPI

from serving.admission import AdmissionGate
from serving.api.batching import MicroBatcher
from serving.api.docs import docs_router
from serving.api.errors import install_error_handlers
from serving.api.health import health_router, index_router
from serving.api.metrics import ApiMetrics, MetricsMiddleware, metrics_router
from serving.api.queries import answer_image_queries
from serving.api.search import search_router
from serving.api.security import api_key_dependencies
from serving.engine import NonFiniteEmbeddingError, SearchEngine
from serving.limits import BodySizeLimitMiddleware
from serving.settings import ServeSettings

__all__ = ["create_app", "serve"]

logger = logging.getLogger(__name__)

TITLE = "retrieval-engine"
#: Allowance for multipart framing and the small form fields on top of the image itself.
_MULTIPART_OVERHEAD = 64 * 1024


def create_app(settings: ServeSettings, engine: SearchEngine | None = None) -> FastAPI:
    """Build the FastAPI application for ``settings`` (the engine is opened when the server starts).

    An already opened ``engine`` may be handed in (the CLI opens it first to report errors cleanly);
    the app then uses it instead of opening a second one, and closes it at shutdown.

    Routes (see the OpenAPI document at ``/openapi.json`` and the docs at ``/docs``): ``POST /v1/search``,
    ``POST /v1/search/embedding``, ``GET /v1/index``, ``GET /metrics`` (these need the API key when one is
    set), ``GET /v1/healthz``, ``GET /v1/readyz``, ``GET /docs``, and the search page's routes.
    """
    app = FastAPI(
        title=TITLE,
        version="1",
        description="Image retrieval: upload a photo (or an on-device embedding), get the most similar gallery items.",
        lifespan=partial(_lifespan, settings=settings, engine=engine),
        docs_url=None,  # FastAPI's pages load Swagger UI / ReDoc from a CDN; serving.api.docs serves it locally
        redoc_url=None,
    )
    key = settings.api_key.get_secret_value().encode("utf-8") if settings.api_key is not None else None
    app.state.settings = settings
    app.state.api_key = key
    app.state.engine = None
    app.state.batcher = None
    app.state.query_gate = None
    app.state.decode_gate = None
    app.state.ready = False
    app.state.not_ready_reason = None
    app.state.metrics = metrics = ApiMetrics()
    auth = api_key_dependencies(key is not None)

    app.include_router(health_router())
    app.include_router(index_router(auth))
    app.include_router(search_router(settings, auth))
    app.include_router(metrics_router(auth))
    app.include_router(docs_router(TITLE))
    _include_page(app, auth)

    install_error_handlers(app, [settings.index, settings.query_encoder])
    max_bytes = settings.max_upload_bytes
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=max_bytes + _MULTIPART_OVERHEAD, upload_limit=max_bytes)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "X-API-Key"],
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: times and counts every answer
    return app


def _include_page(app: FastAPI, auth: list) -> None:
    """The search page (``/``, ``/static``; open) and item thumbnails (behind the API key)."""
    from serving.api.page import items_router, page_router

    app.include_router(page_router)
    app.include_router(items_router, dependencies=auth)


@asynccontextmanager
async def _lifespan(app: FastAPI, settings: ServeSettings, engine: SearchEngine | None) -> AsyncIterator[None]:
    """Open the engine (unless handed in), start the batcher, warm up in the background; undo it all at shutdown."""
    opened = engine or await anyio.to_thread.run_sync(
        partial(
            SearchEngine.open,
            settings.index,
            settings.query_encoder,
            runtime=settings.runtime,
            backend_options=settings.backend_options(),
            **settings.runtime_options(),
        )
    )
    logger.info("serving %r", opened)
    batcher = MicroBatcher(
        partial(answer_image_queries, opened),
        max_size=settings.batch_max_size,
        max_wait_s=settings.batch_max_wait_ms / 1000.0,
        on_batch=app.state.metrics.batch_size.observe,
    )
    batcher.start()
    app.state.query_gate = AdmissionGate(
        settings.query_concurrency, settings.max_queued_queries, settings.queue_timeout_s, "image queries"
    )
    # every query holding a place may decode, so the decode gate needs no queue bound of its own
    app.state.decode_gate = AdmissionGate(
        settings.decode_concurrency, settings.query_concurrency, settings.queue_timeout_s, "decodes"
    )
    app.state.engine = opened
    app.state.batcher = batcher
    warming = asyncio.get_running_loop().create_task(_warm_up(app, opened, settings.warmup))
    try:
        yield
    finally:
        app.state.ready = False
        warming.cancel()
        await asyncio.gather(warming, return_exceptions=True)
        await batcher.aclose()
        app.state.engine = None
        app.state.batcher = None
        opened.close()


async def _warm_up(app: FastAPI, engine: SearchEngine, enabled: bool) -> None:
    """Run one query through encoder and index (so the first client does not pay for it), then mark ready."""
    if enabled:
        try:
            await anyio.to_thread.run_sync(engine.warm_up)
        except NonFiniteEmbeddingError as exc:  # a corrupt model: say so on /v1/readyz (the message names no path)
            logger.error("the warm-up query failed: %s; /v1/readyz stays 503", exc)
            app.state.not_ready_reason = f"the warm-up query failed: {exc}"
            return
        except Exception:
            logger.exception("the warm-up query failed; /v1/readyz stays 503")
            app.state.not_ready_reason = "the warm-up query failed; see the server log"
            return
    app.state.ready = True


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

    from serving.memory import limit_malloc_arenas

    limit_malloc_arenas()  # before uvicorn's and ONNX Runtime's threads exist: RSS stays flat under load
    engine = SearchEngine.open(
        settings.index,
        settings.query_encoder,
        runtime=settings.runtime,
        backend_options=settings.backend_options(),
        **settings.runtime_options(),
    )
    uvicorn.run(
        create_app(settings, engine=engine), host=settings.host, port=settings.port, **settings.uvicorn_options()
    )
