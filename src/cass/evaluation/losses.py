"""Fine-tuning losses and the per-class weights they use.

The paper fine-tunes with a sigmoid focal loss (alpha 1, gamma 2) and per-class weights. Its public
code computes those weights by min-max scaling the class *counts* to [0.2, 1], which gives the
majority class the largest weight: the opposite of countering imbalance. Here the default is
inverse class frequency; the public behaviour stays available under the explicit name ``paper``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

WeightScheme = Callable[[np.ndarray], np.ndarray]


def _inverse_frequency(counts: np.ndarray) -> np.ndarray:
    """1 / count, scaled so the weights average to 1 over the classes present.

    Averaging to 1 keeps the loss on the scale of the unweighted one, so the learning rate means
    the same thing with and without weights. A class with no example gets weight 0: there is
    nothing to up-weight, and a finite 1/0 would be arbitrary.
    """
    present = counts > 0
    weights = np.zeros(len(counts))
    weights[present] = 1.0 / counts[present]
    return weights * present.sum() / weights.sum()


def _uniform(counts: np.ndarray) -> np.ndarray:
    return np.ones(len(counts))


def _paper_min_max(counts: np.ndarray) -> np.ndarray:
    """The public notebooks' weights: counts min-max scaled to [0.2, 1].

    The MAJORITY class gets the LARGEST weight (1.0) and the rarest the smallest (0.2); kept only
    to reproduce the published setup. When all counts are equal the notebooks divide by zero;
    here every weight is 1.
    """
    span = counts.max() - counts.min()
    if span == 0:
        return np.ones(len(counts))
    return 0.2 + 0.8 * (counts - counts.min()) / span


WEIGHT_SCHEMES: dict[str, WeightScheme] = {
    "inverse": _inverse_frequency,
    "none": _uniform,
    "paper": _paper_min_max,
}
"""Class-weight schemes by name; each maps per-class example counts to weights."""


def label_counts(targets: np.ndarray | torch.Tensor, num_classes: int) -> np.ndarray:
    """Examples per class (class indices (N,)) or positives per label (0/1 matrix (N, C))."""
    labels = np.asarray(targets)
    if labels.ndim == 2:
        if labels.shape[1] != num_classes:
            raise ValueError(f"multi-label targets have {labels.shape[1]} columns, expected {num_classes}")
        return labels.sum(axis=0).astype(np.float64)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"targets must be class indices (N,) or a 0/1 matrix (N, C), got shape {labels.shape}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"class indices must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    return np.bincount(labels, minlength=num_classes).astype(np.float64)


def class_weights(targets: np.ndarray | torch.Tensor, num_classes: int, scheme: str = "inverse") -> torch.Tensor:
    """Per-class loss weights (float32, length ``num_classes``) from the training targets.

    Schemes: ``inverse`` (default; inverse frequency averaging 1 over present classes, 0 for
    absent ones), ``none`` (all ones), ``paper`` (counts min-max scaled to [0.2, 1]: gives the
    majority class the LARGEST weight, as the public code does). Multi-label targets use each
    label's positive count.
    """
    if scheme not in WEIGHT_SCHEMES:
        raise ValueError(f"unknown class-weight scheme {scheme!r}; choose one of {', '.join(WEIGHT_SCHEMES)}")
    return torch.as_tensor(WEIGHT_SCHEMES[scheme](label_counts(targets, num_classes)), dtype=torch.float32)


class FocalLoss(nn.Module):
    """Sigmoid focal loss with per-class weights, for multi-class and multi-label heads.

    Each class is an independent sigmoid (multi-class targets become one-hot), as in the paper.
    ``alpha`` is a plain scale factor, as in the paper's code: torchvision's class-balancing alpha
    (``alpha * t + (1 - alpha) * (1 - t)``) would, at alpha 1, drop every negative term.
    Reduction: the mean over all N x C elements of ``weight[c] * alpha * (1 - p_t)**gamma * BCE``,
    the public code's definition.
    """

    weight: torch.Tensor | None

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        alpha: float = 1.0,
        gamma: float = 2.0,
        multilabel: bool = False,
    ) -> None:
        super().__init__()
        self.alpha = alpha
        self.gamma = gamma
        self.multilabel = multilabel
        # A buffer, so that .to(device) moves it with the model and it is not a parameter.
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``logits`` (N, C); ``targets`` class indices (N,) or, multi-label, 0/1 (N, C)."""
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # no bf16 loss
        num_classes = logits.shape[1]
        if self.weight is not None and self.weight.numel() != num_classes:
            raise ValueError(
                f"focal loss has {self.weight.numel()} class weights but the logits have {num_classes} classes"
            )
        onehot = targets if self.multilabel else F.one_hot(targets.long(), num_classes)
        loss = sigmoid_focal_loss(logits, onehot.to(logits.dtype), alpha=-1, gamma=self.gamma, reduction="none")
        if self.weight is not None:
            loss = loss * self.weight.to(logits.dtype)
        return self.alpha * loss.mean()


def _focal(weights: torch.Tensor | None, multilabel: bool) -> nn.Module:
    return FocalLoss(weights, multilabel=multilabel)


def _cross_entropy(weights: torch.Tensor | None, multilabel: bool) -> nn.Module:
    """Softmax cross-entropy (weighted mean over the batch, torch's definition); multi-label:
    binary cross-entropy with logits, each label's column scaled by its weight, mean over
    elements (targets must then be float)."""
    return nn.BCEWithLogitsLoss(weight=weights) if multilabel else nn.CrossEntropyLoss(weight=weights)


LOSSES: dict[str, Callable[[torch.Tensor | None, bool], nn.Module]] = {
    "focal": _focal,
    "ce": _cross_entropy,
}
"""Fine-tuning losses by name; each takes (class weights or None, multilabel)."""


def create_loss(name: str, weights: torch.Tensor | None = None, multilabel: bool = False) -> nn.Module:
    """The loss ``name`` (``focal``, the paper's, or ``ce``) with the given class weights."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name](weights, multilabel)
