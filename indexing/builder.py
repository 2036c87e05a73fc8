"""Build an index directory from an encoder checkpoint and a labelled gallery, in one call.

This is the whole offline half of the engine: embed the gallery (skipping unreadable files),
put the vectors in a FAISS index under the gallery positions as ids, store each item's path
and labels, and write it all atomically with a manifest naming the encoder that built it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from indexing.extract import extract_embeddings
from indexing.faiss_index import FaissIndex
from indexing.index_dir import check_replaceable, write_index_dir
from indexing.manifest import Manifest
from indexing.metadata import MetadataRow
from models.checkpoint import load_encoder
from retrieval.data.datasets import DatasetError, LabelledImageDataset
from retrieval.data.images import SkipReport

__all__ = ["BuildSummary", "build_index"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildSummary:
    """What ``build_index`` did.

    Attributes:
        count: items indexed.
        skipped: gallery files left out as unreadable (also written to ``skipped.tsv`` in the index).
        seconds: wall-clock time of the whole build.
        out_path: the index directory.
        encoder_id: id of the encoder that built it.
    """

    count: int
    skipped: SkipReport
    seconds: float
    out_path: Path
    encoder_id: str


def build_index(
    encoder_path: str | Path,
    dataset: LabelledImageDataset,
    out_path: str | Path,
    factory: str = "Flat",
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
) -> BuildSummary:
    """Embed ``dataset`` with the encoder checkpoint and write an index directory at ``out_path``.

    Item ids are the dataset positions, so ``dataset.names[id]`` is the image of a hit. The
    checkpoint's absolute path is recorded in the manifest as the default query encoder. A
    previous index at ``out_path`` is replaced only once the new one is complete.

    Args:
        encoder_path: an encoder checkpoint directory (``models.save_encoder``).
        dataset: the gallery; its labels are stored as metadata.
        out_path: the index directory to create or replace.
        factory: ``faiss.index_factory`` string; "Flat" is exact search.
        batch_size: images per forward pass.
        device: where the encoder runs.
        num_workers: DataLoader workers decoding images.
        progress: show a progress bar.

    Raises:
        models.CheckpointError: ``encoder_path`` is not a valid checkpoint.
        ValueError: the dataset is empty or none of its images could be read.
        IndexFormatError: ``out_path`` exists and is not an index directory.
    """
    start = time.perf_counter()
    if len(dataset) == 0:
        raise DatasetError("cannot build an index from an empty dataset")
    check_replaceable(Path(out_path))  # fail before the expensive extraction, not after it
    encoder = load_encoder(encoder_path, device=device)
    encoder_id = str(encoder.encoder_id)
    index = FaissIndex(encoder.embedding_dim, factory)  # a bad factory string fails here too
    extraction = extract_embeddings(
        encoder, dataset, batch_size=batch_size, device=device, num_workers=num_workers, progress=progress
    )
    if len(extraction) == 0:
        examples = "; ".join(f"{path}: {reason}" for path, reason in extraction.skipped.skipped[:3])
        raise DatasetError(f"none of the {len(dataset)} images could be read (e.g. {examples})")

    index.train(extraction.embeddings)
    index.add(extraction.embeddings, extraction.indices)
    manifest = Manifest(
        dim=index.dim,
        factory=factory,
        count=index.ntotal,
        encoder_id=encoder_id,
        encoder_path=str(Path(encoder_path).resolve()),
        levels=list(dataset.schema.levels),
        skipped=len(extraction.skipped),
    )
    write_index_dir(out_path, index, _rows(dataset, extraction.indices), manifest, skipped=extraction.skipped)
    seconds = time.perf_counter() - start
    logger.info(
        "indexed %d images (%d skipped) into %s in %.1fs", index.ntotal, len(extraction.skipped), out_path, seconds
    )
    return BuildSummary(
        count=index.ntotal, skipped=extraction.skipped, seconds=seconds, out_path=Path(out_path), encoder_id=encoder_id
    )


def _rows(dataset: LabelledImageDataset, indices: np.ndarray) -> Iterator[MetadataRow]:
    for i in indices.tolist():
        yield MetadataRow(id=i, path=dataset.names[i], labels=dataset.label_names(i))
