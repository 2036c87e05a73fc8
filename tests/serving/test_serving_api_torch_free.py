"""A server whose query encoder is an ``.onnx`` file never imports torch: start it, query it, look."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from isolated_python import run_isolated

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import httpx
    from serving.api.server import running_server
    from serving.app import create_app
    from serving.settings import ServeSettings

    index, onnx, image = sys.argv[1:4]
    app = create_app(ServeSettings(index=index, query_encoder=onnx))
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        with open(image, "rb") as fh:
            search = client.post("/v1/search", files={"image": ("q.png", fh.read(), "image/png")})
        info = client.get("/v1/index").json()
    print(json.dumps({
        "search": search.status_code,
        "first": search.json()["hits"][0]["id"],
        "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")),
        "count": info["count"],
    }))
    """
)


def test_an_onnx_server_runs_without_torch(serving_index, serving_onnx, serving_gallery):
    image = Path(serving_gallery).parent / "img_4.png"
    done = run_isolated(["-c", SCRIPT, str(serving_index), str(serving_onnx), str(image)])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["search"] == 200 and report["first"] == 4 and report["count"] == 9
    assert report["torch"] == [], f"torch was imported: {report['torch'][:5]}"
