"""CASS (Cross-Architectural Self-Supervision), exactly as SPEC §1 describes it.

One augmented view per image is fed to a CNN and a Transformer; the loss pulls their L2-normalised
head outputs together, ``2 - 2 cos(z_cnn, z_vit)``, with gradients into both networks. There is no
projector, predictor, EMA or stop-gradient, so nothing but the two architectures' different
inductive biases stands between the objective and collapse; the engine's diagnostics watch for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Adam, Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from cass.config import PretrainConfig
from cass.data.transforms import cass_augmentation
from cass.methods.base import PretrainMethod, Progress, StepOutput
from cass.methods.losses import cass_loss
from cass.methods.registry import register_method
from cass.models.factory import Network, create_network, shape_options
from cass.utils.schedules import cosine_lambda


@register_method("cass")
class CASS(PretrainMethod):
    """A timm CNN and a timm Transformer trained together by agreement of their head outputs."""

    display_name = "CASS"
    objective = "CASS loss: 2 - 2 cos(CNN, ViT outputs)"
    trains_both_networks = True
    supports_swa = True
    config_section = "cass"
    compared_with = ("dino",)  # the paper's claim: one CASS run against DINO

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__(cfg)
        common = {"init": cfg.init, "num_outputs": self.head_width(), "img_size": cfg.img_size}
        shape = {"cnn_stem": cfg.cnn_stem, "vit_patch_size": cfg.vit_patch_size}
        self.cnn = create_network(cfg.cnn, weights=cfg.cnn_weights, role="cnn", **common,
                                  **shape_options("cnn", **shape))
        self.vit = create_network(cfg.vit, weights=cfg.vit_weights, role="vit", **common,
                                  **shape_options("vit", **shape))

    def head_width(self) -> int:
        """Width of each network's classification head: the compared outputs (0 = no head)."""
        return self.cfg.cass.embed_dim

    def networks(self) -> dict[str, Network]:
        return {"cnn": self.cnn, "vit": self.vit}

    @property
    def img_size(self) -> int:
        # The Transformer is the one built for a fixed size; the CNN follows it.
        return self.cfg.img_size or self.vit.input_size

    def train_transform(self) -> Callable[..., Any]:
        return cass_augmentation(self.img_size)

    def forward(self, images: torch.Tensor, progress: Progress) -> StepOutput:
        feats_cnn, z_cnn = self.cnn(images)
        feats_vit, z_vit = self.vit(images)
        return StepOutput(
            loss=cass_loss(z_cnn, z_vit),
            outputs={"cnn": z_cnn.detach(), "vit": z_vit.detach()},
            features={"cnn": feats_cnn.detach(), "vit": feats_vit.detach()},
        )

    def configure_optimizers(self, total_steps: int) -> tuple[list[Optimizer], list[LRScheduler]]:
        """Adam at ``lr``, cosine decay to ``min_lr`` over the whole run, stepped once per iteration."""
        groups = self.parameter_groups()
        if not self.cfg.cass.separate_optimizers:
            groups = [[p for group in groups for p in group]]
        # Fused kernels exist on CPU and GPU; on CPU they are ~3x faster than the default per-tensor loop.
        optimizers: list[Optimizer] = [Adam(params, lr=self.cfg.lr, fused=True) for params in groups]
        schedule = cosine_lambda(total_steps, self.cfg.lr, self.cfg.min_lr)
        return optimizers, [LambdaLR(opt, schedule) for opt in optimizers]

    def parameter_groups(self) -> list[list[torch.nn.Parameter]]:
        """The CNN's trainable parameters and the Transformer's: one optimiser each by default."""
        return [list(self.cnn.parameters()), list(self.vit.parameters())]
