"""Embeddings on disk in chunks, as extraction produces them: what makes bulk indexing resumable and shardable.

An extraction directory holds ``extraction.json`` (which encoder, which gallery, how it is cut) and
``chunks/chunk-NNNNNN.npz``, one file per fixed slice of ``chunk_size`` gallery positions. A chunk file
is written whole or not at all (temporary file, fsync, rename), so after a kill or Ctrl-C the chunks on
disk are exactly the finished ones and a rerun embeds only the rest. Chunk boundaries depend only on the
gallery order and ``chunk_size``, and batches never straddle them, so every chunk holds the same vectors
whether it was embedded in one run, after a resume, or on another machine as part of ``--shard I/N``:
the index built from them is the same.

The spec records the runtime that embedded the chunks (``torch`` or ``onnx``, see ``indexing.extract_job``).
ONNX Runtime reproduces PyTorch only to within float rounding (cosine >= 0.9999, checked when the encoder is
exported; ~1e-7 in practice), so a resumed run must use the runtime that started it: otherwise the index would
silently depend on where the run was interrupted, and two resumes of the same job could differ. Shards are
different: machines with and without a GPU may embed the shards of one gallery, and ``combine_stores`` accepts
shards of both runtimes with a warning, as it does for shards cut into different batch sizes.

A chunk stores, for its readable items, the gallery positions, the float32 embeddings and each item's
metadata (path, labels, extra columns) as JSON text, plus the skipped items with their reasons, so that
``retrieval index merge`` needs nothing but the shard directories. Files are read with
``allow_pickle=False``: no pickled object is ever loaded.
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, ValidationError

from indexing.errors import IndexFormatError
from indexing.metadata import MetadataRow
from retrieval.atomic import atomic_file, write_file_atomically
from retrieval.config import StrictModel
from retrieval.data.images import CorruptImageError, SkipReport

__all__ = [
    "CHUNKS_DIR",
    "DEFAULT_CHUNK_SIZE",
    "SPEC_FILE",
    "Chunk",
    "EmbeddingStore",
    "ExtractionMismatchError",
    "ExtractionSpec",
    "StoredEmbeddings",
    "chunk_owners",
    "combine_stores",
    "parse_shard",
]

logger = logging.getLogger(__name__)

SPEC_FILE = "extraction.json"
CHUNKS_DIR = "chunks"
#: Gallery positions per chunk: at most this much work is redone after a kill.
DEFAULT_CHUNK_SIZE = 2048
EXTRACTION_FORMAT_VERSION = 1
_CHUNK_NAME = re.compile(r"^chunk-(\d{6,})\.npz$")


class ExtractionMismatchError(IndexFormatError):
    """An extraction directory that belongs to another job (encoder, gallery, chunking or shard)."""


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``: slice ``I`` (counted from 0) of ``N``.

    Raises:
        ValueError: not two integers with ``0 <= I < N``.
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"--shard must look like I/N (e.g. 0/4), got {text!r}")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise ValueError(
            f"--shard {text}: I counts from 0 and must be below N (0/{count} .. {max(count - 1, 0)}/{count})"
        )
    return index, count


class ExtractionSpec(StrictModel):
    """Contents of ``extraction.json``: everything two runs must share for their chunks to be interchangeable.

    Attributes:
        encoder_id: the encoder that produces the embeddings.
        encoder_path: its checkpoint (informational; ``encoder_id`` is what is compared).
        dim: embedding dimension.
        gallery_source: where the gallery came from (informational).
        gallery_count: items in the whole gallery (all shards).
        gallery_fingerprint: ``Gallery.fingerprint()``: names, labels and metadata, in order.
        levels: the gallery's label levels.
        chunk_size: gallery positions per chunk.
        batch_size: images per forward pass; batches are cut inside chunks.
        shard_index, num_shards: which slice of the chunks this directory covers.
        runtime: what ran the encoder: ``torch`` or ``onnx`` (ONNX Runtime on CPU); extraction directories
            written before the field existed were embedded by torch.
    """

    format_version: int = EXTRACTION_FORMAT_VERSION
    encoder_id: str
    encoder_path: str | None = None
    dim: int = Field(gt=0)
    gallery_source: str
    gallery_count: int = Field(gt=0)
    gallery_fingerprint: str
    levels: list[str] = Field(default_factory=list)
    chunk_size: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    shard_index: int = Field(default=0, ge=0)
    num_shards: int = Field(default=1, ge=1)
    runtime: Literal["torch", "onnx"] = "torch"
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def total_chunks(self) -> int:
        return -(-self.gallery_count // self.chunk_size)

    def chunk_numbers(self) -> range:
        """The chunks of this shard: a contiguous slice of all chunks, shards as even as possible."""
        total = self.total_chunks
        return range(self.shard_index * total // self.num_shards, (self.shard_index + 1) * total // self.num_shards)

    def chunk_positions(self, chunk: int) -> range:
        """Gallery positions covered by chunk number ``chunk``."""
        return range(chunk * self.chunk_size, min((chunk + 1) * self.chunk_size, self.gallery_count))

    def positions(self) -> int:
        """How many gallery positions this shard covers."""
        chunks = self.chunk_numbers()
        if not chunks:
            return 0
        return self.chunk_positions(chunks[-1]).stop - self.chunk_positions(chunks[0]).start

    def job_differences(self, other: ExtractionSpec) -> list[str]:
        """Fields (other than the shard) on which two specs disagree, as ``name: ours vs theirs``."""
        fields = ("encoder_id", "dim", "gallery_count", "gallery_fingerprint", "levels", "chunk_size")
        return [
            f"{f}: {getattr(self, f)!r} vs {getattr(other, f)!r}"
            for f in fields
            if getattr(self, f) != getattr(other, f)
        ]

    def resume_differences(self, other: ExtractionSpec) -> list[str]:
        """Why ``other`` cannot continue this extraction: the job, the batch size, the shard or the runtime differ.

        The last three change the vectors in their last bits (or which chunks are done), not their meaning:
        shards may differ in them, a resumed run may not (see the module docstring).
        """
        differences = self.job_differences(other)
        for name in ("batch_size", "runtime"):
            if getattr(self, name) != getattr(other, name):
                differences.append(f"{name}: {getattr(self, name)} vs {getattr(other, name)}")
        if (self.shard_index, self.num_shards) != (other.shard_index, other.num_shards):
            differences.append(f"shard: {self.shard_index}/{self.num_shards} vs {other.shard_index}/{other.num_shards}")
        return differences


@dataclass(frozen=True, eq=False)
class Chunk:
    """One chunk file's content: kept items (positions, embeddings, metadata) and skipped ones."""

    positions: np.ndarray
    embeddings: np.ndarray
    rows: list[dict]
    skipped: list[tuple[str, str]]


@dataclass(frozen=True, eq=False)
class StoredEmbeddings:
    """All chunks of one or more stores, in gallery order: what an index is built from.

    Attributes:
        spec: the (first) store's spec.
        positions: ``(M,)`` int64 gallery positions of the kept items, increasing.
        embeddings: ``(M, dim)`` float32.
        rows: metadata per kept item (``path``, ``labels``, ``extra``), aligned with ``positions``.
        skipped: the unreadable items and why.
    """

    spec: ExtractionSpec
    positions: np.ndarray
    embeddings: np.ndarray
    rows: list[dict]
    skipped: SkipReport

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    def metadata_rows(self, id_offset: int = 0) -> list[MetadataRow]:
        """Metadata rows with ids ``id_offset + position``."""
        return [
            MetadataRow(id=id_offset + int(p), path=r.get("path"), labels=r.get("labels", {}), extra=r.get("extra", {}))
            for p, r in zip(self.positions.tolist(), self.rows, strict=True)
        ]


class EmbeddingStore:
    """An extraction directory (see the module docstring). Create or reopen with :meth:`open_for`.

    Args:
        path: the directory.
        spec: its ``extraction.json``.
    """

    def __init__(self, path: Path, spec: ExtractionSpec) -> None:
        self.path = path
        self.spec = spec

    @classmethod
    def open_for(cls, path: str | Path, spec: ExtractionSpec, *, restart: bool = False) -> EmbeddingStore:
        """Start an extraction at ``path``, or continue the one there if it is the same job.

        Args:
            path: the extraction directory; created when missing.
            spec: the job about to run.
            restart: throw away chunks of a different job instead of refusing.

        Raises:
            ExtractionMismatchError: ``path`` holds another job's extraction (without ``restart``); the
                message names the differences.
            IndexFormatError: ``path`` exists and is not an extraction directory.
        """
        path = Path(path)
        foreign = path.exists() and not (path / SPEC_FILE).is_file() and (not path.is_dir() or any(path.iterdir()))
        if foreign:
            raise IndexFormatError(
                f"{path} exists and is not an extraction directory (no {SPEC_FILE}); choose another path"
            )
        if (path / SPEC_FILE).is_file():
            try:
                existing = cls.open(path)
            except IndexFormatError as exc:
                if not restart:
                    raise IndexFormatError(f"{exc}; pass --restart to discard that extraction") from None
                existing = None
            differences = ["unreadable extraction.json"] if existing is None else existing.spec.resume_differences(spec)
            if existing is not None and not differences:
                _remove_torn_chunks(path)
                return existing
            if not restart:
                runtime = existing.spec.runtime if existing is not None else spec.runtime
                same = f" (--runtime {runtime})" if runtime != spec.runtime else ""
                raise ExtractionMismatchError(
                    f"{path} holds the embeddings of another extraction ({'; '.join(differences)}); "
                    f"rerun with the same settings{same} to continue it, or pass --restart to discard it"
                )
            logger.warning("discarding the extraction in %s (%s)", path, "; ".join(differences))
            for chunk_file in (path / CHUNKS_DIR).glob("chunk-*.npz"):
                chunk_file.unlink()
        (path / CHUNKS_DIR).mkdir(parents=True, exist_ok=True)
        _remove_torn_chunks(path)
        write_file_atomically(path / SPEC_FILE, spec.model_dump_json(indent=2) + "\n")
        return cls(path, spec)

    @classmethod
    def open(cls, path: str | Path) -> EmbeddingStore:
        """Open an existing extraction directory (to merge it, or to continue it).

        Raises:
            IndexFormatError: not an extraction directory, or an unreadable ``extraction.json``.
        """
        path = Path(path)
        spec_file = path / SPEC_FILE
        if not spec_file.is_file():
            raise IndexFormatError(
                f"{path} is not an extraction directory ({SPEC_FILE} is missing); "
                "`retrieval index build --shard I/N --out DIR` writes one"
            )
        try:
            spec = ExtractionSpec.model_validate_json(spec_file.read_text())
        except (ValidationError, ValueError) as exc:
            raise IndexFormatError(f"{spec_file} is not a valid extraction spec: {exc}") from None
        if spec.format_version != EXTRACTION_FORMAT_VERSION:
            raise IndexFormatError(f"{spec_file}: extraction format {spec.format_version} is not supported")
        return cls(path, spec)

    def chunk_file(self, chunk: int) -> Path:
        return self.path / CHUNKS_DIR / f"chunk-{chunk:06d}.npz"

    def finished_chunks(self) -> list[int]:
        """Chunks of this shard whose file is complete; an unreadable file is removed so it is embedded again."""
        finished = []
        wanted = set(self.spec.chunk_numbers())
        for chunk_file in sorted((self.path / CHUNKS_DIR).glob("chunk-*.npz")):
            match = _CHUNK_NAME.match(chunk_file.name)
            if not match or int(match.group(1)) not in wanted:
                continue
            try:
                with zipfile.ZipFile(chunk_file) as archive:  # the zip directory sits at the end: a torn file fails
                    archive.namelist()
            except (zipfile.BadZipFile, OSError) as exc:
                logger.warning("re-embedding chunk %s: its file is unreadable (%s)", chunk_file.name, exc)
                chunk_file.unlink(missing_ok=True)
                continue
            finished.append(int(match.group(1)))
        return finished

    def missing_chunks(self) -> list[int]:
        done = set(self.finished_chunks())
        return [c for c in self.spec.chunk_numbers() if c not in done]

    def is_complete(self) -> bool:
        return not self.missing_chunks()

    def write_chunk(
        self,
        chunk: int,
        positions: np.ndarray,
        embeddings: np.ndarray,
        rows: list[dict],
        skipped: list[tuple[str, str]],
    ) -> Path:
        """Write chunk ``chunk`` whole (temporary file, fsync, rename) and return its path."""
        target = self.chunk_file(chunk)
        with atomic_file(target) as fh:
            np.savez(
                fh,
                positions=np.asarray(positions, dtype=np.int64),
                embeddings=np.asarray(embeddings, dtype=np.float32).reshape(-1, self.spec.dim),
                rows=np.array([json.dumps(r, ensure_ascii=False) for r in rows], dtype=str),
                skipped_paths=np.array([p for p, _ in skipped], dtype=str),
                skipped_reasons=np.array([r for _, r in skipped], dtype=str),
            )
        return target

    def read_chunk(self, chunk: int) -> Chunk:
        """Read a chunk file back.

        Raises:
            IndexFormatError: missing or unreadable file, or content that does not fit the spec.
        """
        path = self.chunk_file(chunk)
        try:
            with np.load(path, allow_pickle=False) as data:
                positions = data["positions"].astype(np.int64)
                embeddings = data["embeddings"].astype(np.float32)
                rows = [json.loads(text) for text in data["rows"].tolist()]
                skipped = list(zip(data["skipped_paths"].tolist(), data["skipped_reasons"].tolist(), strict=True))
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            raise IndexFormatError(
                f"cannot read {path}: {exc}; delete it and rerun to embed that chunk again"
            ) from None
        expected = self.spec.chunk_positions(chunk)
        if (
            embeddings.shape != (len(positions), self.spec.dim)
            or len(rows) != len(positions)
            or len(positions) + len(skipped) != len(expected)
            or (len(positions) and (positions.min() < expected.start or positions.max() >= expected.stop))
        ):
            raise IndexFormatError(f"{path} does not hold chunk {chunk} of this extraction; delete it and rerun")
        return Chunk(positions, embeddings, rows, skipped)

    def __repr__(self) -> str:
        return f"EmbeddingStore({str(self.path)!r}, shard {self.spec.shard_index}/{self.spec.num_shards})"


def _remove_torn_chunks(path: Path) -> None:
    """Delete the temporary files of chunks whose writer was killed before renaming them into place."""
    for torn in (path / CHUNKS_DIR).glob(".chunk-*.tmp-*"):
        torn.unlink(missing_ok=True)


def chunk_owners(stores: list[EmbeddingStore]) -> list[EmbeddingStore]:
    """The store holding each chunk of one extraction, in chunk order, after checking the stores fit together.

    Raises:
        ExtractionMismatchError: the stores belong to different jobs (encoder, gallery, chunking), overlap,
            leave chunks uncovered, or one of them is unfinished; the message says which.
    """
    if not stores:
        raise ExtractionMismatchError("no extraction directories given")
    first = stores[0].spec
    owner: dict[int, EmbeddingStore] = {}
    for store in stores:
        differences = first.job_differences(store.spec)
        if differences:
            raise ExtractionMismatchError(
                f"{store.path} is not a shard of the same extraction as {stores[0].path}: {'; '.join(differences)}"
            )
        missing = store.missing_chunks()
        if missing:
            raise ExtractionMismatchError(
                f"{store.path} is unfinished: {len(missing)} of {len(store.spec.chunk_numbers())} chunks missing; "
                f"rerun `retrieval index build --shard {store.spec.shard_index}/{store.spec.num_shards}` to finish it"
            )
        for chunk in store.spec.chunk_numbers():
            if chunk in owner:
                raise ExtractionMismatchError(f"{owner[chunk].path} and {store.path} both hold chunk {chunk}")
            owner[chunk] = store
    uncovered = [c for c in range(first.total_chunks) if c not in owner]
    if uncovered:
        raise ExtractionMismatchError(
            f"the given shards leave {len(uncovered)} of {first.total_chunks} chunks uncovered "
            f"(first: chunk {uncovered[0]}, gallery positions {first.chunk_positions(uncovered[0]).start}+); "
            "give every shard directory"
        )
    batch_sizes = sorted({s.spec.batch_size for s in stores})
    if len(batch_sizes) > 1:
        logger.warning("shards used different batch sizes %s: vectors may differ in the last bits", batch_sizes)
    runtimes = sorted({s.spec.runtime for s in stores})
    if len(runtimes) > 1:
        logger.warning(
            "shards were embedded by different runtimes (%s): vectors agree to cosine >= 0.9999 (checked when the "
            "encoder was exported), not bit for bit",
            ", ".join(runtimes),
        )
    return [owner[chunk] for chunk in range(first.total_chunks)]


def combine_stores(stores: list[EmbeddingStore]) -> StoredEmbeddings:
    """Read one complete extraction, or the shards of one, into arrays in gallery order.

    Raises:
        ExtractionMismatchError: the stores belong to different jobs (encoder, gallery, chunking), overlap,
            leave chunks uncovered, or one of them is unfinished; the message says which.
    """
    owners = chunk_owners(stores)
    first = stores[0].spec
    positions, embeddings, rows, skipped = [], [], [], SkipReport()
    for chunk in range(first.total_chunks):
        content = owners[chunk].read_chunk(chunk)
        positions.append(content.positions)
        embeddings.append(content.embeddings)
        rows.extend(content.rows)
        for path, reason in content.skipped:
            skipped.add(CorruptImageError(path, reason))
    return StoredEmbeddings(
        spec=first,
        positions=np.concatenate(positions),
        embeddings=np.ascontiguousarray(np.concatenate(embeddings)),
        rows=rows,
        skipped=skipped,
    )
