"""The index manifest: what an index directory holds and which encoder built it.

A search is only meaningful when the query is embedded by the encoder that built the
index (or a student distilled into its space), with the same dimension and metric. The
manifest records exactly that, so that opening an index can refuse a mismatched pairing
with a clear message instead of returning meaningless neighbours.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from indexing.calibration import Calibration
from indexing.errors import IndexFormatError
from indexing.vector_index import DEFAULT_BACKEND
from indexing.whitening import WHITENING_FILE
from retrieval.atomic import write_file_atomically
from retrieval.config import StrictModel

__all__ = ["INDEX_FORMAT_VERSION", "SUPPORTED_FORMAT_VERSIONS", "HistoryEntry", "Manifest", "WhiteningInfo"]

#: Version written by this code. Bump it when the directory layout or a file's meaning changes.
INDEX_FORMAT_VERSION = 1
#: Versions this code can open.
SUPPORTED_FORMAT_VERSIONS: frozenset[int] = frozenset({1})


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class HistoryEntry:
    """One write that changed an index's content: a build, a merge of shards, or an ``index add``.

    Attributes:
        action: "build", "merge" or "add".
        source: the gallery it read (folder, CSV or path list).
        images: items in that gallery.
        added: vectors it added.
        skipped: unreadable items it left out.
        shards: extraction shards combined (1 unless merged).
        at: ISO-8601 UTC time.
    """

    action: str
    source: str
    images: int
    added: int
    skipped: int
    shards: int = 1
    at: str = field(default_factory=_now_iso)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class WhiteningInfo(StrictModel):
    """The manifest's record of the whitening applied to every stored vector (and to every query).

    Attributes:
        method: the whitening method (``indexing.whitening.WHITENING_METHODS``: "pca", "learned").
        dim_in: dimension of the encoder's vectors: what queries arrive with.
        dim_out: dimension after whitening: the manifest's ``dim``, what the index stores.
        file: the whitening file in the index directory (always ``whitening.safetensors``; a fixed name, so a
            manifest cannot point outside its directory).
        sha256: SHA-256 of that file, checked before it is read.
        fitted_on: what it was fitted on (the gallery, or the ``--whiten-images`` file).
        count: vectors it was fitted on.
    """

    method: str = Field(min_length=1)
    dim_in: int = Field(gt=0)
    dim_out: int = Field(gt=0)
    file: Literal["whitening.safetensors"] = WHITENING_FILE
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    fitted_on: str = ""
    count: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _reduces(self) -> WhiteningInfo:
        if self.dim_out > self.dim_in:
            raise ValueError(f"whitening dim_out {self.dim_out} exceeds dim_in {self.dim_in}")
        return self


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
        thresholds: calibrated similarity threshold per level, finest first, for search at a granularity;
            empty when the index is not calibrated.
        calibration: the full calibration report (``indexing.calibration.Calibration.to_dict()``: objective,
            and per level threshold, precision, recall, F1), or ``None``. When present, ``thresholds`` is
            filled from it if left empty and must otherwise agree with it. Optional, so manifests written
            before calibration existed still load (the format version is unchanged).
        created_at: ISO-8601 UTC time the index was written.
        skipped: number of gallery files skipped as unreadable when the index was built.
        factory_reason: why ``factory`` was chosen (``choose_factory``'s sentence for ``--factory auto``,
            or "given"), or ``None`` for manifests written before it was recorded.
        search_params: the search parameters (FAISS names: ``nprobe``, ``efSearch``) tuned at build time and
            applied as the index's defaults when it is opened; ``None`` for exact or untuned indexes.
        tuning: how ``search_params`` were tuned (``target_recall``, measured ``recall`` at ``k``,
            ``num_queries``, ``reached``), or ``None``.
        index_sha256: SHA-256 of ``index.faiss``, checked on open so a corrupt or modified file is an
            error rather than wrong hits; ``None`` in manifests written before checksums (then the index is
            checked structurally on open, see ``indexing.integrity``, and ``retrieval index verify`` adds it).
        metadata_sha256: SHA-256 of ``metadata.sqlite``, checked on open for the same reason (a flipped byte in
            a stored path would otherwise return the wrong file silently); ``None`` in older manifests.

        history: the writes that made the index (``HistoryEntry.to_dict()``: build, merge, add), oldest
            first; empty in manifests written before it was recorded.
        whitening: the whitening every stored vector went through and every query goes through
            (``WhiteningInfo``), or ``None`` when the index stores the encoder's vectors as they are. With it,
            ``dim`` is the whitened dimension and ``query_dim`` the encoder's.
        backend: the vector index backend holding the vectors (``indexing.vector_index.VECTOR_BACKENDS``):
            "faiss" (``index.faiss`` in the directory; what every directory written before backends existed
            holds) or "qdrant" (a Qdrant collection).
        backend_options: what the backend needs to open its index again (Qdrant: ``url``, ``collection`` alias,
            ``physical`` collection); empty for FAISS.

    The fields after ``count``'s neighbours are optional, so older manifests still load with the same format
    version; ``backend`` and ``backend_options`` are left out of FAISS manifests, which older releases then
    still read.
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
    calibration: dict[str, Any] | None = None
    factory_reason: str | None = None
    search_params: dict[str, int] | None = None
    tuning: dict[str, Any] | None = None
    index_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    metadata_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    history: list[dict[str, Any]] = Field(default_factory=list)
    whitening: WhiteningInfo | None = None
    backend: str = Field(default=DEFAULT_BACKEND, min_length=1)
    backend_options: dict[str, Any] = Field(default_factory=dict)

    @property
    def query_dim(self) -> int:
        """Dimension of the query vectors the index takes: the encoder's (``dim`` unless it whitens)."""
        return self.whitening.dim_in if self.whitening is not None else self.dim

    @model_validator(mode="before")
    @classmethod
    def _thresholds_from_calibration(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("calibration"), dict) and not data.get("thresholds"):
            levels = data["calibration"].get("levels")
            if isinstance(levels, list) and all(isinstance(e, dict) and "level" in e for e in levels):
                data = {**data, "thresholds": {e["level"]: e.get("threshold") for e in levels}}
        return data

    @model_validator(mode="after")
    def _whitening_fits(self) -> Manifest:
        if self.whitening is not None and self.whitening.dim_out != self.dim:
            raise ValueError(f"whitening dim_out {self.whitening.dim_out} differs from the index dim {self.dim}")
        return self

    @model_validator(mode="after")
    def _calibration_agrees(self) -> Manifest:
        if self.calibration is None:
            return self
        calibration = Calibration.from_dict(self.calibration)  # ValueError -> ValidationError
        if self.levels and calibration.level_names != self.levels:
            raise ValueError(f"calibration levels {calibration.level_names} differ from the index levels {self.levels}")
        if self.thresholds != calibration.thresholds:
            raise ValueError(f"thresholds {self.thresholds} disagree with the calibration's {calibration.thresholds}")
        return self

    def calibrated(self) -> Calibration | None:
        """The stored calibration, or ``None`` when the index was never calibrated."""
        return None if self.calibration is None else Calibration.from_dict(self.calibration)

    def write(self, path: str | Path) -> None:
        """Write the manifest as indented JSON, atomically: a temporary sibling, fsync, then ``os.replace``.

        A reader (or a crash) therefore sees either the previous manifest or the new one, never a torn file;
        this is what lets ``retrieval index calibrate`` update a live index directory in place.
        """
        # Without a whitening the field is left out, so releases from before whitening still read the file.
        exclude = {"whitening"} if self.whitening is None else set()
        if self.backend == DEFAULT_BACKEND and not self.backend_options:
            exclude |= {"backend", "backend_options"}
        write_file_atomically(path, self.model_dump_json(indent=2, exclude=exclude) + "\n")

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
