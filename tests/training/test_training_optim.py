"""Parameter groups of the optimiser and the shape of the warm-up + cosine schedule."""

from __future__ import annotations

import io
import itertools

import pytest
import torch

from models.encoder import Encoder, EncoderConfig
from retrieval.data.transforms import PreprocessConfig
from training.config import OptimConfig, ScheduleConfig
from training.losses import create_loss
from training.optim import build_optimizer, build_scheduler, param_groups, warmup_cosine


@pytest.fixture(scope="module")
def encoder_and_loss():
    torch.manual_seed(0)
    encoder = Encoder(EncoderConfig(backbone="resnet10t", embedding_dim=16, preprocess=PreprocessConfig(input_size=32)))
    loss = create_loss("multiscale_cosface", [6, 3], 16)
    return encoder, loss


def test_param_groups_split_decay_gem_and_proxies(encoder_and_loss):
    encoder, loss = encoder_and_loss
    cfg = OptimConfig(lr=1e-3, weight_decay=0.1, gem_p_lr_mult=10.0, loss_lr_mult=2.0)
    groups = {g["name"]: g for g in param_groups(encoder, loss, cfg)}
    assert set(groups) == {"decay", "no_decay", "gem_p", "loss"}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}

    assert ids["gem_p"] == {id(encoder.pooling.p)}
    assert groups["gem_p"]["lr"] == pytest.approx(1e-2) and groups["gem_p"]["weight_decay"] == 0.0
    assert ids["loss"] == {id(p) for p in loss.parameters()}
    assert groups["loss"]["lr"] == pytest.approx(2e-3) and groups["loss"]["weight_decay"] == 0.0
    assert id(encoder.head.proj.weight) in ids["decay"] and groups["decay"]["weight_decay"] == 0.1
    assert id(encoder.head.proj.bias) in ids["no_decay"] and groups["no_decay"]["weight_decay"] == 0.0
    norms = [m.weight for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(id(w) in ids["no_decay"] for w in norms)
    # every trainable parameter in exactly one group
    all_ids = [i for s in ids.values() for i in s]
    assert len(all_ids) == len(set(all_ids)) == len(list(encoder.parameters())) + len(list(loss.parameters()))


def test_schedule_warms_up_linearly_then_decays_by_cosine():
    values = [warmup_cosine(s, warmup_steps=10, max_steps=110) for s in range(110)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(b > a for a, b in itertools.pairwise(values[:10]))
    assert values[10] == pytest.approx(1.0)
    assert all(b < a for a, b in itertools.pairwise(values[10:]))
    assert values[60] == pytest.approx(0.5)  # half-way through the cosine
    assert values[-1] < 0.001
    assert warmup_cosine(500, 10, 110, final_ratio=0.1) == pytest.approx(0.1)


def test_scheduler_scales_each_group_and_reloads_with_weights_only(encoder_and_loss):
    encoder, loss = encoder_and_loss
    optimizer = build_optimizer(encoder, loss, OptimConfig(lr=1e-3, gem_p_lr_mult=10.0))
    scheduler = build_scheduler(optimizer, ScheduleConfig(max_steps=20, warmup_steps=4))
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["decay"] == pytest.approx(1e-3 / 4) and lrs["gem_p"] == pytest.approx(1e-2 / 4)
    for _ in range(6):
        optimizer.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save({"s": scheduler.state_dict(), "o": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = build_scheduler(build_optimizer(encoder, loss, OptimConfig(lr=1e-3)), ScheduleConfig(max_steps=20))
    fresh.load_state_dict(state["s"])
    assert fresh.last_epoch == 6
    assert fresh.get_last_lr() == scheduler.get_last_lr()
