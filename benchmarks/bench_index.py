"""FAISS index types on synthetic clustered embeddings: recall@10, queries/s vs exact, latency, memory, build time.

Usage:
    python benchmarks/bench_index.py [--sizes 200000,1000000] [--dim 512] [--queries 1000]
        [--candidates flat,ivfhnsw-pq4-rflat,ivfhnsw-pq4-fp16,ivfhnsw-pq4-sq8] [--nlist K]
        [--nprobe 16,32,64,128] [--ef-search 32,64,128] [--k-factor 4,8,16,32] [--threads N] [--no-tune]

Every candidate (``--candidates``, ``--types`` is an alias; ``--list`` prints them) is built through the
engine's own ``FaissIndex`` (inner product, int64 ids, seeded training sample, two-level k-means for
4096+ lists) and searched with the same queries over a sweep of its search parameters: nprobe (IVF) or
efSearch (HNSW), crossed with k_factor for refine indexes ("...,RFlat", "...,Refine(SQ8)"). Per row:

- recall@10 against the exact Flat results of the same run;
- QPS of one batched search of all queries (best of 3), and its ratio to exact Flat's;
- single-query latency p50/p99: ``--latency-queries`` queries searched one at a time, as the HTTP path does,
  with ``--latency-threads`` (1) OpenMP threads: a server runs concurrent requests on their own threads,
  and OpenMP threads of one tiny search mostly wait for each other on busy cores;
- memory: the serialized index size; build: train + add seconds.

"tuned" rows use ``FaissIndex.tune`` (target recall 0.95) with 500 held-out queries (drawn like the
queries, stored nowhere) and are measured on the real queries. k = ``ivf_nlist(N)`` lists unless
``--nlist`` is given; PQ sizes follow ``indexing.index_factory`` (d/4 4-bit sub-quantisers).

The vectors are not uniform noise, which makes every index look bad: 32 coarse groups, N/100 fine
clusters around them, and per point a 16-dimensional variation shared within its coarse group plus
isotropic noise. With IVF1024 at N=100k this gives recall@10 of ~0.6 at nprobe=1 and ~0.97 at 16,
the shape seen on real image embeddings.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

K = 10


def clustered_vectors(
    n: int, nq: int, dim: int, seed: int = 0, per_cluster: int = 100, groups: int = 32, rank: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """``(gallery (n, dim), queries (nq, dim))`` unit vectors drawn from the same hierarchical clusters."""
    rng = np.random.default_rng(seed)
    k = max(16, n // per_cluster)

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    tops = unit(rng.standard_normal((groups, dim), dtype=np.float32))
    parent = rng.integers(0, groups, k)
    centers = unit(tops[parent] + rng.standard_normal((k, dim), dtype=np.float32) / np.sqrt(dim))
    bases = rng.standard_normal((groups, rank, dim), dtype=np.float32) / np.sqrt(dim * rank)

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, dim), np.float32)
        for start in range(0, m, 65_536):
            stop = min(m, start + 65_536)
            cluster = rng.integers(0, k, stop - start)
            x = centers[cluster] + 0.5 * rng.standard_normal((stop - start, dim), dtype=np.float32) / np.sqrt(dim)
            z = rng.standard_normal((stop - start, rank), dtype=np.float32)
            for group in range(groups):
                rows = np.flatnonzero(parent[cluster] == group)
                x[rows] += z[rows] @ bases[group]
            out[start:stop] = unit(x)
        return out

    return draw(n), draw(nq)


@dataclass(frozen=True)
class Candidate:
    """A benchmarked index type: its factory for ``(n, dim, nlist)`` and the search parameter it sweeps."""

    factory: Callable[[int, int, int], str]
    knob: str  # "", "nprobe" or "ef_search"
    refine: bool = False


def _fs(n: int, d: int, nlist: int, refine: str, sub_dims: int = 4, opq: bool = False) -> str:
    m = d // sub_dims
    prefix = f"OPQ{m}_{d}," if opq else ""
    return f"{prefix}IVF{nlist}_HNSW32,PQ{m}x4fs,{refine}"


#: Name -> candidate. Add one here to benchmark another index type.
CANDIDATES: dict[str, Candidate] = {
    "flat": Candidate(lambda n, d, k: "Flat", ""),
    "hnsw": Candidate(lambda n, d, k: "HNSW32", "ef_search"),
    "ivf": Candidate(lambda n, d, k: f"IVF{k},Flat", "nprobe"),
    "ivfpq": Candidate(lambda n, d, k: f"IVF{k},PQ{max(d // 8, 4)}np", "nprobe"),
    "hnsw-sq8": Candidate(lambda n, d, k: "HNSW32,SQ8", "ef_search"),
    "hnsw-sq8-rflat": Candidate(lambda n, d, k: "HNSW32_SQ8,RFlat", "ef_search", refine=True),
    "ivfhnsw-pq4-rflat": Candidate(lambda n, d, k: _fs(n, d, k, "RFlat"), "nprobe", refine=True),
    "ivfhnsw-pq4-fp16": Candidate(lambda n, d, k: _fs(n, d, k, "Refine(SQfp16)"), "nprobe", refine=True),
    "ivfhnsw-pq4-sq8": Candidate(lambda n, d, k: _fs(n, d, k, "Refine(SQ8)"), "nprobe", refine=True),
    "ivfhnsw-pq4half-rflat": Candidate(lambda n, d, k: _fs(n, d, k, "RFlat", sub_dims=8), "nprobe", refine=True),
    "ivfhnsw-pq4half-sq8": Candidate(lambda n, d, k: _fs(n, d, k, "Refine(SQ8)", sub_dims=8), "nprobe", refine=True),
    "opq-ivfhnsw-pq4-rflat": Candidate(lambda n, d, k: _fs(n, d, k, "RFlat", opq=True), "nprobe", refine=True),
}
DEFAULT_CANDIDATES = "flat,ivfhnsw-pq4-rflat,ivfhnsw-pq4-fp16,ivfhnsw-pq4-sq8"


@dataclass
class Row:
    size: int
    index: str
    param: str
    build_s: float
    bytes: int
    qps: float
    recall: float
    p50_ms: float
    p99_ms: float


def _best_seconds(run: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def _latency_ms(search: Callable[[np.ndarray], object], queries: np.ndarray, threads: int) -> tuple[float, float]:
    """p50 and p99 of one query at a time, in milliseconds, with ``threads`` OpenMP threads."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    times = np.empty(len(queries))
    try:
        for i in range(len(queries)):
            start = time.perf_counter()
            search(queries[i : i + 1])
            times[i] = time.perf_counter() - start
    finally:
        faiss.omp_set_num_threads(before)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([np.isin(t, f).mean() for f, t in zip(found, truth, strict=True)]))


def _settings(candidate: Candidate, args: argparse.Namespace, nlist: int) -> list[tuple[str, dict[str, int]]]:
    """(label, SearchParams keywords) of the sweep: the base parameter crossed with k_factor for refine indexes."""
    if not candidate.knob:
        return [("exact", {})]
    values = [v for v in args.nprobe if v <= nlist] if candidate.knob == "nprobe" else args.ef_search
    name = "efSearch" if candidate.knob == "ef_search" else "nprobe"
    out = []
    for value in values:
        for k_factor in args.k_factor if candidate.refine else [None]:
            params = {candidate.knob: value} | ({"k_factor": k_factor} if k_factor else {})
            out.append((f"{name}={value}" + (f",kf={k_factor}" if k_factor else ""), params))
    return out


def bench_size(n: int, args: argparse.Namespace) -> list[Row]:
    import faiss

    from indexing.faiss_index import FaissIndex, SearchParams
    from indexing.index_factory import ivf_nlist

    start = time.perf_counter()
    gallery, queries = clustered_vectors(n, args.queries + TUNE_QUERIES, args.dim, seed=args.seed)
    queries, tune_queries = queries[: args.queries], queries[args.queries :]
    ids = np.arange(n, dtype=np.int64)
    print(f"# N={n}: generated {n} x {args.dim} clustered vectors in {time.perf_counter() - start:.1f}s", flush=True)
    nlist = args.nlist or ivf_nlist(n)
    lat_queries = queries[: args.latency_queries]
    rows: list[Row] = []
    truth: np.ndarray | None = None
    for name in ["flat", *[c for c in args.candidates if c != "flat"]]:
        candidate = CANDIDATES[name]
        factory = candidate.factory(n, args.dim, nlist)
        start = time.perf_counter()
        index = FaissIndex(args.dim, factory, device="cpu")
        index.train(gallery, seed=args.seed)
        index.add(gallery, ids)
        build = time.perf_counter() - start
        size = len(faiss.serialize_index(index.faiss_index))
        print(f"#   {factory}: built in {build:.1f}s, {size / 1e6:.1f} MB", flush=True)
        settings: list[tuple[str, SearchParams | None]] = [
            (label, SearchParams(**kw) if kw else None) for label, kw in _settings(candidate, args, nlist)
        ]
        if candidate.knob and args.tune:
            tuned = index.tune(tune_queries, target_recall=0.95, k=K)
            chosen = ",".join(f"{key}={value}" for key, value in tuned.params.to_dict().items())
            settings.append((f"tuned {chosen}", tuned.params))
        for label, params in settings:
            found = index.search(queries, K, params)[1]
            seconds = _best_seconds(lambda index=index, params=params: index.search(queries, K, params))
            p50, p99 = _latency_ms(
                lambda q, index=index, params=params: index.search(q, K, params), lat_queries, args.latency_threads
            )
            if truth is None:
                truth = found
            row = Row(n, factory, label, build, size, args.queries / seconds, _recall(found, truth), p50, p99)
            rows.append(row)
            print(
                f"#   {factory:<34} {label:<24} recall@10 {row.recall:.3f}  {row.qps:,.0f} q/s  p50 {p50:.2f} ms",
                flush=True,
            )
        del index
    return rows


#: Held-out queries ``FaissIndex.tune`` gets for the "tuned" rows (drawn like the queries, stored nowhere).
TUNE_QUERIES = 500  # as many as make_index holds out (indexing.index_choice.TUNE_QUERIES)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="200000,1000000", help="comma-separated gallery sizes")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension")
    parser.add_argument("--queries", type=int, default=1000, help="queries per batched search")
    parser.add_argument("--latency-queries", type=int, default=200, help="queries searched one at a time")
    parser.add_argument(
        "--candidates", "--types", dest="candidates", default=DEFAULT_CANDIDATES, help="comma-separated names"
    )
    parser.add_argument("--list", action="store_true", help="print the candidate names and factories and exit")
    parser.add_argument("--nlist", type=int, default=0, help="IVF lists (default: ivf_nlist(N), 4 sqrt(N))")
    parser.add_argument("--nprobe", type=_ints, default=[16, 32, 64, 128], help="nprobe sweep (IVF)")
    parser.add_argument("--ef-search", type=_ints, default=[32, 64, 128], help="efSearch sweep (HNSW)")
    parser.add_argument("--k-factor", type=_ints, default=[4, 8, 16, 32], help="k_factor sweep (refine)")
    parser.add_argument(
        "--latency-threads",
        type=int,
        default=1,
        help="OpenMP threads of the single-query searches (a server runs concurrent requests on their own threads)",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="FAISS OpenMP threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-tune", dest="tune", action="store_false", help="skip the tuned-parameter rows")
    args = parser.parse_args()
    if args.list:
        for name, candidate in CANDIDATES.items():
            print(f"{name:<24} {candidate.factory(1_000_000, args.dim, args.nlist or 4096)}")
        return
    args.candidates = [t.strip() for t in args.candidates.split(",") if t.strip()]
    unknown = set(args.candidates) - set(CANDIDATES)
    if unknown:
        parser.error(f"unknown --candidates {sorted(unknown)}; choose from {','.join(CANDIDATES)}")

    import faiss

    faiss.omp_set_num_threads(args.threads)
    rows: list[Row] = []
    for size in (int(s) for s in args.sizes.split(",")):
        rows += bench_size(size, args)

    print(
        f"\nfaiss {faiss.__version__}, {args.threads} thread(s), CPU, load average {os.getloadavg()[0]:.1f}; "
        f"{args.queries} queries of dim {args.dim}, k={K}; QPS = one batched search, best of 3; latency = "
        f"{args.latency_queries} single queries, {args.latency_threads} thread(s); "
        "recall@10 against exact Flat of the same run"
    )
    header = (
        f"{'N':>9} {'index':<36} {'param':<24} {'build s':>8} {'size MB':>9} {'QPS':>10} {'x Flat':>8} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'recall@10':>9}"
    )
    print(header)
    print("-" * len(header))
    for size in dict.fromkeys(row.size for row in rows):
        flat_qps = next(row.qps for row in rows if row.size == size and row.index == "Flat")
        for row in (r for r in rows if r.size == size):
            print(
                f"{row.size:>9} {row.index:<36} {row.param:<24} {row.build_s:>8.1f} {row.bytes / 1e6:>9.1f} "
                f"{row.qps:>10,.0f} {row.qps / flat_qps:>8.1f} {row.p50_ms:>7.2f} {row.p99_ms:>7.2f} {row.recall:>9.3f}"
            )


if __name__ == "__main__":
    main()
