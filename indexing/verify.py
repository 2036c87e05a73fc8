"""``retrieval index verify``: the full check of an index directory, and checksums for manifests that lack them.

Opening an index checks its checksums, or, for manifests written before checksums existed, a sample of its
vectors. Verifying reads everything once: every vector is reconstructed and checked (finite, unit length
where stored exactly), the HNSW graph's links, the ids of index and metadata against each other,
SQLite's own consistency check, and the whitening file where the index has one (its checksum and content,
and that it maps encoder vectors to unit vectors of the index's dimension). An index that passes and has
no checksums gets them recorded, so every later open is as strict as for a freshly built index.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexing.errors import IndexFormatError
from indexing.faiss_index import FaissIndex
from indexing.index_dir import (
    INDEX_FILE,
    MANIFEST_FILE,
    METADATA_FILE,
    WHITENING_FILE,
    IndexDirectory,
    file_sha256,
    open_index_dir,
)
from indexing.integrity import check_graph, check_vectors

__all__ = ["VerifyReport", "verify_index_dir"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify_index_dir`` checked.

    Attributes:
        path: the index directory.
        count: items in the index.
        vectors_checked: vectors reconstructed and checked (all of them).
        checksums: "verified" (the manifest had them and they match) or "recorded" (added to the manifest now),
            or "missing" when recording was not asked for.
        whitening: "verified" when the index has a whitening file and it passed, ``None`` when it has none.
    """

    path: str
    count: int
    vectors_checked: int
    checksums: str
    whitening: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verify_index_dir(path: str | Path, *, record: bool = True) -> VerifyReport:
    """Check every part of an index directory; record checksums in its manifest if it has none.

    Args:
        path: the index directory.
        record: rewrite ``manifest.json`` (atomically) with the checksums of the verified files when missing.

    Raises:
        IndexFormatError: any file is corrupt or the files disagree; the message names the file.
    """
    path = Path(path)
    digests = None
    with open_index_dir(path) as directory:  # checksums, counts, dimension, sample of vectors
        manifest = directory.manifest
        in_file = isinstance(directory.index, FaissIndex)  # a server backend's vectors are checked by their ids
        needs_record = (in_file and manifest.index_sha256 is None) or manifest.metadata_sha256 is None
        if needs_record:  # hashed before the full check: a file changed meanwhile then fails the next open
            digests = {"metadata_sha256": file_sha256(path / METADATA_FILE)}
            if in_file:
                digests["index_sha256"] = file_sha256(path / INDEX_FILE)
        where = f"index directory {path}: {INDEX_FILE if in_file else f'the {manifest.backend} index'}"
        checked = 0
        if in_file:
            checked = check_vectors(directory.index, where, sample=None)
            check_graph(directory.index, where)
        problem = directory.metadata.integrity_problem()
        if problem is not None:
            raise IndexFormatError(f"index directory {path}: {METADATA_FILE} is corrupt ({problem}); rebuild the index")
        index_ids = np.sort(directory.index.ids())
        if np.unique(index_ids).size != index_ids.size:
            raise IndexFormatError(f"{where} is corrupt: it holds the same id twice")
        if not np.array_equal(index_ids, directory.metadata.ids()):
            raise IndexFormatError(f"{where}: its ids and the rows of {METADATA_FILE} differ")
        whitening = _check_whitening(directory)
    state = "verified"
    if needs_record:
        state = "missing"
        if record:
            manifest.model_copy(update=digests).write(path / MANIFEST_FILE)
            logger.info("recorded checksums in %s", path / MANIFEST_FILE)
            state = "recorded"
    return VerifyReport(str(path), manifest.count, checked, state, whitening)


def _check_whitening(directory: IndexDirectory) -> str | None:
    """Whiten a few encoder-space probes: finite unit vectors of the index's dimension, or the file is wrong.

    Opening already verified the file's checksum, arrays and dimensions against the manifest; this catches a
    projection that a checksum cannot (one written wrong in the first place: all zeros, say).
    """
    whitening = directory.whitening
    if whitening is None:
        return None
    probes = np.random.default_rng(0).normal(size=(16, whitening.dim_in)).astype(np.float32)
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    try:
        whitened = whitening.apply(probes)
    except ValueError as exc:
        raise IndexFormatError(f"index directory {directory.path}: {WHITENING_FILE} is unusable ({exc})") from None
    if whitened.shape != (16, directory.dim) or not np.isfinite(whitened).all():
        raise IndexFormatError(f"index directory {directory.path}: {WHITENING_FILE} does not map to the index's space")
    return "verified"
