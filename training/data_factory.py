"""Turn the ``data`` section of a training config into training and validation datasets."""

from __future__ import annotations

import logging

from retrieval.data.datasets import LabelledImageDataset, open_dataset
from retrieval.data.dyml import open_dyml_train
from retrieval.data.landmarks import open_landmarks_csv
from retrieval.data.synthetic import generate_split
from training.config import DataConfig

__all__ = ["build_datasets"]

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

    Raises:
        DatasetError: a missing or malformed CSV or DyML root (the message names the file).
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
        train = open_dataset(config.train_csv, levels=config.levels)
    val = open_dataset(config.val_csv, levels=config.levels) if config.val_csv is not None else None
    return train, val
