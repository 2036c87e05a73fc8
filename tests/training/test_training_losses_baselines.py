"""Multi-scale baselines against pytorch-metric-learning, and the contract every registered loss keeps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses as pml

from training.losses import available_losses, create_loss, is_distillation_loss

HIERARCHY = np.array([[f, f // 2, f // 4] for f in range(8)])
NUM_CLASSES = [8, 4, 2]
DIM = 10


def _batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, DIM, generator=gen)
    fine = torch.randint(0, 8, (n,), generator=gen)
    fine[: n // 2] = fine[n // 2 :]
    return emb, torch.as_tensor(HIERARCHY)[fine]


@pytest.mark.parametrize(
    ("name", "params", "reference"),
    [
        ("multiscale_triplet", {"margin": 0.2}, lambda: pml.TripletMarginLoss(margin=0.2)),
        ("multiscale_contrastive", {"neg_margin": 0.8}, lambda: pml.ContrastiveLoss(pos_margin=0.0, neg_margin=0.8)),
        ("multiscale_multisimilarity", {}, lambda: pml.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5)),
        ("multiscale_npair", {}, lambda: pml.NPairsLoss()),
    ],
)
def test_pair_baselines_sum_pml_losses_over_levels(name, params, reference):
    emb, labels = _batch()
    ours = create_loss(name, NUM_CLASSES, DIM, **params)
    expected = sum(reference()(emb, labels[:, k]) for k in range(3))
    torch.testing.assert_close(ours(emb, labels), expected)
    only_coarse = create_loss(name, NUM_CLASSES, DIM, levels=[2], **params)
    torch.testing.assert_close(only_coarse(emb, labels), reference()(emb, labels[:, 2]))


def _circle_reference(emb, target, proxies, m, gamma):
    """Class-level Circle loss (Sun et al. 2020, eq. 6 with one positive per sample), written out per sample."""
    losses = []
    for i in range(len(emb)):
        x = emb[i] / emb[i].norm()
        sims = [(x * (w / w.norm())).sum() for w in proxies]
        s_p = sims[int(target[i])]
        alpha_p = torch.clamp(1 + m - s_p.detach(), min=0)
        pos = -gamma * alpha_p * (s_p - (1 - m))
        neg = [gamma * torch.clamp(s.detach() + m, min=0) * (s - m) for j, s in enumerate(sims) if j != int(target[i])]
        losses.append(torch.nn.functional.softplus(pos + torch.logsumexp(torch.stack(neg), 0)))
    return torch.stack(losses).mean()


def test_circle_is_class_level_circle_loss_per_level():
    torch.manual_seed(0)
    loss_fn = create_loss("multiscale_circle", NUM_CLASSES, DIM, m=0.25, gamma=32.0).double()
    emb, labels = _batch()
    emb = emb.double().requires_grad_(True)
    value = loss_fn(emb, labels)
    grads = torch.autograd.grad(value, [emb, *loss_fn.proxies])
    emb_ref = emb.detach().clone().requires_grad_(True)
    proxies = [p.detach().clone().requires_grad_(True) for p in loss_fn.proxies]
    ref = sum(_circle_reference(emb_ref, labels[:, k], proxies[k], 0.25, 32.0) for k in range(3))
    ref_grads = torch.autograd.grad(ref, [emb_ref, *proxies])
    torch.testing.assert_close(value, ref, rtol=1e-9, atol=1e-9)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)


def _copy_single_head(ours, theirs):
    with torch.no_grad():
        theirs.W.copy_(ours.proxies[0].T)  # PML keeps proxies as columns


def test_arcface_matches_pml_with_the_margin_in_radians():
    torch.manual_seed(1)
    ours = create_loss("multiscale_arcface", [9], DIM, scale=30.0, margin=0.3)
    theirs = pml.ArcFaceLoss(num_classes=9, embedding_size=DIM, margin=math.degrees(0.3), scale=30.0)
    _copy_single_head(ours, theirs)
    emb = torch.randn(16, DIM)
    labels = torch.randint(0, 9, (16,))
    emb_a, emb_b = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    a, b = ours(emb_a, labels), theirs(emb_b, labels)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb_a.grad, emb_b.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.proxies[0].grad, theirs.W.grad.T, rtol=1e-4, atol=1e-5)


def test_normsoftmax_matches_pml_normalized_softmax():
    torch.manual_seed(2)
    ours = create_loss("multiscale_normsoftmax", [9], DIM, scale=20.0)
    theirs = pml.NormalizedSoftmaxLoss(num_classes=9, embedding_size=DIM, temperature=1 / 20.0)
    _copy_single_head(ours, theirs)
    emb = torch.randn(16, DIM)
    labels = torch.randint(0, 9, (16,))
    torch.testing.assert_close(ours(emb, labels), theirs(emb, labels), rtol=1e-5, atol=1e-5)


def test_every_loss_is_registered():
    expected = {
        "multiscale_normsoftmax",
        "multiscale_cosface",
        "multiscale_arcface",
        "multiscale_circle",
        "multiscale_triplet",
        "multiscale_npair",
        "multiscale_multisimilarity",
        "multiscale_contrastive",
        "csl",
        "csl_pair",
        "csl_joint",
    }
    assert expected <= set(available_losses())


@pytest.mark.parametrize("name", [n for n in available_losses() if not is_distillation_loss(n)])
def test_every_registered_loss_keeps_the_contract(name):
    """Builds from defaults, takes (N,) and (N, L) labels and a level selection, returns a scalar, keeps no state.

    Distillation losses compare with a teacher's ``ref_emb`` instead; their contract is checked in
    test_training_losses_distillation.py.
    """
    torch.manual_seed(0)
    loss_fn = create_loss(name, NUM_CLASSES, DIM, hierarchy=HIERARCHY)
    emb, labels = _batch()
    emb.requires_grad_(True)
    value = loss_fn(emb, labels)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    assert all(p.grad is not None for p in loss_fn.parameters())

    before = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    with torch.no_grad():
        first = loss_fn(emb, labels)
        loss_fn(torch.randn(6, DIM), labels[:6])
        assert torch.equal(loss_fn(emb, labels), first)
        assert all(torch.equal(before[k], v) for k, v in loss_fn.state_dict().items())

        fine_only = create_loss(name, NUM_CLASSES, DIM, hierarchy=HIERARCHY, levels=[0])
        fine_only.load_state_dict(_first_level_state(loss_fn, fine_only))
        assert torch.isfinite(fine_only(emb, labels[:, 0]))


def _first_level_state(full, single):
    """Carry the fine level's parameters into a fine-only copy of the loss (shapes differ for per-level heads)."""
    wanted = single.state_dict()
    return {k: (full.state_dict()[k] if full.state_dict()[k].shape == v.shape else v) for k, v in wanted.items()}
