"""Calibrate an existing index directory: thresholds from labelled validation images, stored in its manifest.

The validation images are embedded by the encoder that built the index (same preprocessing, same space)
and paired with each other, leave-one-out: every ordered pair of distinct validation images is one
(query, hit) example, positive at a level when both share that level's class. Pairing the validation set
with itself keeps the labels in one vocabulary and the result independent of what the gallery holds (and
of an approximate index's reconstruction error); the validation images should be drawn like the queries
and the gallery the index will serve. Only ``manifest.json`` is rewritten (atomically), and
``calibration.png`` (:mod:`indexing.calibration_plot`: the pair-score histograms and thresholds per level) is
written beside it (atomically, before the manifest); the FAISS index and the metadata are untouched. The
calibration stored in the manifest carries its diagnostics (:mod:`indexing.calibration_diagnostics`), the
warnings that say when the thresholds cannot be trusted.

When the queries will come from a student distilled into the index's space (AML), the thresholds should be
fitted to the pairs it will meet: each validation image as the student embeds it against the others as the
index's encoder embeds them (``query_encoder_path``). A student's queries score lower against the gallery
than the teacher's own, so thresholds fitted on teacher pairs cost the student recall.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from indexing.calibration import DEFAULT_BINS, Calibration, count_pairs, parse_objective, thresholds_from_counts
from indexing.calibration_plot import CALIBRATION_PLOT_FILE, write_calibration_plot
from indexing.errors import IndexFormatError
from indexing.extract import Extraction, extract_embeddings
from indexing.index_dir import MANIFEST_FILE, open_index_dir
from indexing.manifest import Manifest
from models.checkpoint import load_encoder
from retrieval.data.datasets import DatasetError, LabelledImageDataset, open_dataset
from retrieval.data.images import SkipReport
from retrieval.errors import UserFacingError

__all__ = ["CalibrationError", "IndexCalibration", "calibrate_index", "open_validation_set"]

logger = logging.getLogger(__name__)


class CalibrationError(UserFacingError, ValueError):
    """Validation data that cannot calibrate this index (wrong levels, too few images, a bad objective)."""


@dataclass(frozen=True)
class IndexCalibration:
    """What ``calibrate_index`` did.

    Attributes:
        calibration: the thresholds, their precision/recall/F1 and diagnostics (warnings), now stored in the
            manifest.
        images: validation images embedded.
        skipped: validation files left out as unreadable.
        manifest: the updated manifest.
        plot: the ``calibration.png`` written in the index directory.
    """

    calibration: Calibration
    images: int
    skipped: SkipReport
    manifest: Manifest
    plot: Path | None = None


def open_validation_set(labels: str | Path, levels: list[str]) -> LabelledImageDataset:
    """Open the labelled validation images with exactly the index's label levels, in its order.

    Extra CSV columns are ignored; a missing level column is an error.

    Raises:
        CalibrationError: the index records no levels.
        DatasetError: the CSV lacks one of the levels (the message names it and the index's) or cannot be read.
    """
    if not levels:
        raise CalibrationError("the index records no label levels, so there is nothing to calibrate")
    try:
        return open_dataset(labels, levels=levels)
    except DatasetError as exc:
        raise DatasetError(f"{exc} (the index's levels are {', '.join(levels)})") from None


def calibrate_index(
    index_path: str | Path,
    labels: str | Path,
    objective: str = "f1",
    *,
    encoder_path: str | Path | None = None,
    query_encoder_path: str | Path | None = None,
    bins: int = DEFAULT_BINS,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
) -> IndexCalibration:
    """Calibrate one threshold per label level of ``index_path``, store it in the manifest, plot it beside it.

    Args:
        index_path: an index directory.
        labels: labelled validation images: a CSV with ``path`` and one column per index level, or a folder
            holding ``labels.csv``.
        objective: ``"f1"`` or ``"precision>=P"`` (see :mod:`indexing.calibration`).
        encoder_path: the encoder checkpoint; default the one that built the index. It must be that encoder
            (or a student distilled into its space).
        query_encoder_path: the encoder that will embed the queries, when it is not the index's own: a student
            distilled into the index's space (AML). Each validation image then queries the others as the student
            embeds it, against the others as the index's encoder embeds them (the pairs a served student meets),
            so the thresholds fit the student's lower scores. Recorded as the calibration's ``query_encoder_id``.
        bins: candidate thresholds over [-1, 1].
        batch_size: images per forward pass.
        device: where the encoder runs.
        num_workers: DataLoader workers decoding images.
        progress: show a progress bar.

    Raises:
        IndexFormatError: ``index_path`` is not a valid index directory.
        CalibrationError: levels that differ from the index's, an encoder from another space, a bad objective,
            fewer than two readable images, a level without any pair sharing a class, or a plot that cannot be
            written (the manifest is then left as it was).
    """
    try:
        parse_objective(objective)
    except ValueError as exc:
        raise CalibrationError(str(exc)) from None
    with open_index_dir(index_path) as index_dir:
        manifest = index_dir.manifest
        path = index_dir.path
        whitening = index_dir.whitening  # the index scores whitened vectors: so must the calibration pairs
    dataset = open_validation_set(labels, list(manifest.levels))

    def embed(checkpoint: Path) -> tuple[str, Extraction]:
        encoder = load_encoder(checkpoint, device=device)
        accepted = {encoder.encoder_id, getattr(encoder.config, "teacher_id", None)} - {None}
        if manifest.encoder_id not in accepted:
            raise CalibrationError(
                f"encoder {encoder.encoder_id} did not build index {path} (built by {manifest.encoder_id}) and was "
                "not distilled into its space; calibrate with the index's own encoder or one of its students"
            )
        extraction = extract_embeddings(
            encoder, dataset, batch_size=batch_size, device=device, num_workers=num_workers, progress=progress
        )
        if len(extraction) < 2:
            raise CalibrationError(f"calibration needs at least 2 readable validation images, got {len(extraction)}")
        return encoder.encoder_id, extraction

    def whitened(embeddings: np.ndarray) -> np.ndarray:  # the index scores whitened vectors: so must the pairs
        return embeddings if whitening is None else whitening.apply(embeddings)

    _, extraction = embed(_encoder_path(path, manifest, encoder_path))
    labels_of = dataset.labels[extraction.indices]
    query_encoder_id = None
    try:
        if query_encoder_path is None:
            counts = count_pairs(whitened(extraction.embeddings), labels_of, schema=list(manifest.levels), bins=bins)
        else:
            query_encoder_id, queries = embed(Path(query_encoder_path))
            if not np.array_equal(queries.indices, extraction.indices):
                raise CalibrationError("the two encoders could not read the same validation images")
            counts = count_pairs(
                whitened(queries.embeddings),
                labels_of,
                whitened(extraction.embeddings),
                labels_of,
                schema=list(manifest.levels),
                bins=bins,
                query_in_gallery=np.arange(len(extraction)),
            )
        calibration = replace(thresholds_from_counts(counts, objective), query_encoder_id=query_encoder_id)
    except ValueError as exc:
        raise CalibrationError(f"cannot calibrate {path} on {labels}: {exc}") from None
    try:
        updated = Manifest.model_validate(
            {**manifest.model_dump(), "calibration": calibration.to_dict(), "thresholds": calibration.thresholds}
        )
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise IndexFormatError(f"index {path}: the calibrated manifest is invalid: {exc}") from None
    try:
        plot = write_calibration_plot(path / CALIBRATION_PLOT_FILE, counts, calibration)
    except OSError as exc:
        raise CalibrationError(f"cannot write {path / CALIBRATION_PLOT_FILE}: {exc}") from None
    updated.write(path / MANIFEST_FILE)
    logger.info("calibrated %s on %d images: %s", path, len(extraction), calibration.thresholds)
    for warning in calibration.warnings:  # INFO, not WARNING: the CLI prints them itself
        logger.info("calibration warning (%s): %s", warning.kind, warning.message)
    return IndexCalibration(
        calibration, images=len(extraction), skipped=extraction.skipped, manifest=updated, plot=plot
    )


def _encoder_path(index_path: Path, manifest: Manifest, given: str | Path | None) -> Path:
    if given is not None:
        return Path(given)
    if not manifest.encoder_path:
        raise CalibrationError(f"index {index_path} does not record the encoder that built it; pass --encoder")
    recorded = Path(manifest.encoder_path)
    return recorded if recorded.is_absolute() else index_path / recorded
