"""The contract between a self-supervised method and the training engine.

A method owns its networks, its loss, its view-making transform and its optimisers; the engine
(:mod:`cass.training`) owns everything else: devices, precision, DDP, data loading,
checkpoints, logs and collapse diagnostics. One file per method implements this class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from cass.config import PretrainConfig
from cass.models.factory import Network


@dataclass(frozen=True)
class Progress:
    """Where the run is; methods use it for schedules (learning rate, EMA momentum, temperatures)."""

    epoch: int
    step: int
    """Global optimiser step, counted from 0 over the whole run."""
    steps_per_epoch: int
    epochs: int

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs


@dataclass
class StepOutput:
    """What one training step returns to the engine."""

    loss: torch.Tensor
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per network role, the (detached) vectors the objective compares: used for the collapse std."""
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per network role, the (detached) pooled backbone features: used for the effective rank."""


class PretrainMethod(nn.Module):
    """Base class of every pretraining method (CASS, DINO, ...).

    ``forward`` is the training step so that DDP wrappers see it (gradient synchronisation runs in
    ``forward``/``backward`` of the wrapped module).
    """

    name: ClassVar[str]
    views_per_image: int = 1
    """Augmented views per image (1 for CASS, 2 + local crops for DINO)."""

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__()
        self.cfg = cfg

    @property
    def img_size(self) -> int:
        """The training resolution: the config's, else the first network's own."""
        return self.cfg.img_size or next(iter(self.networks().values())).input_size

    def networks(self) -> dict[str, Network]:
        """The networks that are exported after pretraining, by role (``cnn``, ``vit``)."""
        raise NotImplementedError

    def train_transform(self) -> Callable[..., Any]:
        """PIL image -> a tensor (one view) or a list of tensors (multi-crop)."""
        raise NotImplementedError

    def forward(self, images: Any, progress: Progress) -> StepOutput:
        raise NotImplementedError

    def configure_optimizers(self, total_steps: int) -> tuple[list[Optimizer], list[LRScheduler]]:
        raise NotImplementedError

    def before_optimizer_step(self, progress: Progress) -> None:
        """Hook after backward, before ``step()`` (gradient clipping, frozen layers)."""

    def after_optimizer_step(self, progress: Progress) -> None:
        """Hook after ``step()`` (EMA teachers, per-step schedules that are not LR schedulers)."""

    def extra_state(self) -> dict[str, Any]:
        """Non-parameter state to checkpoint beyond ``state_dict()`` (buffers are already in it)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`extra_state`."""
