"""Item thumbnails: ``serving.thumbnails`` itself, and ``GET /v1/items/{id}/thumbnail`` on a real uvicorn server."""

from __future__ import annotations

import io
import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from indexing import open_index_dir
from retrieval.data.datasets import CsvImageDataset
from serving.api.server import running_server
from serving.app import create_app
from serving.settings import ServeSettings
from serving.thumbnails import DEFAULT_SIZE, MAX_SIZE, MIN_SIZE, Thumbnailer, ThumbnailNotFoundError, make_thumbnail

API_KEY = "thumb-key"


@pytest.fixture(scope="module")
def gallery(serving_gallery) -> CsvImageDataset:
    return CsvImageDataset(serving_gallery)


@pytest.fixture(scope="module")
def broken_index(serving_index, serving_gallery, tmp_path_factory) -> Path:
    """A copy of the serving index whose metadata records, per item, a path that is not a plain image file.

    Item 0: a file that was moved away; 1: a directory; 2: a path relative to the index directory (present);
    3: no path; 4: a text file posing as a PNG; 5: a device; 6: the gallery's own file, unchanged.
    (The manifest's metadata checksum is recomputed after the edit, as an operator who means the change would
    with `retrieval index verify` on a manifest without it.)
    """
    root = tmp_path_factory.mktemp("broken_index")
    index = root / "index"
    shutil.copytree(serving_index, index)
    shutil.copy(serving_gallery.parent / "img_2.png", index / "img_2.png")
    (root / "not-an-image.png").write_text("hello")
    paths = {
        0: str(root / "moved-away.png"),
        1: str(root),
        2: "img_2.png",
        3: None,
        4: str(root / "not-an-image.png"),
        5: "/dev/zero",
    }
    _set_paths(index, paths)
    return index


def _set_paths(index: Path, paths: dict[int, str | None]) -> None:
    """Rewrite items' recorded paths in the metadata database and reseal the manifest's checksum of it."""
    from indexing.index_dir import file_sha256
    from indexing.manifest import Manifest

    with sqlite3.connect(index / "metadata.sqlite") as conn:
        conn.executemany("UPDATE items SET path = ? WHERE id = ?", [(p, i) for i, p in paths.items()])
    conn.close()
    manifest = Manifest.read(index / "manifest.json")
    manifest.metadata_sha256 = file_sha256(index / "metadata.sqlite")
    manifest.write(index / "manifest.json")


@pytest.fixture(scope="module")
def server(serving_index) -> Iterator[str]:
    with running_server(create_app(ServeSettings(index=serving_index, warmup=False))) as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=30) as c:
        yield c


def _decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    assert img.format == "JPEG"
    return img.convert("RGB")


def _mean_colour(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(axis=0)


# --- the module, without a server --------------------------------------------------------------------


def test_make_thumbnail_fits_the_box_keeps_the_aspect_and_never_enlarges(tmp_path):
    wide = tmp_path / "wide.png"
    Image.new("RGB", (300, 100), (10, 200, 30)).save(wide)
    data, width, height = make_thumbnail(wide, 60)
    img = _decode(data)
    assert img.size == (width, height) == (60, 20)
    assert np.allclose(_mean_colour(img), (10, 200, 30), atol=6)
    _, width, height = make_thumbnail(wide, MAX_SIZE)  # 300 px is less than the box: left as it is
    assert (width, height) == (300, 100)
    for size in (MIN_SIZE - 1, MAX_SIZE + 1, 0, True):
        with pytest.raises(ValueError, match="thumbnail size"):
            make_thumbnail(wide, size)


def test_transparency_becomes_white_and_exif_orientation_is_applied(tmp_path):
    clear = tmp_path / "clear.png"
    Image.new("RGBA", (40, 40), (255, 0, 0, 0)).save(clear)
    assert np.allclose(_mean_colour(_decode(make_thumbnail(clear, 40)[0])), (255, 255, 255), atol=3)

    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    Image.new("RGB", (80, 40), (0, 0, 255)).save(rotated, exif=exif)
    _, width, height = make_thumbnail(rotated, 80)
    assert (width, height) == (40, 80)


def test_thumbnails_match_the_gallery_images(serving_index, gallery):
    with open_index_dir(serving_index) as index:
        thumbnailer = Thumbnailer(index)
        for i in range(len(gallery)):
            original = Image.open(gallery.paths[i]).convert("RGB")
            thumb = thumbnailer.thumbnail(i, DEFAULT_SIZE)
            img = _decode(thumb.data)
            assert img.size == original.size == (48, 40)  # smaller than the box: not enlarged
            assert np.allclose(_mean_colour(img), _mean_colour(original), atol=4), i
            small = _decode(thumbnailer.thumbnail(i, 24).data)
            assert small.size == (24, 20)
            reference = np.asarray(original.resize((24, 20), Image.Resampling.LANCZOS), float)
            error = np.abs(np.asarray(small, float) - reference).mean()  # JPEG's chroma subsampling of the noise
            assert error < 20 and error < 0.5 * np.abs(reference[::-1, ::-1] - reference).mean(), i


def test_the_cache_answers_repeats_evicts_the_oldest_and_notices_a_changed_file(serving_index, gallery, tmp_path):
    index_copy = tmp_path / "index"
    shutil.copytree(serving_index, index_copy)
    image = tmp_path / "item0.png"
    Image.new("RGB", (32, 32), (200, 0, 0)).save(image)
    _set_paths(index_copy, {0: str(image)})
    with open_index_dir(index_copy) as index:
        thumbnailer = Thumbnailer(index, max_entries=2)
        first = thumbnailer.thumbnail(0, 32)
        assert thumbnailer.thumbnail(0, 32) is first
        assert (thumbnailer.hits, thumbnailer.misses) == (1, 1)
        thumbnailer.thumbnail(1, 32)
        thumbnailer.thumbnail(2, 32)  # evicts (0, 32), the least recently used
        assert thumbnailer.cached() == 2
        assert thumbnailer.thumbnail(0, 32) is not first and thumbnailer.misses == 4

        Image.new("RGB", (32, 32), (0, 0, 200)).save(image)  # replaced in place: new size or mtime
        stamp = image.stat().st_mtime_ns + 10**9
        os.utime(image, ns=(stamp, stamp))
        changed = thumbnailer.thumbnail(0, 32)
        assert changed.etag != first.etag
        assert _mean_colour(_decode(changed.data))[2] > 150  # blue now, not the cached red


def test_items_without_a_readable_file_are_not_found_without_naming_the_path(broken_index):
    root = str(broken_index.parent)
    with open_index_dir(broken_index) as index:
        thumbnailer = Thumbnailer(index)
        assert _decode(thumbnailer.thumbnail(2, 64).data).size == (48, 40)  # relative to the index directory
        assert thumbnailer.thumbnail(6, 64).width == 48
        expected = {
            0: "image file is not available",
            1: "not a readable file",
            3: "no image file recorded",
            4: "cannot be decoded",
            5: "not a readable file",
            9: "no item with id 9",
        }
        for item_id, message in expected.items():
            with pytest.raises(ThumbnailNotFoundError, match=message) as caught:
                thumbnailer.thumbnail(item_id, 64)
            assert root not in str(caught.value) and "/dev" not in str(caught.value)


# --- through the HTTP API ------------------------------------------------------------------------------


def test_thumbnail_route_serves_a_jpeg_of_each_hit(client, gallery):
    hits = client.post(
        "/v1/search", files={"image": ("q.png", Path(gallery.paths[4]).read_bytes(), "image/png")}, data={"k": "9"}
    ).json()["hits"]
    assert len(hits) == 9
    for hit in hits:
        response = client.get(hit["thumbnail_url"], params={"size": 32})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/jpeg"
        img = _decode(response.content)
        assert img.size == (32, 27)
        original = Image.open(gallery.paths[hit["id"]]).convert("RGB")
        assert np.allclose(_mean_colour(img), _mean_colour(original), atol=5)


def test_thumbnail_default_size_and_revalidation(client):
    response = client.get("/v1/items/3/thumbnail")
    assert response.status_code == 200 and _decode(response.content).size == (48, 40)
    etag = response.headers["etag"]
    again = client.get("/v1/items/3/thumbnail", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    other_size = client.get("/v1/items/3/thumbnail", params={"size": 20}, headers={"If-None-Match": etag})
    assert other_size.status_code == 200 and other_size.headers["etag"] != etag


@pytest.mark.parametrize("size", ["15", "513", "-1", "abc", "1e3"])
def test_thumbnail_size_out_of_bounds_is_422(client, size):
    response = client.get("/v1/items/0/thumbnail", params={"size": size})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "size"]


def test_unknown_or_invalid_item_ids(client):
    response = client.get("/v1/items/9/thumbnail")
    assert response.status_code == 404
    assert response.json() == {"detail": "no item with id 9 in the index"}
    for bad in ("-1", str(2**63), "x", "1.5"):
        response = client.get(f"/v1/items/{bad}/thumbnail")
        assert response.status_code == 422, bad
        assert response.json()["detail"][0]["loc"] == ["path", "item_id"]
    assert client.get("/v1/items/..%2F..%2Fetc%2Fpasswd/thumbnail").status_code in (404, 422)


def test_missing_files_are_404_with_path_free_details(broken_index):
    root = str(broken_index.parent)
    with (
        running_server(create_app(ServeSettings(index=broken_index, warmup=False))) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        assert client.get("/v1/items/2/thumbnail").status_code == 200
        for item_id in (0, 1, 3, 4, 5):
            response = client.get(f"/v1/items/{item_id}/thumbnail")
            assert response.status_code == 404, item_id
            detail = response.json()["detail"]
            assert detail.startswith(("no thumbnail for item", f"item {item_id} has no image")), detail
            assert root not in response.text and "/dev/" not in response.text and "Traceback" not in response.text


def test_thumbnails_need_the_api_key_when_one_is_set(serving_index):
    settings = ServeSettings(index=serving_index, api_key=API_KEY, warmup=False)
    with running_server(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as client:
        for headers in ({}, {"X-API-Key": "wrong"}):
            response = client.get("/v1/items/0/thumbnail", headers=headers)
            assert response.status_code == 401
            assert response.json() == {"detail": "missing or invalid API key"}
        response = client.get("/v1/items/0/thumbnail", headers={"X-API-Key": API_KEY})
        assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
