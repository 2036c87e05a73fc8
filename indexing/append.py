"""``index add``: embed more images into an existing index without rebuilding it.

A gallery grows: new products, new photos. Re-embedding a million images to add a thousand is
wasteful, and re-training an IVF quantiser is unnecessary while the new vectors look like the old
ones. The new images go through the same resumable chunked extraction as a build, with the encoder
that built the index (another encoder's vectors would live in another space, so it is refused), and
are appended under ids that continue after the largest existing id.

An index built with a whitening whitens the new vectors with its stored one (``append_to_index_dir`` does
it): the whitening is never refitted, since the vectors already stored and every query must keep sharing
one space. Refit it by rebuilding the index when the gallery has changed a lot.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from indexing.embedding_store import DEFAULT_CHUNK_SIZE, combine_stores
from indexing.errors import IndexFormatError
from indexing.extract import StoreRun
from indexing.extract_job import ExtractOptions, Runtime, default_work_dir, extract_gallery
from indexing.index_dir import append_to_index_dir, open_index_dir
from indexing.manifest import HistoryEntry
from models.checkpoint import load_encoder
from retrieval.config import ConfigError
from retrieval.data.datasets import DatasetError, LabelledImageDataset
from retrieval.data.gallery import Gallery, as_gallery
from retrieval.data.images import SkipReport

__all__ = ["AddSummary", "add_to_index"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AddSummary:
    """What ``add_to_index`` did.

    Attributes:
        index: the index directory.
        added: vectors added.
        skipped: unreadable files of the new gallery (also appended to ``skipped.tsv``).
        first_id: id of the new gallery's position 0 (new ids are ``first_id + position``).
        count: items in the index afterwards.
        seconds: wall-clock time.
        extraction: the extraction run (chunks resumed, images/s).
        whitening: the method of the index's whitening the new vectors went through, or None.
    """

    index: Path
    added: int
    skipped: SkipReport
    first_id: int
    count: int
    seconds: float
    extraction: StoreRun
    whitening: str | None = None


def add_to_index(
    index_path: str | Path,
    dataset: LabelledImageDataset | Gallery,
    encoder_path: str | Path | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    work_dir: str | Path | None = None,
    restart: bool = False,
    keep_embeddings: bool = False,
    amp: bool = True,
    runtime: Runtime = "torch",
    backend_options: Mapping[str, Any] | None = None,
) -> AddSummary:
    """Embed ``dataset`` and append it to the index directory at ``index_path``.

    Args:
        index_path: an existing index directory.
        dataset: the new images; its label levels must be among the index's (an unlabelled list fits any).
        encoder_path: the checkpoint to embed with; default: the one recorded in the manifest. Its
            encoder id must be the index's.
        batch_size, device, num_workers, progress, chunk_size, restart, amp: as for ``build_index``.
        runtime: what runs the encoder: ``torch``, ``onnx`` (ONNX Runtime on CPU) or ``auto``
            (``indexing.extract_job.choose_runtime``).
        work_dir: the resumable extraction directory; default ``INDEX.add-extract`` beside the index.
        keep_embeddings: keep ``work_dir`` afterwards.
        backend_options: override the manifest's backend options (e.g. the Qdrant ``url``).

    The new vectors go through the index's whitening, if it has one (see the module docstring).

    Raises:
        IndexFormatError: not an index directory, or an encoder of another embedding space.
        indexing.onnx_cache.OnnxExtractionError: ``runtime="onnx"`` with an encoder ONNX Runtime cannot run.
        ConfigError: no encoder given and none recorded in the manifest.
        DatasetError: label levels the index does not have, an empty gallery, or no readable image.
    """
    start = time.perf_counter()
    index_path = Path(index_path)
    gallery = as_gallery(dataset)
    options = ExtractOptions(batch_size, chunk_size, device, num_workers, amp, progress, restart, runtime)
    # the whole directory, checksum included, is checked before the long extraction; append_to_index_dir
    # opens it again to write
    with open_index_dir(index_path, backend_options) as current:
        manifest = current.manifest
    unknown = [level for level in gallery.levels if level not in manifest.levels]
    if unknown:
        index_levels = ", ".join(manifest.levels) or "none (an unlabelled index)"
        raise DatasetError(
            f"the new images carry label level(s) {', '.join(unknown)} that index {index_path} does not have "
            f"(its levels: {index_levels})"
        )
    encoder_path = encoder_path or manifest.encoder_path
    if encoder_path is None:
        raise ConfigError(f"index {index_path} records no encoder; pass --encoder with the checkpoint that built it")
    encoder = load_encoder(encoder_path, device=device)
    if str(encoder.encoder_id) != manifest.encoder_id:
        raise IndexFormatError(
            f"encoder {encoder_path} (id {encoder.encoder_id}) is not the encoder that built index {index_path} "
            f"(id {manifest.encoder_id}); its vectors would live in another space"
        )
    work_dir = Path(work_dir) if work_dir is not None else default_work_dir(index_path, "add-extract")
    store, run = extract_gallery(encoder, encoder_path, gallery, work_dir, options)
    stored = combine_stores([store])
    if len(stored) == 0:
        raise DatasetError(f"none of the {len(gallery)} new images could be read; the index is unchanged")
    history = HistoryEntry(
        action="add", source=gallery.source, images=len(gallery), added=len(stored), skipped=len(stored.skipped)
    )
    first_id, count = append_to_index_dir(
        index_path, stored.embeddings, stored.metadata_rows(), stored.skipped, history.to_dict(), backend_options
    )
    if not keep_embeddings:
        shutil.rmtree(work_dir, ignore_errors=True)
    seconds = time.perf_counter() - start
    logger.info("added %d images to %s (ids from %d) in %.1fs", len(stored), index_path, first_id, seconds)
    whitening = manifest.whitening.method if manifest.whitening is not None else None
    return AddSummary(index_path, len(stored), stored.skipped, first_id, count, seconds, run, whitening)
