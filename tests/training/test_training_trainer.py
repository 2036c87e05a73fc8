"""The trainer end to end on tiny synthetic data: it learns, writes its outputs, resumes bit-exactly."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_synthetic import TINY_DATA, tiny_splits

from models.backbones import BackboneError
from models.checkpoint import load_encoder
from retrieval.config import load_config
from retrieval.data.sampler import HierarchicalPKSampler, PKBatchSampler
from retrieval.data.synthetic import generate_split
from training.batches import SeededSamples, step_batches
from training.checkpoints import TRAIN_STATE_FILE, capture_rng_state, restore_rng_state
from training.config import TrainConfig
from training.losses import LOSSES
from training.losses.classification import MultiScaleProxySoftmaxLoss
from training.metrics_log import read_metrics
from training.trainer import Trainer
from training.trainer import train as train_from_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_data():
    return tiny_splits()


def _config(**overrides) -> TrainConfig:
    base = {
        "name": "tiny-test",
        "data": {"synthetic": TINY_DATA.model_dump()},
        "model": {"backbone": "resnet10t", "embedding_dim": 32, "preprocess": {"input_size": 32}},
        "sampler": {"classes_per_batch": 8, "images_per_class": 4},
        "optim": {"lr": 3e-3},
        "schedule": {"max_steps": 20, "warmup_steps": 2},
        "log_every": 5,
        "checkpoint_every": 0,
        "device": "cpu",
        "seed": 7,
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            base.setdefault(section, {})[field] = value
        else:
            base[key] = value
    return TrainConfig.model_validate(base)


def test_smoke_fit_lowers_the_loss_and_writes_encoder_config_metrics(tiny_data, tmp_path):
    train, val = tiny_data
    result = Trainer(_config(eval_every=10), train, val, out_dir=tmp_path, progress=False).fit()

    assert result.steps == result.steps_this_run == 20 and result.stopped == "completed"
    assert result.images_per_second > 0
    records = read_metrics(tmp_path / "metrics.jsonl")
    losses = [r["loss"] for r in records if r["event"] == "train"]
    assert [r["step"] for r in records if r["event"] == "train"] == [5, 10, 15, 20]
    assert losses[-1] < losses[0]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20]
    assert set(evals[-1]["per_level"]) == {"fine", "middle", "coarse"}
    assert result.val_metrics is not None and 0.0 <= result.val_metrics["mAP"] <= 1.0

    encoder = load_encoder(result.encoder_path)
    assert encoder.encoder_id == result.encoder_id
    assert encoder.config.levels == ["fine", "middle", "coarse"]
    assert encoder.config.provenance["steps"] == 20 and encoder.config.provenance["recipe"] == "tiny-test"
    emb = encoder(torch.randn(2, 3, 32, 32))
    assert emb.shape == (2, 32)
    saved = load_config(TrainConfig, tmp_path / "config.yaml")
    assert saved.optim.lr == 3e-3 and saved.out_dir == tmp_path
    state = torch.load(tmp_path / "checkpoints" / "last" / TRAIN_STATE_FILE, weights_only=True)
    assert state["step"] == 20


class _NoisyLoss(MultiScaleProxySoftmaxLoss):
    """Draws from the python, numpy and torch global RNGs every step, so resume must restore all three."""

    def forward(self, embeddings, labels):
        jitter = 1e-2 * (1 + random.random()) * (1 + float(np.random.rand()))
        return super().forward(embeddings + jitter * torch.randn_like(embeddings), labels)


@pytest.fixture()
def noisy_loss():
    LOSSES.add("_test_noisy", lambda num_classes, embedding_dim: _NoisyLoss(num_classes, embedding_dim, scale=16.0))
    yield "_test_noisy"
    LOSSES._items.pop("_test_noisy")  # keep the registry as the package defines it


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = {f"encoder.{k}": v for k, v in trainer.encoder.state_dict().items()}
    state.update({f"loss.{k}": v for k, v in trainer.objective.loss_fn.state_dict().items()})
    return state


def test_resume_is_bit_exact(tiny_data, tmp_path, noisy_loss):
    train, val = tiny_data
    cfg = _config(schedule__max_steps=8, log_every=2, loss__name=noisy_loss)
    straight = Trainer(cfg.model_copy(update={"eval_every": 3}), train, val, out_dir=tmp_path / "a", progress=False)
    straight.fit()

    first = Trainer(cfg, train, val, out_dir=tmp_path / "b", progress=False)
    part = first.fit(stop_at_step=4)
    assert part.steps == 4 and part.stopped == "stop_at_step"
    resumed = Trainer(cfg, train, val, out_dir=tmp_path / "b", progress=False)
    rest = resumed.fit()
    assert rest.steps == 8 and rest.steps_this_run == 4

    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert straight.optimizer.state_dict()["state"][0]["exp_avg"].equal(
        resumed.optimizer.state_dict()["state"][0]["exp_avg"]
    )
    steps = [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if r["event"] == "train"]
    assert steps == [2, 4, 6, 8]  # no duplicate lines from the resumed half
    # a third call has nothing left to do and changes nothing
    again = Trainer(cfg, train, val, out_dir=tmp_path / "b", progress=False).fit()
    assert again.steps_this_run == 0 and again.encoder_id == rest.encoder_id


def test_time_budget_stops_cleanly_and_saves(tmp_path):
    cfg = _config(schedule__max_minutes=1e-6, out_dir=tmp_path)
    result = train_from_config(cfg, progress=False)  # datasets from cfg.data (the tiny synthetic set)
    assert result.stopped == "time_budget" and result.steps == 1
    assert result.partial and (result.planned_steps, result.schedule_steps) == (20, 20)  # spent before any fit
    assert result.val_report is not None and result.val_report.num_queries == len(generate_split(TINY_DATA, "val"))
    assert (tmp_path / "encoder" / "config.json").is_file()
    state = torch.load(tmp_path / "checkpoints" / "last" / TRAIN_STATE_FILE, weights_only=True)
    assert state["step"] == 1


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


def test_batch_stream_depends_only_on_the_step():
    labels = np.repeat(np.arange(6), 5)
    sampler = PKBatchSampler(labels, classes_per_batch=3, images_per_class=2, seed=1)  # 5 batches per epoch
    full = [b for b, _ in zip(step_batches(sampler, 0, seed=9), range(13), strict=False)]
    tail = [b for b, _ in zip(step_batches(sampler, 7, seed=9), range(6), strict=False)]
    assert tail == full[7:]
    assert len({s for batch in full for _, s in batch}) == 13 * 6  # a fresh augmentation seed per slot
    assert full[0] != full[5]  # the next epoch reshuffles


def test_seeded_samples_are_reproducible_and_keep_the_global_rng(tiny_data):
    from retrieval.data.transforms import PreprocessConfig, build_transforms

    train, _ = tiny_data
    view = SeededSamples(train.with_transform(build_transforms(PreprocessConfig(input_size=32), train=True)))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a, labels = view[(3, 123)]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(view[(3, 123)][0], a) and not torch.equal(view[(3, 124)][0], a)
    assert labels.tolist() == train.labels[3].tolist()


def test_bad_setups_fail_with_clear_messages(tiny_data, tmp_path):
    train, val = tiny_data
    big = Trainer(_config(sampler__classes_per_batch=1000), train, val, out_dir=tmp_path, progress=False)
    assert big.sampler.classes_per_batch == big.config.sampler.classes_per_batch == 36  # all the data's fine classes
    with pytest.raises(ValueError, match=r"^loss\.params\.levels: 'tiny' is not a level of the training data"):
        Trainer(_config(loss__params={"levels": ["tiny"]}), train, val, out_dir=tmp_path, progress=False)
    with pytest.raises(
        KeyError, match=r"loss\.name: unknown loss 'nope'; valid names: aml_.*, csl, .*multiscale_cosface"
    ):
        Trainer(_config(loss__name="nope"), train, val, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"^loss\.params\.scale: must be positive, got -1"):
        Trainer(_config(loss__params={"scale": -1.0}), train, val, out_dir=tmp_path, progress=False)
    assert json.loads(_config().model_dump_json())["device"] == "cpu"


def test_csl_with_sibling_batches_trains_and_resumes_exactly(tiny_data, tmp_path):
    """CSL reads the class tree from the data; sibling batches and resume stay a pure function of the step."""
    train, _ = tiny_data
    overrides = {
        "loss__name": "csl",
        "sampler__siblings": 2,
        "sampler__classes_per_batch": 4,
        "schedule__max_steps": 6,
        "schedule__warmup_steps": 1,
    }
    trainer = Trainer(_config(**overrides), train, None, out_dir=tmp_path / "straight", progress=False)
    assert isinstance(trainer.sampler, HierarchicalPKSampler)
    batch = next(iter(trainer.sampler))
    middle = train.labels[batch, 1].reshape(4, -1)[:, 0]
    assert middle[0] == middle[1] and middle[2] == middle[3]
    straight = trainer.fit()
    assert straight.final_loss is not None and math.isfinite(straight.final_loss)

    first = Trainer(_config(**overrides), train, None, out_dir=tmp_path / "resumed", progress=False)
    first.fit(stop_at_step=3)
    resumed = Trainer(_config(**overrides), train, None, out_dir=tmp_path / "resumed", progress=False).fit()
    a = load_file(straight.encoder_path / "model.safetensors")
    b = load_file(resumed.encoder_path / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sibling_sampler_needs_a_coarser_parent_level(tiny_data, tmp_path):
    train, _ = tiny_data
    with pytest.raises(ValueError, match="parent_level"):
        Trainer(
            _config(sampler__siblings=2, sampler__parent_level="fine"), train, None, out_dir=tmp_path, progress=False
        )
    with pytest.raises(ValueError, match="parent_level"):
        Trainer(
            _config(sampler__siblings=2, sampler__parent_level="size"), train, None, out_dir=tmp_path, progress=False
        )


def test_local_backbone_weights_are_loaded_and_a_missing_file_is_a_clear_error(tiny_data, tmp_path):
    """``backbone_weights`` (``retrieval train --weights``) is the offline way to start from pretrained weights."""
    import timm
    from safetensors.torch import save_file

    train, _ = tiny_data
    torch.manual_seed(123)
    donor = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, tmp_path / "r10t.safetensors")
    trainer = Trainer(_config(backbone_weights=tmp_path / "r10t.safetensors"), train, None, out_dir=tmp_path / "run")
    loaded = trainer.encoder.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in donor.state_dict().items())
    with pytest.raises(BackboneError, match="weights file not found"):
        Trainer(_config(backbone_weights=tmp_path / "missing.pt"), train, None, out_dir=tmp_path / "run2")
