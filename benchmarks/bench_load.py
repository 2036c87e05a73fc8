"""The server under sustained load and under pixel bombs: errors, latency and memory of a real ``retrieval serve``.

Usage:
    python benchmarks/bench_load.py [--index DIR --query-encoder MODEL.onnx] [--requests 10000]
        [--concurrency 32] [--idle-every 25 --idle-s 5.0] [--serve-arg=--keep-alive-s=5] [--json]
    python benchmarks/bench_load.py --bombs 4        # 4 concurrent 13000x13000 PNG uploads instead

Without ``--index``, the index and ONNX model are built in a temporary directory with
``benchmarks/bench_http.py``'s helpers (a random resnet10t at 224 px, a seeded 64-image Flat index), and the
query is its 640x480 JPEG. ``retrieval serve`` runs as a subprocess on 127.0.0.1, so its memory
(``/proc/<pid>/status``: VmRSS now, VmHWM the peak) is the server's alone.

Load run: ``--concurrency`` threads share one ``httpx.Client`` whose pool keeps up to ``--concurrency``
connections alive and reuses them, as services calling the API do. httpx's pool expires idle connections after
5 s, uvicorn's default keep-alive is 5 s too; to give the race between the two a chance, every worker pauses
``--idle-s`` (+-2%) after every ``--idle-every`` requests, so its connection sits idle about as long as both
timeouts before being reused. Reported: connection errors (the request never got an answer: resets, read
errors) apart from 503s (refused by admission control) and other statuses, p50/p99 of all requests, requests/s
(idle pauses excluded from the wall time is not attempted: rps is requests over wall time), and the server's RSS
after ``--warmup`` requests and at the end. Targets: 0 errors, RSS growth < 10%.

Bomb run (``--bombs N``): N concurrent uploads of a 13000x13000 greyscale PNG (about 160 KB: it passes the upload
size limit and Pillow's bomb guard, 169 MP < 179 MP); reports each status and the server's peak RSS before and
after.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_http import _build_artifacts, _query_jpeg  # noqa: E402

from serving.api.server import serve_process  # noqa: E402

TARGET_RSS_GROWTH = 0.10


def bomb_png(width: int = 13000, height: int = 13000) -> bytes:
    """A black 8-bit greyscale PNG of ``width`` x ``height``, compressed row by row (never held decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    parts = [compressor.compress(row * min(256, height - start)) for start in range(0, height, 256)]
    idat = b"".join(parts) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of process ``pid`` in KiB, from ``/proc``."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def load_run(url: str, pid: int, jpeg: bytes, args: argparse.Namespace) -> dict[str, Any]:
    """``args.requests`` searches from ``args.concurrency`` threads over one pooled keep-alive client."""
    import httpx

    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    client = httpx.Client(base_url=url, timeout=60, limits=limits)
    files = {"image": ("q.jpg", jpeg, "image/jpeg")}
    _phase(client, files, args.warmup, args.concurrency, 0, 0.0)  # at full concurrency: every thread's buffers exist
    rss_start = memory_kib(pid)
    start = time.perf_counter()
    counts, error_kinds, times = _phase(client, files, args.requests, args.concurrency, args.idle_every, args.idle_s)
    wall = time.perf_counter() - start
    client.close()
    rss_end = memory_kib(pid)
    ms = np.asarray(times) * 1000.0
    return {
        "requests": args.requests,
        "concurrency": args.concurrency,
        **counts,
        "connection_error_kinds": error_kinds,
        "errors": counts["connection_errors"] + counts["503"] + counts["other_status"],
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "rps": args.requests / wall,
        "wall_s": wall,
        "rss_after_warmup_mib": rss_start["VmRSS"] / 1024,
        "rss_end_mib": rss_end["VmRSS"] / 1024,
        "rss_growth": rss_end["VmRSS"] / rss_start["VmRSS"] - 1.0,
        "peak_rss_mib": rss_end["VmHWM"] / 1024,
    }


def _phase(
    client: Any, files: dict, requests: int, concurrency: int, idle_every: int, idle_s: float
) -> tuple[dict[str, int], dict[str, int], list[float]]:
    """``requests`` searches spread over ``concurrency`` threads sharing ``client``: counts, error kinds, latencies."""
    import httpx

    counts = {"ok": 0, "503": 0, "other_status": 0, "connection_errors": 0}
    error_kinds: dict[str, int] = {}
    times: list[float] = []
    lock = threading.Lock()
    per_worker = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]

    def worker(index: int, count: int) -> None:
        rng = random.Random(index)
        mine: list[float] = []
        local = dict.fromkeys(counts, 0)
        kinds: dict[str, int] = {}
        for n in range(count):
            if idle_every and n and n % idle_every == 0:
                time.sleep(idle_s * rng.uniform(0.98, 1.02))
            start = time.perf_counter()
            try:
                status = client.post("/v1/search", files=files, data={"k": "10"}).status_code
            except httpx.TransportError as exc:
                local["connection_errors"] += 1
                kinds[type(exc).__name__] = kinds.get(type(exc).__name__, 0) + 1
                continue
            finally:
                mine.append(time.perf_counter() - start)
            local["ok" if status == 200 else "503" if status == 503 else "other_status"] += 1
        with lock:
            times.extend(mine)
            for key, value in local.items():
                counts[key] += value
            for key, value in kinds.items():
                error_kinds[key] = error_kinds.get(key, 0) + value

    threads = [threading.Thread(target=worker, args=(i, n)) for i, n in enumerate(per_worker) if n]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return counts, error_kinds, times


def bomb_run(url: str, pid: int, count: int) -> dict[str, Any]:
    """``count`` concurrent uploads of the 13000x13000 PNG; statuses, times, and the server's peak RSS."""
    import httpx

    png = bomb_png()
    before = memory_kib(pid)
    outcomes: list[Any] = [None] * count

    def send(i: int) -> None:
        start = time.perf_counter()
        try:
            response = httpx.post(f"{url}/v1/search", files={"image": ("bomb.png", png, "image/png")}, timeout=120)
            outcomes[i] = {"status": response.status_code, "detail": response.json().get("detail")}
        except (httpx.TransportError, ValueError) as exc:
            outcomes[i] = {"status": None, "detail": repr(exc)}
        outcomes[i]["seconds"] = round(time.perf_counter() - start, 2)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = memory_kib(pid)
    return {
        "bomb_png_bytes": len(png),
        "outcomes": outcomes,
        "peak_rss_before_mib": before["VmHWM"] / 1024,
        "peak_rss_after_mib": after["VmHWM"] / 1024,
        "rss_after_mib": after["VmRSS"] / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, help="an index directory (default: build one)")
    parser.add_argument("--query-encoder", type=Path, help="the .onnx query encoder for --index")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=200, help="requests before the first RSS reading")
    parser.add_argument("--idle-every", type=int, default=25, help="pause after this many requests (0: never)")
    parser.add_argument("--idle-s", type=float, default=5.0, help="length of a pause (+-2%%)")
    parser.add_argument("--bombs", type=int, default=0, help="run this many concurrent PNG bombs instead")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra argument for retrieval serve")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if (args.index is None) != (args.query_encoder is None):
        parser.error("give --index and --query-encoder together, or neither")

    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        index, onnx = args.index, args.query_encoder
        if index is None:
            index, onnx = _build_artifacts(Path(tmp), "resnet10t", 224, 64)
        serve_args = ["--index", str(index), "--query-encoder", str(onnx), *args.serve_arg]
        with serve_process(serve_args, cwd=str(ROOT)) as (url, process):
            if args.bombs:
                report = {"bombs": bomb_run(url, process.pid, args.bombs)}
            else:
                report = {"load": load_run(url, process.pid, _query_jpeg(), args)}
    report["machine"] = {"cpus": os.cpu_count(), "serve_args": args.serve_arg}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    _print(report)


def _print(report: dict[str, Any]) -> None:
    if "bombs" in report:
        bombs = report["bombs"]
        for outcome in bombs["outcomes"]:
            print(f"bomb ({bombs['bomb_png_bytes']} bytes): {outcome}")
        before, after = bombs["peak_rss_before_mib"], bombs["peak_rss_after_mib"]
        print(f"server peak RSS: {before:.0f} MiB before, {after:.0f} MiB after")
        return
    load = report["load"]
    print(f"{load['requests']} requests at concurrency {load['concurrency']}: {load['ok']} ok, {load['503']} x 503, "
          f"{load['other_status']} other statuses, {load['connection_errors']} connection errors "
          f"{load['connection_error_kinds'] or ''}")  # fmt: skip
    print(f"p50 {load['p50_ms']:.1f} ms  p99 {load['p99_ms']:.1f} ms  {load['rps']:.1f} req/s "
          f"over {load['wall_s']:.0f} s")  # fmt: skip
    growth = load["rss_growth"]
    verdict = "meets" if growth < TARGET_RSS_GROWTH and load["errors"] == 0 else "misses"
    print(f"server RSS {load['rss_after_warmup_mib']:.0f} -> {load['rss_end_mib']:.0f} MiB ({growth:+.1%}), peak "
          f"{load['peak_rss_mib']:.0f} MiB; {verdict} the targets (0 errors, "
          f"RSS growth < {TARGET_RSS_GROWTH:.0%})")  # fmt: skip


if __name__ == "__main__":
    main()
