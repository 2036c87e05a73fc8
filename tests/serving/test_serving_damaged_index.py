"""An index damaged under a running server: searches get a 500 JSON answer that says so, without server paths."""

from __future__ import annotations

import shutil

import httpx

from serving.api.server import running_server
from serving.app import create_app
from serving.settings import ServeSettings


def test_metadata_overwritten_under_a_running_server_is_a_clear_500(serving_index, serving_gallery, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(serving_index, index)
    image = (serving_gallery.parent / "img_0.png").read_bytes()
    with running_server(create_app(ServeSettings(index=index, warmup=False))) as url:
        assert httpx.post(f"{url}/v1/search", files={"image": ("q.png", image)}, timeout=30).status_code == 200
        database = index / "metadata.sqlite"
        database.write_bytes(bytes(b ^ 0x5A for b in database.read_bytes()))  # same inode, every byte changed
        answer = httpx.post(f"{url}/v1/search", files={"image": ("q.png", image)}, timeout=30)
    assert answer.status_code == 500
    detail = answer.json()["detail"]
    assert detail.startswith("the served index is damaged:") and "metadata.sqlite" in detail
    assert str(tmp_path) not in answer.text and "Traceback" not in answer.text
