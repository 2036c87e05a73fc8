"""Cross-Scale Learning against naive per-sample loop references (value and gradient)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval.config import ConfigError
from retrieval.data.labels import class_parents
from training.losses import create_loss

# 8 fine classes -> 4 middle -> 2 coarse; fine f has middle f // 2 and coarse f // 4.
HIERARCHY = np.array([[f, f // 2, f // 4] for f in range(8)])
NUM_CLASSES = [8, 4, 2]
DIM = 6


def _batch(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, DIM, generator=gen, dtype=torch.float64)
    fine = torch.randint(0, 8, (n,), generator=gen)
    fine[: n // 2] = fine[n // 2 :]  # every fine class present has at least two samples (pair form positives)
    return emb, torch.as_tensor(HIERARCHY)[fine]


def _log1p_sum_exp(terms: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    total = like.new_ones(())
    for t in terms:
        total = total + torch.exp(t)
    return torch.log(total)


def _classification_reference(emb, labels, proxies, margins, gamma, negatives, levels):
    total = emb.new_zeros(())
    for k in levels:
        level_sum = emb.new_zeros(())
        for i in range(len(emb)):
            x = emb[i] / emb[i].norm()
            sims = [(x * (w / w.norm())).sum() for w in proxies]
            s_p = sims[int(labels[i, 0])]
            terms = []
            if negatives == "hardest":
                for c in range(NUM_CLASSES[k]):
                    members = [f for f in range(8) if HIERARCHY[f, k] == c]
                    if c == int(labels[i, k]) or not members:
                        continue
                    s_n = torch.stack([sims[f] for f in members]).max()
                    terms.append(gamma * (s_n - s_p + margins[k]))
            else:
                terms = [gamma * (sims[f] - s_p + margins[k]) for f in range(8) if HIERARCHY[f, k] != int(labels[i, k])]
            level_sum = level_sum + _log1p_sum_exp(terms, emb)
        total = total + level_sum / len(emb)
    return total


def _pair_reference(emb, labels, margins, gamma, negatives, levels):
    unit = [e / e.norm() for e in emb]
    anchors = []
    for i in range(len(emb)):
        positives = [p for p in range(len(emb)) if p != i and labels[p, 0] == labels[i, 0]]
        if not positives:
            continue
        pair_losses = []
        for p in positives:
            s_p = (unit[i] * unit[p]).sum()
            value = emb.new_zeros(())
            for k in levels:
                by_class: dict[int, list[torch.Tensor]] = {}
                for j in range(len(emb)):
                    if labels[j, k] != labels[i, k]:
                        by_class.setdefault(int(labels[j, k]), []).append((unit[i] * unit[j]).sum())
                if negatives == "hardest":
                    negs = [torch.stack(v).max() for v in by_class.values()]
                else:
                    negs = [s for v in by_class.values() for s in v]
                value = value + _log1p_sum_exp([gamma * (s - s_p + margins[k]) for s in negs], emb)
            pair_losses.append(value)
        anchors.append(torch.stack(pair_losses).mean())
    return torch.stack(anchors).mean()


def _grads(value, tensors):
    return torch.autograd.grad(value, tensors)


@pytest.mark.parametrize(
    ("params", "levels", "margins", "gamma", "negatives"),
    [
        ({}, [0, 1, 2], [0.25, 0.35, 0.45], 32.0, "hardest"),
        ({"negatives": "all"}, [0, 1, 2], [0.25, 0.35, 0.45], 32.0, "all"),
        ({"levels": [2, 1], "margins": [0.1, 0.2, 0.3], "gamma": 8.0}, [2, 1], [0.1, 0.2, 0.3], 8.0, "hardest"),
    ],
)
def test_csl_classification_matches_loop_reference(params, levels, margins, gamma, negatives):
    torch.manual_seed(0)
    loss_fn = create_loss("csl", NUM_CLASSES, DIM, hierarchy=HIERARCHY, **params).double()
    emb, labels = _batch()
    emb.requires_grad_(True)
    value = loss_fn(emb, labels)
    grads = _grads(value, [emb, loss_fn.proxies])

    emb_ref = emb.detach().clone().requires_grad_(True)
    proxies = loss_fn.proxies.detach().clone().requires_grad_(True)
    ref = _classification_reference(emb_ref, labels, proxies, margins, gamma, negatives, levels)
    ref_grads = _grads(ref, [emb_ref, proxies])

    assert value.ndim == 0 and value > 0
    torch.testing.assert_close(value, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("negatives", ["hardest", "all"])
def test_csl_pair_matches_loop_reference(negatives):
    loss_fn = create_loss("csl_pair", NUM_CLASSES, DIM, negatives=negatives, gamma=4.0)
    emb, labels = _batch(n=10, seed=3)
    emb.requires_grad_(True)
    value = loss_fn(emb, labels)
    (grad,) = _grads(value, [emb])
    emb_ref = emb.detach().clone().requires_grad_(True)
    ref = _pair_reference(emb_ref, labels, [0.25, 0.35, 0.45], 4.0, negatives, [0, 1, 2])
    (ref_grad,) = _grads(ref, [emb_ref])
    torch.testing.assert_close(value, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-10)


def test_csl_joint_is_classification_plus_weighted_pair():
    torch.manual_seed(0)
    joint = create_loss("csl_joint", NUM_CLASSES, DIM, hierarchy=HIERARCHY, pair_weight=0.5).double()
    cls = create_loss("csl", NUM_CLASSES, DIM, hierarchy=HIERARCHY).double()
    pair = create_loss("csl_pair", NUM_CLASSES, DIM)
    cls.load_state_dict({"proxies": joint.classification.proxies.detach()})
    emb, labels = _batch()
    torch.testing.assert_close(joint(emb, labels), cls(emb, labels) + 0.5 * pair(emb, labels))


def test_csl_reads_coarser_labels_from_the_hierarchy_and_checks_them():
    loss_fn = create_loss("csl", NUM_CLASSES, DIM, hierarchy=HIERARCHY).double()
    emb, labels = _batch()
    torch.testing.assert_close(loss_fn(emb, labels[:, 0]), loss_fn(emb, labels))
    wrong = labels.clone()
    wrong[0, 2] = 1 - wrong[0, 2]
    with pytest.raises(ValueError, match="hierarchy"):
        loss_fn(emb, wrong)


def test_csl_prefers_the_ruler_order():
    """Siblings (same middle class) closer than cousins gives a lower loss than cousins closer than siblings."""
    loss_fn = create_loss("csl", [4, 2], 3, hierarchy=np.array([[0, 0], [1, 0], [2, 1], [3, 1]]), gamma=16.0)
    labels = torch.tensor([[0, 0], [1, 0], [2, 1], [3, 1]])

    def loss_at(angles: list[float]) -> float:
        angle = torch.tensor(angles)
        points = torch.stack([torch.cos(angle), torch.sin(angle), torch.zeros(4)], dim=1)
        with torch.no_grad():
            loss_fn.proxies.copy_(points)
            return float(loss_fn(points, labels))

    assert loss_at([0.0, 0.6, 2.0, 2.6]) < loss_at([0.0, 2.0, 0.6, 2.6])


def test_csl_needs_the_hierarchy_and_validates_it():
    with pytest.raises(ConfigError, match="hierarchy"):
        create_loss("csl", NUM_CLASSES, DIM)
    with pytest.raises(ValueError, match="shape"):
        create_loss("csl", NUM_CLASSES, DIM, hierarchy=HIERARCHY[:5])
    with pytest.raises(ValueError, match="one value per label level"):
        create_loss("csl", NUM_CLASSES, DIM, hierarchy=HIERARCHY, margins=[0.1, 0.2])
    with pytest.raises(ValueError, match="negatives"):
        create_loss("csl", NUM_CLASSES, DIM, hierarchy=HIERARCHY, negatives="semi-hard")


def test_class_parents_reads_the_tree_and_rejects_bad_labels():
    labels = np.array([[2, 1, 0], [0, 0, 0], [1, 0, 0], [2, 1, 0]])
    np.testing.assert_array_equal(class_parents(labels), [[0, 0, 0], [1, 0, 0], [2, 1, 0]])
    with pytest.raises(ValueError, match="nest"):
        class_parents(np.array([[0, 0], [0, 1]]))
    with pytest.raises(ValueError, match="no labelled example"):
        class_parents(np.array([[0, 0], [2, 1]]))


def test_pair_form_without_positives_is_zero_and_differentiable():
    loss_fn = create_loss("csl_pair", NUM_CLASSES, DIM)
    emb = torch.randn(3, DIM, requires_grad=True)
    value = loss_fn(emb, torch.as_tensor(HIERARCHY[[0, 1, 2]]))
    value.backward()
    assert value.item() == 0.0 and emb.grad is not None
