"""The synthetic hierarchical dataset: shape family (coarse) > shape (middle) > shape x colour x texture (fine).

It lets the whole engine (training, indexing, serving, evaluation) run anywhere in minutes, without
downloads, on data whose three label levels nest like those of DyML. 4 families x 3 shapes give 12
middle classes; each shape comes in ``num_colours x num_textures`` fine classes (96 by default).

The split is open-set, as in DyML: for every shape, ``test_combos_per_shape`` of its (colour, texture)
combinations are held out, so the test fine classes never appear in training, while every coarse and
middle class, every colour and every texture does. The held-out combinations rotate from shape to
shape. ``val`` holds fresh instances of the training fine classes (closed-set monitoring).

Every image is a pure function of ``(seed, split, shape, colour, texture, instance)``: the same config
gives byte-identical arrays, one split can be generated without the others, and raising
``train_per_class`` keeps the existing instances.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import Field, field_validator, model_validator

from retrieval.config import StrictModel, save_config
from retrieval.data.datasets import DatasetError, InMemoryImageDataset
from retrieval.data.labels import DEFAULT_LEVELS, LabelSchema, LabelVocabulary
from retrieval.data.synthetic_render import COLOURS, SHAPE_FAMILIES, TEXTURES, RenderStyle, render_shape

__all__ = [
    "SPLITS",
    "SyntheticClass",
    "SyntheticConfig",
    "SyntheticSplits",
    "generate_split",
    "generate_synthetic",
    "split_classes",
    "write_synthetic",
]

logger = logging.getLogger(__name__)

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}  # part of every image's seed, so splits never share instances


class SyntheticConfig(StrictModel):
    """What to generate. Defaults suit a few-minute CPU training run at 64 px (4080 images).

    Attributes:
        seed: base seed; every image's generator is seeded from it and the image's identity.
        image_size: side of the square images in pixels.
        num_colours: colours per shape (the first of red, orange, green, teal, blue, purple, yellow, pink).
        num_textures: textures per shape (the first of solid, striped, dotted, checked, hollow).
        train_per_class: training images per training fine class.
        val_per_class: validation images per training fine class.
        test_per_class: test images per held-out fine class.
        test_combos_per_shape: (colour, texture) combinations of each shape held out for test; 0 makes
            the test split closed-set (fresh instances of the training classes).
        scale_range: shape radius as a fraction of the image side.
        colour_jitter: std of the per-instance colour offset (0-255 units per channel).
        brightness_jitter: per-instance colour gain lies in ``1 +- brightness_jitter``.
        noise_std: per-pixel noise std (0-255 units).
        max_clutter: up to this many faint distractor strokes/blobs per image.
        supersample: shape masks are drawn this many times larger and reduced (anti-aliasing).
        image_format: file format used by :func:`write_synthetic`.
    """

    seed: int = 0
    image_size: int = Field(64, ge=16, le=1024)
    num_colours: int = Field(4, ge=1, le=len(COLOURS))
    num_textures: int = Field(2, ge=1, le=len(TEXTURES))
    train_per_class: int = Field(40, ge=1)
    val_per_class: int = Field(10, ge=1)
    test_per_class: int = Field(20, ge=1)
    test_combos_per_shape: int = Field(2, ge=0)
    scale_range: tuple[float, float] = (0.22, 0.40)
    colour_jitter: float = Field(12.0, ge=0.0)
    brightness_jitter: float = Field(0.12, ge=0.0, lt=1.0)
    noise_std: float = Field(6.0, ge=0.0)
    max_clutter: int = Field(3, ge=0)
    supersample: int = Field(2, ge=1, le=4)
    image_format: Literal["png", "jpg"] = "png"

    @field_validator("scale_range")
    @classmethod
    def _check_scale(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0.0 < low <= high <= 0.5:
            raise ValueError(f"scale_range must satisfy 0 < low <= high <= 0.5, got {value}")
        return value

    @model_validator(mode="after")
    def _check_holdout(self) -> SyntheticConfig:
        combos = self.num_colours * self.num_textures
        if self.test_combos_per_shape >= combos and self.test_combos_per_shape > 0:
            raise ValueError(
                f"test_combos_per_shape={self.test_combos_per_shape} leaves no training class per shape "
                f"(each shape has {combos} colour x texture combinations)"
            )
        return self

    def style(self) -> RenderStyle:
        """The renderer settings of this config."""
        return RenderStyle(
            scale_range=self.scale_range,
            colour_jitter=self.colour_jitter,
            brightness_jitter=self.brightness_jitter,
            noise_std=self.noise_std,
            max_clutter=self.max_clutter,
            supersample=self.supersample,
        )

    def per_class(self, split: str) -> int:
        """Images per fine class in ``split``."""
        return {"train": self.train_per_class, "val": self.val_per_class, "test": self.test_per_class}[
            _check_split(split)
        ]


@dataclass(frozen=True)
class SyntheticClass:
    """One fine class: indices into the shape list, :data:`COLOURS` and :data:`TEXTURES`, and its names."""

    shape_index: int
    colour_index: int
    texture_index: int
    fine: str
    middle: str
    coarse: str


@dataclass(frozen=True)
class SyntheticSplits:
    """The three splits; all share the schema ``(fine, middle, coarse)`` and the middle/coarse class ids."""

    train: InMemoryImageDataset
    val: InMemoryImageDataset
    test: InMemoryImageDataset

    def as_dict(self) -> dict[str, InMemoryImageDataset]:
        return {"train": self.train, "val": self.val, "test": self.test}


def _check_split(split: str) -> str:
    if split not in _SPLIT_CODE:
        raise ValueError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
    return split


def _shapes() -> list[tuple[str, str]]:
    """``(shape, family)`` in a fixed order: the middle-class order."""
    return [(shape, family) for family, shapes in SHAPE_FAMILIES.items() for shape in shapes]


def _held_out(cfg: SyntheticConfig, shape_index: int) -> set[tuple[int, int]]:
    """The (colour, texture) pairs of one shape kept for test.

    Consecutive shapes take consecutive blocks of the combination list, with the texture shifted by the
    shape index, so the held-out colours and textures rotate and every one of them stays in training.
    """
    n_col, n_tex = cfg.num_colours, cfg.num_textures
    held = set()
    for j in range(cfg.test_combos_per_shape):
        idx = (shape_index * cfg.test_combos_per_shape + j) % (n_col * n_tex)
        held.add((idx % n_col, (idx // n_col + shape_index) % n_tex))
    return held


def split_classes(cfg: SyntheticConfig, split: str) -> list[SyntheticClass]:
    """The fine classes present in ``split`` (train and val share theirs), ordered by shape, colour, texture."""
    want_test = _check_split(split) == "test" and cfg.test_combos_per_shape > 0
    colours, textures = list(COLOURS)[: cfg.num_colours], TEXTURES[: cfg.num_textures]
    classes = []
    for s, (shape, family) in enumerate(_shapes()):
        held = _held_out(cfg, s)
        for c, colour in enumerate(colours):
            for t, texture in enumerate(textures):
                if ((c, t) in held) == want_test:
                    classes.append(SyntheticClass(s, c, t, f"{shape}-{colour}-{texture}", shape, family))
    return classes


def _vocabulary(classes: list[SyntheticClass]) -> LabelVocabulary:
    """Fine names of this split only; all middle and coarse names, so their ids agree across splits."""
    shapes = _shapes()
    names = [[c.fine for c in classes], [s for s, _ in shapes], list(SHAPE_FAMILIES)]
    return LabelVocabulary(LabelSchema(DEFAULT_LEVELS), names)


def _instance_seed(cfg: SyntheticConfig, split: str, cls: SyntheticClass, k: int) -> list[int]:
    return [cfg.seed, _SPLIT_CODE[split], cls.shape_index, cls.colour_index, cls.texture_index, k]


def generate_split(cfg: SyntheticConfig, split: str) -> InMemoryImageDataset:
    """Render one split in memory (images ``(N, S, S, 3)`` uint8, ordered by fine class then instance).

    Item names are ``<split>/<fine>/<kkkk>``, the same as the file paths of :func:`write_synthetic`
    without the extension.
    """
    classes = split_classes(cfg, split)
    vocab = _vocabulary(classes)
    per_class, size, style = cfg.per_class(split), cfg.image_size, cfg.style()
    colours = list(COLOURS.values())
    images = np.empty((len(classes) * per_class, size, size, 3), dtype=np.uint8)
    labels = np.empty((len(images), 3), dtype=np.int64)
    names: list[str] = []
    i = 0
    for fine_id, cls in enumerate(classes):
        row = [fine_id, vocab.names[1].index(cls.middle), vocab.names[2].index(cls.coarse)]
        for k in range(per_class):
            rng = np.random.default_rng(_instance_seed(cfg, split, cls, k))
            images[i] = render_shape(
                cls.middle, colours[cls.colour_index], TEXTURES[cls.texture_index], size, rng, style
            )
            labels[i] = row
            names.append(f"{split}/{cls.fine}/{k:04d}")
            i += 1
    return InMemoryImageDataset(images, labels, vocab.schema, vocab, names)


def generate_synthetic(cfg: SyntheticConfig | None = None) -> SyntheticSplits:
    """Render the train, val and test splits in memory."""
    cfg = cfg or SyntheticConfig()
    return SyntheticSplits(**{split: generate_split(cfg, split) for split in SPLITS})


def write_synthetic(
    cfg: SyntheticConfig, out_dir: str | Path, overwrite: bool = False, splits: Sequence[str] = SPLITS
) -> dict[str, Path]:
    """Write the splits as image files plus ``<out_dir>/<split>/labels.csv`` (``path,fine,middle,coarse``).

    Paths in the CSV are relative to the CSV's folder (``<fine>/<kkkk>.png``), so the folder can be moved.
    The config is saved as ``<out_dir>/synthetic.yaml`` so the data can be regenerated exactly.

    Args:
        cfg: what to generate.
        out_dir: destination folder (created if needed).
        overwrite: allow writing over an existing ``labels.csv``; without it, an existing dataset is an error
            rather than silently mixed with new files.
        splits: which of ``train``, ``val``, ``test`` to write (all by default).

    Returns:
        ``{split: path of its labels.csv}``.

    Raises:
        DatasetError: a split folder already holds a ``labels.csv`` and ``overwrite`` is False.
    """
    out_dir = Path(out_dir)
    splits = [_check_split(s) for s in splits]
    if not overwrite:
        existing = [out_dir / s / "labels.csv" for s in splits if (out_dir / s / "labels.csv").exists()]
        if existing:
            raise DatasetError(f"{existing[0]} already exists; choose another folder or pass overwrite=True")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "synthetic.yaml")
    csv_paths = {}
    for split in splits:
        csv_paths[split] = _write_split(generate_split(cfg, split), out_dir / split, split, cfg.image_format)
        logger.info("wrote %s split to %s", split, csv_paths[split])
    return csv_paths


def _write_split(dataset: InMemoryImageDataset, split_dir: Path, split: str, fmt: str) -> Path:
    rows = []
    for i, name in enumerate(dataset.names):
        rel = Path(name).relative_to(split).with_suffix(f".{fmt}")
        path = split_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(dataset.images[i])
        if fmt == "jpg":
            image.save(path, quality=95)
        else:
            image.save(path, compress_level=1)
        rows.append([rel.as_posix(), *dataset.label_names(i).values()])
    csv_path = split_dir / "labels.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", *dataset.schema.levels])
        writer.writerows(rows)
    return csv_path
