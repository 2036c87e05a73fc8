"""Interactive API docs (Swagger UI) served from the installed ``swagger-ui-bundle`` package.

FastAPI's default ``/docs`` and ``/redoc`` pages load their JavaScript and CSS from a CDN, which
fails on an offline or air-gapped server and leaks every docs visit to a third party. These routes
serve the same Swagger UI from local files; ``create_app`` turns the default pages off.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

__all__ = ["DOCS_ASSETS", "DOCS_PATH", "docs_router"]

DOCS_PATH = "/docs"
DOCS_ASSETS = "/docs/assets"
#: The only files served from the bundle, with their media types.
_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}


def _bundle_dir() -> Path:
    from swagger_ui_bundle import swagger_ui_path

    return Path(swagger_ui_path)


def docs_router(title: str, openapi_url: str = "/openapi.json") -> APIRouter:
    """``GET /docs`` (the Swagger UI page) and ``GET /docs/assets/{name}`` (its script, style sheet and icon)."""
    router = APIRouter(include_in_schema=False)

    @router.get(DOCS_PATH)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{title} - API docs",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
        )

    @router.get(DOCS_ASSETS + "/{name}")
    async def swagger_asset(name: str) -> FileResponse:
        media_type = _ASSETS.get(name)
        if media_type is None:
            raise HTTPException(status_code=404, detail="no such docs asset")
        return FileResponse(_bundle_dir() / name, media_type=media_type)

    return router
