"""``cass-vicreg``: VICReg's loss with CASS's two architectures as its two branches.

Faithful CASS (:mod:`cass.methods.cass`) minimises ``2 - 2 cos(z_cnn, z_vit)`` between the two networks'
heads with gradients into both and nothing else, so any constant output is a minimum, and from random init
both networks fall into one within a couple of epochs. This method keeps CASS's *setting* (one augmented
view, a CNN and a Transformer teaching each other, no EMA, no stop-gradient) but optimises VICReg's
objective (Bardes et al. 2022), not CASS's loss:

    loss = invariance_weight * MSE(p_cnn, p_vit)                 (agreement of the two projections)
         + variance_weight   * mean std hinge of p_cnn and p_vit  (a constant output costs this much)
         + covariance_weight * off-diagonal covariance of each    (variance spread over decorrelated dims)
         + cosine_weight     * mean(2 - 2 cos(p_cnn, p_vit))      (CASS's loss; 0 by default)

where ``p`` is a small projector (Linear, BatchNorm, ReLU, Linear) on each network's pooled features. With
the defaults CASS's ``2 - 2 cos`` is *not* in it: the agreement term is VICReg's squared error.
``cosine_weight`` adds CASS's term beside (or, with ``invariance_weight`` 0, in place of) the MSE; the
ablation in BENCHMARKS.md measures what each term is worth. It is a method of its own, never the paper's CASS.

Exports the two backbones without their heads (``cnn.safetensors``, ``vit.safetensors``), like DINO's;
fine-tuning adds a fresh head. The projectors are training-only and are not exported.
"""

from __future__ import annotations

import torch
from torch import nn

from cass.config import ConfigError, PretrainConfig
from cass.methods.base import Progress, StepOutput
from cass.methods.cass import CASS
from cass.methods.losses import cass_loss, cross_vicreg_loss
from cass.methods.registry import register_method


def projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """VICReg's expander, two layers deep: Linear, BatchNorm, ReLU, Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


@register_method("cass-vicreg")
class CassVicreg(CASS):
    """A timm CNN and a timm Transformer whose projections agree, each kept varied and decorrelated."""

    display_name = "CASS-VICReg"
    objective = "VICReg loss between the CNN's and ViT's projections: 25 MSE + 25 variance hinge + covariance"
    config_section = "cass_vicreg"
    compared_with = ("cass", "dino")  # its change (VICReg terms against collapse) must beat plain CASS

    @classmethod
    def check_config(cls, cfg: PretrainConfig) -> None:
        super().check_config(cfg)
        if cfg.batch_size // max(cfg.devices * cfg.num_nodes, 1) < 2:
            raise ConfigError(f"--batch-size {cfg.batch_size}: cass-vicreg needs at least 2 images per process "
                              "(its variance and covariance are computed over the batch)")

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__(cfg)
        opts = cfg.cass_vicreg
        self.cnn_projector = projector(self.cnn.num_features, opts.proj_hidden_dim, opts.proj_dim)
        self.vit_projector = projector(self.vit.num_features, opts.proj_hidden_dim, opts.proj_dim)

    def head_width(self) -> int:
        return 0  # the backbones' pooled features go to the projectors

    def forward(self, images: torch.Tensor, progress: Progress) -> StepOutput:
        feats_cnn = self.cnn.features(images)
        feats_vit = self.vit.features(images)
        z_cnn = self.cnn_projector(feats_cnn)
        z_vit = self.vit_projector(feats_vit)
        opts = self.cfg.cass_vicreg
        terms = cross_vicreg_loss(
            z_cnn, z_vit, invariance_weight=opts.invariance_weight, variance_weight=opts.variance_weight,
            covariance_weight=opts.covariance_weight, variance_target=opts.variance_target,
        )
        loss = terms.loss + opts.cosine_weight * cass_loss(z_cnn, z_vit) if opts.cosine_weight else terms.loss
        return StepOutput(
            loss=loss,
            outputs={"cnn": z_cnn.detach(), "vit": z_vit.detach()},
            features={"cnn": feats_cnn.detach(), "vit": feats_vit.detach()},
        )

    def parameter_groups(self) -> list[list[torch.nn.Parameter]]:
        """Each network trains with its own projector."""
        return [[*self.cnn.parameters(), *self.cnn_projector.parameters()],
                [*self.vit.parameters(), *self.vit_projector.parameters()]]
