"""The search page: its routes and assets over HTTP, then end to end in headless Chromium against a real server.

The browser tests drive Debian's ``chromium`` through Python ``playwright`` (no browser download) and skip,
saying why, where either is missing. Each keeps a screenshot as a test artifact, in ``$RETRIEVAL_TEST_ARTIFACTS``
or else ``tests/artifacts/`` (created by the test, with a ``.gitignore`` that keeps it out of git).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from retrieval.data.datasets import CsvImageDataset
from serving.api.page import ASSETS
from serving.api.server import running_server
from serving.app import create_app
from serving.settings import ServeSettings

API_KEY = "page-test-key"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STATIC = Path(__file__).resolve().parents[2] / "serving" / "static"


@pytest.fixture(scope="module")
def gallery(serving_gallery) -> CsvImageDataset:
    return CsvImageDataset(serving_gallery)


@pytest.fixture(scope="module")
def server(calibrated_index) -> Iterator[str]:
    with running_server(create_app(ServeSettings(index=calibrated_index, max_k=50))) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_server(calibrated_index) -> Iterator[str]:
    with running_server(create_app(ServeSettings(index=calibrated_index, api_key=API_KEY))) as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=30) as c:
        yield c


# --- routes and assets -------------------------------------------------------------------------------


def test_page_and_assets_are_served_with_a_strict_policy(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    referenced = re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text)
    assert sorted(referenced) == ["/static/app.js", "/static/favicon.svg", "/static/style.css"]
    for url in referenced:
        response = client.get(url)
        assert response.status_code == 200, url
        assert response.headers["content-type"] == ASSETS[url.rsplit("/", 1)[1]]
        assert response.content == (STATIC / url.rsplit("/", 1)[1]).read_bytes()


def test_assets_need_nothing_from_outside(client):
    for name in ASSETS:
        text = client.get(f"/static/{name}").text
        text = text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # the SVG namespace is a name, not a fetch
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text, re.IGNORECASE), name
        assert "<script>" not in text and " style=" not in text and "innerHTML" not in text, name


def test_only_the_listed_assets_are_served(client):
    for path in ("/static/nope.js", "/static/..%2Fapp.py", "/static/%2E%2E%2Fsettings.py", "/static/"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "serving" not in response.text and "Traceback" not in response.text
    assert client.get("/static/../app.py").status_code == 404  # httpx normalises it to /app.py


def test_the_page_calls_only_routes_the_app_has(calibrated_index):
    paths = create_app(ServeSettings(index=calibrated_index)).openapi()["paths"]
    script = (STATIC / "app.js").read_text()
    assert set(re.findall(r'"(/v1/[a-z/]+)"', script)) == {"/v1/index", "/v1/search"}
    assert "get" in paths["/v1/index"] and "post" in paths["/v1/search"]
    assert "get" in paths["/v1/items/{item_id}/thumbnail"]  # the page shows each hit's thumbnail_url


def test_the_page_is_open_but_the_api_needs_the_key(keyed_server):
    with httpx.Client(base_url=keyed_server, timeout=30) as client:
        assert client.get("/").status_code == 200
        assert client.get("/static/app.js").status_code == 200
        assert client.get("/v1/index").status_code == 401
        assert client.get("/v1/items/0/thumbnail").status_code == 401


# --- end to end in headless Chromium -------------------------------------------------------------------


def _chromium() -> str | None:
    if os.path.exists("/usr/bin/chromium"):
        return "/usr/bin/chromium"
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = _chromium()
    if executable is None:
        pytest.skip("no chromium browser installed (Debian: apt-get install chromium); the page test needs one")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("python playwright is not installed (pip install -e '.[dev]'); the page test needs it")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def artifact_dir() -> Path:
    """Where screenshots go: ``$RETRIEVAL_TEST_ARTIFACTS``, else ``tests/artifacts`` (git-ignored by its own file)."""
    configured = os.environ.get("RETRIEVAL_TEST_ARTIFACTS")
    folder = Path(configured) if configured else Path(__file__).resolve().parents[1] / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    if not configured and not (folder / ".gitignore").exists():
        (folder / ".gitignore").write_text("*\n")
    return folder


@pytest.fixture
def page(browser, request) -> Iterator[Any]:
    """A fresh page (own storage) that records console errors and every URL it requests."""
    context = browser.new_context(viewport={"width": 1100, "height": 820})
    page = context.new_page()
    page.set_default_timeout(20_000)
    page.console_errors = []
    page.requested = []
    page.on("console", lambda msg: msg.type == "error" and page.console_errors.append(msg.text))
    page.on("pageerror", lambda exc: page.console_errors.append(str(exc)))
    page.on("request", lambda req: page.requested.append(req.url))
    yield page
    context.close()


def _expected_hits(base_url: str, image: Path, k: int, granularity: str | None, key: str | None = None) -> dict:
    data = {"k": str(k), **({"granularity": granularity} if granularity else {})}
    headers = {"X-API-Key": key} if key else {}
    response = httpx.post(
        f"{base_url}/v1/search",
        files={"image": (image.name, image.read_bytes(), "image/png")},
        data=data,
        headers=headers,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.json()


_THUMBNAILS_LOADED = """() => {
    const imgs = [...document.querySelectorAll('#results img')];
    return imgs.length > 0 && imgs.every((img) => img.complete && img.naturalWidth > 0);
}"""


def _wait_for_results(page: Any) -> None:
    page.wait_for_selector("#results .card, #results .empty")
    page.wait_for_function("() => !document.getElementById('search-form').hasAttribute('aria-busy')")


def test_search_page_end_to_end(page, server, gallery):
    levels = httpx.get(f"{server}/v1/index", timeout=30).json()["granularities"]
    assert len(levels) >= 2, levels
    level = levels[1]  # a middle level: more than the item itself, less than everything
    query = Path(gallery.paths[0])

    page.goto(f"{server}/")
    page.wait_for_function("() => document.querySelectorAll('#granularity option').length > 1")
    options = page.eval_on_selector_all("#granularity option", "opts => opts.map((o) => o.value)")
    assert options == ["", *levels]
    assert "9 items" in page.inner_text("#index-info")
    page.select_option("#granularity", level)
    page.fill("#k", "6")
    page.set_input_files("#image-input", str(query))
    _wait_for_results(page)
    page.wait_for_function(_THUMBNAILS_LOADED)

    expected = _expected_hits(server, query, 6, level)["hits"]
    assert 1 <= len(expected) <= 6
    cards = page.locator("#results .card")
    assert cards.count() == len(expected)
    assert [int(cards.nth(i).get_attribute("data-id")) for i in range(len(expected))] == [h["id"] for h in expected]
    first = cards.nth(0)
    assert first.locator(".score").inner_text() == f"{expected[0]['score']:.3f}"
    assert first.locator(".level").inner_text() == expected[0]["level"]
    assert first.locator(".labels").inner_text().split() == [w for kv in expected[0]["labels"].items() for w in kv]
    assert first.locator("img").get_attribute("alt") == f"Gallery item {expected[0]['id']}: {query.name}"
    widths = page.eval_on_selector_all("#results img", "imgs => imgs.map((img) => img.naturalWidth)")
    assert widths == [48] * len(expected)  # the gallery images are 48x40: thumbnails are not enlarged
    assert f"{len(expected)} hit" in page.inner_text("#status") and f"granularity {level}" in page.inner_text("#status")
    assert page.is_visible("#query-preview") and page.is_hidden("#error")

    page.screenshot(path=str(artifact_dir() / "search-page.png"), full_page=True)
    assert page.console_errors == []
    assert all(url.startswith(server) or url.startswith("blob:") for url in page.requested), page.requested

    page.select_option("#granularity", "")  # back to plain k-NN: the search reruns with k=6 hits
    page.wait_for_function("() => document.querySelectorAll('#results .card').length === 6")
    assert page.locator("#results .card").nth(0).locator(".score").inner_text() == "1.000"


def test_search_page_shows_api_errors_as_text(page, server, tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("not an image at all")
    page.goto(f"{server}/")
    page.wait_for_function("() => document.querySelectorAll('#granularity option').length > 1")
    page.set_input_files("#image-input", str(notes))
    page.wait_for_selector("#error:not([hidden])")
    assert page.inner_text("#error").startswith("cannot read image notes.png")
    assert page.locator("#results .card").count() == 0

    page.set_input_files("#image-input", str(Path(__file__)))  # text/x-python: refused before any request
    page.wait_for_function("() => document.getElementById('error').textContent.includes('is not an image')")

    page.fill("#k", "0")  # the server's validation error (a list of {loc, msg}) is shown readably
    page.set_input_files("#image-input", str(_a_png(tmp_path)))
    page.wait_for_function("() => document.getElementById('error').textContent.startsWith('k:')")
    assert "greater than or equal to 1" in page.inner_text("#error")


def _a_png(folder: Path) -> Path:
    from PIL import Image

    path = folder / "grey.png"
    Image.new("RGB", (32, 32), (128, 128, 128)).save(path)
    return path


def test_search_page_sends_the_api_key_and_keeps_it(page, keyed_server, gallery):
    page.goto(f"{keyed_server}/")
    page.wait_for_function("() => document.getElementById('index-info').textContent.includes('API key')")
    assert "missing or invalid API key" in page.inner_text("#index-info")

    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("() => document.querySelectorAll('#granularity option').length > 1")
    page.set_input_files("#image-input", gallery.paths[3])
    _wait_for_results(page)
    page.wait_for_function(_THUMBNAILS_LOADED)  # fetched with the key, shown through blob: URLs
    sources = page.eval_on_selector_all("#results img", "imgs => imgs.map((img) => img.src)")
    assert sources and all(src.startswith("blob:") for src in sources)
    expected = _expected_hits(keyed_server, Path(gallery.paths[3]), 12, None, key=API_KEY)["hits"]
    assert page.locator("#results .card").count() == len(expected) == 9
    page.screenshot(path=str(artifact_dir() / "search-page-api-key.png"), full_page=True)

    page.reload()
    assert page.input_value("#api-key") == API_KEY  # kept in localStorage
    page.wait_for_function("() => document.querySelectorAll('#granularity option').length > 1")
    # the only console errors are the browser's notes on the 401 answers before the key was typed
    assert all("401" in error for error in page.console_errors), page.console_errors


def test_search_page_scales_large_photos_down_before_upload(page, server, tmp_path):
    """A 3000x2000 photo leaves the browser as a JPEG of at most 800 px a side; small images go untouched."""
    import io

    from PIL import Image

    big = tmp_path / "big.png"
    Image.linear_gradient("L").resize((3000, 2000)).convert("RGB").save(big)
    small = _a_png(tmp_path)
    bodies: list[bytes] = []

    def capture(route: Any) -> None:
        bodies.append(route.request.post_data_buffer)
        route.continue_()

    page.route("**/v1/search", capture)
    page.goto(f"{server}/")
    page.wait_for_function("() => document.querySelectorAll('#granularity option').length > 1")
    for path in (big, small):
        with page.expect_response("**/v1/search") as answer:
            page.set_input_files("#image-input", str(path))
        assert answer.value.status == 200
        _wait_for_results(page)
    assert len(bodies) == 2 and page.console_errors == []
    start = bodies[0].index(b"\xff\xd8\xff")  # the JPEG inside the multipart body
    sent = Image.open(io.BytesIO(bodies[0][start:]))
    assert sent.format == "JPEG" and max(sent.size) == 800 and sent.size[0] / sent.size[1] == pytest.approx(1.5, 0.01)
    # Below the limit the file itself is sent (Chromium leaves a file's bytes out of the intercepted body).
    assert b"Content-Type: image/png" in bodies[1] and b"\xff\xd8\xff" not in bodies[1]
