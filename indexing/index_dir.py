"""An index directory: ``manifest.json`` + the vector index + ``metadata.sqlite`` (+ ``skipped.tsv``).

The vector index is whichever backend the manifest names (``indexing.vector_index``): ``index.faiss`` in the
directory for FAISS (the default, and every directory written before backends existed), a Qdrant collection
named in the manifest for ``qdrant``. Search, label filters, granularity thresholds and metadata work the same
on every backend.

The directory is the unit that is built, shipped and served. It is written through
``retrieval.atomic.atomic_directory``: everything goes into a temporary sibling that is
renamed into place only when complete, so a crash or kill during a rebuild leaves the
previous index loadable. Opening checks that the three files agree with each other, so a
hand-edited or mixed-up directory fails with a message instead of returning wrong hits.

An index built with a whitening (``indexing.whitening``) stores whitened vectors and carries the fitted
map in ``whitening.safetensors`` (checksum in the manifest); ``IndexDirectory`` takes queries in the
encoder's space (``query_dim``) and whitens them itself, so every caller (CLI, server, any runtime, an
on-device embedding) searches the same way without knowing about it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from indexing.calibration_plot import CALIBRATION_PLOT_FILE
from indexing.errors import (
    BackendMismatchError,
    IndexFormatError,
    NotCalibratedError,
    UnknownGranularityError,
    UnknownLevelError,
)
from indexing.faiss_index import INDEX_FILE, FaissIndex
from indexing.granularity import filter_by_granularity, tag_hits
from indexing.integrity import check_graph, check_scores, check_vectors, stores_exact_vectors
from indexing.manifest import Manifest, WhiteningInfo
from indexing.metadata import MetadataRow, MetadataStore
from indexing.results import SearchHit, SearchResults
from indexing.vector_index import NO_ID, LabelFilter, SearchParams, VectorIndex, backend_class
from indexing.whitening import WHITENING_FILE, Whitening, load_whitening
from retrieval.atomic import atomic_directory, recover_interrupted_swap
from retrieval.data.images import SkipReport
from retrieval.errors import UserFacingError
from retrieval.resources import Closeable

__all__ = [
    "INDEX_FILE",
    "MANIFEST_FILE",
    "METADATA_FILE",
    "SKIPPED_FILE",
    "WHITENING_FILE",
    "IndexDirectory",
    "IndexFormatError",
    "Where",
    "append_to_index_dir",
    "backend_overrides",
    "check_replaceable",
    "file_sha256",
    "open_index_dir",
    "write_index_dir",
]

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
METADATA_FILE = "metadata.sqlite"
SKIPPED_FILE = "skipped.tsv"


def write_index_dir(
    path: str | Path,
    index: VectorIndex,
    rows: Iterable[MetadataRow | Mapping[str, Any]],
    manifest: Manifest,
    skipped: SkipReport | None = None,
    whitening: Whitening | None = None,
) -> Path:
    """Write a complete index directory at ``path``, replacing any previous one atomically.

    Args:
        path: the index directory to create or replace.
        index: the filled vector index (any backend); a backend whose data lives outside the directory
            (Qdrant) is published (``VectorIndex.publish``) once the directory is in place, and discarded if
            writing it fails.
        rows: one metadata row per indexed id; consumed lazily, so it may be a generator.
        manifest: its ``dim`` and ``count`` must match ``index``.
        skipped: files left out of the build; written as ``skipped.tsv`` when non-empty.
        whitening: the whitening the index's vectors went through (its ``dim_out`` is the index's
            dimension); written as ``whitening.safetensors`` and recorded, with its checksum, as the
            manifest's ``whitening``.

    The manifest is written with ``index_sha256`` set to the checksum of the index file just saved
    (``open_index_dir`` verifies it), and its ``search_params``, when set, are first stored as the
    index's defaults so that file and manifest agree. Every file is fsynced before the directory is
    renamed into place (``atomic_directory``).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        IndexFormatError: manifest, index and metadata disagree (dimension, count or ids), or
            ``path`` exists and is not an index directory; the previous content at ``path`` is
            then left untouched.
    """
    path = Path(path)
    check_replaceable(path)
    if manifest.dim != index.dim:
        raise IndexFormatError(f"manifest dim {manifest.dim} does not match the index dimension {index.dim}")
    if manifest.count != index.ntotal:
        raise IndexFormatError(f"manifest count {manifest.count} does not match the {index.ntotal} indexed vectors")
    if manifest.backend != index.backend:
        raise IndexFormatError(f"manifest backend {manifest.backend!r} does not match the index's {index.backend!r}")
    if manifest.factory != index.factory:
        raise IndexFormatError(f"manifest factory {manifest.factory!r} does not match the index's {index.factory!r}")
    if whitening is None and manifest.whitening is not None:
        raise IndexFormatError("the manifest records a whitening but none was given to write")
    if whitening is not None and whitening.dim_out != index.dim:
        raise IndexFormatError(f"the whitening gives {whitening.dim_out}-d vectors but the index holds {index.dim}-d")
    if manifest.search_params:
        try:
            index.set_default_params(SearchParams.from_dict(manifest.search_params))
        except ValueError as exc:
            raise IndexFormatError(
                f"manifest search_params {manifest.search_params} do not fit the {index.factory!r} index: {exc}"
            ) from None
    previous = _readable_manifest(path)
    try:
        with atomic_directory(path) as tmp:
            manifest = _fill_directory(tmp, index, rows, manifest, skipped, whitening)
    except BaseException:
        index.discard()
        raise
    _publish(index, previous, path)
    logger.info("wrote index directory %s (%d items, dim %d)", path, manifest.count, manifest.dim)
    return path


def _publish(index: VectorIndex, previous: Manifest | None, path: Path) -> None:
    """Make the backend's new data live once the directory is in place; a failure there is a warning, not an error.

    The directory is already complete and reads exactly what it was written with (Qdrant: its own physical
    collection), so searches through it are right; what a failed publish leaves is the backend-side pointer
    (the Qdrant alias other clients follow) and the previous data, which the message names.
    """
    try:
        index.publish(previous)
    except Exception as exc:
        logger.warning(
            "index directory %s was written, but the %s backend could not make it live for its own clients (%s); "
            "searches through the directory are unaffected; write the index again to retry",
            path,
            index.backend,
            exc,
        )


def _readable_manifest(path: Path) -> Manifest | None:
    """The manifest at ``path`` if there is a readable one: the directory a write replaces (a backend drops its
    old data once the new one is live), or the index whose backend an option is checked against."""
    try:
        return Manifest.read(path / MANIFEST_FILE) if (path / MANIFEST_FILE).is_file() else None
    except IndexFormatError:
        return None


def backend_overrides(index: str | Path, backend: str | None, qdrant_url: str | None) -> dict[str, Any]:
    """The backend options that override an existing index's manifest (``open_index_dir(path, options)``).

    An existing index lives in the backend its manifest names, so ``backend`` is only checked against it, and
    ``qdrant_url`` reaches the same Qdrant collection through another address. One check for every command and
    the server; a missing or unreadable manifest is left to ``open_index_dir``, which reports it.

    Raises:
        BackendMismatchError: ``backend`` names another backend than the manifest, or ``qdrant_url`` is given
            for an index (or a ``backend``) that is not Qdrant.
    """
    if backend is None and qdrant_url is None:
        return {}
    if qdrant_url is not None and backend not in (None, "qdrant"):
        raise BackendMismatchError(f"a Qdrant URL goes with the qdrant backend, not {backend}")
    manifest = _readable_manifest(Path(index))
    recorded = manifest.backend if manifest is not None else None
    if recorded is not None and backend is not None and backend != recorded:
        raise BackendMismatchError(
            f"index {index} lives in the {recorded} backend, not {backend}; leave out the backend option"
        )
    if recorded is not None and qdrant_url is not None and recorded != "qdrant":
        raise BackendMismatchError(f"a Qdrant URL applies to Qdrant indexes; {index} is a {recorded} index")
    return {"url": qdrant_url} if qdrant_url else {}


def append_to_index_dir(
    path: str | Path,
    vectors: np.ndarray,
    rows: list[MetadataRow],
    skipped: SkipReport,
    history: Mapping[str, Any],
    backend_options: Mapping[str, Any] | None = None,
) -> tuple[int, int]:
    """Add vectors and their metadata to an existing index directory, atomically.

    Ids continue after the largest id in the index: ``rows[j].id`` (counted from 0 for this batch, gaps
    allowed) becomes ``first_id + rows[j].id``. The vector index is extended (an IVF index keeps its trained
    centroids), the metadata, skipped list, count, checksum and history are updated, and the new directory
    replaces the old one only when complete: a crash leaves the previous index as it was. A backend that
    writes in place (a Qdrant collection) has the new ids removed again when writing the directory fails;
    only a hard kill between the two leaves extra points behind, which ``open_index_dir`` then reports as a
    count mismatch.

    Args:
        path: the index directory.
        vectors: ``(M, query_dim)`` L2-normalised float32 in the encoder's space, row ``j`` for ``rows[j]``;
            an index with a whitening whitens them with it (the one its other vectors went through).
        rows: metadata with batch-relative ids.
        skipped: files of this batch left out as unreadable (appended to ``skipped.tsv``).
        history: the ``HistoryEntry`` dict recorded in the manifest.
        backend_options: override the manifest's backend options, as for ``open_index_dir``.

    Returns:
        ``(first_id, count)``: the id offset used and the index size afterwards.

    Raises:
        IndexFormatError: ``path`` is not a valid index directory, or the vectors do not fit it.
    """
    path = Path(path)
    with open_index_dir(path, backend_options) as current:
        max_id = current.metadata.max_id()
        first_id = 0 if max_id is None else max_id + 1
        index = current.index
        if vectors.ndim != 2 or vectors.shape[1] != current.query_dim:
            raise IndexFormatError(
                f"vectors of shape {vectors.shape} do not fit the index at {path}, which takes {current.query_dim}-d"
            )
        if current.whitening is not None:
            vectors = current.whitening.apply(vectors)
        ids = np.fromiter((first_id + row.id for row in rows), dtype=np.int64, count=len(rows))
        index.add(vectors, ids, labels=[dict(row.labels) for row in rows])
        report = SkipReport.read(path / SKIPPED_FILE) if (path / SKIPPED_FILE).is_file() else SkipReport()
        report.skipped.extend(skipped.skipped)
        manifest = current.manifest.model_copy(
            update={
                "count": index.ntotal,
                "skipped": current.manifest.skipped + len(skipped),
                "history": [*current.manifest.history, dict(history)],
            }
        )
        shifted = (replace(row, id=first_id + row.id) for row in rows)
        try:
            with atomic_directory(path) as tmp:
                shutil.copyfile(path / METADATA_FILE, tmp / METADATA_FILE)
                if (path / CALIBRATION_PLOT_FILE).is_file():  # the calibration stays valid, so does its plot
                    shutil.copyfile(path / CALIBRATION_PLOT_FILE, tmp / CALIBRATION_PLOT_FILE)
                _fill_directory(tmp, index, shifted, manifest, report, current.whitening)
        except BaseException:
            if index.writes_in_place:  # the live collection already holds them: take them out again
                index.remove(ids)
            raise
        _publish(index, current.manifest, path)
    logger.info("added %d items to %s (now %d)", len(rows), path, manifest.count)
    return first_id, manifest.count


def _fill_directory(
    tmp: Path,
    index: VectorIndex,
    rows: Iterable[MetadataRow | Mapping[str, Any]],
    manifest: Manifest,
    skipped: SkipReport | None,
    whitening: Whitening | None = None,
) -> Manifest:
    """Write index, metadata (added to any ``tmp`` already holds), skipped list, whitening and manifest into ``tmp``."""
    options = index.write_to(tmp)
    manifest = manifest.model_copy(update={"backend": index.backend, "backend_options": options})
    if whitening is not None:
        digest = whitening.save(tmp / WHITENING_FILE)
        manifest = manifest.model_copy(update={"whitening": _whitening_info(whitening, digest)})
    with MetadataStore(tmp / METADATA_FILE) as store:
        store.add_many(rows)
        stored = store.ids()
    index_sha256 = file_sha256(tmp / INDEX_FILE) if INDEX_FILE in index.files else None
    manifest = manifest.model_copy(
        update={"index_sha256": index_sha256, "metadata_sha256": file_sha256(tmp / METADATA_FILE)}
    )
    if not np.array_equal(stored, np.sort(index.ids())):
        raise IndexFormatError(
            f"metadata rows ({stored.size}) do not cover exactly the {index.ntotal} ids in the index"
        )
    if skipped is not None and len(skipped):
        skipped.write(tmp / SKIPPED_FILE)
    manifest.write(tmp / MANIFEST_FILE)  # last: a directory with a manifest is a complete one
    return manifest


def _whitening_info(whitening: Whitening, sha256: str) -> WhiteningInfo:
    return WhiteningInfo(**whitening.describe(), file=WHITENING_FILE, sha256=sha256)


def check_replaceable(path: Path) -> None:
    """Refuse to overwrite anything but an index directory: ``--out ~/photos`` must not delete photos."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise IndexFormatError(f"refusing to write an index at {path}: it exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / MANIFEST_FILE).is_file():
        raise IndexFormatError(
            f"refusing to replace {path}: it is a non-empty directory without {MANIFEST_FILE}, "
            "so it does not look like an index; choose another output path"
        )


def open_index_dir(path: str | Path, backend_options: Mapping[str, Any] | None = None) -> IndexDirectory:
    """Open an index directory for search, checking that its files agree.

    Args:
        path: the index directory.
        backend_options: override options the manifest records for its backend (e.g. ``{"url": ...}`` to reach
            the Qdrant collection through another address than the one it was built with).

    Raises:
        IndexFormatError: not a directory, a missing file, an unsupported format version, an unknown backend,
            an unreachable backend index, or a dimension/count mismatch between manifest, index and metadata.
    """
    path = Path(path)
    if not path.is_dir() and recover_interrupted_swap(path) is None:
        raise IndexFormatError(f"index directory not found: {path}{_leftover_hint(path)}")
    for attempt in range(_OPEN_ATTEMPTS):
        version = _version(path)
        try:
            opened = _open_version(path, backend_options or {})
        except (IndexFormatError, OSError, sqlite3.Error):
            if attempt + 1 < _OPEN_ATTEMPTS and _version(path) != version:
                continue  # a writer swapped a new version in while this one was read: read that one
            raise
        if _version(path) == version:
            return opened
        opened.close()  # the files may come from two versions: read again
    raise IndexFormatError(f"index directory {path} kept changing while it was opened; try again")


#: A search's label filters: one, several (all must match) or none.
Where = LabelFilter | Sequence[LabelFilter] | None
#: Label filters whose matching ids an open FAISS index directory keeps (a server backend filters itself).
_CACHED_FILTERS = 64
#: How often ``open_index_dir`` reads again when writers keep replacing the directory under it.
_OPEN_ATTEMPTS = 5


def _version(path: Path) -> tuple[int, int] | None:
    """Which version of the index directory is at ``path`` now: its inode (a write swaps in a new directory).

    Writers replace an index directory whole (``retrieval.atomic``: the new directory is exchanged with the
    old one, which is then removed), so a reader that finds the same directory at ``path`` before and after
    reading its files read them all from one version; otherwise it reads again.
    """
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _open_version(path: Path, backend_options: Mapping[str, Any]) -> IndexDirectory:
    """Open the files at ``path`` once (``open_index_dir`` checks that they came from one version)."""
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.is_file():
        raise IndexFormatError(
            f"{path} is not an index directory: {MANIFEST_FILE} is missing "
            f"(expected {MANIFEST_FILE}, {INDEX_FILE} and {METADATA_FILE})"
        )
    manifest = Manifest.read(manifest_file)
    if backend_options:
        manifest = manifest.model_copy(update={"backend_options": {**manifest.backend_options, **backend_options}})
    try:
        backend = backend_class(manifest.backend)
    except UserFacingError as exc:
        raise IndexFormatError(f"index directory {path}: {exc}") from None
    for name in (*backend.files, METADATA_FILE):
        if not (path / name).is_file():
            raise IndexFormatError(f"index directory {path} is incomplete: {name} is missing")
    _verify_checksum(path, manifest)
    try:
        index = backend.open(path, manifest)
    except (OSError, ValueError) as exc:
        raise IndexFormatError(f"index directory {path}: {' '.join(str(exc).split())}") from None
    try:
        return _check_and_wrap(path, manifest, index)
    except BaseException:
        index.close()
        raise


def _check_and_wrap(path: Path, manifest: Manifest, index: VectorIndex) -> IndexDirectory:
    """Check the opened vector index against the manifest, open the metadata and whitening, wrap them."""
    name = _index_name(manifest)
    if index.dim != manifest.dim:
        raise IndexFormatError(
            f"index directory {path}: {MANIFEST_FILE} says dim {manifest.dim} but {name} holds "
            f"{index.dim}-dimensional vectors"
        )
    if index.ntotal != manifest.count:
        raise IndexFormatError(
            f"index directory {path}: {MANIFEST_FILE} says {manifest.count} items but {name} holds {index.ntotal}"
        )
    if isinstance(index, FaissIndex) and manifest.index_sha256 is None:  # older manifest: check what can be checked
        check_vectors(index, f"index directory {path}: {INDEX_FILE}")
        check_graph(index, f"index directory {path}: {INDEX_FILE}")
    whitening = _open_whitening(path, manifest)
    metadata = MetadataStore(path / METADATA_FILE, readonly=True)
    try:
        problem = metadata.integrity_problem() if manifest.metadata_sha256 is None else None
        rows = metadata.count()
    except Exception as exc:
        metadata.close()
        raise IndexFormatError(f"index directory {path}: cannot read {METADATA_FILE}: {exc}") from None
    if problem is not None:
        metadata.close()
        raise IndexFormatError(f"index directory {path}: {METADATA_FILE} is corrupt ({problem}); rebuild the index")
    if rows != manifest.count:
        metadata.close()
        raise IndexFormatError(
            f"index directory {path}: {METADATA_FILE} has {rows} rows but {MANIFEST_FILE} says {manifest.count} items"
        )
    return IndexDirectory(path, manifest, index, metadata, whitening)


def _index_name(manifest: Manifest) -> str:
    """How errors name the vector index: its file, or the backend's collection."""
    if manifest.backend == "faiss":
        return INDEX_FILE
    located = manifest.backend_options.get("collection") or manifest.backend_options.get("physical")
    return f"the {manifest.backend} index" + (f" {located!r}" if located else "")


def _open_whitening(path: Path, manifest: Manifest) -> Whitening | None:
    """The whitening the manifest records, checksum-verified and checked against it, or ``None``."""
    info = manifest.whitening
    if info is None:
        return None
    file = path / info.file
    if not file.is_file():
        raise IndexFormatError(f"index directory {path} is incomplete: {info.file} is missing")
    try:
        whitening = load_whitening(file, info.sha256)
    except IndexFormatError as exc:
        raise IndexFormatError(f"index directory {path}: {exc}") from None
    found = (whitening.method, whitening.dim_in, whitening.dim_out)
    if found != (info.method, info.dim_in, info.dim_out):
        raise IndexFormatError(
            f"index directory {path}: {info.file} holds a {found[0]} whitening {found[1]} -> {found[2]} but "
            f"{MANIFEST_FILE} records {info.method} {info.dim_in} -> {info.dim_out}"
        )
    return whitening


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks so that a large index does not need twice its memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _verify_checksum(path: Path, manifest: Manifest) -> None:
    """Refuse index and metadata files whose bytes are not the ones written with the manifest.

    Older manifests without a checksum are checked structurally instead (see ``open_index_dir``).
    """
    for name, expected in ((INDEX_FILE, manifest.index_sha256), (METADATA_FILE, manifest.metadata_sha256)):
        if expected is None:
            continue
        actual = file_sha256(path / name)
        if actual != expected:
            raise IndexFormatError(
                f"index directory {path}: {name} is corrupt or was modified after the index was written "
                f"(SHA-256 {actual[:12]}..., {MANIFEST_FILE} expects {expected[:12]}...); rebuild the index"
            )


@contextmanager
def _faiss_threads_for(num_queries: int) -> Iterator[None]:
    """One FAISS (OpenMP) thread for a single query, in this thread only; batches keep every thread.

    A single query is the HTTP path's case. FAISS would still split its scan over every core, and on a
    machine whose cores are busy (other requests, the query encoder's own threads) the search then waits at
    the OpenMP barrier for a descheduled thread. On the 2-core development machine under load from other
    jobs, 100 single queries alternating between the two settings took 65-70 ms p50 with two threads against
    1.7-1.9 ms with one on a 10k Flat index, and 9.1 against 1.4 ms on a 1M IVF4096_HNSW32,PQ128x4fs,RFlat
    (``docs/query_path.md``). OpenMP keeps the thread count per calling thread, so the setting is
    restored afterwards and touches no other thread (a concurrent batch search keeps its threads).
    """
    if num_queries != 1:
        yield
        return
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _leftover_hint(path: Path) -> str:
    """Point at a previous version left aside by a crash between the two renames of an atomic write."""
    if not path.parent.is_dir():
        return ""
    old = sorted(path.parent.glob(f".{path.name}.old-*"))
    if not old:
        return ""
    return (
        f" (a previous version was left at {old[-1]} by an interrupted write; rename it to {path.name} to restore it)"
    )


class IndexDirectory(Closeable):
    """An opened index directory: manifest, vector index (any backend) and metadata, searchable.

    Use ``open_index_dir`` to create one. Searching is safe from several threads.

    Every search takes an optional ``where`` (``LabelFilter``: only items whose label at a level is one of some
    values). A backend that stores labels evaluates it itself; for FAISS it becomes the set of matching ids,
    read from the metadata once per filter and kept (the directory never changes under an open handle).

    Queries are given in the encoder's space (``query_dim``); when the index has a ``whitening`` it is
    applied to them here, exactly as it was to the stored vectors.
    """

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        index: VectorIndex,
        metadata: MetadataStore,
        whitening: Whitening | None = None,
    ) -> None:
        if (whitening is None) != (manifest.whitening is None):
            raise IndexFormatError(f"index {path}: the manifest and the given whitening disagree")
        self.path = path
        self.manifest = manifest
        self.index = index
        self.metadata = metadata
        self.whitening = whitening
        self._exact = stores_exact_vectors(index)  # scores of exact unit vectors are bounded by 1
        self._name = _index_name(manifest)
        self._filter_ids: dict[LabelFilter, np.ndarray] = {}
        self._filter_lock = threading.Lock()

    @property
    def dim(self) -> int:
        """Dimension of the stored vectors (after whitening, if any)."""
        return self.manifest.dim

    @property
    def query_dim(self) -> int:
        """Dimension of the query embeddings ``search`` takes: the encoder's (``dim`` unless the index whitens)."""
        return self.manifest.query_dim

    def __len__(self) -> int:
        return self.index.ntotal

    def threshold(self, granularity: str) -> float:
        """The calibrated similarity threshold of level ``granularity``.

        Raises:
            NotCalibratedError: the index has no thresholds (``retrieval index calibrate`` adds them).
            UnknownGranularityError: ``granularity`` is not a calibrated level; the message lists them.
        """
        thresholds = self.manifest.thresholds
        if not thresholds:
            raise NotCalibratedError(
                f"index {self.path} has no granularity thresholds; run `retrieval index calibrate {self.path} "
                "--labels CSV` with labelled validation images first"
            )
        if granularity not in thresholds:
            raise UnknownGranularityError(
                f"unknown granularity {granularity!r}; index {self.path} is calibrated for {', '.join(thresholds)}"
            )
        return thresholds[granularity]

    def search(
        self,
        query_embeddings: np.ndarray,
        k: int,
        granularity: str | None = None,
        where: Where = None,
    ) -> list[SearchResults]:
        """Nearest gallery items for each query embedding, joined with their metadata.

        When the index is calibrated every hit carries ``level``, the finest level whose threshold its
        score reaches. With ``granularity``, only the hits reaching that level's threshold are kept, at
        most ``k``. That is one k-NN search followed by a filter, and it is exact: the passing hits are a
        prefix of the ranking, so the best ``k`` passing hits are the passing hits among the best ``k``
        (for an approximate index, as exact as its k-NN search). Fewer than ``k`` hits means fewer items
        pass; ask for a larger ``k`` to see more of them.

        Args:
            query_embeddings: ``(Q, query_dim)`` L2-normalised float32 embeddings from an encoder compatible
                with ``manifest.encoder_id`` (in its space: the index whitens them when it has a whitening).
            k: hits wanted per query (fewer when the index holds fewer items, or fewer pass ``granularity``).
            granularity: a calibrated level name (e.g. ``"middle"``), or ``None`` for a plain k-NN search.
            where: only items whose label matches (e.g. ``LabelFilter("coarse", ("shoes",))``); the hits are
                the best ``k`` among them.

        Returns:
            One ``SearchResults`` per query, best first.

        Raises:
            ValueError: wrong shape or dimension, or a non-positive ``k``.
            NotCalibratedError, UnknownGranularityError: see :meth:`threshold`.
            UnknownLevelError: ``where`` names a level the index does not have.
        """
        if granularity is not None:
            self.threshold(granularity)  # fail before searching
        return self.join_metadata(self.nearest(query_embeddings, k, where), granularity)

    def nearest(self, query_embeddings: np.ndarray, k: int, where: Where = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """The vector search of ``search`` alone: ``(scores, ids)`` per query, best first, ``NO_ID`` in empty slots.

        ``search`` is ``nearest`` then ``join_metadata``; apart so that ``benchmarks/bench_query_stages.py``
        can time the index and the metadata join separately.

        Raises:
            ValueError: wrong shape or dimension, or a non-positive ``k``.
            IndexFormatError: the index returned scores unit vectors cannot have (a corrupt file).
        """
        queries = self._check_queries(query_embeddings)
        restriction = self._restriction(where)
        with _faiss_threads_for(len(queries)):
            scores, ids = self.index.search(queries, k, **restriction)
        check_scores(np.where(ids == NO_ID, 0.0, scores), queries, self._exact, f"index {self.path}: {self._name}")
        return list(zip(scores, ids, strict=True))

    def search_above(
        self,
        query_embeddings: np.ndarray,
        min_score: float,
        limit: int | None = None,
        where: Where = None,
    ) -> tuple[list[SearchResults], bool]:
        """Every gallery item scoring above ``min_score`` for each query (a range search), best first.

        FAISS's range search is used where the index type has one; elsewhere (GPU IVF, a few CPU types) a
        k-NN search with a growing k filtered at ``min_score`` stands in, and the second return value says so.

        Args:
            query_embeddings: ``(Q, query_dim)`` L2-normalised float32 embeddings (encoder space, as for ``search``).
            min_score: cosine similarity the hits must exceed (between whitened vectors, for a whitened index).
            limit: keep at most this many hits per query (``None``: all of them).
            where: only items whose label matches, as for ``search``.

        Returns:
            One ``SearchResults`` per query, and whether the k-NN fallback was used.

        Raises:
            ValueError: wrong shape or dimension, or a non-positive ``limit``.
        """
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        queries = self._check_queries(query_embeddings)
        restriction = self._restriction(where)
        with _faiss_threads_for(len(queries)):
            found = self.index.range_search(queries, float(min_score), **restriction)
        check_scores(found.scores, queries, self._exact, f"index {self.path}: {self._name}")
        per_query = [found.hits(i) for i in range(len(found))]
        if limit is not None:
            per_query = [(scores[:limit], ids[:limit]) for scores, ids in per_query]
        return self.join_metadata(per_query, None), found.fallback

    def _restriction(self, where: Where) -> dict[str, Any]:
        """The keyword arguments that restrict a backend search to the items matching every filter of ``where``.

        One filter goes to a backend that stores labels as it is; otherwise (FAISS, or several filters) the
        filters become the ids matching all of them, read from the metadata.

        Raises:
            UnknownLevelError: a filter names a level the index does not have.
        """
        filters = [where] if isinstance(where, LabelFilter) else list(where or ())
        for one in filters:
            if one.level not in self.manifest.levels:
                levels = ", ".join(self.manifest.levels) or "none (the index is unlabelled)"
                raise UnknownLevelError(f"cannot filter on label level {one.level!r}; index {self.path} has {levels}")
        if not filters:
            return {}
        if len(filters) == 1 and self.index.stores_labels:
            return {"where": filters[0]}
        ids = self._matching_ids(filters[0])
        for one in filters[1:]:
            ids = np.intersect1d(ids, self._matching_ids(one), assume_unique=True)
        return {"allowed_ids": ids}

    def _matching_ids(self, where: LabelFilter) -> np.ndarray:
        """Sorted ids of the items ``where`` matches, from the metadata (kept for the next search)."""
        with self._filter_lock:
            ids = self._filter_ids.get(where)
            if ids is None:
                if len(self._filter_ids) >= _CACHED_FILTERS:
                    self._filter_ids.pop(next(iter(self._filter_ids)))
                ids = self._filter_ids[where] = self.metadata.ids_with_label(where.level, where.values)
        return ids

    def _check_queries(self, query_embeddings: np.ndarray) -> np.ndarray:
        """Shape-checked queries, whitened when the index is (into the space of its stored vectors)."""
        queries = np.asarray(query_embeddings)
        if queries.ndim != 2 or queries.shape[1] != self.query_dim:
            raise ValueError(
                f"query embeddings must have shape (Q, {self.query_dim}) for this index, got {queries.shape}"
            )
        if self.whitening is not None:
            queries = self.whitening.apply(queries)
        return queries

    def join_metadata(
        self, per_query: list[tuple[np.ndarray, np.ndarray]], granularity: str | None = None
    ) -> list[SearchResults]:
        """Join ranked ``(scores, ids)`` per query (``nearest``) with the metadata, tag levels, filter by granularity.

        Raises:
            IndexFormatError: the metadata file is damaged.
            ValueError: ``granularity`` is not a calibrated level (``search`` checks it first, with a clearer error).
        """
        every_id = np.concatenate([ids for _, ids in per_query]) if per_query else np.zeros(0, np.int64)
        try:
            rows = self.metadata.get_many(np.unique(every_id[every_id != NO_ID]).tolist())
        except (sqlite3.DatabaseError, ValueError) as exc:  # a damaged file, or a row whose JSON no longer parses
            problem = f"{METADATA_FILE} is corrupt ({exc}); rebuild the index"
            raise IndexFormatError(f"index {self.path}: {problem}") from None
        thresholds = self.manifest.thresholds
        results = []
        for q_scores, q_ids in per_query:
            hits = []
            for score, item_id in zip(q_scores.tolist(), q_ids.tolist(), strict=True):
                if item_id == NO_ID:
                    continue
                row = rows.get(item_id)
                hits.append(
                    SearchHit(
                        id=item_id,
                        score=score,
                        path=row.path if row else None,
                        labels=dict(row.labels) if row else {},
                        extra=dict(row.extra) if row else {},
                    )
                )
            found = SearchResults(tuple(hits))
            if thresholds:
                found = tag_hits(found, thresholds)
            if granularity is not None:
                found = filter_by_granularity(found, thresholds, granularity)
            results.append(found)
        return results

    def info(self) -> dict[str, Any]:
        """A JSON-serialisable description for ``retrieval index info``: manifest fields, backend state, ids, files."""
        files = {
            name: (self.path / name).stat().st_size
            for name in (MANIFEST_FILE, INDEX_FILE, METADATA_FILE, SKIPPED_FILE, WHITENING_FILE, CALIBRATION_PLOT_FILE)
            if (self.path / name).is_file()
        }
        described = self.index.describe()
        return {
            "path": str(self.path),
            **self.manifest.model_dump(),
            "ntotal": self.index.ntotal,
            self.index.backend: {key: value for key, value in described.items() if key not in ("backend", "ntotal")},
            "id_range": [int(v) for v in self.metadata.id_range()] if len(self) else None,
            "files": files,
            "size_bytes": sum(files.values()),
        }

    def close(self) -> None:
        self.metadata.close()
        self.index.close()

    def __repr__(self) -> str:
        return f"IndexDirectory({str(self.path)!r}, count={self.manifest.count}, dim={self.dim})"
