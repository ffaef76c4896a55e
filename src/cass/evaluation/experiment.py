"""The comparison protocol of SPEC §2 as one resumable grid: what ``cass experiment`` runs.

A *cell* is one fine-tuned classifier: a method (``cass``, ``dino`` or ``supervised``), an
architecture (``cnn`` or ``vit``), an initialisation, a label fraction and a seed, plus the
pretraining batch size and epochs of the robustness sweeps. A *pretraining run* is what the cells of
a self-supervised method start from, and it is trained once and shared by every cell that needs it:
one CASS run serves both the CNN and the Transformer cells (CASS trains the two networks together),
a DINO run serves the cells of its student's architecture, and all label fractions share a run.

Seeds: with ``pretrain_per_seed`` (the default) each seed has its own pretraining run, so the
spread over seeds includes the variance of pretraining, which is what a user repeating the whole
recipe would see. ``pretrain_per_seed: false`` pretrains once (with the first seed) and reuses that
run for every seed: cheaper, but the std then only measures fine-tuning noise.

Resuming: rerunning the same configuration skips every cell whose ``cell.json`` exists, reuses
every pretraining run whose exported weights record its last epoch, continues an interrupted
pretraining from its last checkpoint (the engine's resume) and an interrupted fine-tuning from its
own. A directory written with a different configuration is refused, never silently reused.

Layout of ``out``: ``experiment.yaml`` (the resolved configuration: ``cass experiment --config`` on it
reruns everything), ``environment.json`` (machine and versions of each session), ``pretrain/<run>/``,
``finetune/<cell>/`` (a ``cass finetune`` model directory plus ``cell.json``), ``results.csv`` and
``results.json`` (one row per finished cell) and ``pretraining.csv`` (one row per pretraining run).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import platform
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

import cass
from cass.config import (
    ConfigError,
    DataConfig,
    DinoConfig,
    FinetuneConfig,
    PretrainConfig,
    load_yaml,
    save_yaml,
    to_dict,
)
from cass.evaluation.finetune import finetune
from cass.evaluation.subsets import check_fraction
from cass.training.checkpoint import CheckpointError, atomic_write_text, read_info
from cass.training.engine import CHECKPOINT, CONFIG, METRICS, MetricsFile, pretrain

METHODS = ("cass", "dino", "supervised")
SELF_SUPERVISED = ("cass", "dino")
ARCHS = ("cnn", "vit")
BUILTIN_INITS = ("scratch", "imagenet")
CELL = "cell.json"
RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
PRETRAINING_CSV = "pretraining.csv"
EXPERIMENT_YAML = "experiment.yaml"
ENVIRONMENT = "environment.json"
SCORES = ("macro_f1", "micro_f1", "macro_recall", "balanced_accuracy", "auroc", "accuracy", "map")
"""Scalar validation metrics copied into every row (``map`` exists for multi-label data only)."""


@dataclass
class InitSpec:
    """One initialisation of the grid, named as it must appear in every table.

    ``scratch`` is random init; ``imagenet`` is timm's ImageNet weights (downloaded, or the local
    ``*_weights`` files); any other name is a stand-in (SPEC §1): weights files for the CNN and the
    Transformer, e.g. classifiers trained with labels on another dataset, named honestly
    (``blood-supervised``), never passed off as ImageNet.
    """

    name: str = "scratch"
    cnn_weights: str | None = None
    vit_weights: str | None = None


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
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    archs: list[str] = field(default_factory=lambda: list(ARCHS))
    inits: list[InitSpec] = field(default_factory=lambda: [InitSpec()])
    label_fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    pretrain_per_seed: bool = True
    """One pretraining run per seed (True), or one run with the first seed reused by every seed."""
    sweep_batch_sizes: list[int] = field(default_factory=list)
    """Pretraining batch sizes of the robustness sweep (CASS and DINO), e.g. [8, 16, 32]."""
    sweep_epochs: list[int] = field(default_factory=list)
    """Pretraining epochs of the robustness sweep (CASS and DINO), e.g. [25, 50, 100]."""
    sweep_label_fractions: list[float] = field(default_factory=lambda: [1.0])
    """Label fractions at which the sweeps' pretraining runs are fine-tuned."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    out: str = "runs/experiment"


@dataclass(frozen=True)
class PretrainRun:
    """One self-supervised pretraining run of the grid."""

    method: str
    arch: str | None
    """The student's architecture for DINO; None for CASS, which trains both."""
    init: str
    batch_size: int
    epochs: int
    seed: int

    @property
    def label(self) -> str:
        return self.method if self.arch is None else f"{self.method}-{self.arch}"

    @property
    def roles(self) -> tuple[str, ...]:
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

    @property
    def name(self) -> str:
        pretraining = "" if self.batch_size is None else f"_bs{self.batch_size}_ep{self.epochs}"
        return f"{self.method}_{self.arch}_{self.init}{pretraining}_f{self.label_fraction:g}_seed{self.seed}"

    def describe(self) -> str:
        pretraining = "" if self.batch_size is None else f", pretraining batch {self.batch_size} x {self.epochs} epochs"
        return (f"{self.method} {self.arch} from {self.init}, {self.label_fraction * 100:g}% labels, "
                f"seed {self.seed}{pretraining}")


def validate(cfg: ExperimentConfig) -> None:
    """Refuse a grid that would fail (or silently mislead) hours into the run."""
    _check_choices("methods", cfg.methods, METHODS)
    _check_choices("archs", cfg.archs, ARCHS)
    if not cfg.seeds or not cfg.label_fractions or not cfg.inits:
        raise ConfigError("experiment: seeds, label_fractions and inits must each list at least one value")
    for fraction in [*cfg.label_fractions, *cfg.sweep_label_fractions]:
        try:
            check_fraction(fraction)
        except ValueError as err:
            raise ConfigError(f"experiment: {err}") from None
    if any(v < 1 for v in [*cfg.sweep_batch_sizes, *cfg.sweep_epochs]):
        raise ConfigError("experiment: sweep_batch_sizes and sweep_epochs must be positive")
    names = [init.name for init in cfg.inits]
    if len(set(names)) != len(names):
        raise ConfigError(f"experiment: init names must be unique, got {names}")
    for init in cfg.inits:
        _check_init(init, cfg.archs)
    _refuse_per_cell_fields(cfg)


def _check_choices(option: str, values: list[str], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(values) - set(allowed))
    if unknown or not values:
        raise ConfigError(f"experiment: {option} must be a non-empty subset of {list(allowed)}, got {values}")


def _check_init(init: InitSpec, archs: list[str]) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", init.name):
        raise ConfigError(f"experiment: init name {init.name!r} must use only letters, digits, '.', '_' and '-'")
    if init.name == "scratch":
        if init.cnn_weights or init.vit_weights:
            raise ConfigError("experiment: init 'scratch' takes no weights; name the init after its weights")
        return
    for arch in archs:
        weights = getattr(init, f"{arch}_weights")
        if weights is None and init.name != "imagenet":
            raise ConfigError(f"experiment: init {init.name!r} needs {arch}_weights (a weights file for the {arch})")
        if weights is not None and not Path(weights).is_file():
            raise ConfigError(f"experiment: init {init.name!r}: {arch}_weights file not found: {weights}")


_PER_CELL = {
    "pretrain": ("method", "arch", "init", "cnn_weights", "vit_weights", "seed", "out", "data"),
    "finetune": ("source", "arch", "cnn", "vit", "weights", "label_fraction", "seed", "out", "data"),
}


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


def plan(cfg: ExperimentConfig) -> list[Cell]:
    """Every cell, main grid first, then the sweeps; cells sharing a pretraining run are adjacent."""
    base = (cfg.pretrain.batch_size, cfg.pretrain.epochs)
    settings = [base]
    settings += [(b, cfg.pretrain.epochs) for b in cfg.sweep_batch_sizes]
    settings += [(cfg.pretrain.batch_size, e) for e in cfg.sweep_epochs]
    cells: dict[Cell, None] = {}
    for batch_size, epochs in dict.fromkeys(settings):
        is_base = (batch_size, epochs) == base
        fractions = cfg.label_fractions if is_base else cfg.sweep_label_fractions
        methods = cfg.methods if is_base else [m for m in cfg.methods if m in SELF_SUPERVISED]
        for init in cfg.inits:
            for seed in cfg.seeds:
                for method in methods:
                    pretrained = method in SELF_SUPERVISED
                    for arch in cfg.archs:
                        for fraction in fractions:
                            cells[Cell(method, arch, init.name, fraction, seed,
                                       batch_size if pretrained else None, epochs if pretrained else None)] = None
    return list(cells)


def pretrain_run(cfg: ExperimentConfig, cell: Cell) -> PretrainRun | None:
    """The pretraining run a cell starts from (None for the supervised baseline)."""
    if cell.method not in SELF_SUPERVISED:
        return None
    seed = cell.seed if cfg.pretrain_per_seed else cfg.seeds[0]
    arch = cell.arch if cell.method == "dino" else None
    return PretrainRun(cell.method, arch, cell.init, cell.batch_size, cell.epochs, seed)


def _init_spec(cfg: ExperimentConfig, name: str) -> InitSpec:
    return next(init for init in cfg.inits if init.name == name)


def stand_in_dir(cfg: ExperimentConfig, init: InitSpec) -> Path:
    """A directory holding ``cnn.safetensors``/``vit.safetensors`` links to a stand-in's weights.

    A pretraining config names one ``init`` for both networks, and a directory is how the model
    factory gives each network its own file (``<role>.safetensors``).
    """
    directory = Path(cfg.out) / "inits" / init.name
    directory.mkdir(parents=True, exist_ok=True)
    for arch in cfg.archs:
        link = directory / f"{arch}.safetensors"
        target = Path(getattr(init, f"{arch}_weights")).resolve()
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
    return dataclasses.replace(
        cfg.pretrain, method=run.method, arch=run.arch or cfg.pretrain.arch, data=cfg.data,
        batch_size=run.batch_size, epochs=run.epochs, seed=run.seed,
        out=str(pretrain_dir(cfg, run)), **weights,
    )


def finetune_config(cfg: ExperimentConfig, cell: Cell, pretrained: Path | None) -> FinetuneConfig:
    """The full configuration of one cell's fine-tuning (from its pretraining run, or its init)."""
    init = _init_spec(cfg, cell.init)
    if pretrained is not None:
        source, weights = str(pretrained), None
    elif init.name in BUILTIN_INITS:
        source, weights = init.name, getattr(init, f"{cell.arch}_weights")
    else:
        source, weights = getattr(init, f"{cell.arch}_weights"), None
    return dataclasses.replace(
        cfg.finetune, data=cfg.data, source=source, weights=weights, arch=cell.arch, cnn=cfg.pretrain.cnn,
        vit=cfg.pretrain.vit, img_size=cfg.finetune.img_size or cfg.pretrain.img_size,
        label_fraction=cell.label_fraction, seed=cell.seed, out=str(Path(cfg.out) / "finetune" / cell.name),
    )


def _refuse_other_config(directory: Path, cfg: Any) -> None:
    """Reusing a directory written by another configuration would mix results of two experiments.

    The saved file is read as a config (options it lacks take their defaults), so a directory written
    before a new option existed still matches when that option keeps its default.
    """
    path = directory / CONFIG
    if not path.is_file():
        return
    saved = load_yaml(type(cfg), path)
    if saved != cfg:
        differences = _differences(to_dict(saved), to_dict(cfg))
        changed = ", ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in differences)
        raise ConfigError(
            f"{path} was written with a different configuration than this experiment's ({changed}); "
            f"choose another out directory, or delete {directory} to redo it"
        )


def _differences(saved: dict[str, Any], planned: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, planned value) for every option that differs."""
    found = []
    for key, value in planned.items():
        if isinstance(value, dict):
            found += _differences(saved[key], value, f"{prefix}{key}.")
        elif saved[key] != value:
            found.append((f"{prefix}{key}", saved[key], value))
    return found


def pretraining_finished(run_dir: Path, run: PretrainRun) -> bool:
    """True when every exported network's weights record the run's last epoch (written after the checkpoint)."""
    for role in run.roles:
        path = run_dir / f"{role}.safetensors"
        try:
            if not path.is_file() or read_info(path).get("epoch") != str(run.epochs):
                return False
        except CheckpointError:
            return False
    return True


def _configs(cfg: ExperimentConfig, cell: Cell) -> tuple[PretrainRun | None, PretrainConfig | None, FinetuneConfig]:
    """A cell's pretraining run (if any) and the full configurations of both steps."""
    run = pretrain_run(cfg, cell)
    if run is None:
        return None, None, finetune_config(cfg, cell, None)
    return run, pretrain_config(cfg, run), finetune_config(cfg, cell, pretrain_dir(cfg, run))


def run_experiment(cfg: ExperimentConfig) -> Path:
    """Run (or continue) the whole grid; returns ``cfg.out``, which holds the results and every run."""
    validate(cfg)
    out = Path(cfg.out)
    cells = plan(cfg)
    jobs = [(cell, *_configs(cfg, cell)) for cell in cells]
    for _, _, run_cfg, ft_cfg in jobs:  # before anything is written or trained
        for step in (run_cfg, ft_cfg):
            if step is not None:
                _refuse_other_config(Path(step.out), step)
    save_yaml(cfg, out / EXPERIMENT_YAML)
    sessions = json.loads((out / ENVIRONMENT).read_text()) if (out / ENVIRONMENT).is_file() else []
    atomic_write_text(out / ENVIRONMENT, json.dumps([*sessions, environment()], indent=2))
    print(f"experiment {out}: {len(cells)} cells, {len({run for _, run, _, _ in jobs} - {None})} pretraining runs",
          flush=True)
    for number, (cell, run, run_cfg, ft_cfg) in enumerate(jobs, 1):
        label = f"[{number}/{len(cells)}] {cell.describe()}"
        if (Path(ft_cfg.out) / CELL).is_file():
            print(f"{label}: done, skipped", flush=True)
            continue
        if run is not None and not pretraining_finished(Path(run_cfg.out), run):
            resume = (Path(run_cfg.out) / CHECKPOINT).is_file()
            print(f"{label}: {'resuming' if resume else 'starting'} pretraining {run.name}", flush=True)
            pretrain(run_cfg, resume=resume)
        print(f"{label}: fine-tuning", flush=True)
        start = time.perf_counter()
        finetune(ft_cfg, resume=True)
        row = _cell_row(cfg, cell, run, time.perf_counter() - start)
        atomic_write_text(Path(ft_cfg.out) / CELL, json.dumps(row, indent=2))
        print(f"{label}: validation macro-F1 {row['macro_f1']:.4f} ({row['finetune_time_s']:.0f} s)", flush=True)
        write_results(cfg, cells)
    write_results(cfg, cells)
    return out


def environment() -> dict[str, Any]:
    """Where the numbers were measured: the report quotes it next to every time, and warns when a
    resumed experiment mixed machines (its times are then not comparable)."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else _cpu_name()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cass": cass.__version__,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def read_pretraining(run_dir: Path) -> list[dict[str, str]]:
    """The per-epoch rows of a pretraining run's ``metrics.csv`` (empty before its first epoch)."""
    path = Path(run_dir) / METRICS
    return MetricsFile.read(path) if path.is_file() else []


def _pretraining_summary(cfg: ExperimentConfig, run: PretrainRun) -> dict[str, Any]:
    """Cost and end state of one pretraining run, from its ``metrics.csv``."""
    run_dir = pretrain_dir(cfg, run)
    rows = read_pretraining(run_dir)
    last = rows[-1] if rows else {}
    summary: dict[str, Any] = {
        "method": run.method, "arch": run.arch or "cnn+vit", "init": run.init, "batch_size": run.batch_size,
        "epochs": run.epochs, "seed": run.seed, "epochs_done": len(rows),
        "time_s": sum(float(r["epoch_time_s"]) for r in rows),
        "device_time_s": sum(float(r["device_time_s"]) for r in rows),
        "images_per_s": sum(float(r["images_per_s"]) for r in rows) / len(rows) if rows else None,
        "peak_memory_mb": max((float(r["peak_memory_mb"]) for r in rows), default=None),
        "final_loss": float(last["loss"]) if last else None,
    }
    for role in run.roles:
        for key in (f"{role}_output_std", f"{role}_effective_rank"):
            summary[f"final_{key}"] = float(last[key]) if key in last else None
    summary["dir"] = str(run_dir)
    summary["config"] = str(run_dir / CONFIG)
    return summary


def _cell_row(cfg: ExperimentConfig, cell: Cell, run: PretrainRun | None, finetune_time: float) -> dict[str, Any]:
    """One results row: the cell, every validation metric, the costs and the configs that made it."""
    cell_dir = Path(cfg.out) / "finetune" / cell.name
    metrics = json.loads((cell_dir / "metrics.json").read_text())
    with open(cell_dir / "subset.csv", newline="") as fh:
        labelled = sum(1 for _ in csv.DictReader(fh))
    pre = _pretraining_summary(cfg, run) if run is not None else None
    return {
        "method": cell.method, "arch": cell.arch, "init": cell.init, "label_fraction": cell.label_fraction,
        "seed": cell.seed, "pretrain_batch_size": cell.batch_size, "pretrain_epochs": cell.epochs,
        "mode": cfg.finetune.mode, "labelled_images": labelled,
        **{key: metrics.get(key) for key in SCORES},
        "best_epoch": metrics.get("epoch"), "val_loss": metrics.get("val_loss"),
        "num_val_images": metrics.get("num_samples"),
        "pretrain_time_s": pre["time_s"] if pre else None,
        "pretrain_device_time_s": pre["device_time_s"] if pre else None,
        "finetune_time_s": finetune_time,
        "pretrain_dir": pre["dir"] if pre else None, "pretrain_config": pre["config"] if pre else None,
        "finetune_dir": str(cell_dir), "finetune_config": str(cell_dir / CONFIG),
        "classes": metrics.get("classes"), "per_class": metrics.get("per_class"),
        "confusion_matrix": metrics.get("confusion_matrix"),
    }


NESTED = ("classes", "per_class", "confusion_matrix")
"""Row fields kept in ``results.json`` only; ``results.csv`` flattens the per-class F1 instead."""


def write_results(cfg: ExperimentConfig, cells: list[Cell]) -> None:
    """``results.csv``/``results.json`` (finished cells, in plan order) and ``pretraining.csv``."""
    out = Path(cfg.out)
    rows = [json.loads(path.read_text()) for cell in cells if (path := out / "finetune" / cell.name / CELL).is_file()]
    atomic_write_text(out / RESULTS_JSON, json.dumps(rows, indent=2))
    flat = [{**{k: v for k, v in row.items() if k not in NESTED},
             **{f"f1_{name}": values.get("f1") for name, values in (row.get("per_class") or {}).items()}}
            for row in rows]
    atomic_write_text(out / RESULTS_CSV, _csv(flat))
    runs = dict.fromkeys(run for cell in cells if (run := pretrain_run(cfg, cell)) is not None)
    summaries = [_pretraining_summary(cfg, run) for run in runs if (pretrain_dir(cfg, run) / METRICS).is_file()]
    atomic_write_text(out / PRETRAINING_CSV, _csv(summaries))


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    fields = list(dict.fromkeys(key for row in rows for key in row))
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def demo_config(out: str = "runs/demo", accelerator: str = "auto") -> ExperimentConfig:
    """What ``cass demo`` runs: every method, both networks, 1/10/100 % labels, one seed, on the shipped sample.

    Small networks at 48 px and short schedules, sized to finish in minutes on a 2-core CPU; DINO keeps
    its recipe but with a 4,096-prototype head and 2 local crops, so its cost stays comparable. A
    two-point sweep (batch 16 vs 32, 1 vs 3 epochs, fine-tuned on all labels) fills the report's
    robustness plots.
    """
    return ExperimentConfig(
        data=DataConfig(num_workers=0),
        label_fractions=[0.01, 0.1, 1.0],
        seeds=[0],
        sweep_batch_sizes=[16],
        sweep_epochs=[1],
        pretrain=PretrainConfig(
            cnn="resnet18", vit="vit_tiny_patch16_224", img_size=48, batch_size=32, epochs=3,
            accelerator=accelerator, dino=DinoConfig(out_dim=4096, n_local_crops=2),
        ),
        finetune=FinetuneConfig(epochs=4, batch_size=32, patience=4, accelerator=accelerator),
        out=out,
    )
