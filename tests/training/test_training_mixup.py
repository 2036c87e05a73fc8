"""Metrix mixup: which items are mixed, the mixed tensors and labels, and the three kinds inside a training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_synthetic import TINY_DATA, tiny_splits

from models.encoder import Encoder, EncoderConfig
from retrieval.config import ConfigError
from retrieval.data.synthetic import generate_split
from retrieval.data.transforms import PreprocessConfig
from training.config import MixupConfig, TrainConfig
from training.losses import create_loss
from training.mixup import Mixup, draw_mixing_pairs, mix, soft_label_losses
from training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_each_anchor_mixes_one_of_its_positives_with_one_of_its_negatives():
    classes = torch.tensor([0, 0, 0, 1, 1, 2])  # class 2 has no positive: its anchor mixes itself
    pairs = draw_mixing_pairs(classes, 2.0, np.random.default_rng(0))
    assert pairs is not None and pairs.anchors.tolist() == [0, 1, 2, 3, 4, 5]
    for anchor, first, second in zip(pairs.anchors, pairs.first, pairs.second, strict=True):
        assert classes[first] == classes[anchor] and classes[second] != classes[anchor]
        assert first != anchor or anchor == 5
    assert int(pairs.first[5]) == 5
    assert torch.all((pairs.lam > 0) & (pairs.lam < 1))


def test_the_draws_are_a_function_of_the_generator_and_anchors_without_negatives_are_left_out():
    classes = torch.tensor([0, 1, 0, 1, 2, 2, 0])
    first = draw_mixing_pairs(classes, 2.0, np.random.default_rng([1, 2]))
    again = draw_mixing_pairs(classes, 2.0, np.random.default_rng([1, 2]))
    other = draw_mixing_pairs(classes, 2.0, np.random.default_rng([1, 3]))
    assert all(torch.equal(a, b) for a, b in zip(vars(first).values(), vars(again).values(), strict=True))
    assert not torch.equal(first.lam, other.lam)
    assert draw_mixing_pairs(torch.tensor([4, 4, 4]), 2.0, np.random.default_rng(0)) is None


def test_lambda_follows_beta_alpha_alpha():
    classes = torch.arange(4000) % 2
    lam = draw_mixing_pairs(classes, 2.0, np.random.default_rng(5)).lam.numpy()
    assert lam.mean() == pytest.approx(0.5, abs=0.02)
    assert lam.var() == pytest.approx(1 / 20, abs=0.005)  # Beta(2, 2): variance ab/((a+b)^2 (a+b+1)) = 1/20
    peaked = draw_mixing_pairs(classes, 50.0, np.random.default_rng(5)).lam.numpy()
    assert peaked.var() < 0.01


def test_mix_interpolates_any_tensor_and_the_labels_of_both_sources_are_kept():
    classes = torch.tensor([0, 0, 1, 1])
    pairs = draw_mixing_pairs(classes, 2.0, np.random.default_rng(3))
    images = torch.randn(4, 3, 5, 6)
    mixed = mix(images, pairs)
    assert mixed.shape == (len(pairs), 3, 5, 6)
    m = 1
    lam = float(pairs.lam[m])
    assert torch.allclose(mixed[m], lam * images[pairs.first[m]] + (1 - lam) * images[pairs.second[m]])
    labels = torch.tensor([[0, 7], [0, 7], [1, 7], [1, 8]])
    soft = pairs.labels(labels)
    assert torch.equal(soft.first, labels[pairs.first]) and torch.equal(soft.second, labels[pairs.second])
    assert torch.equal(soft.lam, pairs.lam)


def _tiny_encoder() -> Encoder:
    torch.manual_seed(0)
    config = EncoderConfig(backbone="resnet10t", embedding_dim=16, preprocess=PreprocessConfig(input_size=32))
    return Encoder(config).eval()


@pytest.mark.parametrize("kind", ["input", "feature", "embedding"])
def test_every_kind_embeds_the_clean_batch_unchanged_and_mixes_what_it_names(kind):
    encoder = _tiny_encoder()
    loss_fn = create_loss("multiscale_multisimilarity", [4], 16)
    mixup = Mixup(MixupConfig(kind=kind), loss_fn, level=0, seed=0)
    images = torch.randn(6, 3, 32, 32)
    labels = torch.tensor([0, 0, 1, 1, 2, 3])
    pairs = mixup.pairs(labels, step=4)
    with torch.no_grad():
        clean, mixed = mixup.embed(encoder, images, pairs)
        plain = encoder(images)
    assert torch.allclose(clean, plain, atol=1e-5)  # eval mode: BatchNorm does not see the mixed inputs
    assert mixed.shape == (len(pairs), 16)
    assert torch.allclose(mixed.norm(dim=1), torch.ones(len(pairs)), atol=1e-5)
    with torch.no_grad():
        if kind == "input":
            expected = encoder(mix(images, pairs))
        elif kind == "feature":
            expected = encoder.embed_feature_map(mix(encoder.feature_map(images), pairs))
        else:
            expected = F.normalize(mix(plain, pairs), dim=1)
    assert torch.allclose(mixed, expected, atol=1e-5)


def test_the_loss_adds_the_weighted_mixed_loss_and_sends_gradients_through_both():
    encoder = _tiny_encoder().train()
    loss_fn = create_loss("multiscale_contrastive", [3], 16)
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 0, 1, 1, 2, 2])
    for weight in (0.0, 0.4):
        mixup = Mixup(MixupConfig(kind="embedding", weight=weight), loss_fn, level=0, seed=1)
        pairs = mixup.pairs(labels, step=0)
        clean, mixed = mixup.embed(encoder, images, pairs)
        total = mixup.loss(clean, labels, mixed, pairs)
        clean_loss = loss_fn(clean, labels)
        mixed_loss = loss_fn.mixed_loss(clean, labels, mixed, pairs.labels(labels))
        assert float(total.detach()) == pytest.approx(float((clean_loss + weight * mixed_loss).detach()), rel=1e-6)
    encoder.zero_grad()
    mixed_only = loss_fn.mixed_loss(clean, labels, mixed, pairs.labels(labels))
    mixed_only.backward()
    assert encoder.head.proj.weight.grad.abs().sum() > 0


def test_a_loss_without_a_soft_label_form_is_refused_with_the_ones_that_have_it():
    names = soft_label_losses()
    assert {"multiscale_contrastive", "multiscale_multisimilarity"} <= set(names)
    assert {"multiscale_proxy_anchor", "multiscale_proxy_nca_pp"} <= set(names)
    with pytest.raises(ConfigError, match="multiscale_proxy_anchor"):
        Mixup(MixupConfig(), create_loss("multiscale_normsoftmax", [3], 16), level=0, seed=0)


@pytest.mark.parametrize("kind", ["input", "feature", "embedding"])
def test_a_run_with_mixup_trains_and_records_it(kind, tmp_path):
    train, val = tiny_splits()
    config = TrainConfig.model_validate(
        {
            "name": "tiny-metrix",
            "model": {"backbone": "resnet10t", "embedding_dim": 16, "preprocess": {"input_size": 32}},
            "loss": {"name": "multiscale_proxy_anchor", "params": {"levels": ["fine"]}},
            "mixup": {"kind": kind, "level": "fine"},
            "sampler": {"classes_per_batch": 8, "images_per_class": 4},
            "optim": {"lr": 3e-3},
            "schedule": {"max_steps": 4, "warmup_steps": 1},
            "log_every": 2,
            "checkpoint_every": 0,
            "device": "cpu",
        }
    )
    result = Trainer(config, train, val, out_dir=tmp_path, progress=False).fit()
    assert result.final_loss is not None and np.isfinite(result.final_loss)
    from models.checkpoint import load_encoder

    assert load_encoder(result.encoder_path).config.provenance["mixup"]["kind"] == kind


def test_mixup_level_must_be_a_level_of_the_data(tmp_path):
    train = generate_split(TINY_DATA, "train")
    config = TrainConfig.model_validate(
        {
            "model": {"backbone": "resnet10t", "embedding_dim": 16, "preprocess": {"input_size": 32}},
            "loss": {"name": "multiscale_contrastive"},
            "mixup": {"level": "species"},
            "sampler": {"classes_per_batch": 8, "images_per_class": 4},
            "device": "cpu",
        }
    )
    with pytest.raises(ConfigError, match=r"mixup\.level"):
        Trainer(config, train, None, out_dir=tmp_path, progress=False)
