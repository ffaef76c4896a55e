"""Per-image outputs of a scored image set, and their file ``test_predictions.csv.gz``.

Every fine-tuning or readout cell keeps what it predicted on each test image so that a comparison of two
cells can be bootstrapped over the test images they share (SPEC §2 "Uncertainty"); the mean over seeds
alone cannot tell a difference from the luck of one test split.

The file (a gzip-compressed CSV; a plain one when its name ends in ``.csv``) has one row per image: ``file`` (the image key), ``target`` and ``pred`` (class names; for
multi-label data the positive labels joined by ``;``, empty for none) and one probability column per
class, ``softmax_<class>``, or per label, ``sigmoid_<label>`` (the prefix says which task the file is).
``pred`` is written from the full-precision probabilities exactly
as the metrics decided it (first maximum; multi-label: probability > 0.5), so reading the file back
gives the reported confusion matrix even where rounding the probabilities would create a tie.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cass.utils.atomic import atomic_write_bytes
from cass.utils.rundir import csv_text, read_csv

LABEL_SEPARATOR = ";"
PREFIXES = {False: "softmax_", True: "sigmoid_"}
"""Probability columns by ``multilabel``."""
MULTILABEL_THRESHOLD = 0.5
"""A label is predicted when its sigmoid probability is above this (what the metrics use)."""


@dataclass(frozen=True)
class Predictions:
    """What a model predicted on an image set, in the order of its images."""

    classes: list[str]
    multilabel: bool
    probabilities: np.ndarray
    """(N, C) float: softmax over the classes, or one sigmoid per label."""
    targets: np.ndarray
    """(N,) class indices, or (N, C) 0/1 labels."""
    predicted: np.ndarray
    """Same shape as ``targets``: the decision the metrics scored."""

    @classmethod
    def from_probabilities(cls, classes: Sequence[str], multilabel: bool, probabilities: np.ndarray,
                           targets: np.ndarray) -> Predictions:
        """The decisions the metrics make from these probabilities (argmax; multi-label: above 0.5)."""
        predicted = (probabilities > MULTILABEL_THRESHOLD).astype(np.int64) if multilabel else probabilities.argmax(1)
        return cls(list(classes), multilabel, probabilities, targets.astype(np.int64), predicted)

    def __len__(self) -> int:
        return len(self.targets)


def _names(classes: Sequence[str], value: np.ndarray, multilabel: bool) -> str:
    if multilabel:
        return LABEL_SEPARATOR.join(name for name, on in zip(classes, value, strict=True) if on)
    return classes[int(value)]


def _indices(classes: Sequence[str], text: str, multilabel: bool) -> int | list[int]:
    if multilabel:
        on = set(filter(None, text.split(LABEL_SEPARATOR)))
        return [int(name in on) for name in classes]
    return classes.index(text)


def save_predictions(path: Path, keys: Sequence[str], predictions: Predictions) -> None:
    """Write the predictions file (atomically): one row per image, ``keys`` in the same order; compressed
    when ``path`` ends in ``.gz`` (with no timestamp, so the same predictions give the same bytes)."""
    if len(keys) != len(predictions):
        raise ValueError(f"{len(keys)} image keys for {len(predictions)} predictions")
    classes, multilabel = predictions.classes, predictions.multilabel
    prefix = PREFIXES[multilabel]
    rows = [{"file": key, "target": _names(classes, target, multilabel), "pred": _names(classes, pred, multilabel),
             **{f"{prefix}{name}": f"{p:.9g}" for name, p in zip(classes, probs, strict=True)}}
            for key, target, pred, probs in zip(keys, predictions.targets, predictions.predicted,
                                                predictions.probabilities, strict=True)]
    data = csv_text(rows).encode()
    atomic_write_bytes(path, gzip.compress(data, mtime=0) if Path(path).suffix == ".gz" else data)


def load_predictions(path: Path) -> tuple[list[str], Predictions]:
    """The image keys and predictions of a predictions file (compressed or plain)."""
    rows = read_csv(path)
    if not rows:
        raise ValueError(f"{path}: no predictions")
    multilabel = any(column.startswith(PREFIXES[True]) for column in rows[0])
    prefix = PREFIXES[multilabel]
    classes = [column[len(prefix):] for column in rows[0] if column.startswith(prefix)]
    probabilities = np.array([[float(row[prefix + name]) for name in classes] for row in rows])
    targets = np.array([_indices(classes, row["target"], multilabel) for row in rows], dtype=np.int64)
    predicted = np.array([_indices(classes, row["pred"], multilabel) for row in rows], dtype=np.int64)
    return [row["file"] for row in rows], Predictions(classes, multilabel, probabilities, targets, predicted)
