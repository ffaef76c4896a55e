"""The report of a ``cass experiment`` directory: Markdown plus one self-contained HTML page.

Everything is read back from the files the experiment wrote (``experiment.yaml``, ``results.json``,
``pretraining.csv``, each run's ``metrics.csv`` and each cell's model directory), so a report can be
rebuilt at any time, also from a partly finished experiment. The Markdown is the single source of
the text: the HTML page is that Markdown rendered by the ``markdown`` package, with every figure
embedded as base64 so the page can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import csv
import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import markdown
import numpy as np
import torch

from cass.config import ConfigError, FinetuneConfig, load_yaml
from cass.data.splits import three_roles
from cass.data.transforms import eval_transform
from cass.evaluation.diagnostics import BACKBONE_RANK, BACKBONE_STD, COLLAPSED, KNN_F1, KNN_MIN_GAIN, RANK_FLOOR
from cass.evaluation.inference import load_classifier
from cass.evaluation.intervals import ABOVE, BELOW, REPLICATES, UNRESOLVED, Interval, interval
from cass.experiment.config import (
    READOUTS,
    STARTING_POINT,
    SUPERVISED,
    ExperimentConfig,
    PublishedResult,
    is_self_supervised,
)
from cass.experiment.comparisons import (
    BUDGET_CURVE_CSV,
    COMPARISONS_CSV,
    PRETRAINING_ADDED,
    KeptPredictions,
    budget_curve,
    comparisons,
    covers,
    write_budget_curve,
    write_comparisons,
)
from cass.experiment.plan import Cell, plan
from cass.experiment.results import PRETRAINING_CSV, RESULTS_JSON, TrainingTime
from cass.experiment.run import ENVIRONMENT, EXPERIMENT_YAML
from cass.methods.registry import method_class
from cass.reporting.explain import grad_cam_maps, vit_attention_maps
from cass.utils.atomic import atomic_write_text
from cass.utils.markdown import markdown_table
from cass.utils.plots import (
    Curve,
    ForestRow,
    plot_bars,
    plot_confusion_matrix,
    plot_curves,
    plot_forest,
    plot_heatmaps,
)
from cass.utils.rundir import predictions_file, read_history

ARCH_NAMES = {"cnn": "CNN", "vit": "Transformer"}
METRIC_NAMES = {
    "macro_f1": "macro-F1", "micro_f1": "micro-F1", "accuracy": "accuracy", "macro_recall": "macro recall",
    "balanced_accuracy": "balanced accuracy", "auroc": "AUROC (macro, one-vs-rest)", "map": "mAP",
}
EXPLAINED_IMAGES = 4
Row = dict[str, Any]


class Report:
    """What the sections share: the experiment, its rows and runs, and where figures go."""

    def __init__(self, run_dir: Path) -> None:
        if not (run_dir / EXPERIMENT_YAML).is_file() or not (run_dir / RESULTS_JSON).is_file():
            raise ConfigError(f"{run_dir}: not a cass experiment directory (no {EXPERIMENT_YAML} and {RESULTS_JSON})")
        self.run_dir = run_dir
        self.cfg = load_yaml(ExperimentConfig, run_dir / EXPERIMENT_YAML)
        self.rows: list[Row] = json.loads((run_dir / RESULTS_JSON).read_text())
        self.runs = _read_csv(run_dir / PRETRAINING_CSV)
        self.sessions: list[dict[str, Any]] = json.loads((run_dir / ENVIRONMENT).read_text())
        self.figures = run_dir / "report" / "figures"
        self.figures.mkdir(parents=True, exist_ok=True)
        base = self.cfg.pretrain
        base_grid = [r for r in self.rows if r["pretrain_batch_size"] in (None, base.batch_size)
                     and r["pretrain_epochs"] in (None, base.epochs) and r.get("pretrain_at_epoch") is None]
        self.main = [r for r in base_grid if r.get("mode", "full") == self.cfg.finetune.mode
                     and r["method"] != STARTING_POINT]
        self.readouts = [r for r in base_grid if r.get("mode") in self.cfg.readouts]
        self.main_runs = [r for r in self.runs if int(r["batch_size"]) == base.batch_size
                          and int(r["epochs"]) == base.epochs]
        self.kept = KeptPredictions(run_dir)

    @cached_property
    def budget_curve(self) -> list[Row]:
        """The readouts against pretraining epochs, with their intervals (:func:`cass.experiment.comparisons.budget_curve`)."""
        return budget_curve(self.cfg, self.run_dir, self.kept)

    @cached_property
    def comparisons(self) -> list[Row]:
        """The stated comparisons with their paired intervals and verdicts (:mod:`cass.experiment.comparisons`)."""
        return comparisons(self.cfg, self.run_dir, self.kept)

    def interval_caption(self) -> str:
        """What a table's ``[low, high]`` is, and what a ``±`` means where it appears instead."""
        text = (f"in brackets its 95 % interval: a bootstrap over {covers(self.cfg, len(self.cfg.seeds))}, "
                f"{REPLICATES} replicates, each drawing test images and seeds with replacement")
        if not all(predictions_file(self.cell_dir(row)).is_file() for row in self.rows):
            text += ("; `mean ± std` instead marks cells finished before cass kept per-image predictions (std over "
                     "seeds)")
        return text

    def machine(self) -> str:
        """Where the numbers were measured, with a warning when sessions ran on different machines."""
        first, last = self.sessions[0], self.sessions[-1]
        devices = sorted({f"{s['device']} ({s['cpu_count']} CPU cores)" for s in self.sessions})
        where = (devices[0] if len(devices) == 1 else
                 f"several machines ({'; '.join(devices)}): times from different machines are not comparable")
        started = (f"one session, started {first['date']}" if len(self.sessions) == 1 else
                   f"{len(self.sessions)} sessions, the first started {first['date']}, the last {last['date']}")
        return f"{where}; {last['platform']}, torch {last['torch']}, cass {last['cass']}; {started}"

    def cell_dir(self, row: Row) -> Path:
        """A cell's model directory, found inside this experiment directory even if it was moved."""
        return self.run_dir / "finetune" / Path(row["finetune_dir"]).name

    def pretrain_dir(self, run: dict[str, str]) -> Path:
        return self.run_dir / "pretrain" / Path(run["dir"]).name

    def network(self, arch: str) -> str:
        return f"{ARCH_NAMES[arch]} ({getattr(self.cfg.pretrain, arch)})"

    def figure(self, name: str, alt: str) -> tuple[Path, str]:
        """The PNG path to write and the Markdown that shows it."""
        return self.figures / name, f"![{alt}](figures/{name})"


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file() or not path.read_text().strip():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


Stats = tuple[float, float, int]
"""Mean, sample std and count over seeds (:func:`_mean_std`)."""


def _mean_std(values: Iterable[float]) -> Stats:
    """Mean and sample std (ddof 1; 0 for one value) of the finite values, and how many there were."""
    array = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if not array.size:
        return float("nan"), float("nan"), 0
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0, int(array.size)


def _format(stats: Stats, digits: int = 3) -> str:
    """``mean ± std (n=k)``; a single value has no spread to show, so only ``mean (n=1)``."""
    mean, std, n = stats
    if n == 0:
        return "not run"
    spread = f" ± {std:.{digits}f}" if n > 1 else ""
    return f"{mean:.{digits}f}{spread} (n={n})"


def _format_interval(result: Interval, sign: str = "") -> str:
    """``estimate [low, high]`` (``sign="+"`` for differences)."""
    return f"{result.estimate:{sign}.3f} [{result.low:{sign}.3f}, {result.high:{sign}.3f}]"


def _cell_interval(report: Report, rows: list[Row], metric: str) -> Interval | None:
    """The mean of ``metric`` over a cell's seeds with its 95 % interval over test images and seeds; None where
    a seed kept no per-image predictions or the metric has no bootstrap (mAP)."""
    seeds = report.kept.seeds([report.cell_dir(row).name for row in rows], metric)
    return None if seeds is None else interval(seeds)


def _cell(report: Report, rows: list[Row], metric: str) -> str:
    """A table cell: ``mean [low, high] (n=k)`` (:func:`_cell_interval`); ``mean ± std (n=k)`` where there is
    no interval."""
    result = _cell_interval(report, rows, metric)
    mark = NOT_CONVERGED if any(row.get("converged") is False for row in rows) else ""
    mark += CONSTANT if any(row.get("above_constant") is False for row in rows) else ""
    if result is None:
        return _format(_mean_std(row[f"test_{metric}"] for row in rows)) + mark
    return f"{_format_interval(result)} (n={len(rows)}){mark}"


NOT_CONVERGED = " †"
"""Marks a fine-tuning cell where at least one seed reached its evaluation budget still improving."""


CONSTANT = " ‡"
"""Marks a cell where at least one seed's chosen model was no better, on the selection split, than
predicting the same class for every image."""


def constant_caption(rows: list[Row]) -> str:
    """How many runs' chosen models beat a constant prediction on the selection split, and what ``‡`` means;
    empty for cells finished before cass checked it."""
    known = [row["above_constant"] for row in rows if row.get("above_constant") is not None]
    if not known:
        return ""
    return (f"`{CONSTANT.strip()}` marks a cell where a run's chosen model scored no higher selection macro-F1 than "
            "predicting the most frequent class for every image (`val_constant_macro_f1` in `results.csv`): it "
            f"learnt nothing the selection split can see, whatever ended its training ({len(known) - sum(known)} "
            f"of {len(known)} runs).")


def convergence_caption(rows: list[Row]) -> str:
    """How many fine-tuning runs early stopping ended (converged) and what ``†`` means; empty for cells
    finished before cass recorded it."""
    known = [row["converged"] for row in rows if row.get("converged") is not None]
    if not known:
        return ""
    return (f"Fine-tuning converged (early stopping on the selection split ended it) in {sum(known)} of "
            f"{len(known)} runs; `{NOT_CONVERGED.strip()}` marks a cell where a run was still improving when its "
            "budget of evaluations ended: not converged, its mean understates what longer training gives.")


def _groups(rows: list[Row], *keys: str) -> dict[tuple, list[Row]]:
    grouped: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        grouped[tuple(row[k] for k in keys)].append(row)
    return grouped


def _fraction(value: float) -> str:
    return f"{value * 100:g}%"


def method_name(method: str) -> str:
    """How tables name a grid method: the registered method's display name, the supervised baseline, or
    the starting point of the readouts."""
    if is_self_supervised(method):
        return method_class(method).display_name
    return "Starting point (no pretraining)" if method == STARTING_POINT else SUPERVISED.capitalize()


def _series_label(method: str, init: str) -> str:
    return f"{method_name(method)} / {init}"


def results_table(report: Report, metric: str = "macro_f1") -> str:
    """The paper's layout: rows method x architecture (x init), columns label fractions, mean [95 % interval]."""
    fractions = report.cfg.label_fractions
    cells = _groups(report.main, "method", "arch", "init", "label_fraction")
    rows = [[method_name(method), report.network(arch), init,
             *(_cell(report, cells.get((method, arch, init, f), []), metric) for f in fractions)]
            for method, arch, init in _conditions(report)]
    return markdown_table(["method", "network", "init", *map(_fraction, fractions)], rows)


def _conditions(report: Report) -> Iterator[tuple[str, str, str]]:
    """(method, arch, init) of the fine-tuning grid, in the order of its tables."""
    for method in report.cfg.methods:
        for arch in report.cfg.archs:
            for init in (i.name for i in report.cfg.inits):
                yield method, arch, init


def summary_table(run_dir: str | Path, metric: str = "macro_f1", readout: str | None = None) -> str:
    """The fine-tuning table of an experiment directory as Markdown, or with ``readout`` (``knn``, ``logistic``)
    its "what pretraining added" table (what ``cass demo`` prints)."""
    report = Report(Path(run_dir))
    return readout_table(report, readout, metric) if readout else results_table(report, metric)


def _section_results(report: Report) -> str:
    if not report.cfg.fine_tune:
        return "## Results\n\nNo fine-tuning in this experiment (`fine_tune: false`): readouts only."
    seeds = len(report.cfg.seeds)
    text = [
        "## Results",
        f"Fine-tuning. Test-split macro-F1 (the primary metric): the mean over {seeds} seed(s), "
        f"{report.interval_caption()}; `n` is the number of finished seeds. The best evaluation of each run was "
        "chosen on the selection split (`val`); nothing was selected on the test split. Pretraining: batch "
        f"{report.cfg.pretrain.batch_size}, {report.cfg.pretrain.epochs} epochs; fine-tuning mode "
        f"`{report.cfg.finetune.mode}`. Columns are the fraction of the train labels used for fine-tuning.",
        convergence_caption(report.main),
        constant_caption(report.main),
        results_table(report, "macro_f1"),
    ]
    present = {k for row in report.main for k, v in row.items() if v is not None}
    for metric in ("micro_f1", "macro_recall", "balanced_accuracy", "auroc", "map"):
        if f"test_{metric}" in present:
            text += [f"### {METRIC_NAMES[metric]}", results_table(report, metric)]
    text.append("Every row of every cell (with per-class F1, the confusion matrix and the config paths) is in "
                "`results.csv` and `results.json`.")
    return "\n\n".join(part for part in text if part)


AGAINST_PUBLISHED = {ABOVE: "above it", BELOW: "below it", UNRESOLVED: "level"}
"""Where a cell's interval lies relative to a published value (its verdict on ``cell - published``)."""


def published_table(report: Report, published: PublishedResult) -> str:
    """The published scores, then every fine-tuned cell at their label fraction: ``mean [low, high]`` and where
    that interval lies relative to the published value (above it, level: contains it, below it)."""
    metrics = list(published.scores)
    rows = [[f"**{published.name}** (published)", "", ""] + [f"{published.scores[m]:.3f}" for m in metrics]]
    cells = _groups(report.main, "method", "arch", "init", "label_fraction")
    for method, arch, init in _conditions(report):
        found = cells.get((method, arch, init, published.label_fraction))
        if not found:
            continue
        values = []
        for metric in metrics:
            result = _cell_interval(report, found, metric)
            values.append(_format(_mean_std(row[f"test_{metric}"] for row in found)) if result is None else
                          f"{_format_interval(result)}: "
                          f"{AGAINST_PUBLISHED[_shifted(result, published.scores[metric]).verdict]}")
        rows.append([method_name(method), report.network(arch), init, *values])
    return markdown_table(["method", "network", "init", *(METRIC_NAMES[m] for m in metrics)], rows)


def _shifted(result: Interval, value: float) -> Interval:
    """The interval of ``cell - value``: its verdict says where the cell lies relative to ``value``."""
    return Interval(result.estimate - value, result.low - value, result.high - value)


def _section_published(report: Report) -> str:
    if not report.cfg.published:
        return ""
    text = ["## Against published results",
            "Each published test score on this test split, then every fine-tuned cell at the same fraction of the "
            f"train labels: the mean over seeds, {report.interval_caption()}; then where that interval lies: "
            "above or below the published value, or level (it contains the value). The published number has an "
            "unknown spread of its own (one training run, or a mean over runs), so a verdict says where this "
            "tool's training lands, not that two methods differ."]
    for published in report.cfg.published:
        notes = " ".join(note for note in (published.recipe and f"Trained: {published.recipe}",
                                           published.source and f"Source: {published.source}.") if note)
        text += [f"### {published.name}, {_fraction(published.label_fraction)} labels", notes,
                 published_table(report, published)]
    return "\n\n".join(part for part in text if part)


def _metric_curves(report: Report, rows: list[Row], x_key: str) -> dict[str, dict[str, Curve]]:
    """Macro-F1 against ``x_key``, one panel per architecture, one line per method and init."""
    panels: dict[str, dict[str, Curve]] = {}
    for arch in report.cfg.archs:
        lines: dict[str, Curve] = {}
        for (method, init), group in _groups([r for r in rows if r["arch"] == arch], "method", "init").items():
            by_x = _groups(group, x_key)
            xs = sorted(x for (x,) in by_x)
            stats = [_mean_std(r["test_macro_f1"] for r in by_x[(x,)]) for x in xs]
            lines[_series_label(method, init)] = Curve(xs, [s[0] for s in stats], [s[1] for s in stats])
        if lines:
            panels[report.network(arch)] = lines
    return panels


def _section_fraction_curves(report: Report) -> str:
    if not report.main:
        return ""
    path, image = report.figure("label_fraction_curves.png", "macro-F1 against the label fraction")
    plot_curves(_metric_curves(report, report.main, "label_fraction"), path, "fraction of train labels (log)",
                "test macro-F1", logx=True)
    return "\n\n".join(["## Label-fraction curves",
                        "Mean over seeds; error bars are the standard deviation over seeds.", image])


def _run_label(run: dict[str, str]) -> str:
    return f"{_run_method_label(run)} / {run['init']} / seed {run['seed']}"


def _run_method_label(run: dict[str, str]) -> str:
    """``CASS`` for a run that trains both networks, ``DINO-CNN`` for a single-network run."""
    return method_class(run["method"]).label(None if run["arch"] == "cnn+vit" else run["arch"])


LEARNING_PANELS = {
    "output_std": "head / projector output std",
    BACKBONE_STD: "backbone feature std",
    BACKBONE_RANK: "backbone effective rank",
    KNN_F1: "online k-NN macro-F1 (selection split)",
}
"""The per-network curves of the learning-checks figure (``metrics.csv`` column suffix: panel title)."""


def _section_pretraining_curves(report: Report) -> str:
    if not report.main_runs:
        return "## Pretraining curves\n\nNot run (no self-supervised method in this experiment)."
    loss: dict[str, dict[str, Curve]] = defaultdict(dict)
    panels: dict[str, dict[str, Curve]] = {title: {} for title in LEARNING_PANELS.values()}
    for run in report.main_runs:
        history = read_history(report.pretrain_dir(run))
        trained = [row for row in history if "loss" in row]
        loss[method_class(run["method"]).objective][_run_label(run)] = Curve(
            [row["epoch"] for row in trained], [row["loss"] for row in trained])
        for role in ("cnn", "vit"):
            for suffix, title in LEARNING_PANELS.items():
                points = [(row["epoch"], row[f"{role}_{suffix}"]) for row in history if f"{role}_{suffix}" in row]
                if points:
                    panels[title][f"{_run_label(run)} ({role})"] = Curve(*zip(*points, strict=True))
    loss_path, loss_image = report.figure("pretraining_loss.png", "pretraining loss per epoch")
    plot_curves(loss, loss_path, "epoch")
    collapse_path, collapse_image = report.figure("collapse.png", "learning checks per epoch (0: before training)")
    rank_title = LEARNING_PANELS[BACKBONE_RANK]
    plot_curves({title: curves for title, curves in panels.items() if curves} or panels, collapse_path,
                "epoch (0 = before training)", thresholds={rank_title: (RANK_FLOOR, f"collapse (rank {RANK_FLOOR:g})")})
    threshold = report.cfg.pretrain.collapse_threshold
    return "\n\n".join([
        "## Pretraining: loss and learning checks",
        "Each method has its own objective, so the losses are not comparable across methods. The learning "
        "checks are comparable. Both stds are those of L2-normalised vectors, scaled so that isotropic vectors "
        "give 1 and a constant one gives 0. The head / projector output std is measured on the training "
        "batches and describes what the objective sees; it decides nothing, because a projector can look "
        "healthy over a collapsed backbone and collapse over a healthy one. The other three panels measure "
        "what the user gets, each exported backbone's pooled features, in eval mode, on images fixed for the "
        "whole run, from before the first step (epoch 0): the std and the effective rank (how many directions "
        "the features use) on train images, and a cosine k-NN with those images as its labelled bank, scored "
        f"on the selection split. A backbone whose std falls below {threshold:g} of its epoch-0 value, or "
        f"whose effective rank falls below {RANK_FLOOR:g}, has collapsed; a k-NN curve that does not end "
        f"{KNN_MIN_GAIN:g} above its epoch-0 value shows a backbone that learned nothing the labels can use.",
        loss_image, collapse_image,
    ])


def _time_groups(report: Report) -> dict[str, list[float]]:
    """Pretraining seconds per run and method, and, for single-network methods (DINO), both networks'
    runs of one (init, seed) added: the cost of getting a CNN and a Transformer, as one CASS run does."""
    times: dict[str, list[float]] = defaultdict(list)
    pairs: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    for run in report.main_runs:
        seconds = float(run["time_s"])
        cls = method_class(run["method"])
        if cls.trains_both_networks:
            times[f"{cls.display_name} (CNN + ViT, one run)"].append(seconds)
        else:
            times[_run_method_label(run)].append(seconds)
            pairs[(cls.display_name, run["init"], run["seed"])][run["arch"]] = seconds
    for (name, _, _), pair in pairs.items():
        if len(pair) == 2:
            times[f"{name}-ViT + {name}-CNN"].append(pair["vit"] + pair["cnn"])
    return dict(times)


def _total_time(report: Report) -> str:
    """The experiment's training time so far, in one sentence."""
    spent = TrainingTime.of(report.runs, report.rows)
    return (f"The whole experiment so far: {spent.pretraining_runs} pretraining runs, {spent.pretraining_s:,.0f} s; "
            f"{spent.cells} fine-tuning and readout cells, {spent.cells_s:,.0f} s; together {spent.hours:.1f} hours "
            "of training on the machine above (loading images, reports and bootstraps not counted).")


def _section_time(report: Report) -> str:
    times = _time_groups(report)
    if not times:
        return ("## Pretraining time\n\nNot run (no self-supervised method in this experiment). "
                f"Measured on {report.machine()}. " + _total_time(report))
    stats = {label: _mean_std(values) for label, values in times.items()}
    path, image = report.figure("pretraining_time.png", "pretraining time per run")
    plot_bars({label: (s[0], s[1]) for label, s in stats.items()}, path, "seconds per pretraining run",
              f"{report.cfg.pretrain.epochs} epochs, batch {report.cfg.pretrain.batch_size}")
    table = markdown_table(["run", "seconds per run (mean ± std over runs)"],
                           [[label, _format(s, 1)] for label, s in stats.items()])
    cass_time = stats.get("CASS (CNN + ViT, one run)")
    ratios = [f"{cass_time[0] / stats[other][0]:.2f}x {other}" for other in list(stats)[1:]
              if cass_time and stats[other][0] > 0]
    text = ["## Pretraining time",
            f"Wall-clock seconds of the training epochs (from each run's `metrics.csv`), measured on "
            f"{report.machine()}. CASS trains both networks in one run, so it is "
            "compared with DINO-ViT, DINO-CNN and both DINO runs together. " + _total_time(report),
            table, image]
    if ratios:
        text.insert(3, "CASS took " + ", ".join(ratios) + " (less than 1x = faster).")
    return "\n\n".join(text)


def _section_robustness(report: Report) -> str:
    cfg = report.cfg
    text = ["## Robustness to pretraining batch size and epochs"]
    for key, values, option, xlabel in (
        ("pretrain_batch_size", cfg.sweep_batch_sizes, "sweep_batch_sizes", "pretraining batch size"),
        ("pretrain_epochs", cfg.sweep_epochs, "sweep_epochs", "pretraining epochs"),
    ):
        other = "pretrain_epochs" if key == "pretrain_batch_size" else "pretrain_batch_size"
        fixed = cfg.pretrain.epochs if key == "pretrain_batch_size" else cfg.pretrain.batch_size
        rows = [r for r in report.rows if is_self_supervised(r["method"]) and r[other] == fixed
                and r.get("mode", "full") == cfg.finetune.mode and r.get("pretrain_at_epoch") is None]
        if not values or not rows:
            text.append(f"{xlabel.capitalize()}: not run (set `{option}` in the experiment config).")
            continue
        for fraction in cfg.sweep_label_fractions:
            at = [r for r in rows if r["label_fraction"] == fraction]
            name = f"robustness_{key}_{fraction:g}.png"
            path, image = report.figure(name, f"macro-F1 against the {xlabel}")
            plot_curves(_metric_curves(report, at, key), path, xlabel, f"macro-F1 at {_fraction(fraction)} labels")
            text += [f"{xlabel.capitalize()}, fine-tuned with {_fraction(fraction)} of the labels "
                     "(mean ± std over seeds):", image]
    return "\n\n".join(text)


def _budget_label(row: Row, several_fractions: bool) -> str:
    label = method_name(row["method"])
    return f"{label}, {_fraction(row['label_fraction'])}" if several_fractions else label


def _section_budget_curve(report: Report) -> str:
    """Readouts against pretraining epochs (``readout_epochs``), and where the last doubling stopped paying."""
    rows = [r for r in report.budget_curve if r["macro_f1"] is not None]
    if not rows:
        return ""
    several = len(report.cfg.label_fractions) > 1
    panels: dict[str, dict[str, Curve]] = {}
    for (mode, arch), group in _groups(rows, "mode", "arch").items():
        lines = {}
        for (_, _, fraction), line in _groups(group, "method", "init", "label_fraction").items():
            label = _budget_label(line[0], several) + ("" if len(report.cfg.inits) == 1 else f" / {line[0]['init']}")
            lines[label] = Curve(
                [r["epochs"] for r in line], [r["macro_f1"] for r in line],
                [[r["macro_f1"] - r["low"] for r in line], [r["high"] - r["macro_f1"] for r in line]])
        panels[f"{readout_name(mode, report.cfg.finetune)}, {ARCH_NAMES[arch]}"] = lines
    path, image = report.figure("budget_curve.png", "readout macro-F1 against pretraining epochs")
    plot_curves(panels, path, "pretraining epochs (0 = starting point)", "test macro-F1")
    times = {(r["method"], r["arch"], r["init"], r["pretrain_at_epoch"] or r["pretrain_epochs"]): r["pretrain_time_s"]
             for r in report.rows if r.get("pretrain_time_s") is not None and r["mode"] in report.cfg.readouts}
    budgets = [0, *sorted(report.cfg.readout_epochs), report.cfg.pretrain.epochs]
    several_inits = len(report.cfg.inits) > 1
    header = (["method", "network", *(["init"] if several_inits else []), "readout", "labels"]
              + [f"{e} ep" for e in budgets] + ["last step [95 % interval]", "curve", "pretraining s"])
    table = []
    for (method, arch, init, fraction, mode), line in _groups(rows, "method", "arch", "init", "label_fraction",
                                                              "mode").items():
        at = {r["epochs"]: r["macro_f1"] for r in line}
        last = line[-1]
        step = ("" if last["step_verdict"] is None else
                f"{line[-2]['epochs']} → {last['epochs']}: {last['step_diff']:+.3f} "
                f"[{last['step_low']:+.3f}, {last['step_high']:+.3f}]")
        spent = times.get((method, arch, init, last["epochs"]))
        table.append([
            method_name(method), ARCH_NAMES[arch], *([init] if several_inits else []), MODE_LABELS.get(mode, mode),
            _fraction(fraction), *(f"{at[e]:.3f}" if e in at else "–" for e in budgets), step,
            BUDGET_STATES.get(last["step_verdict"], ""), f"{spent:.0f}" if spent else ""])
    readouts = "; ".join(f"{MODE_LABELS.get(m, m)}: {readout_name(m, report.cfg.finetune)}" for m in report.cfg.readouts)
    return "\n\n".join([
        "## Pretraining budget",
        f"Each pretrained network read out after {', '.join(map(str, report.cfg.readout_epochs))} and "
        f"{report.cfg.pretrain.epochs} epochs of the same run (a snapshot is taken before the learning rate has "
        "decayed: a lower bound on a run of that length), and at its starting point (0). Test macro-F1, mean over "
        f"seeds, bars: {report.interval_caption()}. Each step is a paired difference from the budget before it; "
        f"`{BUDGET_CURVE_CSV}` holds every point and step with its interval.",
        image,
        "The last step of each line: *still rising* when its paired interval is above 0 (a longer run may pay), "
        "*flattened* when it contains 0, *falling* when below; pretraining seconds to the last budget. "
        f"Readouts: {readouts}.",
        markdown_table(header, table)])


BUDGET_STATES = {ABOVE: "still rising", UNRESOLVED: "flattened", BELOW: "falling"}
"""How the report names the last step of a budget curve, by its verdict."""


def _best_cells(report: Report) -> dict[tuple[str, str], Row]:
    """The best fine-tuned cell (highest test macro-F1) of every method and architecture."""
    best: dict[tuple[str, str], Row] = {}
    tuned = [r for r in report.rows if r.get("mode", "full") == report.cfg.finetune.mode and r["method"] != STARTING_POINT]
    for key, group in _groups(tuned, "method", "arch").items():
        best[key] = max(group, key=lambda r: r["test_macro_f1"])
    return best


def _describe_cell(row: Row) -> str:
    return Cell(row["method"], row["arch"], row["init"], row["label_fraction"], row["seed"],
                row["pretrain_batch_size"], row["pretrain_epochs"]).describe()


def _section_confusion(report: Report) -> str:
    if not _best_cells(report):
        return ""
    text = ["## Confusion matrices",
            "Best cell (highest test macro-F1) of each method and network, on the test split; rows are true classes, "
            "colours the fraction of each true class, numbers the counts."]
    for (method, arch), row in sorted(_best_cells(report).items()):
        matrix = np.asarray(row["confusion_matrix"])
        if matrix.ndim != 2:
            text.append(f"{_describe_cell(row)}: multi-label data, see the per-label table in `results.json`.")
            continue
        path, image = report.figure(f"confusion_{method}_{arch}.png", f"confusion matrix {method} {arch}")
        plot_confusion_matrix(matrix, row["classes"], path, f"{method_name(method)} {arch}: F1 {row['test_macro_f1']:.3f}")
        text += [f"**{_describe_cell(row)}** (macro-F1 {row['test_macro_f1']:.3f})", image]
    return "\n\n".join(text)


def _validation_images(report: Report, img_size: int) -> tuple[torch.Tensor, list[str]]:
    """A few test images, one per class first, as the models' input tensors, with captions."""
    val = three_roles(report.cfg.data).test
    if val is None:
        raise ConfigError(f"{report.cfg.data.data}: no test images to explain")
    picked: dict[int, int] = {}
    if val.targets is not None and val.targets.ndim == 1:
        for index, target in enumerate(val.targets):
            picked.setdefault(int(target), index)
    order = (list(picked.values()) + [i for i in range(len(val)) if i not in picked.values()])[:EXPLAINED_IMAGES]
    transform = eval_transform(img_size)
    captions = [f"true: {val.classes[int(val.targets[i])]}" if val.targets is not None and val.targets.ndim == 1
                else Path(val.keys[i]).name for i in order]
    return torch.stack([transform(val.load(i)) for i in order]), captions


def _section_explanations(report: Report) -> str:
    if not _best_cells(report):
        return ""
    text = ["## Where the networks look",
            "Best fine-tuned model of each method on the same test images. Transformer: attention of the "
            "class token to each patch in the last block, averaged over heads. CNN: Grad-CAM of the predicted "
            "class at the last stage. Maps are as coarse as the network's last grid (input / 16 for ViT-*/16 "
            "patches, input / 32 for ResNets), and a network fine-tuned for a few epochs looks where it looks: "
            "these are diagnostics, not evidence of clinical relevance."]
    best = _best_cells(report)
    for arch, explain, name, what in (("vit", vit_attention_maps, "attention.png", "Transformer attention"),
                                      ("cnn", grad_cam_maps, "gradcam.png", "CNN Grad-CAM")):
        cells = [best[(m, arch)] for m in report.cfg.methods if (m, arch) in best]
        if arch not in report.cfg.archs or not cells:
            text.append(f"{what}: not run (no {arch} cell finished).")
            continue
        if report.cfg.finetune.mode in READOUTS:
            text.append(f"{what}: not available for frozen-feature readouts, which have no classification head.")
            continue
        text.append(_explanation_figure(report, cells, explain, name, what))
    return "\n\n".join(text)


def _explanation_figure(report: Report, cells: list[Row], explain: Callable[..., np.ndarray], name: str,
                        what: str) -> str:
    maps: dict[str, np.ndarray] = {}
    images = captions = None
    for row in cells:
        classifier = load_classifier(report.cell_dir(row), device="cpu")
        if images is None:
            images, captions = _validation_images(report, classifier.img_size)
        maps[f"{method_name(row['method'])} ({row['init']}, {_fraction(row['label_fraction'])})"] = explain(
            classifier.net, images)
    path, image = report.figure(name, what)
    plot_heatmaps(images.permute(0, 2, 3, 1).numpy(), maps, path, captions, what)
    return f"{what}:\n\n{image}"


def _section_reproduce(report: Report) -> str:
    run_dir = report.run_dir
    lines = [
        "## Reproduce",
        "The whole grid (rerunning it skips finished cells and resumes interrupted ones), then this report:",
        f"```\ncass experiment --config {run_dir / EXPERIMENT_YAML}\ncass report {run_dir}\n```",
        "One cell alone: `cass pretrain --config PRETRAIN_CONFIG --out NEW_RUN`, then `cass finetune --config "
        "FINETUNE_CONFIG --from NEW_RUN --out NEW_MODEL` (the supervised baseline needs only the second; "
        "without `--from` the fine-tuning starts from this experiment's own pretraining run).",
        markdown_table(["cell", "macro-F1", "fine-tuning config", "pretraining config"],
                       [[_describe_cell(r), f"{r['test_macro_f1']:.3f}", f"`{r['finetune_config']}`",
                         f"`{r['pretrain_config']}`" if r["pretrain_config"] else "-"] for r in report.rows]),
    ]
    return "\n\n".join(lines)


def _comparison(report: Report, arch: str, init: str) -> str | None:
    """One sentence per (network, init): the methods' macro-F1 per fraction and who beat whom."""
    cells = _groups([r for r in report.main if r["arch"] == arch and r["init"] == init], "method", "label_fraction")
    fractions = report.cfg.label_fractions
    means = {m: [_mean_std(r["test_macro_f1"] for r in cells.get((m, f), []))[0] for f in fractions]
             for m in report.cfg.methods}
    scores = "; ".join(f"{method_name(m)} " + " / ".join("-" if np.isnan(v) else f"{v:.3f}" for v in values)
                       for m, values in means.items())
    columns = " / ".join(map(_fraction, fractions))
    sentence = f"**{report.network(arch)}, init {init}** (macro-F1 at {columns}): {scores}."
    best = []
    for i, fraction in enumerate(fractions):
        scored = {m: values[i] for m, values in means.items() if not np.isnan(values[i])}
        if len(scored) > 1:
            best.append(f"{method_name(max(scored, key=scored.__getitem__))} at {_fraction(fraction)}")
    if best:
        sentence += " Highest mean: " + ", ".join(best) + "."
    return sentence


def _section_reading_guide(report: Report) -> str:
    cfg = report.cfg
    text = ["## Reading guide"]
    text += [s for arch in cfg.archs for init in (i.name for i in cfg.inits) if (s := _comparison(report, arch, init))]
    text.append(f"Every stated difference is paired (same test images, labelled subsets and seeds) with a 95 % "
                f"interval, a bootstrap over {covers(cfg, len(cfg.seeds))}; *unresolved* means "
                "the interval contains 0: the data cannot tell the two apart, whatever the means say.")
    text.append("**Did not learn** rests on two measurements of what a run exports, and each line says which: its "
                "backbone collapsed (feature std on fixed train images below a fraction of its start, or effective "
                f"rank below {RANK_FLOOR:g}: `metrics.csv`, `start.csv`), or no readout of that network lies above "
                "its starting point (the paired intervals of *What pretraining added*). The other learning checks "
                f"(an online k-NN on the selection split ending less than {KNN_MIN_GAIN:g} above its start; DINO's "
                "loss near ln K or rising back from its lowest) are listed as warnings: they say what to look at, "
                "not that the network is useless. A head's or projector's output std decides nothing.")
    text += _did_not_learn(report)
    for run in report.runs:
        warnings = [w for w in (run.get("warnings") or "").split(" | ") if w and COLLAPSED not in w]
        if warnings:
            text.append(f"**Learning-check warning:** {_run_label(run)} (batch {run['batch_size']}, {run['epochs']} "
                        f"epochs): {'; '.join(warnings)}.")
    stand_ins = [i for i in cfg.inits if i.name not in ("scratch", "imagenet")]
    names = ["`scratch` is random initialisation"] + (
        ["`imagenet` is timm's ImageNet weights"] if any(i.name == "imagenet" for i in cfg.inits) else [])
    names += [f"`{i.name}` is a stand-in for ImageNet weights (SPEC §1): CNN `{i.cnn_weights}`, Transformer "
              f"`{i.vit_weights}`" for i in stand_ins]
    text.append("Initialisations: " + "; ".join(names) + ".")
    return "\n\n".join(text)


def _did_not_learn(report: Report, metric: str = "macro_f1") -> list[str]:
    """One line per pretrained network that did not learn, by measurement: a collapsed backbone (any seed's
    run), or readouts of which none lies above the starting point by its paired interval."""
    lines = []
    for run in report.runs:
        collapsed = [w for w in (run.get("warnings") or "").split(" | ") if COLLAPSED in w]
        if collapsed:
            lines.append(f"**Did not learn (backbone):** {_run_label(run)}: "
                         f"{'; '.join(collapsed)}.")
    added = _groups([r for r in report.comparisons if r["comparison"] == PRETRAINING_ADDED and r["metric"] == metric],
                    "a", "arch", "init")
    for (method, arch, init), rows in added.items():
        if any(r["verdict"] == ABOVE for r in rows):
            continue
        cells = "; ".join(f"{r['mode']} {_fraction(r['label_fraction'])}: {r['diff']:+.3f} [{r['low']:+.3f}, "
                          f"{r['high']:+.3f}] {r['verdict']}" for r in rows if r["diff"] is not None)
        lines.append(f"**Did not learn (readout):** {method_name(method)} {report.network(arch)} from {init}: no "
                     f"readout lies above its starting point ({cells}).")
    return lines


def _section_overview(report: Report) -> str:
    cfg = report.cfg
    return "\n\n".join([
        "# CASS experiment report",
        f"Experiment `{report.run_dir}`: data `{cfg.data.data or 'shipped brain-MRI sample'}`, methods "
        f"{', '.join(method_name(m) for m in cfg.methods)}, networks {cfg.pretrain.cnn} (CNN) and "
        f"{cfg.pretrain.vit} (Transformer) at {cfg.pretrain.img_size or 'their default'} px, label fractions "
        f"{', '.join(map(_fraction, cfg.label_fractions))}, seeds {cfg.seeds}; {_progress(report)}. "
        f"Run on {report.machine()}.",
    ])


def _progress(report: Report) -> str:
    """How many of the grid's cells have finished; a part-done experiment says so in bold."""
    planned = len(plan(report.cfg))
    if len(report.rows) >= planned:
        return f"all {planned} cells finished"
    return (f"**part-done: {len(report.rows)} of {planned} cells finished** (rerunning the experiment continues "
            "it; every table below holds the finished cells only)")


def readout_name(mode: str, cfg: FinetuneConfig) -> str:
    """What a readout is, with how its setting was found (a fixed k in experiments made before the grid)."""
    if mode == "knn":
        how = (f"k = {cfg.knn_k}" if cfg.knn_k is not None
               else f"k chosen on the selection split from {', '.join(map(str, cfg.knn_ks))}")
        return f"cosine k-NN on frozen features ({how})"
    return ("L2 logistic regression on frozen, standardised features (C chosen on the selection split from "
            f"{', '.join(f'{c:g}' for c in cfg.logistic_cs)})")


def readout_table(report: Report, mode: str, metric: str = "macro_f1") -> str:
    """Each pretrained network against the same network at its starting point: the mean over seeds with its
    interval, then (Δ) the paired difference from the starting point with its interval and verdict."""
    fractions = report.cfg.label_fractions
    groups = _groups([r for r in report.readouts if r["mode"] == mode], "method", "arch", "init", "label_fraction")
    added = {(r["a"], r["arch"], r["init"], r["label_fraction"]): r for r in report.comparisons
             if r["comparison"] == PRETRAINING_ADDED and r["mode"] == mode and r["metric"] == metric}
    rows = []
    for arch in report.cfg.archs:
        for init in (i.name for i in report.cfg.inits):
            for method in [STARTING_POINT, *(m for m in report.cfg.methods if is_self_supervised(m))]:
                values = []
                for fraction in fractions:
                    difference = added.get((method, arch, init, fraction))
                    values.append(_cell(report, groups.get((method, arch, init, fraction), []), metric)
                                  + (f"; Δ {_difference(difference)}" if difference else ""))
                rows.append([method_name(method), report.network(arch), init, *values])
    return markdown_table(["method", "network", "init", *map(_fraction, fractions)], rows)


def _difference(row: Row) -> str:
    """A comparison row as ``+0.123 [+0.050, +0.190] above``."""
    if row["diff"] is None or row["low"] is None:
        return "undefined"
    return f"{_format_interval(Interval(row['diff'], row['low'], row['high']), '+')} {row['verdict']}"


def pretraining_added_verdict(report: Report, mode: str, metric: str = "macro_f1") -> str:
    """The networks whose readout is not above their starting point by the paired interval, by name and label
    fraction: the table's verdict said in words, so that no one takes a within-noise difference for a gain."""
    rows = [r for r in report.comparisons
            if r["comparison"] == PRETRAINING_ADDED and r["mode"] == mode and r["metric"] == metric]
    if not rows:
        return "No paired difference yet: no readout finished with kept predictions on both sides."
    missed = [f"{method_name(r['a'])} {report.network(r['arch'])} from {r['init']} at {_fraction(r['label_fraction'])} "
              f"({r['verdict']})" for r in rows if r["verdict"] != ABOVE]
    if not missed:
        return "Every pretrained network is above its starting point (the paired 95 % interval lies above 0)."
    return "**Not above the starting point** (the paired 95 % interval reaches 0 or below): " + "; ".join(missed) + "."


def _section_readouts(report: Report) -> str:
    if not report.readouts:
        return "## What pretraining added\n\nNot run (no readouts in this experiment: `readouts: []`)."
    text = ["## What pretraining added",
            "Each pretrained network read out on frozen features, against the same network at its starting point "
            "(its initialisation, before any pretraining), with the same labelled images. Test-split macro-F1, "
            f"the mean over seeds {report.cfg.seeds}, {report.interval_caption()}; after Δ the paired difference from "
            "the starting point (same test images, labelled subsets and seeds) with its interval and verdict. A "
            "method whose difference is not above 0 did not learn features this readout can use.",
            constant_caption(report.readouts)]
    for mode in report.cfg.readouts:
        name = readout_name(mode, report.cfg.finetune)
        text += [f"### {name[0].upper()}{name[1:]}", readout_table(report, mode),
                 pretraining_added_verdict(report, mode)]
    return "\n\n".join(part for part in text if part)


VERDICT_STYLES = {ABOVE: ("tab:green", "o"), UNRESOLVED: ("tab:gray", "D"), BELOW: ("tab:red", "s")}
"""Forest-plot colour and marker of each verdict."""
MODE_LABELS = {"full": "fine-tuned", "linear": "linear probe", "knn": "k-NN", "logistic": "logistic probe"}


def _comparison_label(report: Report, row: Row) -> str:
    """``CASS − starting point, CNN, k-NN, 10%`` (and the init when the experiment has several; each side's
    init when they differ: ``starting point (pooled) − CASS-VICReg (scratch), ...``)."""
    names = ["starting point" if m == STARTING_POINT else method_name(m) for m in (row["a"], row["b"])]
    across = row.get("b_init", row["init"]) != row["init"]
    if across:
        names = [f"{names[0]} ({row['init']})", f"{names[1]} ({row['b_init']})"]
    parts = [" − ".join(names), ARCH_NAMES[row["arch"]], MODE_LABELS.get(row["mode"], row["mode"]),
             _fraction(row["label_fraction"])]
    if len(report.cfg.inits) > 1 and not across:
        parts.insert(2, row["init"])
    return ", ".join(parts)


def resolved_findings(run_dir: str | Path, metric: str = "macro_f1", most: int = 10) -> str:
    """The stated comparisons whose paired 95 % interval excludes 0, largest difference first, one per line,
    at most ``most`` of them (what ``cass demo`` leads with: a finding, not a table of differences within the
    noise), and how many others stay unresolved."""
    report = Report(Path(run_dir))
    rows = [r for r in report.comparisons if r["metric"] == metric and r["diff"] is not None]
    resolved = sorted((r for r in rows if r["verdict"] in (ABOVE, BELOW)), key=lambda r: -abs(r["diff"]))
    unresolved = len(rows) - len(resolved)
    if not resolved:
        return (f"None of the {len(rows)} stated comparisons is resolved: every paired 95 % interval of test "
                f"{METRIC_NAMES[metric]} contains 0 at this budget.")
    lines = [f"- {_comparison_label(report, r)}: {_difference(r)}" for r in resolved[:most]]
    if len(resolved) > most:
        lines.append(f"- ... and {len(resolved) - most} more resolved ({COMPARISONS_CSV})")
    return "\n".join([*lines, f"({unresolved} other comparison(s) unresolved: their interval contains 0.)"])


def _section_comparisons(report: Report, metric: str = "macro_f1") -> str:
    """The stated comparisons first: a forest plot of the paired differences, then one verdict per line."""
    rows = [r for r in report.comparisons if r["metric"] == metric]
    if not rows:
        return ("## Stated comparisons\n\nNone yet: no comparison has finished cells with kept per-image test "
                "predictions on both sides.")
    path, image = report.figure("comparisons.png", "paired differences with their 95 % intervals")
    bounds = [[float("nan") if r[k] is None else r[k] for k in ("diff", "low", "high")] for r in rows]
    plot_forest([ForestRow(_comparison_label(report, r), *b, r["verdict"]) for r, b in zip(rows, bounds, strict=True)],
                VERDICT_STYLES, path, f"difference of test {METRIC_NAMES[metric]} (a − b)")
    spans = sorted({r["covers"] for r in rows})
    return "\n\n".join([
        "## Stated comparisons",
        f"Each row is a paired difference of test {METRIC_NAMES[metric]}, a − b: the mean over seeds of a minus "
        "that of b, on the same test images, labelled subsets and seeds. Bars: 95 % interval, a bootstrap over "
        f"{' / '.join(spans)}; {REPLICATES} replicates, each drawing test images and seeds with replacement, the "
        "same draw for a and b. **above**: the whole interval is above 0 (a is better); **below**: below 0 (b is "
        "better); **unresolved**: the interval contains 0, so this experiment cannot tell. Readouts are compared "
        "with the network's starting point, fine-tuned networks with the supervised baseline. "
        f"`{COMPARISONS_CSV}` holds every comparison, with accuracy and AUROC too.",
        image,
        "\n".join(f"- {_comparison_label(report, r)}: {_difference(r)} ({r['n_seeds']} seed(s), "
                  f"{r['n_test_images']} test images)" for r in rows),
    ])


SECTIONS = (_section_overview, _section_comparisons, _section_readouts, _section_budget_curve,
            _section_reading_guide, _section_results, _section_published, _section_fraction_curves,
            _section_pretraining_curves, _section_time, _section_robustness, _section_confusion,
            _section_explanations, _section_reproduce)

_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:4px 8px}
th{background:#f3f3f3}img{max-width:100%}pre{background:#f6f6f6;padding:0.8em;overflow-x:auto}"""


def _html(md_text: str, report_dir: Path) -> str:
    """The Markdown rendered to one HTML page whose figures are embedded as base64 PNGs."""
    body = markdown.markdown(md_text, extensions=["tables", "fenced_code"])

    def embed(match: re.Match[str]) -> str:
        data = base64.b64encode((report_dir / match.group(1)).read_bytes()).decode()
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="(figures/[^"]+\.png)"', embed, body)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>CASS experiment report</title>'
            f"<style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n")


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report/report.md`` (figures beside it) and ``report/report.html`` (self-contained)."""
    report = Report(Path(run_dir))
    if not report.rows:
        raise ConfigError(f"{run_dir}: no finished cell in {RESULTS_JSON} yet; run `cass experiment` first")
    md_text = "\n\n".join(text for section in SECTIONS if (text := section(report))) + "\n"
    write_comparisons(report.run_dir, report.comparisons)
    write_budget_curve(report.run_dir, report.budget_curve)
    report_dir = report.figures.parent
    md_path, html_path = report_dir / "report.md", report_dir / "report.html"
    atomic_write_text(md_path, md_text)
    atomic_write_text(html_path, _html(md_text, report_dir))
    return md_path, html_path
