"""Classification metrics of an epoch, computed by torchmetrics and returned as plain JSON data.

The public notebooks reported an "F1" that was really pooled recall and never reset it between
epochs. Here every number comes from torchmetrics (which follows scikit-learn's definitions and
synchronises across DDP processes), and :meth:`ClassificationMetrics.compute` ends the epoch: it
clears the accumulated state, so nothing leaks into the next epoch.

Conventions (all match scikit-learn):

- probabilities are ``softmax(logits)`` (multi-class) or ``sigmoid(logits)`` (multi-label, with a
  0.5 threshold per label). They are computed here, never guessed by torchmetrics from the range of
  its input;
- macro averages of precision, recall and F1 run over the classes that occur in the targets or the
  predictions (a class never seen nor predicted is left out); per-class values with an empty
  denominator are 0;
- ``balanced_accuracy`` is the mean recall over the classes present in the targets. For
  multi-class data that is the macro recall whenever no absent class is predicted; for multi-label
  data it is the mean over labels of the binary balanced accuracy (mean of sensitivity and
  specificity, over whichever of the two is defined);
- AUROC (one-vs-rest) and average precision are undefined for a class without positives (AUROC:
  or without negatives), which happens on small validation sets. Such a class gets ``None`` and the
  macro average runs over the others (``None`` if none is left). Undefined values are ``None``,
  never NaN, so the result is strict JSON.

Per-image outputs: inside :func:`recording_predictions`, every :meth:`ClassificationMetrics.compute` also
hands the probabilities, targets and decisions it scored to the recorder (see that function for why).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
    MultilabelAUROC,
    MultilabelAveragePrecision,
    MultilabelConfusionMatrix,
    MultilabelF1Score,
    MultilabelPrecision,
    MultilabelRecall,
    MultilabelSpecificity,
)

from cass.evaluation.predictions import Predictions


def _multiclass_metrics(num_classes: int) -> dict[str, Metric]:
    return {
        "macro_f1": MulticlassF1Score(num_classes, average="macro"),
        "micro_f1": MulticlassF1Score(num_classes, average="micro"),
        "macro_recall": MulticlassRecall(num_classes, average="macro"),
        "accuracy": MulticlassAccuracy(num_classes, average="micro"),
        "precision": MulticlassPrecision(num_classes, average=None),
        "recall": MulticlassRecall(num_classes, average=None),
        "f1": MulticlassF1Score(num_classes, average=None),
        "auroc": MulticlassAUROC(num_classes, average=None),
        "confusion_matrix": MulticlassConfusionMatrix(num_classes),
    }


def _multilabel_metrics(num_labels: int) -> dict[str, Metric]:
    return {
        "macro_f1": MultilabelF1Score(num_labels, average="macro"),
        "micro_f1": MultilabelF1Score(num_labels, average="micro"),
        "macro_recall": MultilabelRecall(num_labels, average="macro"),
        "precision": MultilabelPrecision(num_labels, average=None),
        "recall": MultilabelRecall(num_labels, average=None),
        "specificity": MultilabelSpecificity(num_labels, average=None),
        "f1": MultilabelF1Score(num_labels, average=None),
        "auroc": MultilabelAUROC(num_labels, average=None),
        "average_precision": MultilabelAveragePrecision(num_labels, average=None),
        "confusion_matrix": MultilabelConfusionMatrix(num_labels),
    }


def _mean_where(values: torch.Tensor, defined: torch.Tensor) -> float | None:
    return float(values[defined].double().mean()) if defined.any() else None


def _per_class(classes: Sequence[str], columns: dict[str, list[Any]]) -> dict[str, dict[str, Any]]:
    return {name: {key: column[i] for key, column in columns.items()} for i, name in enumerate(classes)}


def _where_defined(values: torch.Tensor, defined: torch.Tensor) -> list[float | None]:
    return [float(v) if ok else None for v, ok in zip(values.tolist(), defined.tolist())]


def _summarise_multiclass(values: dict[str, torch.Tensor], classes: Sequence[str]) -> dict[str, Any]:
    confusion = values["confusion_matrix"].long()
    support = confusion.sum(dim=1)
    num_samples = int(confusion.sum())
    present = support > 0
    auroc_defined = present & (support < num_samples)
    return {
        "classes": list(classes),
        "num_samples": num_samples,
        "macro_f1": float(values["macro_f1"]),
        "micro_f1": float(values["micro_f1"]),
        "macro_recall": float(values["macro_recall"]),
        "balanced_accuracy": _mean_where(values["recall"], present),
        "auroc": _mean_where(values["auroc"], auroc_defined),
        "accuracy": float(values["accuracy"]),
        "per_class": _per_class(
            classes,
            {
                "precision": values["precision"].tolist(),
                "recall": values["recall"].tolist(),
                "f1": values["f1"].tolist(),
                "auroc": _where_defined(values["auroc"], auroc_defined),
                "support": support.tolist(),
            },
        ),
        "confusion_matrix": confusion.tolist(),
    }


def _summarise_multilabel(values: dict[str, torch.Tensor], classes: Sequence[str]) -> dict[str, Any]:
    confusion = values["confusion_matrix"].long()  # (C, 2, 2): [[tn, fp], [fn, tp]] per label
    positives = confusion[:, 1, :].sum(dim=1)
    negatives = confusion[:, 0, :].sum(dim=1)
    has_pos, has_neg = positives > 0, negatives > 0
    # Binary balanced accuracy per label: mean of the rates whose class occurs in the targets.
    balanced = (values["recall"] * has_pos + values["specificity"] * has_neg) / (has_pos.int() + has_neg.int())
    return {
        "classes": list(classes),
        "num_samples": int(confusion[0].sum()),
        "macro_f1": float(values["macro_f1"]),
        "micro_f1": float(values["micro_f1"]),
        "macro_recall": float(values["macro_recall"]),
        "balanced_accuracy": float(balanced.double().mean()),
        "auroc": _mean_where(values["auroc"], has_pos & has_neg),
        "map": _mean_where(values["average_precision"], has_pos),
        "per_class": _per_class(
            classes,
            {
                "precision": values["precision"].tolist(),
                "recall": values["recall"].tolist(),
                "f1": values["f1"].tolist(),
                "auroc": _where_defined(values["auroc"], has_pos & has_neg),
                "average_precision": _where_defined(values["average_precision"], has_pos),
                "support": positives.tolist(),
            },
        ),
        "confusion_matrix": confusion.tolist(),
    }


class PredictionRecorder:
    """The per-image outputs of every :meth:`ClassificationMetrics.compute` inside :func:`recording_predictions`."""

    def __init__(self) -> None:
        self.seen: list[Predictions] = []

    def only(self) -> Predictions:
        """The outputs of the one scoring the block ran (an error if it ran none or several)."""
        if len(self.seen) != 1:
            raise RuntimeError(f"expected the per-image outputs of one scoring, got {len(self.seen)}")
        return self.seen[0]


_RECORDER: ContextVar[PredictionRecorder | None] = ContextVar("cass_prediction_recorder", default=None)


@contextmanager
def recording_predictions() -> Iterator[PredictionRecorder]:
    """Keep the per-image outputs behind every :meth:`ClassificationMetrics.compute` inside the block.

    Every scorer of a model (the best fine-tuned weights, k-NN, any readout added later) ends in
    ``compute()``, so recording here keeps the outputs of any scorer without changing what a scorer
    returns; outside the block nothing is kept, so the many validations of a training run cost no memory.
    """
    recorder = PredictionRecorder()
    token = _RECORDER.set(recorder)
    try:
        yield recorder
    finally:
        _RECORDER.reset(token)


class ClassificationMetrics(nn.Module):
    """Accumulates logits and targets over an epoch; :meth:`compute` returns the metrics and resets.

    An ``nn.Module`` so that it follows its owner to the right device (``.to``, Lightning).
    """

    def __init__(self, classes: Sequence[str], multilabel: bool = False) -> None:
        super().__init__()
        if len(classes) < (1 if multilabel else 2):
            raise ValueError(f"need at least {1 if multilabel else 2} class names, got {list(classes)}")
        self.classes = list(classes)
        self.multilabel = multilabel
        build = _multilabel_metrics if multilabel else _multiclass_metrics
        self.collection = MetricCollection(build(len(self.classes)))
        self._seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        """(probabilities, targets) of each batch, kept only while :func:`recording_predictions` is active."""

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add a batch: ``logits`` (N, C); ``targets`` class indices (N,) or 0/1 labels (N, C)."""
        num_classes = len(self.classes)
        if logits.ndim != 2 or logits.shape[1] != num_classes:
            raise ValueError(
                f"logits have shape {tuple(logits.shape)} but the metrics expect (N, {num_classes}) "
                f"for classes {self.classes}"
            )
        expected = (logits.shape[0], num_classes) if self.multilabel else (logits.shape[0],)
        if tuple(targets.shape) != expected:
            raise ValueError(f"targets have shape {tuple(targets.shape)}, expected {expected}")
        logits = logits.detach().float()
        if self.multilabel and not ((targets == 0) | (targets == 1)).all():
            raise ValueError("multi-label targets must contain only 0 and 1")
        probabilities = logits.sigmoid() if self.multilabel else logits.softmax(dim=1)
        self.collection.update(probabilities, targets.long())
        if _RECORDER.get() is not None:
            self._seen.append((probabilities, targets.detach().long()))

    def reset(self) -> None:
        """Forget everything accumulated (compute() already does this)."""
        self.collection.reset()
        self._seen = []

    def _record(self) -> None:
        """Hand the outputs seen since the last reset to the active recorder (the same tensors the metrics saw)."""
        recorder = _RECORDER.get()
        if recorder is not None and self._seen:
            probabilities, targets = (torch.cat(parts).cpu().numpy() for parts in zip(*self._seen, strict=True))
            recorder.seen.append(Predictions.from_probabilities(self.classes, self.multilabel, probabilities, targets))

    def compute(self) -> dict[str, Any]:
        """The metrics of everything seen since the last reset, as plain JSON data; then reset."""
        if not self.collection["confusion_matrix"].update_called:
            raise RuntimeError("no predictions were added since the last compute()/reset()")
        with warnings.catch_warnings():
            # torchmetrics warns about classes without positives; they are reported as None instead.
            warnings.filterwarnings("ignore", message="No (positive|negative) samples")
            values = self.collection.compute()
        self._record()
        self.reset()
        summarise = _summarise_multilabel if self.multilabel else _summarise_multiclass
        return summarise({name: value.detach().cpu() for name, value in values.items()}, self.classes)


def compute_metrics(
    logits: torch.Tensor, targets: torch.Tensor, classes: Sequence[str], multilabel: bool = False
) -> dict[str, Any]:
    """Metrics of one set of predictions (see :class:`ClassificationMetrics`)."""
    metrics = ClassificationMetrics(classes, multilabel).to(logits.device)
    metrics.update(logits, targets)
    return metrics.compute()


def constant_prediction_macro_f1(targets: np.ndarray, num_classes: int, multilabel: bool) -> float:
    """The best macro-F1 a model that ignores its input can score on these targets: one class for every image
    (multi-class: the most frequent class wins), or every label on for every image (multi-label; every label
    off scores 0). A chosen model at or below it has learnt nothing the selection split can see, however its
    early stopping ended."""
    if multilabel:
        return float(f1_score(targets, np.ones_like(targets), average="macro", zero_division=0))
    return max(float(f1_score(targets, np.full_like(targets, c), average="macro", zero_division=0))
               for c in range(num_classes))
