"""Admission control (``serving.admission``) and the server timeouts (``ServeSettings.uvicorn_options``)."""

from __future__ import annotations

import asyncio
import http.client
import time

import pytest

from serving.admission import AdmissionGate, OverloadedError
from serving.api.server import running_server
from serving.app import create_app
from serving.settings import DEFAULT_KEEP_ALIVE_S, ServeSettings


def test_gate_admits_in_order_and_refuses_beyond_the_queue():
    async def scenario() -> tuple[list[str], int]:
        gate = AdmissionGate(limit=2, max_waiting=2, wait_s=5.0)
        order: list[str] = []
        release = asyncio.Event()

        async def hold(name: str) -> None:
            async with gate.slot():
                order.append(name)
                await release.wait()

        tasks = [asyncio.create_task(hold(f"q{i}")) for i in range(4)]  # 2 run, 2 wait
        await asyncio.sleep(0.05)
        assert (gate.active, gate.waiting) == (2, 2)
        with pytest.raises(OverloadedError, match="2 waiting"):  # the fifth finds the queue full: refused at once
            async with gate.slot():
                pass
        release.set()
        await asyncio.gather(*tasks)
        return order, gate.refused

    order, refused = asyncio.run(scenario())
    assert order == ["q0", "q1", "q2", "q3"] and refused == 1


def test_gate_refuses_after_waiting_too_long():
    async def scenario() -> float:
        gate = AdmissionGate(limit=1, max_waiting=5, wait_s=0.2)
        async with gate.slot():
            start = time.perf_counter()
            with pytest.raises(OverloadedError, match=r"within 0\.2 s"):
                async with gate.slot():
                    pass
            waited = time.perf_counter() - start
        async with gate.slot():  # the refused waiter left no place taken
            assert gate.active == 1 and gate.waiting == 0
        return waited

    assert 0.15 < asyncio.run(scenario()) < 2.0


def test_settings_defaults_and_environment(monkeypatch, tmp_path):
    settings = ServeSettings(index=tmp_path)
    assert settings.keep_alive_s == DEFAULT_KEEP_ALIVE_S == 75 and settings.max_image_pixels == 50_000_000
    assert settings.query_concurrency >= 1 and settings.decode_concurrency >= 1
    assert settings.uvicorn_options()["timeout_keep_alive"] == 75
    monkeypatch.setenv("RETRIEVAL_KEEP_ALIVE_S", "9")
    monkeypatch.setenv("RETRIEVAL_MAX_QUEUED_QUERIES", "3")
    monkeypatch.setenv("RETRIEVAL_MAX_CONCURRENT_QUERIES", "2")
    monkeypatch.setenv("RETRIEVAL_MAX_IMAGE_MP", "1.5")
    settings = ServeSettings(index=tmp_path)
    assert (settings.keep_alive_s, settings.max_queued_queries, settings.query_concurrency) == (9, 3, 2)
    assert settings.max_image_pixels == 1_500_000


def _reused_after_idle(url: str, idle_s: float) -> bool:
    """Whether a keep-alive connection still answers after ``idle_s`` of silence (False: the server closed it)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/v1/healthz")
        assert conn.getresponse().read() == b'{"status":"ok"}'
        time.sleep(idle_s)
        try:
            conn.request("GET", "/v1/healthz")
            return conn.getresponse().status == 200
        except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
            return False
    finally:
        conn.close()


@pytest.mark.parametrize(("keep_alive_s", "reused"), [(1, False), (3, True)])
def test_keep_alive_is_configurable(serving_index, keep_alive_s, reused):
    settings = ServeSettings(index=serving_index, keep_alive_s=keep_alive_s, warmup=False)
    with running_server(create_app(settings), **settings.uvicorn_options()) as url:
        assert _reused_after_idle(url, 1.6) is reused
