"""Turn the ``data`` section of a training config into training and validation datasets."""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

from retrieval.config import ConfigError
from retrieval.data.datasets import LabelledImageDataset, open_dataset
from retrieval.data.dyml import open_dyml_train
from retrieval.data.labels import DEFAULT_LEVELS
from retrieval.data.landmarks import open_landmarks_csv
from retrieval.data.synthetic import generate_split
from training.config import DataConfig

__all__ = ["build_datasets", "check_levels"]

logger = logging.getLogger(__name__)


def build_datasets(config: DataConfig) -> tuple[LabelledImageDataset, LabelledImageDataset | None]:
    """Return ``(train, val)``; ``val`` is ``None`` when the config names no validation data.

    ``synthetic`` renders the generator's train and val splits in memory (val holds fresh instances
    of the training classes). ``csv`` opens ``train_csv`` / ``val_csv`` (a CSV file, or a folder with a
    ``labels.csv``), restricted to ``levels`` when given. ``dyml`` opens the official training split of
    ``dyml_root`` (DyML has no validation split, so ``val`` comes from ``val_csv`` or is ``None``).
    ``landmarks`` opens ``landmarks_csv`` (GLDv2 ``train_clean.csv``, ``id,landmark_id`` or ``path,landmark_id``)
    with images under ``landmarks_images``; a ``val_csv`` is read the same way. ``sfm120k`` opens the cirtorch
    SfM-120k layout's train and val splits.

    A ``val_csv`` is read with the training data's levels, so the two always agree (or the validation file's
    missing column is named).

    Raises:
        DatasetError: a missing or malformed CSV or DyML root (the message names the file).
        ConfigError: ``data.levels`` naming columns the CSV lacks, or a CSV without a label column the default
            levels would find (``data.levels`` then names its columns).
    """
    if config.source == "synthetic":
        train: LabelledImageDataset = generate_split(config.synthetic, "train")
        synthetic_val = generate_split(config.synthetic, "val")
        logger.info("synthetic data: %d train / %d val images", len(train), len(synthetic_val))
        return train, synthetic_val
    if config.source == "landmarks":
        assert config.landmarks_csv is not None  # enforced by DataConfig's validator
        train = open_landmarks_csv(config.landmarks_csv, config.landmarks_images)
        logger.info("landmarks data: %d train images of %d landmarks", len(train), train.vocab.num_classes(0))
        landmarks_val = None if config.val_csv is None else open_landmarks_csv(config.val_csv, config.landmarks_images)
        return train, landmarks_val
    if config.source == "sfm120k":
        from retrieval.data.sfm120k import open_sfm120k

        assert config.sfm120k_root is not None  # enforced by DataConfig's validator
        train = open_sfm120k(config.sfm120k_root, "train")
        logger.info("SfM-120k: %d train images of %d clusters", len(train), train.vocab.num_classes(0))
        return train, open_sfm120k(config.sfm120k_root, "val")
    if config.source == "dyml":
        assert config.dyml_root is not None  # enforced by DataConfig's validator
        train = open_dyml_train(config.dyml_root)
        logger.info("DyML data: %d train images from %s", len(train), config.dyml_root)
    else:
        assert config.train_csv is not None  # enforced by DataConfig's validator
        check_levels(config.train_csv, config.levels)
        train = open_dataset(config.train_csv, levels=config.levels)
        logger.info("training levels %s from %s", ", ".join(train.schema.levels), config.train_csv)
    if config.val_csv is None:
        return train, None
    return train, open_dataset(config.val_csv, levels=config.levels or list(train.schema.levels))


def check_levels(spec: Path, levels: Sequence[str] | None) -> None:
    """Fail early, naming ``data.levels``, when the label columns a CSV or image folder offers do not fit.

    Reads the CSV's header only. A spec that does not exist is left to the dataset layer to report.

    Raises:
        ConfigError: levels absent from the CSV's header, a CSV with none of the default level columns, or
            several levels asked of an image folder (it has one: the sub-folder).
    """
    path = Path(spec)
    csv_path = path / "labels.csv" if path.is_dir() else path
    if path.is_dir() and not csv_path.is_file():
        if levels is not None and len(levels) != 1:
            raise ConfigError(f"data.levels: {path} is a folder of class folders, one label level; got {list(levels)}")
        return
    if not csv_path.is_file() or csv_path.suffix.lower() != ".csv":
        return
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            header = [cell.strip() for cell in next(csv.reader(fh), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return  # unreadable: the dataset layer names the problem
    columns = ", ".join(header) or "none"
    if levels is not None:
        missing = [level for level in levels if level not in header]
        if missing:
            raise ConfigError(
                f"data.levels: {', '.join(map(repr, missing))} not among the columns of {csv_path} ({columns})"
            )
    elif header and "path" in header and not any(level in header for level in DEFAULT_LEVELS):
        raise ConfigError(
            f"data.levels: {csv_path} has none of the label columns {', '.join(DEFAULT_LEVELS)} (columns: {columns}); "
            "name its label columns, finest first: --set data.levels=[product,category]"
        )
