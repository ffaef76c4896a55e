"""What an experiment is: a grid of methods x architectures x initialisations x label fractions x seeds
(SPEC §2), checked before anything trains.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cass.config import (
    ConfigError,
    DataConfig,
    FinetuneConfig,
    PretrainConfig,
    load_yaml,
    merge,
)
from cass.data.subsets import check_fraction
from cass.evaluation.intervals import MULTICLASS_METRICS
from cass.methods.registry import method_class, method_names
from cass.utils.rundir import CONFIG

SUPERVISED = "supervised"
"""The baseline without pretraining: the same network and initialisation trained with labels only."""
STARTING_POINT = "starting-point"
"""Not a method: each network at its initialisation (random or stand-in weights), read out on frozen
features exactly like a pretrained network; what pretraining added is measured against it."""
READOUTS = ("knn", "logistic")
"""Frozen-feature readouts (``finetune.mode`` values): cosine k-NN and L2 logistic regression, k and C chosen
on the selection split (``finetune.knn_ks``, ``finetune.logistic_cs``)."""
ARCHS = ("cnn", "vit")
BUILTIN_INITS = ("scratch", "imagenet")


def is_self_supervised(method: str) -> bool:
    """Whether a grid method pretrains (a registered method) rather than being the supervised baseline."""
    return method in method_names()


def grid_methods() -> list[str]:
    """What an experiment can compare: every registered pretraining method, then the supervised baseline."""
    return [*method_names(), SUPERVISED]


@dataclass
class InitSpec:
    """One initialisation of the grid, named as it must appear in every table.

    ``scratch`` is random init; ``imagenet`` is timm's ImageNet weights (downloaded, or the local
    ``*_weights`` files); any other name is a stand-in (SPEC §1): weights files for the CNN and the
    Transformer, e.g. classifiers trained with labels on another dataset, named honestly
    (``blood-supervised``), never passed off as ImageNet.

    An init can instead be the networks of a self-supervised pretraining run shared by every dataset: ``run``,
    a pretraining run directory (say ``cass pretrain --data A --data B ...`` on every unlabelled source a
    user has), or ``pool``, sources the experiment pretrains on once itself. Every cell of the init then
    starts from that one backbone: its starting-point readouts read it out, the supervised baseline
    fine-tunes it, and the grid's self-supervised methods continue pretraining from it on ``data``.
    """

    name: str = "scratch"
    cnn_weights: str | None = None
    vit_weights: str | None = None
    run: str | None = None
    """A pretraining run directory whose ``cnn.safetensors``/``vit.safetensors`` are this init's weights; its
    networks must be the experiment's (``pretrain.cnn``/``vit``, ``cnn_stem``, ``vit_patch_size``)."""
    pool: list[DataConfig] = field(default_factory=list)
    """Sources to pretrain on once, before any cell, under ``<out>/pool/<name>`` (resumable like every run of
    the grid): the first is that run's ``data``, the others its ``more_data``; its networks are this init's
    weights. The pretraining is one run whatever the seeds (with the first seed), so the spread over seeds
    does not include its variance."""
    pool_options: dict[str, Any] = field(default_factory=dict)
    """Options of the ``pool`` run over the experiment's ``pretrain`` section, as dotted keys, e.g.
    ``{method: cass-vicreg, epochs: 10, balance_sources: true}``; the networks and their shape stay the
    experiment's."""
    methods: list[str] | None = None
    """The grid's methods run under this init (a subset of the experiment's ``methods``); None: all of them.
    E.g. ``[supervised]`` for a shared backbone that is fine-tuned and read out as it is, without a
    per-dataset pretraining continued from it (which costs a pretraining run per method and seed)."""

    def runs(self, method: str) -> bool:
        """Whether ``method`` has cells under this init."""
        return self.methods is None or method in self.methods

    @property
    def pretrained(self) -> bool:
        """Whether the init is the networks of a self-supervised pretraining run (``run`` or ``pool``)."""
        return self.run is not None or bool(self.pool)


@dataclass
class PublishedResult:
    """A published test score to hold the experiment's fine-tuned cells against, e.g. MedMNIST v2's supervised
    ResNet-18 (28) on the same official test split: the report sets every cell at ``label_fraction`` beside it,
    with its interval, and says whether the interval lies below, around or above it."""

    name: str = ""
    """How the tables name it, e.g. ``MedMNIST v2, ResNet-18 (28)``."""
    source: str = ""
    """Where it was published (a citation), printed under its table."""
    recipe: str = ""
    """How it was trained where that differs from the experiment's cells (input size, schedule...), printed
    under its table: a published number from another recipe is a landmark, not a paired comparison."""
    label_fraction: float = 1.0
    """The fraction of the train labels it was trained with; the experiment's cells at this fraction are set
    beside it."""
    scores: dict[str, float] = field(default_factory=dict)
    """Its test scores by metric name as the tables name them (``auroc``, ``accuracy``, ``macro_f1``...)."""


@dataclass
class ExperimentConfig:
    """A grid of methods x architectures x initialisations x label fractions x seeds (SPEC §2).

    ``pretrain`` and ``finetune`` hold the schedules and sizes shared by every cell; the fields that
    vary per cell (method, arch, init, weights, seed, label fraction, data, out, fine-tuning source
    and network names) are filled in by the grid and must be left unset there. The networks are
    ``pretrain.cnn`` and ``pretrain.vit`` for every method, so all cells compare the same backbones.
    """

    data: DataConfig = field(default_factory=DataConfig)
    """The images of every cell: a root with ``train/`` and ``val/`` (None: the shipped sample)."""
    methods: list[str] = field(default_factory=grid_methods)
    archs: list[str] = field(default_factory=lambda: list(ARCHS))
    inits: list[InitSpec] = field(default_factory=lambda: [InitSpec()])
    label_fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    pretrain_per_seed: bool = True
    """One pretraining run per seed (True), or one run with the first seed reused by every seed."""
    readouts: list[str] = field(default_factory=lambda: list(READOUTS))
    """Frozen-feature readouts of every pretrained network and of the same network at its starting point,
    at every label fraction and seed (``[]`` for none): the report's first tables, "what pretraining added"."""
    sweep_batch_sizes: list[int] = field(default_factory=list)
    """Pretraining batch sizes of the robustness sweep (CASS and DINO), e.g. [8, 16, 32]."""
    sweep_epochs: list[int] = field(default_factory=list)
    """Pretraining epochs of the robustness sweep (CASS and DINO), e.g. [25, 50, 100]."""
    sweep_label_fractions: list[float] = field(default_factory=lambda: [1.0])
    """Label fractions at which the sweeps' pretraining runs are fine-tuned."""
    readout_epochs: list[int] = field(default_factory=list)
    """The pretraining budget curve: besides the end of each pretraining run, read every pretrained network out
    after these epochs of the same run (kept with ``keep_epochs``), at every label fraction and seed, e.g.
    [3, 10] with ``pretrain.epochs`` 30. One run per method and seed gives every budget; a snapshot is taken
    before the learning rate has decayed, so it is a lower bound on a run of that length. The report plots
    the readouts against the epochs and says where the last doubling gained nothing beyond its interval."""
    fine_tune: bool = True
    """Fine-tune every cell of the grid (``finetune.mode``); False: readouts only (a budget curve, a quick look)."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    pretrain_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Options of ``pretrain`` that differ between pretraining runs, by run label (``cass``, ``dino-cnn``,
    ``dino-vit``) as dotted keys, e.g. ``{dino-cnn: {dino.base_lr: 0.24}}``: DINO's CNN student trains with
    SGD and its ViT student with AdamW, whose learning rates differ by two orders of magnitude."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    published: list[PublishedResult] = field(default_factory=list)
    """Published test scores on the same test split, set beside the fine-tuned cells in the report (its
    "Against published results" section); they change no cell, only what the report compares."""
    out: str = "runs/experiment"


def validate(cfg: ExperimentConfig) -> None:
    """Refuse a grid that would fail (or silently mislead) hours into the run."""
    _check_choices("methods", cfg.methods, tuple(grid_methods()))
    _check_choices("archs", cfg.archs, ARCHS)
    if "linear" in cfg.readouts:  # refused, not mapped: its cells would silently change meaning and name
        raise ConfigError("experiment: readouts: the linear readout is now `logistic` (L2 logistic regression, C "
                          "chosen on the selection split; `linear` is a fine-tuning mode that trains a head with "
                          "Adam); replace linear by logistic")
    unknown = sorted(set(cfg.readouts) - set(READOUTS))
    if unknown:
        raise ConfigError(f"experiment: readouts must be a subset of {list(READOUTS)}, got {cfg.readouts}")
    if not cfg.seeds or not cfg.label_fractions or not cfg.inits:
        raise ConfigError("experiment: seeds, label_fractions and inits must each list at least one value")
    for fraction in [*cfg.label_fractions, *cfg.sweep_label_fractions]:
        try:
            check_fraction(fraction)
        except ValueError as err:
            raise ConfigError(f"experiment: {err}") from None
    if any(v < 1 for v in [*cfg.sweep_batch_sizes, *cfg.sweep_epochs]):
        raise ConfigError("experiment: sweep_batch_sizes and sweep_epochs must be positive")
    if any(not 1 <= e < cfg.pretrain.epochs for e in cfg.readout_epochs):
        raise ConfigError(f"experiment: readout_epochs {cfg.readout_epochs} must lie between 1 and the run's "
                          f"{cfg.pretrain.epochs} epochs (pretrain.epochs), which is always read out")
    if cfg.readout_epochs and not cfg.readouts:
        raise ConfigError("experiment: readout_epochs needs readouts (knn, logistic) to read the networks out")
    if not cfg.fine_tune and not cfg.readouts:
        raise ConfigError("experiment: fine_tune: false and readouts: [] leave nothing to run")
    names = [init.name for init in cfg.inits]
    if len(set(names)) != len(names):
        raise ConfigError(f"experiment: init names must be unique, got {names}")
    for init in cfg.inits:
        _check_init(init, cfg)
    _refuse_per_cell_fields(cfg)
    _check_pretrain_overrides(cfg)
    for published in cfg.published:
        _check_published(published, cfg)


def _check_published(published: PublishedResult, cfg: ExperimentConfig) -> None:
    where = f"experiment: published {published.name!r}"
    if not published.name or not published.scores:
        raise ConfigError("experiment: published: every entry needs a name and scores (e.g. {auroc: 0.901})")
    if not cfg.fine_tune or published.label_fraction not in cfg.label_fractions:
        raise ConfigError(f"{where}: label_fraction {published.label_fraction} is not one of the fine-tuned "
                          f"label_fractions {cfg.label_fractions}, so no cell could be set beside it")
    unknown = sorted(set(published.scores) - set(MULTICLASS_METRICS))
    if unknown:
        raise ConfigError(f"{where}: scores {unknown} are not metrics the tables report; "
                          f"use {list(MULTICLASS_METRICS)}")
    if not all(0 <= value <= 1 for value in published.scores.values()):
        raise ConfigError(f"{where}: scores must be fractions between 0 and 1 (0.901, not 90.1), got "
                          f"{published.scores}")


def _check_choices(option: str, values: list[str], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(values) - set(allowed))
    if unknown or not values:
        raise ConfigError(f"experiment: {option} must be a non-empty subset of {list(allowed)}, got {values}")


def _check_init(init: InitSpec, cfg: ExperimentConfig) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", init.name):
        raise ConfigError(f"experiment: init name {init.name!r} must use only letters, digits, '.', '_' and '-'")
    if init.methods is not None and (not init.methods or set(init.methods) - set(cfg.methods)):
        raise ConfigError(f"experiment: init {init.name!r}: methods {init.methods} must be a non-empty subset of "
                          f"the experiment's methods {cfg.methods}")
    if init.pretrained:
        _check_pretrained_init(init, cfg)
        return
    if init.pool_options:
        raise ConfigError(f"experiment: init {init.name!r}: pool_options without a pool; list its sources in pool")
    if init.name == "scratch":
        if init.cnn_weights or init.vit_weights:
            raise ConfigError("experiment: init 'scratch' takes no weights; name the init after its weights")
        return
    for arch in cfg.archs:
        weights = getattr(init, f"{arch}_weights")
        if weights is None and init.name != "imagenet":
            raise ConfigError(f"experiment: init {init.name!r} needs {arch}_weights (a weights file for the {arch})")
        if weights is not None and not Path(weights).is_file():
            raise ConfigError(f"experiment: init {init.name!r}: {arch}_weights file not found: {weights}")


_SHAPE_OPTION = {"cnn": "cnn_stem", "vit": "vit_patch_size"}
"""Besides its timm name, what makes a network of an init the same as the experiment's (its weights must fit)."""


def _check_pretrained_init(init: InitSpec, cfg: ExperimentConfig) -> None:
    """An init from a pretraining run: a run directory or a pool (not both, no weights files beside), whose
    networks are the experiment's and cover every architecture of the grid."""
    where = f"experiment: init {init.name!r}"
    if init.name in BUILTIN_INITS or init.cnn_weights or init.vit_weights or (init.run and init.pool):
        raise ConfigError(f"{where}: a pretraining run's networks are the init's weights: give run or pool alone, "
                          f"without cnn_weights/vit_weights, under a name other than {' or '.join(BUILTIN_INITS)}")
    if init.run is not None:
        path = Path(init.run) / CONFIG
        if not path.is_file():
            raise ConfigError(f"{where}: run {init.run}: no {CONFIG} there (is it a cass pretrain run directory?)")
        run = load_yaml(PretrainConfig, path)
        missing = [arch for arch in cfg.archs if not (Path(init.run) / f"{arch}.safetensors").is_file()]
        if missing:
            raise ConfigError(f"{where}: run {init.run} has no {', '.join(f'{a}.safetensors' for a in missing)} "
                              f"(its {run.method} run trains {', '.join(method_class(run.method).roles(run.arch))})")
        shape = [key for arch in cfg.archs for key in (arch, _SHAPE_OPTION[arch])]
        differ = [f"{key} {getattr(run, key)!r} (experiment: {getattr(cfg.pretrain, key)!r})"
                  for key in shape if getattr(run, key) != getattr(cfg.pretrain, key)]
        if differ:
            raise ConfigError(f"{where}: run {init.run}'s networks are not the experiment's: {', '.join(differ)}")
        return
    fixed = sorted(key for key in init.pool_options
                   if key.split(".")[0] in ("cnn", "vit", *_SHAPE_OPTION.values(), "data", "more_data", "out"))
    if fixed:
        raise ConfigError(f"{where}: pool_options: {', '.join(fixed)} cannot be set: the pool's sources are its "
                          "pool list, its networks the experiment's pretrain.cnn/vit")
    pool = merge(cfg.pretrain, init.pool_options, where=f"{where}: pool_options")
    if missing := sorted(set(cfg.archs) - set(method_class(pool.method).roles(pool.arch))):
        raise ConfigError(f"{where}: pool_options: a {pool.method} run trains no {', '.join(missing)}, and the "
                          f"grid's archs {cfg.archs} each need one")


_PER_CELL = {
    "pretrain": ("method", "arch", "init", "cnn_weights", "vit_weights", "seed", "out", "data", "more_data"),
    "finetune": ("source", "arch", "cnn", "vit", "weights", "label_fraction", "seed", "out", "data", "save_model"),
}


def run_network(method: str, arch: str) -> str | None:
    """The network a pretraining run serving an ``arch`` cell trains: None for a method that trains both
    networks in one run (CASS), whose run then serves the cells of both architectures."""
    return None if method_class(method).trains_both_networks else arch


def run_labels(cfg: ExperimentConfig) -> list[str]:
    """The labels of the grid's pretraining runs, in grid order."""
    labels = [method_class(method).run_name(arch)
              for method in cfg.methods if is_self_supervised(method) for arch in cfg.archs]
    return list(dict.fromkeys(labels))


_FIXED_BY_GRID = ("method", "arch", "init", "cnn_weights", "vit_weights", "seed", "out", "data", "more_data",
                  "batch_size", "epochs", "cnn", "vit", "img_size")


def _check_pretrain_overrides(cfg: ExperimentConfig) -> None:
    """Every key names a run of the grid and every option exists and is not one the grid sets or compares on."""
    labels = run_labels(cfg)
    for label, options in cfg.pretrain_overrides.items():
        if label not in labels:
            raise ConfigError(f"experiment: pretrain_overrides.{label}: no such pretraining run; runs: {labels}")
        fixed = sorted(key for key in options if key.split(".")[0] in _FIXED_BY_GRID)
        if fixed:
            raise ConfigError(f"experiment: pretrain_overrides.{label}: {', '.join(fixed)} must be the same for "
                              "every run (set it in pretrain or the grid)")
        merge(cfg.pretrain, options, where=f"experiment: pretrain_overrides.{label}")


def _refuse_per_cell_fields(cfg: ExperimentConfig) -> None:
    """A value set in ``pretrain``/``finetune`` that the grid overwrites would be silently ignored."""
    for section, names in _PER_CELL.items():
        given, default = getattr(cfg, section), type(getattr(cfg, section))()
        for name in names:
            if getattr(given, name) != getattr(default, name):
                raise ConfigError(
                    f"experiment: {section}.{name} is set per cell by the grid (data, methods, archs, inits, "
                    f"seeds, label_fractions, out, pretrain.cnn/vit); remove it from {section}"
                )
