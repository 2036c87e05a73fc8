"""Peak memory of ``index merge``: the streaming merge against the in-memory one, on a large synthetic gallery.

Usage:
    python benchmarks/bench_merge_memory.py [--count 2000000] [--dim 128] [--shards 4] [--factory F]
        [--paths streaming,in-memory] [--threads N] [--work-dir DIR] [--keep] [--json]

A sharded extraction is written to ``--work-dir`` (a temporary directory by default, removed at the end unless
``--keep``): ``--shards`` directories of ``chunk-*.npz`` files of 2,048 positions each, as ``retrieval index
build --shard I/N`` writes them, holding seeded clustered unit vectors (one cluster per 100 items around 32
coarse groups, so an IVF has structure to find) and a path per item. Every 1,000th item is recorded as an
unreadable image, as real galleries have some. Each path then merges it in its own child process and writes an
index directory (FAISS index + SQLite metadata + manifest):

- ``streaming``: ``indexing.streaming_merge`` (``open_shards`` + ``stream_index``, metadata rows streamed into
  the directory);
- ``in-memory``: ``combine_stores`` + ``make_index`` + ``write_index_dir``, what ``merge_shards`` did before
  the streaming merge (all vectors and all metadata rows in memory, the held-out split copying the vectors).

Per path: the child's peak resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``), its resident memory
right after importing the engine (torch, faiss: paid by any merge), the peak above that baseline, both as a share
of the raw float32 vectors, the wall time, and the tuned parameters. The two index files are compared: the
streaming merge draws the same training sample and held-out queries and adds in the same order, so they should
be byte-identical.

The default factory is ``IVF1024,PQ{dim/4}np`` (``dim/4`` one-byte codes, no refine store), a compressed index
much smaller than the vectors; "auto" would pick a refine store of full floats, whose index is as large as the
gallery, and the comparison would say nothing about the merge itself. 1024 lists rather than ``ivf_nlist(N)``
(4096 at 2M) keep the list assignment of every vector (N x lists x dim multiply-adds, the bulk of the add) to
minutes on a 2-core machine; the memory of a merge does not depend on it beyond the 64 x lists training vectors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CHUNK_SIZE = 2048
SKIP_EVERY = 1000
PATHS = ("streaming", "in-memory")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_gallery(root: Path, count: int, dim: int, shards: int, seed: int = 0) -> list[Path]:
    """``shards`` extraction directories of a ``count``-item gallery, one chunk in memory at a time."""
    from indexing.embedding_store import EmbeddingStore, ExtractionSpec

    rng = np.random.default_rng(seed)
    groups = _unit(rng.standard_normal((32, dim), dtype=np.float32))
    clusters = max(16, count // 100)
    parent = rng.integers(0, len(groups), clusters)
    centres = _unit(groups[parent] + rng.standard_normal((clusters, dim), dtype=np.float32) / np.sqrt(dim))
    dirs = []
    for shard in range(shards):
        spec = ExtractionSpec(
            encoder_id="bench-merge-memory",
            dim=dim,
            gallery_source="synthetic clustered vectors",
            gallery_count=count,
            gallery_fingerprint=f"bench-{count}-{dim}-{seed}",
            chunk_size=CHUNK_SIZE,
            batch_size=64,
            shard_index=shard,
            num_shards=shards,
        )
        store = EmbeddingStore.open_for(root / f"shard-{shard}", spec)
        for chunk in spec.chunk_numbers():
            span = np.arange(spec.chunk_positions(chunk).start, spec.chunk_positions(chunk).stop)
            lost = span[span % SKIP_EVERY == SKIP_EVERY - 1]
            kept = span[span % SKIP_EVERY != SKIP_EVERY - 1]
            chunk_rng = np.random.default_rng([seed, chunk])
            noise = chunk_rng.standard_normal((len(kept), dim), dtype=np.float32) * np.float32(0.6 / np.sqrt(dim))
            vectors = _unit(centres[chunk_rng.integers(0, clusters, len(kept))] + noise)
            rows = [{"path": f"images/{p:08d}.jpg"} for p in kept.tolist()]
            skipped = [(f"images/{p:08d}.jpg", "truncated file") for p in lost.tolist()]
            store.write_chunk(chunk, kept, vectors, rows, skipped)
        dirs.append(store.path)
    return dirs


def _rss_kib() -> int:
    """Current resident memory in KiB (Linux ``/proc``), 0 where unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_child(path: str, shard_dirs: list[str], out: str, factory: str) -> dict[str, Any]:
    """One merge in this (child) process; returns its measurements."""
    from indexing.builder import make_index
    from indexing.embedding_store import EmbeddingStore, combine_stores
    from indexing.index_dir import write_index_dir
    from indexing.manifest import Manifest
    from indexing.streaming_merge import open_shards, stream_index

    baseline = _rss_kib()
    start = time.perf_counter()
    if path == "streaming":
        shards = open_shards(shard_dirs)
        spec, skipped = shards.spec, shards.skipped
        built = stream_index(shards, factory)
        rows: Any = shards.metadata_rows()
    else:
        stored = combine_stores([EmbeddingStore.open(d) for d in shard_dirs])
        spec, skipped = stored.spec, stored.skipped
        built = make_index(stored.embeddings, stored.positions, factory)
        rows = stored.metadata_rows()
    built_at = time.perf_counter() - start
    manifest = Manifest(
        dim=built.index.dim,
        count=built.index.ntotal,
        encoder_id=spec.encoder_id,
        skipped=len(skipped),
        **built.manifest_fields(),
    )
    write_index_dir(out, built.index, rows, manifest, skipped=skipped)
    return {
        "path": path,
        "count": built.index.ntotal,
        "factory": built.factory,
        "search_params": built.manifest_fields()["search_params"],
        "recall": None if built.tuning is None else round(built.tuning.recall, 4),
        "build_s": round(built_at, 1),
        "total_s": round(time.perf_counter() - start, 1),
        "baseline_rss": baseline * 1024,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _index_bytes(index_dir: Path) -> bytes | None:
    files = [p for p in index_dir.iterdir() if p.suffix == ".faiss"] if index_dir.is_dir() else []
    return files[0].read_bytes() if len(files) == 1 else None


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--factory", default=None, help="FAISS factory (default IVF1024,PQ{dim/4}np)")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated: streaming, in-memory")
    parser.add_argument("--threads", type=int, default=None, help="FAISS OpenMP threads in the children")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the generated shards and indexes")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("PATH", "OUT", "FACTORY"), help=argparse.SUPPRESS)
    parser.add_argument("--shard-dirs", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        path, out, factory = args.child
        print(json.dumps(run_child(path, args.shard_dirs, out, factory)))
        return 0

    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        parser.error(f"unknown --paths {unknown}; choose from {', '.join(PATHS)}")
    factory = args.factory or f"IVF1024,PQ{args.dim // 4}np"
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    raw = 4 * args.count * args.dim
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    results = []
    try:
        start = time.perf_counter()
        dirs = write_gallery(work / "shards", args.count, args.dim, args.shards)
        written = time.perf_counter() - start
        on_disk = sum(f.stat().st_size for d in dirs for f in (d / "chunks").iterdir())
        print(
            f"{args.count:,} x {args.dim}-d float32 = {_mb(raw)} of vectors in {args.shards} shards "
            f"({_mb(on_disk)} of chunk files with metadata), written in {written:.0f}s; factory {factory}",
            file=sys.stderr,
        )
        for path in paths:
            command = [sys.executable, __file__, "--child", path, str(work / f"index-{path}"), factory]
            done = subprocess.run(
                [*command, "--shard-dirs", *map(str, dirs)], capture_output=True, text=True, env=env, cwd=REPO
            )
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"the {path} merge failed (exit {done.returncode})")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        files = {path: _index_bytes(work / f"index-{path}") for path in paths}
        same = len(files) == 2 and None not in files.values() and len(set(files.values())) == 1
        report = {
            "count": args.count,
            "dim": args.dim,
            "shards": args.shards,
            "factory": factory,
            "raw_vector_bytes": raw,
            "chunk_file_bytes": on_disk,
            "write_s": round(written, 1),
            "identical_index_files": same if len(files) == 2 else None,
            "results": results,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "load_average": os.getloadavg(),
        }
        _print(report, args.json)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _print(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    raw = report["raw_vector_bytes"]
    load = ", ".join(f"{x:.1f}" for x in report["load_average"])
    print(f"raw vectors {_mb(raw)}; {report['factory']}; {report['machine']}; load average {load}")
    columns = ("path", "peak RSS", "x raw", "baseline", "peak-base", "x raw", "build s", "total s")
    print(f"{columns[0]:<10}" + "".join(f" {c:>10}" for c in columns[1:]) + "  tuned")
    for row in report["results"]:
        above = row["peak_rss"] - row["baseline_rss"]
        cells = (
            _mb(row["peak_rss"]),
            f"{row['peak_rss'] / raw:.2f}",
            _mb(row["baseline_rss"]),
            _mb(above),
            f"{above / raw:.2f}",
            row["build_s"],
            row["total_s"],
        )
        tuned = f"{row['search_params']} recall@10 {row['recall']}"
        print(f"{row['path']:<10}" + "".join(f" {c:>10}" for c in cells) + f"  {tuned}")
    if report["identical_index_files"] is not None:
        print(f"index files identical: {report['identical_index_files']}")


if __name__ == "__main__":
    raise SystemExit(main())
