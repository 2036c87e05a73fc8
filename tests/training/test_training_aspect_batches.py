"""Aspect-ratio batches end to end: landmark CSV -> joint non-square batches -> ArcFace; resume stays bit-exact.

Also trains the glam-synthetic-cpu recipe for two steps (skipped until the "glam" attention is registered).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from retrieval.config import load_config
from retrieval.data.sampler import AspectRatioBatchSampler
from training.batches import step_batches
from training.config import TrainConfig
from training.recipe_paths import recipe_path
from training.trainer import Trainer
from training.trainer import train as train_from_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 8 images in each of three shapes (width, height): landscape 2:1, square, portrait 1:2.
SHAPES = [(64, 32), (48, 48), (32, 64)]
JOINT = {(64, 32): (32, 64), (48, 48): (64, 64), (32, 64): (64, 32)}  # image (w, h) -> batch (height, width)


@pytest.fixture(scope="module")
def landmarks_csv(tmp_path_factory):
    """A ``path,landmark_id`` CSV over 24 noisy images of three aspect ratios and four landmarks."""
    root = tmp_path_factory.mktemp("landmarks")
    rng = np.random.default_rng(0)
    rows = []
    for n in range(24):
        width, height = SHAPES[n % 3]
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{n}.png")
        rows.append(f"{n}.png,landmark{n % 4}")
    (root / "train.csv").write_text("path,landmark_id\n" + "\n".join(rows) + "\n")
    return root / "train.csv"


def _config(csv_path, **overrides) -> TrainConfig:
    base = {
        "name": "aspect-test",
        "data": {"source": "landmarks", "landmarks_csv": str(csv_path)},
        "model": {"backbone": "resnet10t", "embedding_dim": 32, "preprocess": {"input_size": 64}},
        "loss": {"name": "multiscale_arcface", "params": {"levels": ["fine"], "scale": 30.0, "margin": 0.15}},
        "sampler": {"kind": "aspect", "batch_size": 8},
        "optim": {"lr": 3e-3},
        "schedule": {"max_steps": 4, "warmup_steps": 1},
        "log_every": 2,
        "checkpoint_every": 0,
        "device": "cpu",
        "seed": 11,
    }
    base.update(overrides)
    return TrainConfig.model_validate(base)


def _datasets(config: TrainConfig):
    from training.data_factory import build_datasets

    return build_datasets(config.data)


def test_batches_are_resized_jointly_to_the_median_ratio(landmarks_csv, tmp_path):
    config = _config(landmarks_csv)
    train, val = _datasets(config)
    assert val is None and train.schema.levels == ("fine",) and len(train) == 24
    trainer = Trainer(config, train, None, out_dir=tmp_path, progress=False)
    assert isinstance(trainer.sampler, AspectRatioBatchSampler) and len(trainer.sampler) == 3

    keys = step_batches(trainer.sampler, 0, config.seed)
    batches = trainer._batches(0)  # the loop's own stream
    shapes = set()
    for _ in range(6):  # two epochs
        indices = [index for index, _seed in next(keys)]
        images, labels, positions = next(batches)
        assert positions.tolist() == indices  # the dataset positions travel with the batch
        wanted = JOINT[SHAPES[indices[0] % 3]]
        assert {SHAPES[i % 3] for i in indices} == {SHAPES[indices[0] % 3]}  # one ratio family per batch
        assert images.shape == (8, 3, *wanted) and images.dtype == torch.float32
        assert trainer.sampler.batch_shape(indices, long_side=64) == wanted
        assert labels.tolist() == train.labels[indices].tolist()
        shapes.add(wanted)
    batches.close()
    assert shapes == set(JOINT.values())


def test_aspect_training_resumes_bit_exactly(landmarks_csv, tmp_path):
    config = _config(landmarks_csv)
    train, _ = _datasets(config)
    straight = Trainer(config, train, None, out_dir=tmp_path / "straight", progress=False).fit()
    assert straight.steps == 4 and straight.final_loss is not None and np.isfinite(straight.final_loss)

    Trainer(config, train, None, out_dir=tmp_path / "resumed", progress=False).fit(stop_at_step=2)
    resumed = Trainer(config, train, None, out_dir=tmp_path / "resumed", progress=False).fit()
    assert resumed.steps_this_run == 2
    a = load_file(straight.encoder_path / "model.safetensors")
    b = load_file(resumed.encoder_path / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_aspect_setups_fail_clearly(landmarks_csv, tmp_path):
    with pytest.raises(ValueError, match=r"sampler\.batch_size is required"):
        _config(landmarks_csv, sampler={"kind": "aspect"})
    with pytest.raises(ValueError, match=r"sampler\.batch_size applies to sampler\.kind 'aspect'"):
        _config(landmarks_csv, sampler={"batch_size": 8})
    with pytest.raises(ValueError, match=r"data\.landmarks_csv is required"):
        _config(landmarks_csv, data={"source": "landmarks"})
    config = _config(landmarks_csv, sampler={"kind": "aspect", "batch_size": 25})
    train, _ = _datasets(config)
    with pytest.raises(ValueError, match=r"sampler\.batch_size=25 exceeds the 24 training images"):
        Trainer(config, train, None, out_dir=tmp_path, progress=False)


def _glam_registered() -> bool:
    import models.encoder  # noqa: F401  (registers the attention modules)
    from models.registries import ATTENTION

    return "glam" in ATTENTION.names()


def test_glam_synthetic_recipe_trains_two_steps(tmp_path):
    if not _glam_registered():
        pytest.skip('the "glam" attention is not registered yet (models/glam.py)')
    overrides = [
        "data.synthetic.image_size=32",
        "data.synthetic.num_colours=2",
        "data.synthetic.num_textures=2",
        "data.synthetic.train_per_class=3",
        "data.synthetic.val_per_class=2",
        "model.preprocess.input_size=32",
        "sampler.classes_per_batch=4",
        "schedule.max_steps=2",
        "schedule.warmup_steps=1",
        "eval_every=0",
        "device=cpu",
        f"out_dir={tmp_path / 'run'}",
    ]
    config = load_config(TrainConfig, recipe_path("glam-synthetic-cpu"), overrides)
    assert config.model.attention == "glam" and config.loss.name == "multiscale_arcface"
    result = train_from_config(config, progress=False)
    assert result.steps == 2 and result.final_loss is not None and np.isfinite(result.final_loss)
    assert (result.encoder_path / "model.safetensors").is_file()
