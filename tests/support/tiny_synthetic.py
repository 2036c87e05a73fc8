"""The tiny synthetic dataset the training tests share: 8 images per fine class at 32 px, trained in seconds."""

from __future__ import annotations

from retrieval.data.datasets import InMemoryImageDataset
from retrieval.data.synthetic import SyntheticConfig, generate_split

TINY_DATA = SyntheticConfig(
    seed=3, image_size=32, num_colours=2, num_textures=2, train_per_class=8, val_per_class=3, test_combos_per_shape=1
)


def tiny_splits() -> tuple[InMemoryImageDataset, InMemoryImageDataset]:
    """``(train, val)`` of :data:`TINY_DATA`."""
    return generate_split(TINY_DATA, "train"), generate_split(TINY_DATA, "val")
