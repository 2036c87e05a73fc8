"""The search page (``GET /``, ``GET /static/{asset}``) and item thumbnails (``GET /v1/items/{id}/thumbnail``).

The page is a plain client of the public API: static files (HTML, JavaScript, CSS, an icon) shipped
in the ``serving`` package, with no framework, CDN or build step, so it works on an offline server.
It reads ``GET /v1/index`` for the granularities, posts the photo to ``POST /v1/search`` and shows
each hit's ``thumbnail_url``. ``page_router`` needs no API key (a browser must load the page to
type one); ``items_router`` reveals gallery content, so ``create_app`` mounts it behind the key.

Only the assets listed in ``ASSETS`` are served, looked up by exact name, so a request cannot
reach any other file. Thumbnails are made in the thread pool (decoding is CPU work) by a
``serving.thumbnails.Thumbnailer`` kept on ``app.state`` beside the engine it belongs to.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from serving.api.deps import get_engine
from serving.api.schemas import ErrorBody
from serving.engine import SearchEngine
from serving.thumbnails import DEFAULT_SIZE, MAX_SIZE, MIN_SIZE, Thumbnailer, ThumbnailNotFoundError

__all__ = ["ASSETS", "CONTENT_SECURITY_POLICY", "items_router", "page_router"]

#: The page's files and their media types; nothing else under ``serving/static`` is served.
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
#: Scripts and styles from this server only (no inline code, so an injected string cannot run); thumbnails
#: fetched with the API key are shown through ``blob:`` URLs, the query preview too.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
_PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate, so a server upgrade never mixes old and new assets
}
#: Largest item id: ids are SQLite/FAISS int64.
_MAX_ID = 2**63 - 1


@cache
def _asset(name: str) -> bytes:
    return resources.files("serving").joinpath("static", name).read_bytes()


def _asset_response(name: str) -> Response:
    return Response(content=_asset(name), media_type=ASSETS[name], headers=_PAGE_HEADERS)


def _build_page_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/", response_class=HTMLResponse)
    async def search_page() -> Response:
        return _asset_response("index.html")

    @router.get("/static/{asset}")
    async def static_asset(asset: str) -> Response:
        if asset not in ASSETS:
            raise HTTPException(status_code=404, detail="no such page asset")
        return _asset_response(asset)

    return router


def _thumbnailer(request: Request, engine: SearchEngine) -> Thumbnailer:
    """The app's thumbnailer for ``engine``'s index, made on first use (in the event loop, so without races)."""
    current: Thumbnailer | None = getattr(request.app.state, "thumbnailer", None)
    if current is None or current.index_dir is not engine.index_dir:
        current = Thumbnailer(engine.index_dir)
        request.app.state.thumbnailer = current
    return current


def _build_items_router() -> APIRouter:
    router = APIRouter(prefix="/v1/items", tags=["items"])

    @router.get(
        "/{item_id}/thumbnail",
        summary="Thumbnail of an indexed image",
        response_class=Response,
        responses={
            200: {"content": {"image/jpeg": {}}, "description": "a JPEG, longest side at most `size` pixels"},
            304: {"description": "not modified (the `If-None-Match` tag is current)"},
            401: {"model": ErrorBody, "description": "missing or invalid API key (when the server has one)"},
            404: {"model": ErrorBody, "description": "unknown id, or no readable image file for the item"},
        },
    )
    async def item_thumbnail(
        request: Request,
        engine: Annotated[SearchEngine, Depends(get_engine)],
        item_id: Annotated[int, Path(ge=0, le=_MAX_ID, description="the item's id, as in a hit's `id`")],
        size: Annotated[
            int, Query(ge=MIN_SIZE, le=MAX_SIZE, description="longest side in pixels (never enlarged)")
        ] = DEFAULT_SIZE,
    ) -> Response:
        thumbnailer = _thumbnailer(request, engine)
        try:
            thumb = await run_in_threadpool(thumbnailer.thumbnail, item_id, size)
        except ThumbnailNotFoundError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        headers = {"ETag": thumb.etag, "Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"}
        if thumb.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(content=thumb.data, media_type="image/jpeg", headers=headers)

    return router


page_router = _build_page_router()
items_router = _build_items_router()
