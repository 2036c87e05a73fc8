"""One extraction job: a gallery embedded into an extraction directory, resuming what is already there.

``index build`` runs one over the whole gallery into ``OUT.extract``, ``index build --shard I/N`` one over a
slice into ``--out``, ``index add`` one over the new images; the index is built from the chunk files after.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from indexing.embedding_store import DEFAULT_CHUNK_SIZE, EmbeddingStore, ExtractionSpec
from indexing.extract import StoreRun, extract_to_store
from models.checkpoint import load_encoder
from models.encoder import Encoder
from retrieval.config import ConfigError
from retrieval.data.datasets import DatasetError, LabelledImageDataset
from retrieval.data.gallery import Gallery, as_gallery

__all__ = ["ExtractOptions", "default_work_dir", "extract_gallery", "extract_shard"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractOptions:
    """How a gallery is embedded: batching, chunking into resumable files, device and workers.

    Attributes:
        batch_size: images per forward pass.
        chunk_size: gallery positions per chunk file (the unit of resuming and of sharding).
        device: where the encoder runs.
        num_workers: DataLoader worker processes decoding images.
        amp: float16 autocast on CUDA.
        progress: progress bar with images/s and ETA.
        restart: discard an extraction directory left by a different job instead of refusing.
    """

    batch_size: int = 64
    chunk_size: int = DEFAULT_CHUNK_SIZE
    device: str | torch.device = "cpu"
    num_workers: int = 0
    amp: bool = True
    progress: bool = True
    restart: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.chunk_size < 1:
            raise ConfigError(f"batch size and chunk size must be positive, got {self.batch_size}, {self.chunk_size}")


def default_work_dir(out_path: str | Path, suffix: str = "extract") -> Path:
    """Where ``build_index`` keeps its chunk files: ``OUT.extract`` beside the index (removed after success)."""
    out_path = Path(out_path)
    return out_path.parent / f"{out_path.name}.{suffix}"


def extract_gallery(
    encoder: Encoder,
    encoder_path: str | Path,
    gallery: Gallery,
    work_dir: str | Path,
    options: ExtractOptions,
    shard: tuple[int, int] = (0, 1),
) -> tuple[EmbeddingStore, StoreRun]:
    """Embed (the ``shard`` slice of) ``gallery`` into the extraction directory ``work_dir``, resuming it if present.

    Raises:
        ExtractionMismatchError: ``work_dir`` holds another job's chunks and ``options.restart`` is off.
    """
    if len(gallery) == 0:
        raise DatasetError("cannot index an empty gallery")
    spec = ExtractionSpec(
        encoder_id=str(encoder.encoder_id),
        encoder_path=str(Path(encoder_path).resolve()),
        dim=encoder.embedding_dim,
        gallery_source=gallery.source,
        gallery_count=len(gallery),
        gallery_fingerprint=gallery.fingerprint(),
        levels=list(gallery.levels),
        chunk_size=options.chunk_size,
        batch_size=options.batch_size,
        shard_index=shard[0],
        num_shards=shard[1],
    )
    store = EmbeddingStore.open_for(work_dir, spec, restart=options.restart)
    run = extract_to_store(
        encoder,
        gallery,
        store,
        device=options.device,
        num_workers=options.num_workers,
        progress=options.progress,
        amp=options.amp,
    )
    if run.chunks_before:
        logger.info("resumed %s: %d chunks were already embedded", work_dir, run.chunks_before)
    return store, run


def extract_shard(
    encoder_path: str | Path,
    dataset: LabelledImageDataset | Gallery,
    out_dir: str | Path,
    shard: tuple[int, int],
    options: ExtractOptions,
) -> StoreRun:
    """Embed slice ``shard = (I, N)`` of the gallery into the extraction directory ``out_dir`` (resumable).

    ``merge_shards`` later builds the index from all N directories.
    """
    encoder = load_encoder(encoder_path, device=options.device)
    return extract_gallery(encoder, encoder_path, as_gallery(dataset), out_dir, options, shard)[1]
