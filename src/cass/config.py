"""Run configurations as dataclasses that round-trip to YAML.

One dataclass per kind of run. The CLI, the Python API and the YAML files all fill the same
objects, so a run directory's ``config.yaml`` is always enough to rerun it exactly.
"""

from __future__ import annotations

import dataclasses
import math
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
DEFAULT_GROUP_COLUMN = "group"
"""The column of a CSV that names each image's group, unless ``group_column`` says otherwise."""


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the option (and the file)."""


SEED_MAX = 2**32 - 1


def opt(
    default: Any,
    *,
    flag: str | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A config field with its command-line ``flag`` and allowed range, kept in the field's metadata.

    ``flag``: the option's name when the generated one (``--field-name``, ``--section-field-name`` for a
    nested section) would not do; ``--x/--no-y`` for a boolean with its own negative. Range: ``ge``/``le``
    are inclusive bounds, ``gt``/``lt`` exclusive ones; :func:`check_ranges` enforces them (None passes).
    """
    metadata = {key: value for key, value in (("flag", flag), ("ge", ge), ("gt", gt), ("le", le), ("lt", lt))
                if value is not None}
    if isinstance(default, list):  # a mutable default: every config gets its own copy
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    """Where the images come from and how they are read."""

    data: str | None = opt(None, flag="--data")
    """Folder, CSV, zip or .npz; a root with ``train/`` and ``val/`` splits. None: the shipped sample."""
    val_data: str | None = opt(None, flag="--val-data")
    """Overrides the ``val`` split found under ``data``."""
    num_workers: int | None = opt(None, flag="--num-workers", ge=0)
    """Data-loading worker processes. None: automatic (:func:`cass.data.loaders.default_workers`): 0 on the
    cache path (batches are only gathered there), else min(4, CPU cores - 1)."""
    skip_bad_images: bool = opt(False, flag="--skip-bad-images/--stop-on-bad-images")
    """Skip unreadable images (counted and reported) instead of stopping with an error."""
    max_image_pixels: int = opt(DEFAULT_MAX_PIXELS, flag="--max-image-pixels", ge=1)
    """Refuse images larger than this many pixels (decompression bombs)."""
    path: str = opt("auto", flag="--data-path")
    """How images are read. ``cache``: decoded once into a memory-mapped uint8 file at the network's size
    (in ``cache_dir``), shared by pretraining and fine-tuning; pretraining then augments in batches on the
    device (:mod:`cass.data.device_augment`); ``pil``: decoded and augmented per image in DataLoader workers
    every epoch; ``auto``: ``cache`` unless the disk has no room for it (or, in pretraining, the method's
    augmentation has a step the device path lacks)."""
    cache_dir: str | None = opt(None, flag="--cache-dir")
    """Folder of decoded-image caches; None: ``$CASS_CACHE_DIR``, else ``~/.cache/cass``."""
    test_fraction: float = opt(0.15, flag="--test-fraction", gt=0, lt=1)
    """When the data has no ``test`` split: this fraction of every class of ``train`` becomes the test split
    (the only one reported), taken away from training and pretraining alike."""
    val_fraction: float = opt(0.15, flag="--val-fraction", gt=0, lt=1)
    """When the data has no ``val`` split (and no ``val_data``): this fraction of every class of ``train``
    becomes the selection split (early stopping, best epoch)."""
    train_images: int | None = opt(None, flag="--train-images", ge=1)
    """Use about this many images of ``train`` (after the carving above): a stratified subset fixed by
    ``split_seed``, for quick comparisons on a large set. Pretraining and the labelled fractions draw from
    it; the selection and test splits are unchanged. None: all of them."""
    split_seed: int = opt(0, flag="--split-seed", ge=0)
    """Seed of the carved test and selection splits; one value for every run of an experiment, so that
    every method is scored on the same images whatever the run's own seed."""
    groups: str | None = opt(None, flag="--groups")
    """CSV naming each image's group (patient, study, near-duplicate cluster): a ``path`` column (or the one
    column starting with ``path``, e.g. ``path_in_zip``) matching the end of an image's name
    (``train/glioma/x.png`` in a zip, ``train_images[3]`` of an .npz) and the ``group_column``. Carved splits
    take whole groups, so no patient is both trained and tested on. Without it, a CSV data file's group
    column or a DICOM file's PatientID (else StudyInstanceUID) groups images; an image with none is its own."""
    group_column: str = opt(DEFAULT_GROUP_COLUMN, flag="--group-column")
    """Column of the group id, in a CSV data file and in the ``groups`` file (e.g. ``dup_group``)."""
    allow_group_overlap: bool = opt(False, flag="--allow-group-overlap/--refuse-group-overlap")
    """When the data's own train/val/test splits share a group (a leak: the scores overstate), warn loudly
    and go on instead of stopping with an error naming the groups."""


@dataclass
class CassConfig:
    """Options of the CASS objective (SPEC §1). Defaults are the paper's."""

    embed_dim: int = opt(1000, ge=1)
    """Width of the compared outputs: the classification heads (1000 = ImageNet heads)."""
    separate_optimizers: bool = True
    """One Adam per network (the paper's notebooks) or one over both."""


@dataclass
class CassVicregConfig:
    """Options of ``cass-vicreg``: VICReg's loss (Bardes et al. 2022) with the CNN and the Transformer as its two
    branches: MSE between their projections, plus variance and covariance terms on each network's projections,
    which make the constant output that faithful CASS falls into costly. CASS's ``2 - 2 cos`` is not in it
    unless ``cosine_weight`` > 0. Not the paper's method; weights are VICReg's."""

    proj_hidden_dim: int = opt(1024, ge=1)
    """Hidden width of each network's projector (Linear, BatchNorm, ReLU, Linear)."""
    proj_dim: int = opt(256, ge=1)
    """Width of the projections the loss compares. Kept small because a covariance over a batch of B images
    has rank at most B - 1: with 256 dimensions at batch 16 the covariance term cannot reach zero, but its
    floor is a constant that leaves the gradient towards decorrelated, non-constant outputs intact."""
    invariance_weight: float = opt(25.0, ge=0)
    """Weight of the mean squared error between the CNN's and the Transformer's projections."""
    variance_weight: float = opt(25.0, ge=0)
    """Weight of the hinge on each projection dimension's std over the batch (target ``variance_target``)."""
    covariance_weight: float = opt(1.0, ge=0)
    """Weight of the squared off-diagonal covariances of each network's projections."""
    variance_target: float = opt(1.0, gt=0)
    """The std each projection dimension is pushed to reach (VICReg's gamma)."""
    cosine_weight: float = opt(0.0, ge=0)
    """Weight of CASS's ``2 - 2 cos(p_cnn, p_vit)`` between the two projections, beside the MSE (0: off; with
    ``invariance_weight`` 0 it replaces the MSE). For the ablation of what each term is worth."""


@dataclass
class DinoConfig:
    """Options of the DINO baseline (Caron et al. 2021, standard recipe)."""

    optimizer: str | None = None
    """``adamw`` or ``sgd`` (momentum 0.9). None: the student's recipe (:data:`cass.methods.dino.RECIPES`):
    AdamW for a ViT student, SGD for a CNN student, as in DINO's official ResNet-50 run."""
    base_lr: float | None = opt(None, gt=0)
    """Learning rate per 256 images (DINO's linear scaling); ``lr`` is CASS's and is not used by DINO.
    None: the student's recipe (ViT 5e-4 with AdamW, CNN 0.03 with SGD)."""
    out_dim: int = opt(65536, ge=1)
    """Output dimensions of the DINO head (prototypes)."""
    hidden_dim: int = opt(2048, ge=1)
    """Hidden width of the DINO head's MLP."""
    bottleneck_dim: int = opt(256, ge=1)
    """Width of the head's bottleneck before the last (weight-normalised) layer."""
    n_local_crops: int = opt(10, ge=0)
    """Small local crops per image, besides the two global ones."""
    global_crop_scale: tuple[float, float] | None = opt(None, gt=0, le=1)
    """Area range of the global crops, as fractions of the image. None: the student's recipe (ViT 0.4-1,
    CNN 0.14-1)."""
    local_crop_scale: tuple[float, float] | None = opt(None, gt=0, le=1)
    """Area range of the local crops, as fractions of the image. None: the student's recipe (ViT
    0.05-0.4, CNN 0.05-0.14)."""
    source_size: int | None = opt(None, ge=8)
    """Side of the square image the crops are cut from on the cache path, so that crops keep detail above
    the training size instead of being upsampled from it. None: twice the training size, at most 224 px
    and never below the training size. (The PIL path cuts from the original files.)"""
    local_crop_fraction: float = opt(96 / 224, gt=0, le=1)
    """Local crop size as a fraction of the image size (96 px at 224)."""
    teacher_temp: float = opt(0.07, gt=0)
    """Teacher softmax temperature after its warm-up."""
    warmup_teacher_temp: float = opt(0.04, gt=0)
    """Teacher softmax temperature at the start of its warm-up."""
    warmup_teacher_temp_epochs: int = opt(30, ge=0)
    """Epochs of the teacher temperature's linear warm-up (at most the run)."""
    student_temp: float = opt(0.1, gt=0)
    """Student softmax temperature."""
    center_momentum: float = opt(0.9, ge=0, lt=1)
    """EMA momentum of the centre subtracted from the teacher's outputs."""
    momentum_teacher: float = opt(0.996, ge=0, le=1)
    """Teacher EMA momentum at the start (cosine schedule to 1)."""
    weight_decay: float | None = opt(None, ge=0)
    """Weight decay at the start (cosine schedule to ``weight_decay_end``). None: the student's recipe
    (ViT 0.04, CNN 1e-4)."""
    weight_decay_end: float | None = opt(None, ge=0)
    """Weight decay at the end of the run. None: the student's recipe (ViT 0.4, CNN 1e-4: fixed)."""
    warmup_epochs: int = opt(10, ge=0)
    """Epochs of linear learning-rate warm-up (at most half the run)."""
    clip_grad: float = opt(3.0, ge=0)
    """Per-tensor gradient norm clipping of the student; 0: off."""
    freeze_last_layer_epochs: int = opt(1, ge=0)
    """Epochs during which the head's last layer is not updated."""
    norm_last_layer: bool = True
    """Weight-normalise the head's last layer with a fixed norm (DINO's stabler choice)."""
    use_bn_in_head: bool = False
    """BatchNorm after each hidden layer of the head (DINO's ``--use_bn_in_head``; off in its recipes)."""


@dataclass
class PretrainConfig:
    """A self-supervised pretraining run (CASS or a baseline method)."""

    method: str = "cass"
    """Pretraining method: a registered name (``cass``, the paper's; ``dino``, the baseline; ...)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The first source of images (with several sources, its selection split scores the online k-NN), and the
    run's data-reading options (``path``, ``num_workers``) for every source."""
    more_data: list[DataConfig] = field(default_factory=list)
    """Further sources pretrained on together with ``data``, each with its own groups, fractions, splits and
    ``train_images``: only each source's train images are read; its selection and test images (whole groups)
    are kept out. In YAML a list of data sections; on the command line ``--data`` repeated."""
    balance_sources: bool = False
    """With several sources, draw each source equally often in every epoch (a small source's images then come
    back within an epoch, a large one's are subsampled; the epoch keeps the pooled number of images), instead
    of every pooled image once."""
    cnn: str = "resnet50"
    """timm name of the CNN."""
    vit: str = "vit_base_patch16_384"
    """timm name of the Transformer."""
    arch: str = "vit"
    """For single-network methods (DINO): which of ``cnn``/``vit`` is trained."""
    init: str = "scratch"
    """``scratch``, ``imagenet`` (timm download, or the ``*_weights`` files), or a checkpoint path."""
    cnn_weights: str | None = None
    """Local ImageNet weights of the CNN (safetensors or state dict) for ``init`` ``imagenet``."""
    vit_weights: str | None = None
    """Local ImageNet weights of the Transformer."""
    cnn_stem: str = opt("timm", flag="--cnn-stem")
    """``timm`` (the CNN's own stem) or ``small``: a 3x3 stride-1 first convolution and no max-pool, for
    28-64 px images (MedMNIST v2's "ResNet-18 (28)"); timm's ResNet family only."""
    vit_patch_size: int | None = opt(None, flag="--vit-patch-size", ge=1)
    """Patch size of the Transformer; None: its own (16 for ``*_patch16_*``). At 28-64 px a smaller patch
    keeps at least 16 patches (e.g. 4 at 28 px, 8 at 32-64 px); embeddings of loaded weights are resampled."""
    img_size: int | None = opt(None, ge=1)
    """Input size in pixels; None: the size in the model's own config (384 for the paper's ViT)."""
    batch_size: int = opt(16, ge=1)
    """Global batch size (split over all processes)."""
    epochs: int = opt(100, ge=1)
    """Training epochs."""
    lr: float = opt(1e-3, gt=0)
    """Peak learning rate (cosine schedule down to ``min_lr``)."""
    min_lr: float = opt(1e-6, ge=0)
    """Learning rate at the end of the cosine schedule."""
    swa: bool = False
    """Average weights (torch.optim.swa_utils) from ``swa_start`` of the run; the paper mentions SWA."""
    swa_start: float = opt(0.75, ge=0, lt=1)
    """Fraction of the epochs after which weights are averaged (with ``swa``)."""
    seed: int = opt(0, ge=0, le=SEED_MAX)
    """Seed of initialisation, image order and augmentations."""
    out: str = "runs/pretrain"
    """Run directory."""
    devices: int = opt(1, ge=1)
    """Devices (GPUs or CPU processes) per node."""
    num_nodes: int = opt(1, ge=1)
    """Nodes for multi-node DDP."""
    accelerator: str = "auto"
    """``auto``, ``cpu`` or ``gpu``."""
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
    collapse_threshold: float = opt(0.1, ge=0)
    """Warn that a backbone collapsed when the std of its features on fixed train images (1 = healthy, 0 =
    collapsed) falls below this fraction of its value before training."""
    diagnostics_samples: int = opt(512, ge=1)
    """Outputs per epoch and network from which the collapse diagnostics are computed, and the fixed train
    images (chosen once by ``seed``) on which every backbone is measured each epoch and the online k-NN
    finds its neighbours."""
    keep_epochs: list[int] = opt([], ge=1)
    """Also keep each network's weights after these epochs, in ``snapshots/epoch_NNN/`` (with the run's
    ``config.yaml``, so a snapshot is read like a run directory: ``cass finetune --from``): a budget curve from
    one long run instead of one run per budget. A snapshot is taken mid-schedule (its learning rate had not
    yet decayed), so it is a lower bound on what a run of that many epochs gives."""
    knn_every: int = opt(1, ge=0)
    """Epochs between two online k-NN scores of each backbone on the selection split (labelled data only;
    the start and the last epoch are always scored); 0: never."""
    cass: CassConfig = field(default_factory=CassConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    cass_vicreg: CassVicregConfig = field(default_factory=CassVicregConfig)

    def sources(self) -> list[DataConfig]:
        """Every source of pretraining images: ``data`` first, then ``more_data`` in order."""
        return [self.data, *self.more_data]


@dataclass
class FinetuneConfig:
    """Supervised fine-tuning or probing of one network with a fraction of the labels (SPEC §1, §2)."""

    data: DataConfig = field(default_factory=DataConfig)
    source: str = opt("scratch", flag="--from")
    """A pretraining run directory, ``imagenet``, ``scratch`` (the supervised baseline) or a weights file."""
    arch: str | None = None
    """Which network: ``cnn`` or ``vit`` (for a CASS run, which of its two networks). None: the pretraining
    run's network when its method trains only one (DINO), else ``cnn``."""
    cnn: str = "resnet50"
    """timm name of the CNN when ``source`` is not a pretraining run."""
    vit: str = "vit_base_patch16_384"
    """timm name of the Transformer when ``source`` is not a pretraining run."""
    weights: str | None = None
    """Local ImageNet weights when ``source`` is ``imagenet``."""
    cnn_stem: str = opt("timm", flag="--cnn-stem")
    """When ``source`` is not a pretraining run (a run brings its own): ``timm`` (the CNN's own stem) or ``small``: a 3x3 stride-1 first convolution and no max-pool, for
    28-64 px images (MedMNIST v2's "ResNet-18 (28)"); timm's ResNet family only."""
    vit_patch_size: int | None = opt(None, flag="--vit-patch-size", ge=1)
    """When ``source`` is not a pretraining run: patch size of the Transformer; None: its own (16 for ``*_patch16_*``). At 28-64 px a smaller patch
    keeps at least 16 patches (e.g. 4 at 28 px, 8 at 32-64 px); embeddings of loaded weights are resampled."""
    mode: str = "full"
    """``full`` (end-to-end, the paper's protocol), ``linear`` (a head trained on frozen features), or a
    readout of frozen features with its setting chosen on the selection split: ``knn`` (cosine k-NN) or
    ``logistic`` (L2 logistic regression)."""
    save_model: bool = True
    """Keep ``model.safetensors`` (and a readout's k-NN bank or logistic probe) for ``cass predict``; False keeps only the scores,
    history and subset (what an experiment's readouts need: their weights are the pretrained network's)."""
    label_fraction: float = opt(1.0, gt=0, le=1)
    """Fraction of the training labels used, e.g. 0.01, 0.1 or 1.0 (stratified, at least one per class)."""
    seed: int = opt(0, ge=0, le=SEED_MAX)
    """Seed of the label subset, initialisation and augmentations."""
    epochs: int = opt(50, ge=1)
    """Evaluations at most, one per pass over the labelled images, or per few passes when ``min_steps``
    needs more (early stopping on the selection split's macro-F1, see ``patience``). A run is *converged*
    when early stopping ended it; one that reached this budget still improving is recorded as not converged."""
    lr: float = opt(3e-4, gt=0)
    """Peak learning rate (cosine schedule down to ``min_lr``)."""
    min_lr: float = opt(1e-6, ge=0)
    """Learning rate at the end of the cosine schedule."""
    schedule: str = "cosine"
    """``cosine`` (to ``min_lr``, the paper's) or ``step`` (x0.1 at 50 % and 75 % of the run: MedMNIST v2's)."""
    warmup: float = opt(0.05, ge=0, lt=1)
    """Fraction of the run's optimiser steps (at most) over which the learning rate rises linearly from 0 to
    ``lr`` before the schedule: a fresh head on pretrained features otherwise sends large gradients into the
    backbone in its first steps. 0: none (MedMNIST v2's recipe has none)."""
    vit_layer_decay: float = opt(0.75, gt=0, le=1)
    """Layer-wise learning-rate decay of a Transformer fine-tuned from pretrained weights (timm's parameter
    groups, as in BEiT and MAE): each block learns at this times the rate of the block above it, the head at
    ``lr``, so the earliest, most general features move least. 1: one rate for all. Not applied to a CNN, to a
    network trained from scratch (every layer must learn) or in ``linear`` mode (only the head trains)."""
    select_metric: str = "macro_f1"
    """Selection-split metric that picks the best evaluation and drives early stopping: ``macro_f1`` (the
    paper's), ``auroc`` (MedMNIST v2 chooses its models on validation AUC) or ``accuracy``."""
    augment: str = "paper"
    """Training augmentation: ``paper`` (the CASS view of SPEC §1) or ``none`` (resize only; MedMNIST v2's)."""
    batch_size: int = opt(16, ge=1)
    """Batch size."""
    img_size: int | None = opt(None, ge=1)
    """Input size in pixels; None: the pretraining run's, else the model's own."""
    loss: str = "ce"
    """``ce`` (cross-entropy; BCE for multi-label) or ``focal`` (the paper's sigmoid focal loss, alpha 1, gamma 2).
    Chosen by measurement on the selection split: cross-entropy scored higher in 15 of 16 conditions of the
    BreastMNIST shared-backbone comparison and in both blood-cell runs (BENCHMARKS "Fine-tuning checks")."""
    class_weights: str = "inverse"
    """``inverse`` (inverse frequency, normalised), ``none``, or ``paper`` (the public code's: grows with frequency)."""
    patience: int = opt(10, ge=1)
    """Early stopping: evaluations on the selection split without a better macro-F1."""
    min_steps: int = opt(200, ge=0)
    """Optimiser steps at least, whatever the label fraction: a small labelled subset gets more passes
    over its images between evaluations (``epochs`` stays the number of evaluations)."""
    knn_k: int | None = opt(None, ge=1)
    """A fixed k for the k-NN readout (``mode`` ``knn``); None: k is chosen on the selection split from
    ``knn_ks``. (Runs made before the grid existed used a fixed 20.)"""
    knn_ks: list[int] = opt([1, 5, 10, 20, 50], ge=1)
    """The k-NN readout's grid: the k with the best selection macro-F1 is kept (ties: the smallest); a k
    above the number of labelled images becomes that number."""
    logistic_cs: list[float] = opt([1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0], gt=0)
    """The logistic readout's grid of C, the inverse L2 strength (``mode`` ``logistic``): the C with the best
    selection macro-F1 is kept (ties: the smallest, the strongest regularisation)."""
    out: str = "runs/finetune"
    """Output model directory."""
    accelerator: str = "auto"
    """``auto``, ``cpu`` or ``gpu``."""
    precision: str = "auto"
    """``auto`` = bf16 autocast on GPU, fp32 on CPU; or any Lightning precision string."""


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
    """Build ``cls`` from a dict, refusing unknown keys, wrong types and out-of-range values with the option's name."""
    cfg = _from_dict(cls, values, where)
    check_ranges(cfg, where)
    return cfg


def option_flag(f: dataclasses.Field, section: str = "") -> str:
    """The command-line flag of a config field: its ``flag`` metadata, else ``--<section>-<field-name>``.

    ``section`` is the name of the nested section holding the field (``dino``), empty at the top level.
    A boolean's declared ``--x/--no-y`` is returned whole; a generated one is ``--x`` (its negative is ``--no-x``).
    """
    declared = f.metadata.get("flag")
    if declared:
        return declared
    return "--" + "-".join(part for part in (section, f.name) if part).replace("_", "-")


def check_ranges(cfg: Any, where: str = "config") -> None:
    """Refuse numeric values outside the range in their field's metadata (``ge``/``gt``/``le``/``lt``).

    Walks nested sections; a tuple or list is checked element by element and None ("automatic") passes.
    For the configs of ``cass pretrain`` and ``cass finetune`` the message also names the option's flag.
    """
    _check_ranges(cfg, where, "" if isinstance(cfg, (PretrainConfig, FinetuneConfig)) else None)


def _check_ranges(cfg: Any, where: str, section: str | None) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _check_ranges(value, f"{where}.{f.name}", None if section is None else f.name)
            continue
        if isinstance(value, list) and any(dataclasses.is_dataclass(item) for item in value):
            for i, item in enumerate(value):  # sections of a list (``more_data``) have no flags of their own
                _check_ranges(item, f"{where}.{f.name}[{i}]", None)
            continue
        bounds = {key: f.metadata[key] for key in ("ge", "gt", "le", "lt") if key in f.metadata}
        if not bounds:
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is None or isinstance(item, bool) or not isinstance(item, (int, float)):
                continue
            if not math.isfinite(item) or not _within(item, bounds):
                flag = "" if section is None else f" ({option_flag(f, section).split('/')[0]})"
                raise ConfigError(f"{where}.{f.name}{flag}: must be {describe_range(bounds)}, got {value!r}")


def _within(value: float, bounds: dict[str, float]) -> bool:
    return ((("ge" not in bounds) or value >= bounds["ge"]) and (("gt" not in bounds) or value > bounds["gt"])
            and (("le" not in bounds) or value <= bounds["le"]) and (("lt" not in bounds) or value < bounds["lt"]))


def describe_range(bounds: dict[str, float]) -> str:
    """``>= 1``, ``> 0``, ``in (0, 1]`` ... for a field's ``ge``/``gt``/``le``/``lt`` metadata."""
    low = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    high = ("]", bounds["le"]) if "le" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
    if low and high:
        return f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1]}"
    if high:
        return f"{'<=' if high[0] == ']' else '<'} {high[1]}"
    return "any number"


def _from_dict(cls: type[T], values: dict[str, Any], where: str) -> T:
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
        return _from_dict(tp, value or {}, where)
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
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(args[0], k, where): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
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
