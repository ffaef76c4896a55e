"""Fine-tuning losses and class weights: equal to float64 references, weights point the right way."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cass.evaluation.losses import FocalLoss, class_weights, create_loss


def focal_reference(logits: np.ndarray, onehot: np.ndarray, weight: np.ndarray, alpha=1.0, gamma=2.0) -> float:
    """Lin et al.'s sigmoid focal loss written out in float64, mean over all N x C elements."""
    p = 1.0 / (1.0 + np.exp(-logits))
    p_t = np.where(onehot == 1, p, 1.0 - p)
    return float(np.mean(weight[None, :] * alpha * (1.0 - p_t) ** gamma * -np.log(p_t)))


@pytest.fixture(scope="module")
def breast_labels(shared_data) -> np.ndarray:
    return np.load(shared_data / "medmnist-small" / "breastmnist.npz")["train_labels"].astype(np.int64)


@pytest.mark.parametrize("with_weights", [True, False])
def test_multiclass_focal_loss_equals_reference(with_weights):
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(32, 5))
    targets = rng.integers(0, 5, size=32)
    weight = rng.uniform(0.1, 2.0, size=5) if with_weights else np.ones(5)
    loss = FocalLoss(torch.tensor(weight) if with_weights else None)
    got = loss(torch.tensor(logits), torch.tensor(targets))
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(focal_reference(logits, np.eye(5)[targets], weight), rel=1e-6)


def test_multilabel_focal_loss_equals_reference_with_alpha_and_gamma():
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3.0, size=(16, 4))
    targets = rng.integers(0, 2, size=(16, 4))
    weight = np.array([0.5, 1.0, 2.0, 0.0])
    loss = FocalLoss(torch.tensor(weight), alpha=0.7, gamma=1.5, multilabel=True)
    got = loss(torch.tensor(logits), torch.tensor(targets))
    assert got.item() == pytest.approx(focal_reference(logits, targets, weight, 0.7, 1.5), rel=1e-6)


def test_alpha_one_keeps_the_negative_terms():
    # torchvision's alpha=1 would zero every negative term: a confidently wrong negative must cost.
    loss = FocalLoss()(torch.tensor([[10.0, -10.0]]), torch.tensor([1]))
    assert loss.item() > 4.0


def test_focal_gradients_are_finite_for_extreme_logits():
    logits = torch.tensor([[80.0, -80.0, 0.0], [-80.0, 80.0, 1e-3]], requires_grad=True)
    loss = FocalLoss(torch.tensor([1.0, 2.0, 0.5]))(logits, torch.tensor([1, 0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_focal_loss_in_bfloat16_is_computed_in_float32():
    logits = torch.randn(8, 3, dtype=torch.bfloat16)
    assert FocalLoss()(logits, torch.randint(0, 3, (8,))).dtype == torch.float32


def test_focal_loss_refuses_weights_of_the_wrong_length():
    with pytest.raises(ValueError, match="3 class weights.*4 classes"):
        FocalLoss(torch.ones(3))(torch.zeros(2, 4), torch.tensor([0, 1]))


def test_inverse_weights_favour_the_minority_and_average_one(breast_labels):
    weights = class_weights(breast_labels, 2, "inverse")
    assert weights.dtype == torch.float32
    assert weights[0] > weights[1]  # 147 malignant < 399 benign
    np.testing.assert_allclose(weights.numpy(), np.array([1 / 147, 1 / 399]) * 2 / (1 / 147 + 1 / 399), rtol=1e-6)
    assert class_weights(breast_labels, 2).tolist() == weights.tolist(), "inverse is the default"


def test_inverse_weights_give_absent_classes_zero(breast_labels):
    weights = class_weights(breast_labels, 3, "inverse")
    assert weights[2] == 0
    assert weights[:2].mean().item() == pytest.approx(1.0)


def test_paper_weights_reproduce_the_public_notebook():
    # Brain MRI training counts and the weights printed by the public notebook.
    counts = [1321, 1457, 1595, 1339]
    targets = np.repeat(np.arange(4), counts)
    weights = class_weights(targets, 4, "paper")
    np.testing.assert_allclose(weights.numpy(), [0.2, 0.5970802919708029, 1.0, 0.25255474452554744], rtol=1e-6)
    assert weights.argmax() == np.argmax(counts), "the majority class gets the largest weight"


def test_paper_weights_favour_the_majority(breast_labels):
    assert class_weights(breast_labels, 2, "paper").tolist() == pytest.approx([0.2, 1.0])


def test_none_weights_are_ones(breast_labels):
    assert class_weights(breast_labels, 2, "none").tolist() == [1.0, 1.0]


def test_multilabel_weights_use_positive_counts():
    targets = np.array([[1, 1, 0], [0, 1, 0], [0, 1, 1], [0, 1, 1]])
    weights = class_weights(targets, 3, "inverse")
    np.testing.assert_allclose(weights.numpy(), np.array([1, 1 / 4, 1 / 2]) * 3 / 1.75, rtol=1e-6)
    assert class_weights(targets, 3, "paper").tolist() == pytest.approx([0.2, 1.0, 0.2 + 0.8 / 3])


def test_unknown_scheme_and_out_of_range_labels_are_refused(breast_labels):
    with pytest.raises(ValueError, match="inverse, none, paper"):
        class_weights(breast_labels, 2, "balanced")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        class_weights(breast_labels, 1)


def test_cross_entropy_uses_the_class_weights():
    logits, targets, weights = torch.randn(10, 3), torch.randint(0, 3, (10,)), torch.tensor([0.5, 1.0, 3.0])
    got = create_loss("ce", weights)(logits, targets)
    assert got.item() == pytest.approx(F.cross_entropy(logits, targets, weight=weights).item())


def test_multilabel_cross_entropy_is_weighted_binary_cross_entropy():
    logits, targets, weights = torch.randn(10, 3), torch.randint(0, 2, (10, 3)).float(), torch.tensor([0.5, 1.0, 3.0])
    got = create_loss("ce", weights, multilabel=True)(logits, targets)
    expected = (F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * weights).mean()
    assert got.item() == pytest.approx(expected.item())


def test_create_loss_builds_the_focal_loss_and_refuses_unknown_names():
    loss = create_loss("focal", torch.ones(2), multilabel=True)
    assert isinstance(loss, FocalLoss) and loss.multilabel and (loss.alpha, loss.gamma) == (1.0, 2.0)
    with pytest.raises(ValueError, match="focal, ce"):
        create_loss("hinge")
