"""The stated comparisons of an experiment: each a paired difference of a test metric with its 95 % interval
over test images and seeds and a verdict (SPEC §2 "Uncertainty"), from the per-image test predictions
every cell keeps (``test_predictions.csv.gz``).

What is compared, per network, initialisation, label fraction and mode (each readout, and the fine-tuning
mode), on the base pretraining schedule (the sweeps are plotted, not stated): every pretrained method
against its baseline (in a readout, the same network at its starting point: what pretraining added;
fine-tuned, the supervised baseline) and against each method it claims to improve on (the method's
``compared_with``: CASS against DINO, CASS-VICReg against CASS and DINO). A comparison pairs the seeds both
sides finished, so an interrupted experiment states what it has and ``n_seeds`` says how much that is.

Why in the experiment layer: the comparisons are results of the experiment, like ``results.csv``, and
scripts read them without a report. ``cass experiment`` writes ``comparisons.csv``/``.json`` beside
``results.csv`` when the grid is done (not after every cell: the bootstrap takes seconds per cell), and
``cass report`` writes them again from the cells finished so far, so the file always matches the report.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cass.evaluation.intervals import Replicated, interval, metric_names, paired_difference, replicate
from cass.evaluation.predictions import Predictions, load_predictions
from cass.experiment.config import STARTING_POINT, SUPERVISED, ExperimentConfig, is_self_supervised
from cass.experiment.plan import Cell, plan
from cass.experiment.results import CELL
from cass.methods.registry import method_class
from cass.utils.atomic import atomic_write_text
from cass.utils.rundir import csv_text, predictions_file

COMPARISONS_CSV = "comparisons.csv"
COMPARISONS_JSON = "comparisons.json"
BUDGET_CURVE_CSV = "budget_curve.csv"
COMPARED_METRICS = ("macro_f1", "accuracy", "auroc")
"""Macro-F1 (the primary metric), then accuracy and AUROC (multi-label data: macro-F1 and AUROC only)."""

PRETRAINING_ADDED = "pretraining added"
AGAINST_SUPERVISED = "against supervised"
AGAINST_METHOD = "against another method"
AGAINST_INIT = "shared backbone"


@dataclass(frozen=True)
class Stated:
    """One stated comparison ``a - b`` in one mode, before the grid's networks and fractions fill it in.

    ``a_init``/``b_init`` None: both sides under the same init, for every init of the grid; set: a comparison
    across inits (a shared pretrained backbone against the grid's own starting point or pretraining)."""

    comparison: str
    a: str
    b: str
    mode: str
    a_init: str | None = None
    b_init: str | None = None


def stated_comparisons(cfg: ExperimentConfig) -> list[Stated]:
    """Every comparison the experiment states, in the order the report lists them."""
    pretrained = [m for m in cfg.methods if is_self_supervised(m)]
    modes = [*cfg.readouts, *([cfg.finetune.mode] if cfg.fine_tune else [])]
    found = []
    for mode in dict.fromkeys(modes):
        baselines = [(PRETRAINING_ADDED, STARTING_POINT)] if mode in cfg.readouts else []
        if mode == cfg.finetune.mode and SUPERVISED in cfg.methods:
            baselines.append((AGAINST_SUPERVISED, SUPERVISED))
        for a in pretrained:
            found += [Stated(kind, a, b, mode) for kind, b in baselines]
            found += [Stated(AGAINST_METHOD, a, b, mode) for b in method_class(a).compared_with if b in pretrained]
    return found + shared_backbone_comparisons(cfg, modes)


def shared_backbone_comparisons(cfg: ExperimentConfig, modes: Sequence[str]) -> list[Stated]:
    """An init that is a pretraining run's networks (a backbone pooled over several datasets), against every
    init that is not (random init, a stand-in for ImageNet weights): its readout against that init's starting
    point (what the shared backbone adds over random init, or over the stand-in) and against each method
    pretrained on this dataset alone from it; its supervised fine-tuning against supervised fine-tuning from
    that init and against each method pretrained from it and fine-tuned. The question a user with one backbone
    for every task asks: is it worth it here?"""
    pretrained = [m for m in cfg.methods if is_self_supervised(m)]
    found = []
    for shared in (init.name for init in cfg.inits if init.pretrained):
        for other in (init for init in cfg.inits if not init.pretrained):
            for mode in modes:
                own = STARTING_POINT if mode in cfg.readouts else SUPERVISED
                if own == SUPERVISED and not (SUPERVISED in cfg.methods and other.runs(SUPERVISED)):
                    continue
                found += [Stated(AGAINST_INIT, own, b, mode, shared, other.name)
                          for b in (own, *filter(other.runs, pretrained))]
    return found


def covers(cfg: ExperimentConfig, n_seeds: int) -> str:
    """What an interval is a bootstrap over: a seed draws the labelled subset (and a fine-tuned cell's head and
    augmentations); pretraining seeds only when each seed had its own pretraining."""
    if n_seeds < 2:
        return "test images only (one seed)"
    return ("test images and seeds (each its own labelled subset, fine-tuning and pretraining run)"
            if cfg.pretrain_per_seed else
            "test images and seeds (each its own labelled subset and fine-tuning; one pretraining run for all)")


class KeptPredictions:
    """The kept test predictions of an experiment's cells, each read, and replicated per metric, once.

    A report shows a cell in a table and in several comparisons; the image draws depend only on the test
    set, so a cell's replicates are computed once and stay paired with every other cell's.
    """

    def __init__(self, run_dir: Path) -> None:
        self.finetune = Path(run_dir) / "finetune"
        self._read: dict[str, Predictions | None] = {}
        self._keys: tuple[str, list[str]] | None = None
        self._replicated: dict[tuple[str, str], Replicated] = {}

    def predictions(self, cell: str) -> Predictions | None:
        """A cell's predictions (None when it kept none: a cell finished before cass kept them)."""
        if cell not in self._read:
            path = predictions_file(self.finetune / cell)
            self._read[cell] = self._check_keys(cell, *load_predictions(path)) if path.is_file() else None
        return self._read[cell]

    def _check_keys(self, cell: str, keys: list[str], predictions: Predictions) -> Predictions:
        """Every cell must have scored the same test images in the same order, or nothing can be paired."""
        if self._keys is None:
            self._keys = (cell, keys)
        elif keys != self._keys[1]:
            first = predictions_file(self.finetune / self._keys[0])
            raise ValueError(f"{predictions_file(self.finetune / cell)} and {first} "
                             "list different test images: the cells come from different data or splits")
        return predictions

    def seeds(self, cells: Sequence[str], metric: str) -> list[Replicated] | None:
        """``metric`` of each cell (one per seed) with its bootstrap replicates; None when a cell kept no
        predictions or the task has no bootstrap of ``metric`` (see :func:`metric_names`)."""
        found = [self.predictions(cell) for cell in cells]
        if not found or any(p is None or metric not in metric_names(p.multilabel) for p in found):
            return None
        for cell, p in zip(cells, found, strict=True):
            if (cell, metric) not in self._replicated:
                self._replicated[(cell, metric)] = replicate(metric, p.targets, p.predicted, p.probabilities)
        return [self._replicated[(cell, metric)] for cell in cells]


Condition = tuple[str, str, str, float, str]
"""(method, arch, init, label fraction, mode)."""


def finished_cells(cfg: ExperimentConfig, run_dir: Path) -> dict[Condition, dict[int, str]]:
    """The finished cells of the base pretraining schedule, by condition and seed."""
    found: dict[Condition, dict[int, str]] = defaultdict(dict)
    for cell in _finished_base_cells(cfg, run_dir):
        if cell.at_epoch is None:
            found[(cell.method, cell.arch, cell.init, cell.label_fraction, cell.mode)][cell.seed] = cell.name
    return found


def _finished_base_cells(cfg: ExperimentConfig, run_dir: Path) -> Iterator[Cell]:
    """The finished cells of the base pretraining schedule (batch size and epochs; not the sweeps)."""
    for cell in plan(cfg):
        if cell.batch_size in (None, cfg.pretrain.batch_size) and cell.epochs in (None, cfg.pretrain.epochs) \
                and (Path(run_dir) / "finetune" / cell.name / CELL).is_file():
            yield cell


def comparisons(cfg: ExperimentConfig, run_dir: Path, kept: KeptPredictions | None = None) -> list[dict[str, Any]]:
    """One row per stated comparison, network, init, label fraction and metric that has cells on both sides."""
    kept = kept or KeptPredictions(run_dir)
    cells = finished_cells(cfg, run_dir)
    rows = []
    for s in stated_comparisons(cfg):
        inits = [i.name for i in cfg.inits] if s.a_init is None else [s.a_init]
        for arch in cfg.archs:
            for init in inits:
                for fraction in cfg.label_fractions:
                    a = cells.get((s.a, arch, init, fraction, s.mode), {})
                    b = cells.get((s.b, arch, s.b_init or init, fraction, s.mode), {})
                    common = sorted(set(a) & set(b))
                    for metric in COMPARED_METRICS:
                        seeds_a, seeds_b = (kept.seeds([side[seed] for seed in common], metric) for side in (a, b))
                        if seeds_a is None or seeds_b is None:
                            continue
                        result = paired_difference(seeds_a, seeds_b)
                        rows.append({
                            "comparison": s.comparison, "a": s.a, "b": s.b, "arch": arch, "init": init,
                            "b_init": s.b_init or init,
                            "mode": s.mode, "label_fraction": fraction, "metric": metric,
                            "a_mean": _number(np.mean([x.point for x in seeds_a])),
                            "b_mean": _number(np.mean([x.point for x in seeds_b])),
                            "diff": _number(result.estimate), "low": _number(result.low),
                            "high": _number(result.high),
                            "verdict": result.verdict, "n_seeds": len(common),
                            "n_test_images": len(kept.predictions(a[common[0]])),
                            "covers": covers(cfg, len(common)),
                        })
    return rows


def budget_curve(cfg: ExperimentConfig, run_dir: Path, kept: KeptPredictions | None = None) -> list[dict[str, Any]]:
    """The pretraining budget curve (``readout_epochs``): per pretrained method, network, init, label fraction
    and readout, the readout's test macro-F1 after each kept epoch and at the run's end, with its interval, and
    the paired difference from the budget before it (epoch 0: the starting point) with its verdict. Where the
    last step's verdict is ``unresolved`` the curve has flattened within what this experiment can resolve."""
    if not cfg.readout_epochs:
        return []
    kept = kept or KeptPredictions(run_dir)
    found: dict[tuple, dict[int, str]] = defaultdict(dict)
    for cell in _finished_base_cells(cfg, run_dir):
        if cell.mode in cfg.readouts:
            epoch = 0 if cell.method == STARTING_POINT else cell.at_epoch or cfg.pretrain.epochs
            found[(cell.method, cell.arch, cell.init, cell.label_fraction, cell.mode, epoch)][cell.seed] = cell.name
    budgets = [0, *sorted(cfg.readout_epochs), cfg.pretrain.epochs]
    rows = []
    for method in (m for m in cfg.methods if is_self_supervised(m)):
        for arch, init, fraction, mode in ((a, i.name, f, m) for a in cfg.archs for i in cfg.inits
                                           for f in cfg.label_fractions for m in cfg.readouts):
            previous: dict[int, str] = {}
            for epoch in budgets:
                side = found.get((STARTING_POINT if epoch == 0 else method, arch, init, fraction, mode, epoch), {})
                seeds = sorted(side)
                here = kept.seeds([side[s] for s in seeds], "macro_f1") if seeds else None
                if here is None:
                    previous = {}
                    continue
                value = interval(here)
                row = {"method": method, "arch": arch, "init": init, "mode": mode, "label_fraction": fraction,
                       "epochs": epoch, "macro_f1": _number(value.estimate), "low": _number(value.low),
                       "high": _number(value.high), "n_seeds": len(seeds), "step_diff": None, "step_low": None,
                       "step_high": None, "step_verdict": None}
                common = sorted(set(previous) & set(side))
                if common:
                    step = paired_difference(kept.seeds([side[s] for s in common], "macro_f1"),
                                             kept.seeds([previous[s] for s in common], "macro_f1"))
                    row.update(step_diff=_number(step.estimate), step_low=_number(step.low),
                               step_high=_number(step.high), step_verdict=step.verdict)
                rows.append(row)
                previous = side
    return rows


def write_budget_curve(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """``budget_curve.csv`` in the experiment directory (nothing when the experiment has no budget curve)."""
    if rows:
        atomic_write_text(Path(run_dir) / BUDGET_CURVE_CSV, csv_text(rows))


def _number(value: float) -> float | None:
    """None for an undefined value (AUROC with one class), so the JSON stays strict."""
    return None if np.isnan(value) else float(value)


def write_comparisons(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """``comparisons.csv`` and ``comparisons.json`` in the experiment directory."""
    atomic_write_text(Path(run_dir) / COMPARISONS_JSON, json.dumps(rows, indent=2))
    atomic_write_text(Path(run_dir) / COMPARISONS_CSV, csv_text(rows) if rows else "")
