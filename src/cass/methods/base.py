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

from cass.config import ConfigError, PretrainConfig
from cass.evaluation.diagnostics import learning_checks
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
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    """Scalar learning diagnostics of the step (detached), averaged over the epoch into ``metrics.csv``
    (DINO: ``teacher_entropy``, ``teacher_student_kl``)."""


class PretrainMethod(nn.Module):
    """Base class of every pretraining method (CASS, DINO, ...).

    ``forward`` is the training step so that DDP wrappers see it (gradient synchronisation runs in
    ``forward``/``backward`` of the wrapped module).
    """

    # --- what the method is: read by the experiment, fine-tuning, report, bench and CLI --------------
    name: ClassVar[str]
    """Registry name (``cass pretrain --method NAME``); set by :func:`~cass.methods.registry.register_method`."""
    display_name: ClassVar[str]
    """How tables and plots name the method."""
    objective: ClassVar[str]
    """One line saying what the loss measures (the report's loss-curve legend)."""
    trains_both_networks: ClassVar[bool] = True
    """True: one run trains and exports the CNN and the Transformer (CASS); False: one network, ``cfg.arch``."""
    supports_swa: ClassVar[bool] = False
    """Whether ``--swa`` applies (weight averaging of the exported networks)."""
    config_section: ClassVar[str | None] = None
    """The :class:`~cass.config.PretrainConfig` field that holds this method's own options."""
    compared_with: ClassVar[tuple[str, ...]] = ()
    """Registered methods this one claims to improve on: an experiment holding both states each comparison,
    with its paired interval and verdict (besides every method against its starting point and supervised)."""

    @classmethod
    def roles(cls, arch: str) -> tuple[str, ...]:
        """The networks a run exports (``cnn.safetensors``, ``vit.safetensors``), given the config's ``arch``."""
        return ("cnn", "vit") if cls.trains_both_networks else (arch,)

    @classmethod
    def run_name(cls, arch: str | None) -> str:
        """The key of one run in files and options (``pretrain_overrides``, bench rows): ``cass``, or
        ``dino-cnn`` for a single-network method, whose CNN and ViT runs differ."""
        return cls.name if cls.trains_both_networks or arch is None else f"{cls.name}-{arch}"

    @classmethod
    def label(cls, arch: str | None) -> str:
        """The name of one run in tables: ``CASS``, or ``DINO-CNN`` for a single-network method."""
        if cls.trains_both_networks or arch is None:
            return cls.display_name
        return f"{cls.display_name}-{'CNN' if arch == 'cnn' else 'ViT'}"

    @classmethod
    def check_config(cls, cfg: PretrainConfig) -> None:
        """Refuse options this method cannot honour, naming them (solo-learn's ``add_and_assert_specific_cfg``)."""
        if cfg.swa and not cls.supports_swa:
            raise ConfigError(f"--swa is not supported by method {cls.name!r}")
        if not cls.trains_both_networks and cfg.arch not in ("cnn", "vit"):
            raise ConfigError(f"--arch must be cnn or vit for method {cls.name!r}, got {cfg.arch!r}")

    @classmethod
    def learning_warnings(cls, history: list[dict[str, float]], cfg: PretrainConfig) -> list[str]:
        """Plain-language warnings that a run's record so far shows the method is not learning.

        ``history``: the start row (epoch 0, when recorded) then one ``metrics.csv`` row per finished epoch,
        as numbers (:func:`~cass.utils.rundir.read_history`). Every method gets the checks on what the user
        gets, its backbones (:func:`~cass.evaluation.diagnostics.learning_checks`); methods add their own
        failure modes.
        """
        return learning_checks(history, cfg.collapse_threshold)

    views_per_image: int = 1
    """Augmented views per image (1 for CASS, 2 + local crops for DINO)."""

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__()
        type(self).check_config(cfg)
        self.cfg = cfg

    @property
    def img_size(self) -> int:
        """The training resolution: the config's, else the first network's own."""
        return self.cfg.img_size or next(iter(self.networks().values())).input_size

    @property
    def source_size(self) -> int:
        """Side of the square images the train transform receives on the cache path (the training size,
        unless the method cuts crops from larger images)."""
        return self.img_size

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
