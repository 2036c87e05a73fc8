"""Turn the ``data`` section of a training config into training and validation datasets."""

from __future__ import annotations

import logging

from retrieval.data.datasets import LabelledImageDataset, open_dataset
from retrieval.data.dyml import open_dyml_train
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

    Raises:
        DatasetError: a missing or malformed CSV or DyML root (the message names the file).
    """
    if config.source == "synthetic":
        train: LabelledImageDataset = generate_split(config.synthetic, "train")
        synthetic_val = generate_split(config.synthetic, "val")
        logger.info("synthetic data: %d train / %d val images", len(train), len(synthetic_val))
        return train, synthetic_val
    if config.source == "dyml":
        assert config.dyml_root is not None  # enforced by DataConfig's validator
        train = open_dyml_train(config.dyml_root)
        logger.info("DyML data: %d train images from %s", len(train), config.dyml_root)
    else:
        assert config.train_csv is not None  # enforced by DataConfig's validator
        train = open_dataset(config.train_csv, levels=config.levels)
    val = open_dataset(config.val_csv, levels=config.levels) if config.val_csv is not None else None
    return train, val
