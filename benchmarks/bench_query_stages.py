"""One image query through the server's own path, stage by stage: where the milliseconds of a search go.

Usage:
    python benchmarks/bench_query_stages.py [--sizes 10000,1000000] [--work-dir DIR] [--queries 200]
        [--images 640x480,4032x3024] [--torch] [--http-requests 100] [--threads N] [--k 10] [--json]

The budget (issue 14): no stage that is not the encoder or the search may take more than 10% of a query.

What runs: the AML student that serves queries (EfficientNet-B3 -> GeM -> 512-d at 300 px, random weights;
latency does not depend on them), saved, exported with ``serving.export.export_onnx`` and opened with the
served runtime (``OnnxRuntimeQueryEncoder``; ``--torch`` adds the PyTorch runtime). The gallery is
``bench_index.clustered_vectors`` (unit vectors in hierarchical clusters) with one metadata row per item (path,
three label levels, two extra fields), built as ``retrieval index build --factory auto`` builds: ``make_index``
(``choose_factory`` at run time, training, tuning to recall 0.95) and ``write_index_dir``, with calibrated-style
thresholds in the manifest so hits are tagged with a level. The index's encoder id is the student's
``teacher_id``, the pairing the engine checks. With ``--work-dir`` the student and every index directory are
kept there and reused by later runs (an index is rebuilt when ``choose_factory`` now picks another type).

Each query is timed stage by stage with the functions the server calls, in order (the server's
``answer_image_queries`` and ``build_response`` are these functions, chained):

- decode: ``ImageQuery.decoded`` (``decode_image_bytes`` with the server's pixel limit and draft size);
- preprocess: the runtime's ``prepare`` (resize, crop, normalise into the model's input batch);
- encode: the runtime's ``infer`` (the network, re-normalisation) and ``SearchEngine.checked_embeddings``;
- search: ``IndexDirectory.nearest`` (whitening when any, FAISS search, score check);
- join: ``IndexDirectory.join_metadata`` (SQLite lookup, hits, level tags);
- response: ``serving.api.search.build_response`` and its JSON (``model_dump_json``, what FastAPI sends).

Every query also runs once, in alternation, as one call of the server's ``answer_image_queries`` followed by
the response (``end to end``), so the stage sum can be checked against it. Then ``retrieval serve`` runs as
a real uvicorn process on 127.0.0.1 (as in ``bench_http.py``) and the same uploads go through
``POST /v1/search`` over one keep-alive connection, alternating with in-process end-to-end calls; the
difference of the medians is the HTTP share (multipart parsing, the framework, the loopback round trip).

The numbers are medians (p50) over ``--queries`` single queries cycling through 8 distinct photo-like
JPEGs per image size; shares are of the sum of the stage medians. The header prints the machine and its
load average: the numbers belong to that machine at that time.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_index import clustered_vectors  # noqa: E402

BUDGET_SHARE = 0.10
STAGES = ("decode", "preprocess", "encode", "search", "join", "response")
#: Stages the budget does not cap: the network and the vector search are the work itself.
UNCAPPED = ("encode", "search")
DIM = 512
TEACHER_ID = "bench-teacher-glam-resnet101"
LEVELS = ("fine", "middle", "coarse")
THRESHOLDS = {"fine": 0.85, "middle": 0.7, "coarse": 0.5}
DISTINCT_QUERIES = 8


def student_artifacts(work: Path, size: int) -> tuple[Path, Path]:
    """The student checkpoint and its ONNX export in ``work``, made once (random weights, seeded)."""
    checkpoint, onnx = work / "student", work / "student.onnx"
    if (checkpoint / "config.json").is_file() and onnx.is_file():
        return checkpoint, onnx
    import torch

    from models import Encoder, EncoderConfig, save_encoder
    from retrieval.data.preprocess import PreprocessConfig
    from serving.export import export_onnx

    torch.manual_seed(0)
    config = EncoderConfig(
        backbone="efficientnet_b3",
        embedding_dim=DIM,
        pooling="gem",
        preprocess=PreprocessConfig(input_size=size),
        teacher_id=TEACHER_ID,
    )
    student = Encoder(config).eval()
    save_encoder(student, checkpoint)
    export = export_onnx(checkpoint, onnx)
    print(f"# exported the student to {onnx} (parity cosine {export.min_cosine:.6f})", flush=True)
    return checkpoint, onnx


def gallery_rows(n: int) -> Iterator[Any]:
    """One metadata row per item, shaped like a product gallery's (path, three levels, SKU and URL)."""
    from indexing.metadata import MetadataRow

    for i in range(n):
        fine, middle, coarse = i // 10, i // 1000, i // 50_000
        yield MetadataRow(
            id=i,
            path=f"gallery/c{coarse:03d}/m{middle:05d}/{i:08d}.jpg",
            labels={"fine": f"item-{fine:07d}", "middle": f"kind-{middle:05d}", "coarse": f"category-{coarse:03d}"},
            extra={"sku": f"SKU-{i:08d}", "url": f"https://shop.example/p/{i:08d}"},
        )


def index_directory(work: Path, n: int, seed: int) -> Path:
    """The index directory of ``n`` clustered vectors in ``work``: reused when it holds what would be built now."""
    from indexing.builder import make_index
    from indexing.index_dir import MANIFEST_FILE, write_index_dir
    from indexing.manifest import Manifest

    path = work / f"index-{n}"
    factory = _factory_now(n)
    if (path / MANIFEST_FILE).is_file():
        manifest = Manifest.read(path / MANIFEST_FILE)
        if (manifest.count, manifest.factory, manifest.encoder_id) == (n, factory, TEACHER_ID):
            return path
        print(f"# {path} holds {manifest.factory} x {manifest.count}; choose_factory now picks {factory}: rebuilding")
    start = time.perf_counter()
    vectors, _ = clustered_vectors(n, 1, DIM, seed=seed)
    built = make_index(vectors, np.arange(n, dtype=np.int64), "auto", seed=seed)
    manifest = Manifest(
        dim=DIM,
        count=built.index.ntotal,
        encoder_id=TEACHER_ID,
        levels=list(LEVELS),
        thresholds=dict(THRESHOLDS),
        **built.manifest_fields(),
    )
    del vectors
    write_index_dir(path, built.index, gallery_rows(n), manifest)
    print(f"# built {path} ({built.factory}, {built.reason}) in {time.perf_counter() - start:.0f}s", flush=True)
    return path


def _factory_now(n: int) -> str:
    """What ``make_index(..., "auto")`` picks for ``n`` vectors today: ``choose_factory`` within the default budget."""
    from indexing import index_factory

    default_budget = getattr(index_factory, "default_memory_budget", None)  # the build's default, where there is one
    return index_factory.choose_factory(n, DIM, default_budget() if default_budget is not None else None).factory


def photo_jpeg(width: int, height: int, seed: int) -> bytes:
    """A photo-like JPEG (smooth gradients, sensor-like noise, a few shapes; quality 90) of the given size."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    phase = rng.uniform(0, 1, 3).astype(np.float32)
    channels = [(np.sin(6.0 * (x * (c + 1) + y * (3 - c)) + 6.28 * p) * 0.5 + 0.5) * 255 for c, p in enumerate(phase)]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 6, (height, width, 3)).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        w, h = int(rng.integers(width // 8, width // 3)), int(rng.integers(height // 8, height // 3))
        x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        draw.ellipse((x0, y0, x0 + w, y0 + h), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


class Pipeline:
    """One query's stages, each a call of the server's own function, timed with ``perf_counter``."""

    def __init__(self, engine: Any, settings: Any, k: int) -> None:
        self.engine = engine
        self.encoder = engine.query_encoder
        self.index = engine.index_dir
        self.settings = settings
        self.k = k

    def query(self, data: bytes) -> Any:
        from serving.api.queries import ImageQuery

        target = self.encoder.preprocess.input_size
        return ImageQuery(data, "q.jpg", self.k, max_pixels=self.settings.max_image_pixels, target_size=target)

    def staged(self, data: bytes) -> tuple[dict[str, float], Any]:
        """Milliseconds per stage for one upload (``STAGES``), and its ``SearchResults``."""
        from serving.api.queries import Answer
        from serving.api.search import build_response

        clock = time.perf_counter
        t0 = clock()
        query = self.query(data).decoded()
        t1 = clock()
        batch = self.encoder.prepare([query.image])
        t2 = clock()
        vectors = self.engine.checked_embeddings(self.encoder.infer(*_infer_args(self.encoder, batch)))
        t3 = clock()
        per_query = self.index.nearest(vectors, self.k)
        t4 = clock()
        (results,) = self.index.join_metadata(per_query, None)
        t5 = clock()
        body = build_response(Answer(results), self.k, self.encoder.encoder_id, None, None, 0.0).model_dump_json()
        t6 = clock()
        if not len(results) or not body:
            raise RuntimeError("a query returned no hits")
        times = (t0, t1, t2, t3, t4, t5, t6)
        return {stage: 1000.0 * (b - a) for stage, a, b in zip(STAGES, times[:-1], times[1:], strict=True)}, results

    def end_to_end(self, data: bytes) -> float:
        """Milliseconds of the server's ``answer_image_queries`` on one upload plus its JSON response."""
        from serving.api.queries import answer_image_queries
        from serving.api.search import build_response

        start = time.perf_counter()
        (answer,) = answer_image_queries(self.engine, [self.query(data)])
        if isinstance(answer, BaseException):
            raise answer
        build_response(answer, self.k, self.encoder.encoder_id, None, None, 0.0).model_dump_json()
        return 1000.0 * (time.perf_counter() - start)


def _infer_args(encoder: Any, batch: Any) -> tuple:
    """``infer``'s arguments: the ONNX runtime also takes the row count (its batch may be padded)."""
    from serving.runtimes.onnx_runtime import OnnxRuntimeQueryEncoder

    return (batch, 1) if isinstance(encoder, OnnxRuntimeQueryEncoder) else (batch,)


def measure(pipeline: Pipeline, jpegs: list[bytes], queries: int) -> dict[str, Any]:
    """Stage medians over ``queries`` single queries, alternating with end-to-end calls of the same uploads."""
    for data in jpegs:  # warm-up: ORT arenas, FAISS buffers, SQLite page cache
        pipeline.staged(data)
        pipeline.end_to_end(data)
    stages: dict[str, list[float]] = {stage: [] for stage in STAGES}
    whole: list[float] = []
    for i in range(queries):
        data = jpegs[i % len(jpegs)]
        for stage, ms in pipeline.staged(data)[0].items():
            stages[stage].append(ms)
        whole.append(pipeline.end_to_end(data))
    p50 = {stage: statistics.median(values) for stage, values in stages.items()}
    total = sum(p50.values())
    return {
        "stages": {
            stage: {
                "p50_ms": p50[stage],
                "p90_ms": float(np.percentile(stages[stage], 90)),
                "share": p50[stage] / total,
            }
            for stage in STAGES
        },
        "sum_p50_ms": total,
        "end_to_end_p50_ms": statistics.median(whole),
        "over_budget": [s for s in STAGES if s not in UNCAPPED and p50[s] / total > BUDGET_SHARE],
    }


def http_overhead(
    pipeline: Pipeline, index: Path, onnx: Path, jpegs: list[bytes], requests: int, threads: int | None
) -> dict[str, Any]:
    """``POST /v1/search`` on a real ``retrieval serve`` against in-process end-to-end calls, alternating."""
    from bench_http import _Client, _multipart

    from serving.api.server import serve_process

    args = ["--index", str(index), "--query-encoder", str(onnx)]
    if threads is not None:
        args += ["--threads", str(threads)]
    bodies = [_multipart(data, pipeline.k) for data in jpegs]
    with serve_process(args, cwd=str(ROOT), ready_timeout_s=600.0) as (url, _):
        client = _Client(int(url.rsplit(":", 1)[1]))
        try:
            for body, headers in bodies:
                if client.send("POST", "/v1/search", body, headers) != 200:
                    raise RuntimeError("POST /v1/search failed")
            remote, local = [], []
            for i in range(requests):
                body, headers = bodies[i % len(bodies)]
                start = time.perf_counter()
                if client.send("POST", "/v1/search", body, headers) != 200:
                    raise RuntimeError("POST /v1/search failed")
                remote.append(1000.0 * (time.perf_counter() - start))
                local.append(pipeline.end_to_end(jpegs[i % len(jpegs)]))
        finally:
            client.close()
    http_p50, local_p50 = statistics.median(remote), statistics.median(local)
    return {
        "http_p50_ms": http_p50,
        "in_process_p50_ms": local_p50,
        "overhead_ms": http_p50 - local_p50,
        "share": (http_p50 - local_p50) / http_p50,
        "requests": requests,
    }


def _engines(index: Path, checkpoint: Path, onnx: Path, use_torch: bool, threads: int | None) -> dict[str, Any]:
    from indexing import open_index_dir
    from serving.engine import SearchEngine
    from serving.runtimes.onnx_runtime import OnnxRuntimeQueryEncoder

    index_dir = open_index_dir(index)
    engines = {"onnxruntime": SearchEngine(index_dir, OnnxRuntimeQueryEncoder(onnx, threads=threads))}
    if use_torch:
        from serving.runtimes.torch_runtime import TorchQueryEncoder

        engines["torch"] = SearchEngine(index_dir, TorchQueryEncoder(checkpoint, device="cpu"))
    return engines


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from serving.settings import ServeSettings

    # the thresholds are set by hand, not calibrated for the student's queries: the engine's warning is expected
    logging.getLogger("serving.engine").setLevel(logging.ERROR)

    checkpoint, onnx = student_artifacts(work, args.student_size)
    settings = ServeSettings(index=work, query_encoder=onnx)
    images = [tuple(int(v) for v in spec.split("x")) for spec in args.images.split(",")]
    jpegs = {f"{w}x{h}": [photo_jpeg(w, h, seed) for seed in range(DISTINCT_QUERIES)] for w, h in images}
    report: dict[str, Any] = {"machine": _machine(args), "results": []}
    for n in (int(s) for s in args.sizes.split(",")):
        index = index_directory(work, n, args.seed)
        engines = _engines(index, checkpoint, onnx, args.torch, args.threads)
        try:
            for image, uploads in jpegs.items():
                for runtime, engine in engines.items():
                    pipeline = Pipeline(engine, settings, args.k)
                    row = {
                        "size": n,
                        "factory": engine.index_dir.manifest.factory,
                        "search_params": engine.index_dir.manifest.search_params,
                        "image": image,
                        "jpeg_kb": statistics.mean(len(d) for d in uploads) / 1024,
                        "runtime": runtime,
                        **measure(pipeline, uploads, args.queries),
                    }
                    if runtime == "onnxruntime" and args.http_requests > 0:
                        row["http"] = http_overhead(pipeline, index, onnx, uploads, args.http_requests, args.threads)
                    report["results"].append(row)
                    _print_row(row, args.queries)
        finally:
            engines["onnxruntime"].close()
    report["machine"]["load_after"] = os.getloadavg()
    return report


def _machine(args: argparse.Namespace) -> dict[str, Any]:
    import faiss
    import onnxruntime
    import PIL

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "load_before": os.getloadavg(),
        "versions": {"faiss": faiss.__version__, "onnxruntime": onnxruntime.__version__, "pillow": PIL.__version__},
        "student": f"efficientnet_b3 -> GeM -> {DIM}-d at {args.student_size} px (random weights)",
        "k": args.k,
        "queries": args.queries,
    }


def _print_row(row: dict[str, Any], queries: int) -> None:
    params = row["search_params"] or {}
    tuned = ", ".join(f"{name} {value}" for name, value in params.items())
    print(
        f"\ngallery {row['size']:,} ({row['factory']}{', ' + tuned if tuned else ''}), query JPEG {row['image']} "
        f"(~{row['jpeg_kb']:.0f} KB), {row['runtime']}; p50 over {queries} single queries"
    )
    print(f"  {'stage':<12} {'p50 ms':>8} {'p90 ms':>8} {'share':>7}")
    for stage, values in row["stages"].items():
        flag = "  OVER 10%" if stage in row["over_budget"] else ""
        print(f"  {stage:<12} {values['p50_ms']:>8.2f} {values['p90_ms']:>8.2f} {values['share']:>7.1%}{flag}")
    print(f"  {'sum':<12} {row['sum_p50_ms']:>8.2f}")
    print(f"  {'end to end':<12} {row['end_to_end_p50_ms']:>8.2f}   (answer_image_queries + response, one call)")
    if "http" in row:
        http = row["http"]
        print(
            f"  HTTP POST /v1/search p50 {http['http_p50_ms']:.2f} ms vs in process {http['in_process_p50_ms']:.2f} "
            f"ms: HTTP adds {http['overhead_ms']:.2f} ms, {http['share']:.1%} of the HTTP total"
        )
    verdict = "within budget" if not row["over_budget"] else f"over budget: {', '.join(row['over_budget'])}"
    print(f"  budget (no stage but encode/search above {BUDGET_SHARE:.0%}): {verdict}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,1000000", help="comma-separated gallery sizes")
    parser.add_argument("--work-dir", type=Path, help="keep the student and index directories here and reuse them")
    parser.add_argument("--queries", type=int, default=200, help="single queries per measurement")
    parser.add_argument("--images", default="640x480,4032x3024", help="query JPEG sizes, WxH, comma-separated")
    parser.add_argument("--student-size", type=int, default=300, help="student input side (EfficientNet-B3: 300)")
    parser.add_argument("--torch", action="store_true", help="also measure the PyTorch runtime")
    parser.add_argument("--http-requests", type=int, default=100, help="POST /v1/search requests (0: skip HTTP)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime threads (default: its own choice, all cores)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="also print the report as JSON")
    args = parser.parse_args()
    if args.queries < 1 or args.k < 1:
        parser.error("--queries and --k must be at least 1")
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        report = run(args, args.work_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-query-stages-") as tmp:
            report = run(args, Path(tmp))
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
