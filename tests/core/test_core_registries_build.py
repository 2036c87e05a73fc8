"""Every registered extension (STYLE rule 3) builds from its registry name and does its one job."""

from __future__ import annotations

import pytest
import torch

from models.encoder import Encoder
from models.registries import ATTENTION, POOLING
from training.losses.registry import available_losses, create_loss, is_distillation_loss


@pytest.mark.parametrize("name", ATTENTION.names())
def test_every_attention_keeps_the_feature_map_shape(name):
    module = ATTENTION.get(name)(8)
    assert module(torch.rand(2, 8, 3, 3)).shape == (2, 8, 3, 3)


@pytest.mark.parametrize("name", POOLING.names())
def test_every_pooling_builds_into_an_encoder(name, tiny_encoder_config):
    config = tiny_encoder_config.model_copy(update={"pooling": name, "pooling_params": {}})
    out = Encoder(config).eval()(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 32)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


@pytest.mark.parametrize("name", available_losses())
def test_every_loss_gives_a_finite_differentiable_scalar(name):
    torch.manual_seed(0)
    fine = torch.arange(12) % 6
    labels = torch.stack([fine, fine // 2, fine // 3], dim=1)
    loss = create_loss(name, [6, 3, 2], 16, hierarchy=labels[:6].numpy())  # rows 0..5 are fine classes 0..5
    embeddings = torch.nn.functional.normalize(torch.randn(12, 16), dim=1).requires_grad_()
    if is_distillation_loss(name):  # needs the teacher's vectors: the 12 anchors' own, then a mining pool
        teacher = torch.nn.functional.normalize(embeddings.detach() + torch.randn(12, 16), dim=1)
        ref_emb = torch.cat([teacher, torch.nn.functional.normalize(torch.randn(30, 16), dim=1)])
        rows = 12 + torch.stack([torch.randperm(30)[:6] for _ in range(12)])  # 1 positive + 5 negatives each
        anchors = torch.arange(12)
        pairs = (anchors, rows[:, 0], anchors.repeat_interleave(5), rows[:, 1:].reshape(-1))
        value = loss(embeddings, labels, ref_emb=ref_emb, indices_tuple=pairs)
    else:
        value = loss(embeddings, labels)
    value.backward()
    assert value.ndim == 0 and torch.isfinite(value) and embeddings.grad.abs().sum() > 0


def test_runtimes_are_registered():
    from serving.runtimes import RUNTIMES

    assert RUNTIMES.names() == ["onnxruntime", "tensorrt", "torch"]
