"""The results of an experiment: one row per finished cell and per pretraining run, as CSV and JSON."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cass.config import PretrainConfig, load_yaml
from cass.evaluation.diagnostics import BACKBONE_RANK, BACKBONE_STD, DIAGNOSTIC_SUFFIXES, KNN_F1
from cass.experiment.config import ExperimentConfig
from cass.experiment.plan import Cell, PretrainRun, pretrain_dir, pretrain_run
from cass.methods.registry import method_class
from cass.utils.atomic import atomic_write_text
from cass.utils.rundir import CONFIG, METRICS, MetricsFile, csv_text, read_csv, read_history

CELL = "cell.json"


RESULTS_CSV = "results.csv"


RESULTS_JSON = "results.json"


PRETRAINING_CSV = "pretraining.csv"


SCORES = ("macro_f1", "micro_f1", "macro_recall", "balanced_accuracy", "auroc", "accuracy", "map")
"""Scalar validation metrics copied into every row (``map`` exists for multi-label data only)."""


COST_COLUMNS = {"epoch", "step", "loss", "skipped_steps", "lr", "epoch_time_s", "images_per_s", "device_time_s",
                "peak_memory_mb"}
"""Columns of a pretraining ``metrics.csv`` that are progress or cost, not learning diagnostics."""


def read_pretraining(run_dir: Path) -> list[dict[str, str]]:
    """The per-epoch rows of a pretraining run's ``metrics.csv`` (empty before its first epoch)."""
    path = Path(run_dir) / METRICS
    return MetricsFile.read(path) if path.is_file() else []


def _pretraining_summary(cfg: ExperimentConfig, run: PretrainRun) -> dict[str, Any]:
    """Cost and end state of one pretraining run, from its ``metrics.csv`` and ``start.csv``.

    ``final_*`` is the last value each diagnostic recorded (the k-NN may skip epochs), ``start_*`` its value
    before the first step; ``warnings`` are the method's verdicts on the whole record
    (:meth:`~cass.methods.base.PretrainMethod.learning_warnings`), the report's "did not learn".
    """
    run_dir = pretrain_dir(cfg, run)
    history = read_history(run_dir)
    start = history[0] if history and history[0]["epoch"] == 0 else {}
    epochs = [row for row in history if row["epoch"] >= 1]
    last = {key: value for row in epochs for key, value in row.items()}  # the latest value of every column
    summary: dict[str, Any] = {
        "method": run.method, "arch": run.arch or "cnn+vit", "init": run.init, "batch_size": run.batch_size,
        "epochs": run.epochs, "seed": run.seed, "epochs_done": len(epochs),
        "time_s": sum(r["epoch_time_s"] for r in epochs),
        "device_time_s": sum(r["device_time_s"] for r in epochs),
        "images_per_s": sum(r["images_per_s"] for r in epochs) / len(epochs) if epochs else None,
        "peak_memory_mb": max((r["peak_memory_mb"] for r in epochs), default=None),
        "final_loss": last.get("loss"),
    }
    for role in run.roles:
        for suffix in ("output_std", "effective_rank", BACKBONE_STD, BACKBONE_RANK, KNN_F1):
            summary[f"final_{role}_{suffix}"] = last.get(f"{role}_{suffix}")
        knn = f"{role}_{KNN_F1}"
        summary[f"start_{knn}"] = start.get(knn)
        summary[f"best_{knn}"] = max((row[knn] for row in epochs if knn in row), default=None)
    for key in sorted(set(last) - COST_COLUMNS):  # the method's own diagnostics (DINO's entropy)
        if not key.endswith(DIAGNOSTIC_SUFFIXES):
            summary[f"final_{key}"] = last[key]
    warnings = []
    if epochs and (run_dir / CONFIG).is_file():
        warnings = method_class(run.method).learning_warnings(history, load_yaml(PretrainConfig, run_dir / CONFIG))
    summary["warnings"] = " | ".join(warnings)
    summary["dir"] = str(run_dir)
    summary["config"] = str(run_dir / CONFIG)
    return summary


def cell_row(cfg: ExperimentConfig, cell: Cell, run: PretrainRun | None, finetune_time: float) -> dict[str, Any]:
    """One results row: the cell, every metric named by its split (``test_*``: reported, measured on the test
    split; ``val_*``: the selection split the best evaluation was chosen on), a readout's chosen k or C
    (``readout_k``, ``readout_c``), the costs and the configs."""
    cell_dir = Path(cfg.out) / "finetune" / cell.name
    metrics = json.loads((cell_dir / "metrics.json").read_text())
    selection = metrics.get("selection", {})
    readout = metrics.get("readout", {})
    with open(cell_dir / "subset.csv", newline="") as fh:
        labelled = sum(1 for _ in csv.DictReader(fh))
    pre = _pretraining_summary(cfg, run) if run is not None else None
    if pre is not None and cell.at_epoch is not None:  # a snapshot: the time its run had taken to get there
        epochs = [row for row in read_history(pretrain_dir(cfg, run)) if 1 <= row["epoch"] <= cell.at_epoch]
        pre = {**pre, "time_s": sum(r["epoch_time_s"] for r in epochs),
               "device_time_s": sum(r["device_time_s"] for r in epochs)}
    return {
        "method": cell.method, "arch": cell.arch, "init": cell.init, "label_fraction": cell.label_fraction,
        "seed": cell.seed, "pretrain_batch_size": cell.batch_size, "pretrain_epochs": cell.epochs,
        "pretrain_at_epoch": cell.at_epoch,
        "mode": cell.mode, "labelled_images": labelled, "readout_k": readout.get("k"), "readout_c": readout.get("c"),
        **{f"test_{key}": metrics.get(key) for key in SCORES},
        **{f"val_{key}": selection.get(key) for key in SCORES},
        "best_evaluation": metrics.get("epoch"), "steps": metrics.get("steps"), "val_loss": selection.get("val_loss"),
        "converged": metrics.get("converged"),  # fine-tuning only: early stopping ended it, not the budget
        "above_constant": metrics.get("above_constant_prediction"),  # None: a cell from before it was checked
        "val_constant_macro_f1": selection.get("constant_prediction_macro_f1"),
        "num_test_images": metrics.get("num_samples"), "num_val_images": selection.get("num_samples"),
        "pretrain_time_s": pre["time_s"] if pre else None,
        "pretrain_device_time_s": pre["device_time_s"] if pre else None,
        "finetune_time_s": finetune_time,
        "pretrain_dir": pre["dir"] if pre else None, "pretrain_config": pre["config"] if pre else None,
        "finetune_dir": str(cell_dir), "finetune_config": str(cell_dir / CONFIG),
        "classes": metrics.get("classes"), "per_class": metrics.get("per_class"),
        "confusion_matrix": metrics.get("confusion_matrix"),
    }


NESTED = ("classes", "per_class", "confusion_matrix")
"""Row fields kept in ``results.json`` only (test split); ``results.csv`` flattens the per-class F1 instead."""


def write_results(cfg: ExperimentConfig, cells: list[Cell]) -> None:
    """``results.csv``/``results.json`` (finished cells, in plan order) and ``pretraining.csv``."""
    out = Path(cfg.out)
    rows = [json.loads(path.read_text()) for cell in cells if (path := out / "finetune" / cell.name / CELL).is_file()]
    atomic_write_text(out / RESULTS_JSON, json.dumps(rows, indent=2))
    flat = [{**{k: v for k, v in row.items() if k not in NESTED},
             **{f"test_f1_{name}": values.get("f1") for name, values in (row.get("per_class") or {}).items()}}
            for row in rows]
    atomic_write_text(out / RESULTS_CSV, csv_text(flat))
    runs = dict.fromkeys(run for cell in cells if (run := pretrain_run(cfg, cell)) is not None)
    summaries = [_pretraining_summary(cfg, run) for run in runs if (pretrain_dir(cfg, run) / METRICS).is_file()]
    atomic_write_text(out / PRETRAINING_CSV, csv_text(summaries))



@dataclass(frozen=True)
class TrainingTime:
    """What an experiment's training took, from its own files: the seconds of its pretraining runs' epochs
    (``pretraining.csv``) and of its cells' fine-tuning or readout fits (``results.csv``). Loading images,
    reports and bootstraps are not counted, so the wall time of the whole benchmark is somewhat longer."""

    pretraining_runs: int
    pretraining_s: float
    cells: int
    cells_s: float

    @property
    def hours(self) -> float:
        return (self.pretraining_s + self.cells_s) / 3600

    @classmethod
    def of(cls, runs: list[dict[str, Any]], cells: list[dict[str, Any]]) -> TrainingTime:
        """From the rows of ``pretraining.csv`` and of ``results.csv`` (or ``results.json``)."""
        return cls(len(runs), sum(float(run["time_s"]) for run in runs),
                   len(cells), sum(float(cell["finetune_time_s"] or 0) for cell in cells))


def training_time(run_dir: Path) -> TrainingTime:
    """The :class:`TrainingTime` of an experiment directory (or of its files kept under ``results/``)."""
    run_dir = Path(run_dir)
    runs = read_csv(run_dir / PRETRAINING_CSV) if (run_dir / PRETRAINING_CSV).is_file() else []
    cells = read_csv(run_dir / RESULTS_CSV) if (run_dir / RESULTS_CSV).is_file() else []
    return TrainingTime.of(runs, cells)
