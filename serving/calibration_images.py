"""The images a mobile export is calibrated on and checked against, split so that the check is held out.

Static int8 quantisation picks every activation's range from a sample of real inputs; its accuracy is
then measured on other images, so a range fitted to the very images it is judged on cannot flatter it.
The images come from anything ``retrieval.data.gallery.open_gallery`` reads (a folder, a CSV, a list of
paths), in a seeded random order (a folder sorted by class would otherwise calibrate on one class); a file
that cannot be read is skipped and reported, as in indexing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrieval.data.images import CorruptImageError
from retrieval.data.preprocess import PreprocessConfig, to_uint8_chw
from retrieval.errors import UserFacingError

__all__ = ["MIN_HELD_OUT", "CalibrationError", "CalibrationSplit", "load_calibration_split"]

#: Held-out images needed for a top-10 sample search (each image queries the other ten or more).
MIN_HELD_OUT = 11


class CalibrationError(UserFacingError, ValueError):
    """Too few readable calibration images, or a calibration source that cannot be opened."""


@dataclass(frozen=True)
class CalibrationSplit:
    """Resized uint8 images ``(3, S, S)``: those that calibrate the quantiser and those that check it.

    Attributes:
        calibration: images whose activations set the int8 ranges.
        held_out: other images, for the agreement check.
        skipped: ``(name, reason)`` of each file that could not be read.
        requested_calibration: the calibration count asked for (``calibration`` is shorter when images ran out).
    """

    calibration: list[np.ndarray]
    held_out: list[np.ndarray]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    requested_calibration: int = 0


def load_calibration_split(
    source: str | Path, pre: PreprocessConfig, calibration_count: int = 100, held_out_count: int = 100, seed: int = 0
) -> CalibrationSplit:
    """Read up to ``calibration_count + held_out_count`` images from ``source`` and split them.

    The first ``calibration_count`` readable images (in a seeded shuffle) calibrate; the next ones, up to
    ``held_out_count``, are held out. When fewer are readable, the calibration share shrinks so that at least
    ``min(held_out_count, max(MIN_HELD_OUT, n // 2))`` stay held out: the check is never run on calibration
    images.

    Raises:
        CalibrationError: counts below 1 or ``held_out_count < MIN_HELD_OUT``, an unreadable source, or fewer than
            ``MIN_HELD_OUT + 1`` readable images.
    """
    from retrieval.data.datasets import DatasetError
    from retrieval.data.gallery import open_gallery

    if calibration_count < 1 or held_out_count < MIN_HELD_OUT:
        raise CalibrationError(
            f"need at least 1 calibration image and {MIN_HELD_OUT} held-out images for a top-10 search, "
            f"got calibration count {calibration_count} and held-out count {held_out_count}"
        )
    try:
        gallery = open_gallery(source)
    except DatasetError as exc:
        raise CalibrationError(f"cannot read calibration images from {source}: {exc}") from exc
    wanted = calibration_count + held_out_count
    images: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    for i in np.random.default_rng(seed).permutation(len(gallery)):
        if len(images) == wanted:
            break
        try:
            images.append(to_uint8_chw(gallery.load_image(int(i)), pre))
        except CorruptImageError as exc:
            skipped.append((gallery.names[int(i)], exc.reason))
    if len(images) < MIN_HELD_OUT + 1:
        raise CalibrationError(
            f"{source}: {len(images)} readable image(s) ({len(skipped)} skipped); a mobile export needs at least "
            f"{MIN_HELD_OUT + 1} (calibration plus {MIN_HELD_OUT} held out for the agreement check)"
        )
    n_calibration = min(calibration_count, len(images) - min(held_out_count, max(MIN_HELD_OUT, len(images) // 2)))
    return CalibrationSplit(images[:n_calibration], images[n_calibration:], skipped, calibration_count)
