"""The index manifest: what an index directory holds and which encoder built it.

A search is only meaningful when the query is embedded by the encoder that built the
index (or a student distilled into its space), with the same dimension and metric. The
manifest records exactly that, so that opening an index can refuse a mismatched pairing
with a clear message instead of returning meaningless neighbours.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError

from indexing.errors import IndexFormatError
from retrieval.config import StrictModel

__all__ = ["INDEX_FORMAT_VERSION", "SUPPORTED_FORMAT_VERSIONS", "Manifest"]

#: Version written by this code. Bump it when the directory layout or a file's meaning changes.
INDEX_FORMAT_VERSION = 1
#: Versions this code can open.
SUPPORTED_FORMAT_VERSIONS: frozenset[int] = frozenset({1})


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Manifest(StrictModel):
    """Contents of ``manifest.json`` in an index directory.

    Attributes:
        format_version: layout version of the directory (see ``SUPPORTED_FORMAT_VERSIONS``).
        dim: embedding dimension of every stored vector.
        metric: similarity used for search; vectors are L2-normalised, so inner product is cosine.
        factory: the ``faiss.index_factory`` string of the index ("Flat" = exact search).
        count: number of indexed items (FAISS vectors and metadata rows).
        encoder_id: id of the encoder whose embeddings the index holds; query encoders must match it.
        encoder_path: the checkpoint that built the index, used as the default query encoder.
        levels: label levels of the metadata labels, finest first.
        thresholds: calibrated similarity threshold per level, for search at a granularity.
        created_at: ISO-8601 UTC time the index was written.
        skipped: number of gallery files skipped as unreadable when the index was built.
    """

    format_version: int = INDEX_FORMAT_VERSION
    dim: int = Field(gt=0)
    metric: Literal["inner_product"] = "inner_product"
    factory: str = "Flat"
    count: int = Field(ge=0)
    encoder_id: str
    encoder_path: str | None = None
    levels: list[str] = Field(default_factory=list)
    thresholds: dict[str, float] = Field(default_factory=dict)
    created_at: str = Field(default_factory=_now_iso)
    skipped: int = Field(default=0, ge=0)

    def write(self, path: str | Path) -> None:
        """Write the manifest as indented JSON."""
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")

    @classmethod
    def read(cls, path: str | Path) -> Manifest:
        """Read and validate a manifest file.

        The format version is checked before the other fields so that an index written by a
        newer release is reported as "unsupported version", not as a list of unknown fields.

        Raises:
            IndexFormatError: missing or unreadable file, unsupported version, or invalid fields.
        """
        path = Path(path)
        if not path.is_file():
            raise IndexFormatError(f"index manifest not found: {path}")
        try:
            payload = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IndexFormatError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(payload, dict):
            raise IndexFormatError(f"{path} must hold a JSON object, got {type(payload).__name__}")
        version = payload.get("format_version")
        if version not in SUPPORTED_FORMAT_VERSIONS:
            supported = ", ".join(str(v) for v in sorted(SUPPORTED_FORMAT_VERSIONS))
            raise IndexFormatError(
                f"{path}: index format version {version!r} is not supported (this release reads {supported}); "
                "rebuild the index with this release"
            )
        try:
            return cls.model_validate(payload)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in exc.errors())
            raise IndexFormatError(f"{path} is not a valid index manifest: {problems}") from exc
