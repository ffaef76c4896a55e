"""Run configurations as dataclasses that round-trip to YAML.

One dataclass per kind of run. The CLI, the Python API and the YAML files all fill the same
objects, so a run directory's ``config.yaml`` is always enough to rerun it exactly.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cass.utils.atomic import atomic_write_text

T = TypeVar("T")

DEFAULT_MAX_PIXELS = 100_000_000
"""Images above this many pixels are refused (decompression bombs) unless ``max_image_pixels`` says more."""


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the option (and the file)."""


@dataclass
class DataConfig:
    """Where the images come from and how they are read."""

    data: str | None = None
    """Folder, CSV, zip or .npz; a root with ``train/`` and ``val/`` splits. None: the shipped sample."""
    val_data: str | None = None
    """Overrides the ``val`` split found under ``data``."""
    num_workers: int = 2
    skip_bad_images: bool = False
    """Skip unreadable images (counted and reported) instead of stopping with an error."""
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    """Refuse images larger than this many pixels (decompression bombs)."""
    path: str = "auto"
    """How images are read. ``cache``: decoded once into a memory-mapped uint8 file at the network's size
    (in ``cache_dir``), shared by pretraining and fine-tuning; pretraining then augments in batches on the
    device (:mod:`cass.data.device_augment`); ``pil``: decoded and augmented per image in DataLoader workers
    every epoch; ``auto``: ``cache`` unless the disk has no room for it (or, in pretraining, the method's
    augmentation has a step the device path lacks)."""
    cache_dir: str | None = None
    """Folder of decoded-image caches; None: ``$CASS_CACHE_DIR``, else ``~/.cache/cass``."""


@dataclass
class CassConfig:
    """Options of the CASS objective (SPEC §1). Defaults are the paper's."""

    embed_dim: int = 1000
    """Width of the compared outputs: the classification heads (1000 = ImageNet heads)."""
    separate_optimizers: bool = True
    """One Adam per network (the paper's notebooks) or one over both."""


@dataclass
class DinoConfig:
    """Options of the DINO baseline (Caron et al. 2021, standard recipe)."""

    base_lr: float = 5e-4
    """Learning rate per 256 images (DINO's linear scaling); ``lr`` is CASS's and is not used by DINO."""
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    n_local_crops: int = 10
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    local_crop_fraction: float = 96 / 224
    """Local crop size as a fraction of the image size (96 px at 224)."""
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30
    student_temp: float = 0.1
    center_momentum: float = 0.9
    momentum_teacher: float = 0.996
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    warmup_epochs: int = 10
    clip_grad: float = 3.0
    freeze_last_layer_epochs: int = 1
    norm_last_layer: bool = True


@dataclass
class PretrainConfig:
    """A self-supervised pretraining run (CASS or a baseline method)."""

    method: str = "cass"
    data: DataConfig = field(default_factory=DataConfig)
    cnn: str = "resnet50"
    vit: str = "vit_base_patch16_384"
    arch: str = "vit"
    """For single-network methods (DINO): which of ``cnn``/``vit`` is trained."""
    init: str = "scratch"
    """``scratch``, ``imagenet`` (timm download, or the ``*_weights`` files), or a checkpoint path."""
    cnn_weights: str | None = None
    vit_weights: str | None = None
    img_size: int | None = None
    """Input size in pixels; None: the size in the model's own config (384 for the paper's ViT)."""
    batch_size: int = 16
    """Global batch size (split over all processes)."""
    epochs: int = 100
    lr: float = 1e-3
    min_lr: float = 1e-6
    swa: bool = False
    """Average weights (torch.optim.swa_utils) from ``swa_start`` of the run; the paper mentions SWA."""
    swa_start: float = 0.75
    seed: int = 0
    out: str = "runs/pretrain"
    devices: int = 1
    num_nodes: int = 1
    accelerator: str = "auto"
    precision: str = "auto"
    """``auto`` = bf16 autocast on GPU, fp32 on CPU; or any Lightning precision string."""
    channels_last: bool = True
    """On CUDA, keep weights and input images in channels-last layout (faster convolutions); no effect elsewhere."""
    compile: bool = False
    """``torch.compile`` each network in place (checkpoints keep their names); the first steps are slow."""
    cuda_graphs: bool = False
    """CUDA only: compile with ``mode="reduce-overhead"`` so each network's forward and backward replay as
    CUDA graphs; for the small batches (8-32) CASS is meant for, whose steps are bound by kernel launches."""
    on_nonfinite_loss: str = "stop"
    """``stop`` (keep the last good checkpoint and exit with a message) or ``skip`` (drop that step, count it)."""
    collapse_threshold: float = 0.1
    """Warn when the output std (1 = healthy, 0 = collapsed) falls below this."""
    diagnostics_samples: int = 512
    cass: CassConfig = field(default_factory=CassConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)


@dataclass
class FinetuneConfig:
    """Supervised fine-tuning or probing of one network with a fraction of the labels (SPEC §1, §2)."""

    data: DataConfig = field(default_factory=DataConfig)
    source: str = "scratch"
    """``--from``: a pretraining run directory, ``imagenet``, ``scratch`` (the supervised baseline) or a weights file."""
    arch: str | None = None
    """Which network: ``cnn`` or ``vit`` (for a CASS run, which of its two networks). None: the pretraining
    run's network when its method trains only one (DINO), else ``cnn``."""
    cnn: str = "resnet50"
    vit: str = "vit_base_patch16_384"
    weights: str | None = None
    """Local ImageNet weights when ``source`` is ``imagenet``."""
    mode: str = "full"
    """``full`` (end-to-end, the paper's protocol), ``linear`` (head on frozen features) or ``knn``."""
    label_fraction: float = 1.0
    seed: int = 0
    epochs: int = 50
    lr: float = 3e-4
    min_lr: float = 1e-6
    batch_size: int = 16
    img_size: int | None = None
    loss: str = "focal"
    """``focal`` (sigmoid focal loss, alpha 1, gamma 2) or ``ce`` (cross-entropy; BCE for multi-label)."""
    class_weights: str = "inverse"
    """``inverse`` (inverse frequency, normalised), ``none``, or ``paper`` (the public code's: grows with frequency)."""
    patience: int = 10
    """Early stopping: epochs without a better validation macro-F1."""
    knn_k: int = 20
    out: str = "runs/finetune"
    accelerator: str = "auto"
    precision: str = "auto"


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict of a config (tuples become lists so YAML stays readable)."""
    return _plain(dataclasses.asdict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def from_dict(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Build ``cls`` from a dict, refusing unknown keys and wrong types with the option's name."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in values.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value or {}, where)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, where) for v in value]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is Any or (isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def save_yaml(cfg: Any, path: str | Path) -> None:
    """Write a config as YAML (atomically, so a crash never leaves a half-written file)."""
    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_yaml(cls: type[T], path: str | Path) -> T:
    """Read a config of type ``cls`` from YAML; errors name the file and the option."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    return from_dict(cls, values, where=str(path))


def merge(cfg: T, overrides: dict[str, Any], where: str = "command line") -> T:
    """Return ``cfg`` with dotted-key overrides applied (``{"data.data": "x.zip", "epochs": 3}``)."""
    values = to_dict(cfg)
    for key, value in overrides.items():
        node = values
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"{where}: unknown option {key}")
        node[leaf] = value
    return from_dict(type(cfg), values, where)
