"""The cells of an experiment and the pretraining runs they share, with the full configuration of each.

A *cell* is one fine-tuned classifier: a method, an architecture (``cnn`` or ``vit``), an
initialisation, a label fraction and a seed, plus the pretraining batch size and epochs of the
robustness sweeps. A *pretraining run* is what the cells of a self-supervised method start from; it is
trained once and shared by every cell that needs it: a run of a method that trains both networks
(CASS) serves the CNN and the Transformer cells, a single-network run (DINO) the cells of its
student's architecture, and all label fractions share a run. An init's ``pool`` is one more pretraining
run (:func:`pool_config`), trained before any cell and shared by every cell of that init.

Seeds: with ``pretrain_per_seed`` (the default) each seed has its own pretraining run, so the
spread over seeds includes the variance of pretraining. ``pretrain_per_seed: false`` pretrains once
(with the first seed) and reuses that run for every seed: cheaper, but the spread then only measures
fine-tuning noise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from cass.config import (
    FinetuneConfig,
    PretrainConfig,
    merge,
)
from cass.experiment.config import (
    ARCHS,
    BUILTIN_INITS,
    STARTING_POINT,
    ExperimentConfig,
    InitSpec,
    is_self_supervised,
    run_network,
)
from cass.methods.registry import method_class
from cass.utils.rundir import snapshot_dir


@dataclass(frozen=True)
class PretrainRun:
    """One self-supervised pretraining run of the grid."""

    method: str
    arch: str | None
    """The network a single-network method (DINO) trains; None for a method that trains both (CASS)."""
    init: str
    batch_size: int
    epochs: int
    seed: int

    @property
    def label(self) -> str:
        return method_class(self.method).run_name(self.arch)

    @property
    def roles(self) -> tuple[str, ...]:
        """The networks the run exports."""
        return ARCHS if self.arch is None else (self.arch,)

    @property
    def name(self) -> str:
        return f"{self.label}_{self.init}_bs{self.batch_size}_ep{self.epochs}_seed{self.seed}"


@dataclass(frozen=True)
class Cell:
    """One fine-tuned classifier of the grid."""

    method: str
    arch: str
    init: str
    label_fraction: float
    seed: int
    batch_size: int | None
    """Pretraining batch size (None for the supervised baseline, which has no pretraining)."""
    epochs: int | None
    """Pretraining epochs (None for the supervised baseline)."""
    mode: str = "full"
    """``full`` fine-tuning, or a frozen-feature readout (``knn``, ``logistic``)."""
    at_epoch: int | None = None
    """A readout of the pretraining run's networks kept after this epoch (``readout_epochs``); None: its end."""

    @property
    def name(self) -> str:
        pretraining = "" if self.batch_size is None else f"_bs{self.batch_size}_ep{self.epochs}"
        pretraining += "" if self.at_epoch is None else f"_at{self.at_epoch}"
        readout = "" if self.mode == "full" else f"_{self.mode}"
        return f"{self.method}_{self.arch}_{self.init}{pretraining}_f{self.label_fraction:g}_seed{self.seed}{readout}"

    def describe(self) -> str:
        pretraining = "" if self.batch_size is None else f", pretraining batch {self.batch_size} x {self.epochs} epochs"
        pretraining += "" if self.at_epoch is None else f" read out after epoch {self.at_epoch}"
        how = "fine-tuned" if self.mode == "full" else f"{self.mode} readout"
        return (f"{self.method} {self.arch} from {self.init}, {how}, {self.label_fraction * 100:g}% labels, "
                f"seed {self.seed}{pretraining}")


def plan(cfg: ExperimentConfig) -> list[Cell]:
    """Every cell: the frozen-feature readouts first (cheap, and the first thing the report shows, so an
    interrupted experiment already has them), then the fine-tuning grid seed by seed, then the sweeps."""
    base = (cfg.pretrain.batch_size, cfg.pretrain.epochs)
    settings = [base]
    settings += [(b, cfg.pretrain.epochs) for b in cfg.sweep_batch_sizes]
    settings += [(cfg.pretrain.batch_size, e) for e in cfg.sweep_epochs]
    cells: dict[Cell, None] = dict.fromkeys(readout_cells(cfg))
    if not cfg.fine_tune:
        return list(cells)
    for batch_size, epochs in dict.fromkeys(settings):
        is_base = (batch_size, epochs) == base
        fractions = cfg.label_fractions if is_base else cfg.sweep_label_fractions
        methods = cfg.methods if is_base else [m for m in cfg.methods if is_self_supervised(m)]
        for init in cfg.inits:
            for seed in cfg.seeds:
                for method in filter(init.runs, methods):
                    pretrained = is_self_supervised(method)
                    for arch in cfg.archs:
                        for fraction in fractions:
                            cells[Cell(method, arch, init.name, fraction, seed, batch_size if pretrained else None,
                                       epochs if pretrained else None, cfg.finetune.mode)] = None
    return list(cells)


def readout_cells(cfg: ExperimentConfig) -> list[Cell]:
    """Every frozen-feature readout: each pretrained network of the main grid and, beside it, the same
    network at its starting point, at every label fraction and seed. A grid without a self-supervised method
    has them too when an init is a pretraining run's networks (:attr:`InitSpec.pretrained`): its starting
    point is then a pretrained backbone, read out beside the other inits' starting points. With
    ``readout_epochs``, each pretrained network is also read out after those epochs of its run."""
    pretrained = [m for m in cfg.methods if is_self_supervised(m)]
    if not cfg.readouts or not (pretrained or any(init.pretrained for init in cfg.inits)):
        return []
    batch_size, epochs = cfg.pretrain.batch_size, cfg.pretrain.epochs
    at_end = [Cell(method, arch, init.name, fraction, seed, *((batch_size, epochs) if is_self_supervised(method)
                                                             else (None, None)), mode)
              for init in cfg.inits for seed in cfg.seeds
              for method in [*filter(init.runs, pretrained), STARTING_POINT] for arch in cfg.archs for fraction in cfg.label_fractions for mode in cfg.readouts]
    earlier = [dataclasses.replace(cell, at_epoch=at) for at in sorted(cfg.readout_epochs)
               for cell in at_end if cell.method != STARTING_POINT]
    return at_end + earlier


def pretrain_run(cfg: ExperimentConfig, cell: Cell) -> PretrainRun | None:
    """The pretraining run a cell starts from (None for the supervised baseline)."""
    if not is_self_supervised(cell.method):
        return None
    seed = cell.seed if cfg.pretrain_per_seed else cfg.seeds[0]
    return PretrainRun(cell.method, run_network(cell.method, cell.arch), cell.init, cell.batch_size, cell.epochs, seed)


def _init_spec(cfg: ExperimentConfig, name: str) -> InitSpec:
    return next(init for init in cfg.inits if init.name == name)


def pool_dir(cfg: ExperimentConfig, init: InitSpec) -> Path:
    """Where the experiment pretrains an init's ``pool``."""
    return Path(cfg.out) / "pool" / init.name


def pool_config(cfg: ExperimentConfig, init: InitSpec) -> PretrainConfig:
    """The full configuration of an init's ``pool`` run: the experiment's ``pretrain`` options with the first
    seed and the init's ``pool_options`` over them, on the pool's sources."""
    shared = merge(dataclasses.replace(cfg.pretrain, seed=cfg.seeds[0]), init.pool_options,
                   where=f"inits.{init.name}.pool_options")
    return dataclasses.replace(shared, data=init.pool[0], more_data=list(init.pool[1:]), out=str(pool_dir(cfg, init)))


def init_weights(cfg: ExperimentConfig, init: InitSpec, arch: str) -> str | None:
    """The weights file of ``arch`` under ``init``: its ``*_weights`` file, else the network of its pretraining
    run (``run``, or the ``pool`` run under ``out``, written before any cell needs it); None for random init
    and for timm's own ImageNet download."""
    if init.run is not None:
        return str(Path(init.run) / f"{arch}.safetensors")
    if init.pool:
        return str(pool_dir(cfg, init) / f"{arch}.safetensors")
    return getattr(init, f"{arch}_weights")


def stand_in_dir(cfg: ExperimentConfig, init: InitSpec) -> Path:
    """A directory holding ``cnn.safetensors``/``vit.safetensors`` links to a stand-in's weights (or to the
    networks of the init's pretraining run).

    A pretraining config names one ``init`` for both networks, and a directory is how the model
    factory gives each network its own file (``<role>.safetensors``).
    """
    directory = Path(cfg.out) / "inits" / init.name
    directory.mkdir(parents=True, exist_ok=True)
    for arch in cfg.archs:
        link = directory / f"{arch}.safetensors"
        target = Path(init_weights(cfg, init, arch)).resolve()
        if not (link.is_symlink() and link.resolve() == target):
            link.unlink(missing_ok=True)
            link.symlink_to(target)
    return directory


def pretrain_dir(cfg: ExperimentConfig, run: PretrainRun) -> Path:
    return Path(cfg.out) / "pretrain" / run.name


def pretrain_config(cfg: ExperimentConfig, run: PretrainRun) -> PretrainConfig:
    """The full configuration of one pretraining run."""
    init = _init_spec(cfg, run.init)
    if init.name in BUILTIN_INITS:
        weights = {"init": init.name, "cnn_weights": init.cnn_weights, "vit_weights": init.vit_weights}
    else:
        weights = {"init": str(stand_in_dir(cfg, init))}
    shared = merge(cfg.pretrain, cfg.pretrain_overrides.get(run.label, {}), where=f"pretrain_overrides.{run.label}")
    keep = sorted({*shared.keep_epochs, *(e for e in cfg.readout_epochs if e < run.epochs)})
    return dataclasses.replace(
        shared, method=run.method, arch=run.arch or cfg.pretrain.arch, data=cfg.data,
        batch_size=run.batch_size, epochs=run.epochs, seed=run.seed, keep_epochs=keep,
        out=str(pretrain_dir(cfg, run)), **weights,
    )


def finetune_config(cfg: ExperimentConfig, cell: Cell, pretrained: Path | None) -> FinetuneConfig:
    """The full configuration of one cell's fine-tuning (from its pretraining run, or its init)."""
    init = _init_spec(cfg, cell.init)
    if pretrained is not None:
        source, weights = str(pretrained if cell.at_epoch is None else snapshot_dir(pretrained, cell.at_epoch)), None
    elif init.name in BUILTIN_INITS:
        source, weights = init.name, init_weights(cfg, init, cell.arch)
    else:
        source, weights = init_weights(cfg, init, cell.arch), None
    return dataclasses.replace(
        cfg.finetune, data=cfg.data, source=source, weights=weights, arch=cell.arch, cnn=cfg.pretrain.cnn,
        vit=cfg.pretrain.vit, img_size=cfg.finetune.img_size or cfg.pretrain.img_size,
        label_fraction=cell.label_fraction, seed=cell.seed, mode=cell.mode,
        save_model=cell.mode == cfg.finetune.mode and cell.method != STARTING_POINT,  # readouts keep scores only
        out=str(Path(cfg.out) / "finetune" / cell.name),
    )


def job_configs(cfg: ExperimentConfig, cell: Cell) -> tuple[PretrainRun | None, PretrainConfig | None, FinetuneConfig]:
    """A cell's pretraining run (if any) and the full configurations of both steps."""
    run = pretrain_run(cfg, cell)
    if run is None:
        return None, None, finetune_config(cfg, cell, None)
    return run, pretrain_config(cfg, run), finetune_config(cfg, cell, pretrain_dir(cfg, run))
