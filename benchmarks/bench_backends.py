"""Vector backends side by side: FAISS Flat against Qdrant (local directory, in memory, optionally a server).

Usage:
    python benchmarks/bench_backends.py [--sizes 20000,100000] [--dim 128] [--queries 200] [--batch 64]
        [--backends faiss,qdrant-path,qdrant-memory] [--url http://HOST:6333] [--dir DIR] [--path-max N]

Every backend is built through the engine's own classes (``FaissIndex("Flat")``, ``QdrantIndex.create``) from the
same seeded random unit vectors and searched with the same queries. Per backend and gallery size:

- build: seconds to create the index and add every vector (Qdrant: upserts of 1,024 points, acknowledged);
- recall@10 of its top 10 against FAISS Flat's (exact search), and the largest |score difference| over the
  result slots where both returned the same id;
- single-query latency p50/p95 over ``--queries`` queries searched one at a time (the HTTP path), FAISS with one
  OpenMP thread as a server request gets;
- throughput of batched searches (``--batch`` queries per call) over all queries, in queries per second
  (best of 3 passes).

Ratios are to FAISS Flat of the same run. Qdrant's local mode (a directory and ``:memory:``) is qdrant-client's own
exact numpy search, meant for tests and small galleries; a directory store also commits each point to SQLite on its own,
so its build is bounded by the disk's sync rate and sizes above ``--path-max`` skip it. ``--url`` adds a Qdrant
server (HNSW; ``QDRANT_API_KEY`` from the environment), the backend meant for large galleries.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np

K = 10


def unit_vectors(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@dataclass
class Row:
    size: int
    backend: str
    build_s: float
    recall: float
    max_delta: float
    p50_ms: float
    p95_ms: float
    qps: float


def _build(backend: str, gallery: np.ndarray, ids: np.ndarray, store: Path, url: str | None):
    """The index of ``backend`` holding ``gallery`` under ``ids``, and the seconds it took."""
    from indexing.faiss_index import FaissIndex
    from indexing.qdrant_index import QdrantIndex

    start = time.perf_counter()
    if backend == "faiss":
        index = FaissIndex(gallery.shape[1], "Flat", device="cpu")
        index.add(gallery, ids)
    else:
        location = {"qdrant-path": str(store), "qdrant-memory": ":memory:", "qdrant-server": url}[backend]
        index = QdrantIndex.create(gallery.shape[1], "auto", {"url": location, "collection": "bench"})
        index.add(gallery, ids)
    return index, time.perf_counter() - start


def _latency_ms(search: Callable[[np.ndarray], object], queries: np.ndarray) -> tuple[float, float]:
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        search(queries[:1])  # warm-up
        times = []
        for query in queries:
            start = time.perf_counter()
            search(query[None, :])
            times.append(time.perf_counter() - start)
    finally:
        faiss.omp_set_num_threads(before)
    p50, p95 = np.percentile(np.array(times) * 1e3, [50, 95])
    return float(p50), float(p95)


def _batch_qps(search: Callable[[np.ndarray], object], queries: np.ndarray, batch: int, repeats: int = 3) -> float:
    """Queries per second of batched searches over every query, best of ``repeats`` passes (load noise)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for lo in range(0, len(queries), batch):
            search(queries[lo : lo + batch])
        best = min(best, time.perf_counter() - start)
    return len(queries) / best


def _agreement(ids: np.ndarray, scores: np.ndarray, ref_ids: np.ndarray, ref_scores: np.ndarray) -> tuple[float, float]:
    recall = float(np.mean([np.isin(r, f).mean() for f, r in zip(ids, ref_ids, strict=True)]))
    same = ids == ref_ids
    delta = float(np.abs(scores[same].astype(np.float64) - ref_scores[same]).max()) if same.any() else float("nan")
    return recall, delta


def run_size(args: argparse.Namespace, n: int, backends: list[str], workdir: Path) -> list[Row]:
    rng = np.random.default_rng(n)
    gallery, queries = unit_vectors(n, args.dim, rng), unit_vectors(args.queries, args.dim, rng)
    ids = np.arange(n, dtype=np.int64) * 3 + 1  # ids unrelated to positions
    rows: list[Row] = []
    reference: tuple[np.ndarray, np.ndarray] | None = None
    for backend in backends:
        if backend == "qdrant-path" and n > args.path_max:
            print(f"# N={n}: skipping qdrant-path (above --path-max {args.path_max})", flush=True)
            continue
        index, build = _build(backend, gallery, ids, workdir / f"{backend}-{n}", args.url)
        print(f"#   N={n} {backend}: built in {build:.1f}s", flush=True)
        try:
            scores, found = index.search(queries, K)
            if reference is None:
                reference = (found, scores)
            recall, delta = _agreement(found, scores, *reference)
            p50, p95 = _latency_ms(lambda q, index=index: index.search(q, K), queries)
            qps = _batch_qps(lambda q, index=index: index.search(q, K), queries, args.batch)
        finally:
            if backend != "faiss":
                index.discard()
                index.close()
        rows.append(Row(n, backend, build, recall, delta, p50, p95, qps))
        print("#   " + format_row(rows[-1], rows[0]), flush=True)  # the table again at the end
    return rows


def header(batch: int) -> str:
    return (
        f"{'N':>8} {'backend':<14} {'build s':>8} {'x faiss':>8} {'R@10':>6} {'max|dS|':>9} "
        f"{'p50 ms':>8} {'p95 ms':>8} {'x faiss':>8} {f'b{batch} q/s':>9} {'x faiss':>8}"
    )


def format_row(row: Row, ref: Row) -> str:
    """One table line; ratios to ``ref`` (FAISS Flat at the same size)."""
    return (
        f"{row.size:>8} {row.backend:<14} {row.build_s:>8.2f} {row.build_s / ref.build_s:>8.1f} "
        f"{row.recall:>6.3f} {row.max_delta:>9.1e} {row.p50_ms:>8.2f} {row.p95_ms:>8.2f} "
        f"{row.p50_ms / ref.p50_ms:>8.1f} {row.qps:>9.0f} {row.qps / ref.qps:>8.3f}"
    )


def print_table(rows: list[Row], batch: int) -> None:
    line = header(batch)
    print(line)
    print("-" * len(line))
    base = {row.size: row for row in rows if row.backend == "faiss"}
    for row in rows:
        print(format_row(row, base.get(row.size, row)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="20000", help="comma-separated gallery sizes")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=200, help="queries (single-query latency and batches)")
    parser.add_argument("--batch", type=int, default=64, help="queries per batched search")
    parser.add_argument("--backends", default="faiss,qdrant-path,qdrant-memory")
    parser.add_argument("--url", default=None, help="a Qdrant server (http://HOST:6333): adds qdrant-server")
    parser.add_argument("--dir", default=None, help="where qdrant-path stores live (default: a temporary directory)")
    parser.add_argument("--path-max", type=int, default=20_000, help="largest N built in local-directory mode")
    args = parser.parse_args()
    backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    if args.url:
        backends.append("qdrant-server")
    unknown = set(backends) - {"faiss", "qdrant-path", "qdrant-memory", "qdrant-server"}
    if unknown or backends[0] != "faiss":
        parser.error("--backends starts with faiss (the reference); the others: qdrant-path, qdrant-memory")
    warnings.filterwarnings("ignore", message="Local mode is not recommended")
    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-backends-"))
    workdir.mkdir(parents=True, exist_ok=True)
    import faiss

    try:
        rows = [row for n in (int(s) for s in args.sizes.split(",")) for row in run_size(args, n, backends, workdir)]
    finally:
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"\nfaiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads for batches, 1 for single queries), "
        f"qdrant-client {version('qdrant-client')}; "
        f"{args.dim}-d random unit vectors, {args.queries} queries, k={K}; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n"
    )
    print_table(rows, args.batch)


if __name__ == "__main__":
    main()
