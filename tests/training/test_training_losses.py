"""Multi-scale proxy losses against a per-sample loop reference and pytorch-metric-learning."""

from __future__ import annotations

import math

import pytest
import torch

from retrieval.registry import UnknownNameError
from training.losses import create_loss

NUM_CLASSES = [7, 4, 2]
DIM = 12


def _batch(n: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, DIM, generator=gen, dtype=torch.float64)
    fine = torch.randint(0, NUM_CLASSES[0], (n,), generator=gen)
    labels = torch.stack([fine, fine % NUM_CLASSES[1], fine % NUM_CLASSES[2]], dim=1)
    return emb, labels


def _reference(emb, labels, proxies, levels, scale, margin):
    """Loop over samples and classes; log-softmax written out by hand."""
    total = emb.new_zeros(())
    for head, level in enumerate(levels):
        level_sum = emb.new_zeros(())
        for i in range(emb.shape[0]):
            x = emb[i] / emb[i].norm()
            target = int(labels[i, level])
            logits = []
            for j in range(proxies[head].shape[0]):
                w = proxies[head][j] / proxies[head][j].norm()
                cos = (x * w).sum()
                logits.append(scale * (cos - margin) if j == target else scale * cos)
            stacked = torch.stack(logits)
            level_sum = level_sum - (stacked[target] - torch.log(torch.exp(stacked).sum()))
        total = total + level_sum / emb.shape[0]
    return total


@pytest.mark.parametrize(
    ("name", "params", "levels", "margin", "scale"),
    [
        ("multiscale_normsoftmax", {}, [0, 1, 2], 0.0, 16.0),
        ("multiscale_cosface", {}, [0, 1, 2], 0.2, 30.0),
        ("multiscale_cosface", {"levels": [2, 0], "scale": 10.0, "margin": 0.35}, [2, 0], 0.35, 10.0),
    ],
)
def test_loss_matches_loop_reference_value_and_gradient(name, params, levels, margin, scale):
    torch.manual_seed(0)
    loss_fn = create_loss(name, NUM_CLASSES, DIM, **params).double()
    emb, labels = _batch()
    emb.requires_grad_(True)
    value = loss_fn(emb, labels)
    grads = torch.autograd.grad(value, [emb, *loss_fn.parameters()])

    emb_ref = emb.detach().clone().requires_grad_(True)
    proxies = [p.detach().clone().requires_grad_(True) for p in loss_fn.parameters()]
    assert len(proxies) == len(levels)
    ref = _reference(emb_ref, labels, proxies, levels, scale, margin)
    ref_grads = torch.autograd.grad(ref, [emb_ref, *proxies])

    assert value.ndim == 0
    torch.testing.assert_close(value, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_cosface_matches_pytorch_metric_learning():
    from pytorch_metric_learning.losses import CosFaceLoss

    torch.manual_seed(1)
    ours = create_loss("multiscale_cosface", [9], DIM, scale=24.0, margin=0.25)
    theirs = CosFaceLoss(num_classes=9, embedding_size=DIM, margin=0.25, scale=24.0)
    with torch.no_grad():
        theirs.W.copy_(ours.proxies[0].T)  # pml stores proxies as columns
    emb = torch.randn(16, DIM)
    labels = torch.randint(0, 9, (16,))
    emb_a = emb.clone().requires_grad_(True)
    emb_b = emb.clone().requires_grad_(True)
    a, b = ours(emb_a, labels), theirs(emb_b, labels)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb_a.grad, emb_b.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.proxies[0].grad, theirs.W.grad.T, rtol=1e-4, atol=1e-6)


def test_vector_labels_mean_finest_level_and_perfect_proxies_give_low_loss():
    loss_fn = create_loss("multiscale_normsoftmax", [5], 5, scale=30.0)
    with torch.no_grad():
        loss_fn.proxies[0].copy_(torch.eye(5))
    labels = torch.arange(5)
    good = loss_fn(torch.eye(5), labels)
    bad = loss_fn(torch.eye(5)[[1, 2, 3, 4, 0]], labels)
    assert good < 1e-3 < math.log(5) < bad
    torch.testing.assert_close(loss_fn(torch.eye(5), labels[:, None]), good)


def test_loss_keeps_no_state_between_calls():
    torch.manual_seed(0)
    loss_fn = create_loss("multiscale_cosface", NUM_CLASSES, DIM)
    before = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    emb, labels = _batch()
    first = loss_fn(emb.float(), labels)
    loss_fn(torch.randn(4, DIM), labels[:4])
    assert torch.equal(loss_fn(emb.float(), labels), first)
    assert all(torch.equal(before[k], v) for k, v in loss_fn.state_dict().items())


def test_bad_inputs_give_clear_errors():
    with pytest.raises(UnknownNameError, match="multiscale_cosface"):
        create_loss("arcfaec", [3], 4)
    with pytest.raises(ValueError, match=r"^loss\.params\.margn: not a parameter of loss 'multiscale_cosface' \(it "):
        create_loss("multiscale_cosface", [3], 4, margn=0.1)
    with pytest.raises(ValueError, match=r"^loss\.params\.levels: must be distinct indices in \[0, 2\), got \[2\]"):
        create_loss("multiscale_cosface", [3, 2], 4, levels=[2])
    loss_fn = create_loss("multiscale_normsoftmax", [3, 2], 4)
    with pytest.raises(ValueError, match="only 1 column"):
        loss_fn(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="level 1 must lie in"):
        loss_fn(torch.randn(2, 4), torch.tensor([[0, 0], [1, 5]]))
    with pytest.raises(ValueError, match="rows"):
        loss_fn(torch.randn(3, 4), torch.tensor([[0, 0], [1, 1]]))
