"""The self-supervised objectives as pure functions of the compared outputs (no state, no modules).

Each is tested against an independent float64 transcription of its paper's formula
(tests/test_losses_ssl.py). DINO's loss keeps a running centre, so it lives with DINO as a module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def cass_loss(z_cnn: torch.Tensor, z_vit: torch.Tensor) -> torch.Tensor:
    """``mean_batch(2 - 2 cos(z_cnn, z_vit))``: the squared distance of the L2-normalised outputs (CASS)."""
    cos = F.cosine_similarity(z_cnn.float(), z_vit.float(), dim=-1)
    return (2 - 2 * cos).mean()


@dataclass
class VicregTerms:
    """The three terms of a VICReg-style loss, unweighted, and their weighted sum."""

    loss: torch.Tensor
    invariance: torch.Tensor
    variance: torch.Tensor
    covariance: torch.Tensor


def variance_hinge(z: torch.Tensor, target: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """Mean over dimensions of ``relu(target - std)``: zero once every dimension varies across the batch.

    This is what makes a constant output costly: collapse sets every std to 0 and this term to ``target``.
    """
    std = torch.sqrt(z.var(dim=0) + eps)
    return F.relu(target - std).mean()


def covariance_penalty(z: torch.Tensor) -> torch.Tensor:
    """Sum of squared off-diagonal covariances divided by the dimension: decorrelates the dimensions,
    so the variance cannot be satisfied by copying one direction into all of them."""
    n, d = z.shape
    centred = z - z.mean(dim=0)
    cov = centred.T @ centred / (n - 1)
    off_diagonal = cov - torch.diag_embed(torch.diagonal(cov))
    return off_diagonal.pow(2).sum() / d


def cross_vicreg_loss(
    z_cnn: torch.Tensor,
    z_vit: torch.Tensor,
    invariance_weight: float = 25.0,
    variance_weight: float = 25.0,
    covariance_weight: float = 1.0,
    variance_target: float = 1.0,
    eps: float = 1e-4,
) -> VicregTerms:
    """VICReg's objective (Bardes et al. 2022) with the two networks as the two branches.

    Invariance is the mean squared error between the CNN's and the Transformer's projections of the same
    image (CASS's idea: the architectures are the views); variance and covariance are computed on each
    network's own projections and averaged over the two, as in the authors' code. Computed in float32
    whatever the autocast precision, since variances of bf16 values are too coarse near collapse.
    """
    a, b = z_cnn.float(), z_vit.float()
    if a.shape[0] < 2:
        raise ValueError("the variance and covariance terms need a batch of at least 2 images per process")
    invariance = F.mse_loss(a, b)
    variance = (variance_hinge(a, variance_target, eps) + variance_hinge(b, variance_target, eps)) / 2
    covariance = covariance_penalty(a) + covariance_penalty(b)
    loss = invariance_weight * invariance + variance_weight * variance + covariance_weight * covariance
    return VicregTerms(loss, invariance.detach(), variance.detach(), covariance.detach())
