"""The files of a run directory: their names, and the per-epoch metrics CSV.

Pretraining runs, fine-tuned model directories, experiments and reports all read and write these
names, so they live here, below every layer that uses them.
"""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path
from typing import Any

from cass.utils.atomic import atomic_write_text

CONFIG = "config.yaml"
"""The resolved configuration of a run: enough to rerun it exactly."""
CHECKPOINT = "checkpoint.safetensors"
"""Full resume state (weights, optimisers, schedulers, RNG, progress); dropped once a fine-tuning finishes."""
METRICS = "metrics.csv"
"""One row per pretraining epoch: loss, learning rate, learning diagnostics, time, img/s, memory."""
START = "start.csv"
"""One row, epoch 0: the learning checks of a pretraining run's networks before its first step, where the
backbone and k-NN curves of ``metrics.csv`` start (kept apart so every row of ``metrics.csv`` is an epoch)."""
SOURCES = "sources.json"
"""The sources a pretraining run read: per source its data options, how many train images it gave and how
many selection and test images it kept out, and the fingerprint of those train images."""
HISTORY = "history.csv"
"""One row per fine-tuning evaluation: losses, selection-split scores, steps, time."""
MODEL = "model.safetensors"
"""A fine-tuned (or probed) classifier: timm weights whose metadata name network, classes and size."""
KNN_BANK = "knn_bank.safetensors"
"""The labelled features (and ``k``) of a k-NN classifier."""
LOGISTIC_PROBE = "logistic_probe.safetensors"
"""The standardisation (mean, scale), weights, bias (and ``C``) of a logistic-regression readout."""
SCORES = "metrics.json"
"""The scores of a fine-tuned model directory (or of ``cass evaluate``)."""
PREDICTIONS = "test_predictions.csv.gz"
"""Per test image of a fine-tuned model directory: target, prediction and class probabilities, kept so that
every comparison can be bootstrapped over test images (``cass.evaluation.predictions``). Compressed: an
experiment keeps one per cell, and gzip makes them six times smaller."""
PLAIN_PREDICTIONS = "test_predictions.csv"
"""The uncompressed name runs made before the predictions were compressed; still read."""

SNAPSHOTS = "snapshots"
"""Folder of a pretraining run's kept epochs (``keep_epochs``): ``snapshots/epoch_NNN/``, each read like a run."""


def snapshot_dir(run_dir: Path, epoch: int) -> Path:
    """Where a pretraining run keeps its weights after ``epoch`` (``keep_epochs``)."""
    return Path(run_dir) / SNAPSHOTS / f"epoch_{epoch:03d}"


def predictions_file(cell_dir: Path) -> Path:
    """The predictions file of a fine-tuned model directory: the plain CSV where an older run wrote one
    (and no compressed file), otherwise the compressed name, which need not exist yet."""
    plain = Path(cell_dir) / PLAIN_PREDICTIONS
    compressed = Path(cell_dir) / PREDICTIONS
    return plain if plain.is_file() and not compressed.is_file() else compressed


def csv_text(rows: list[dict[str, Any]]) -> str:
    """Rows as CSV text; the header is the union of the rows' keys in first-seen order, None is empty."""
    buffer = io.StringIO()
    fields = list(dict.fromkeys(key for row in rows for key in row))
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file (written by :func:`csv_text` or :class:`MetricsFile`), gzip-compressed when its
    name ends in ``.gz``."""
    opener = gzip.open if Path(path).suffix == ".gz" else open
    with opener(path, "rt", newline="") as fh:
        return list(csv.DictReader(fh))


def numeric_rows(rows: list[dict[str, str]]) -> list[dict[str, float]]:
    """CSV rows as numbers; a value a row did not measure (empty, e.g. a k-NN not run that epoch) is left out."""
    return [{key: float(value) for key, value in row.items() if value not in ("", None)} for row in rows]


def read_history(run_dir: Path) -> list[dict[str, float]]:
    """The learning record of a pretraining run, as numbers: its start row (epoch 0, when recorded), then one
    row per finished epoch."""
    paths = (Path(run_dir) / START, Path(run_dir) / METRICS)
    return [row for path in paths if path.is_file() for row in numeric_rows(read_csv(path))]


class MetricsFile:
    """One CSV row per epoch, rewritten atomically; a resumed run drops rows past its checkpoint."""

    def __init__(self, path: Path, resume_epoch: int) -> None:
        self.path = path
        rows = read_csv(path) if path.exists() else []
        self.rows = [r for r in rows if int(r["epoch"]) <= resume_epoch]

    @staticmethod
    def read(path: Path) -> list[dict[str, str]]:
        return read_csv(path)

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append({k: str(v) for k, v in row.items()})
        atomic_write_text(self.path, csv_text(self.rows))
