"""95 % intervals of test-split metrics by a bootstrap over test images and seeds (SPEC §2 "Uncertainty").

A condition (one method, network, label fraction and readout) has one set of per-image predictions per
seed, all on the same test images. Its value is the mean of the metric over seeds; a comparison of two
conditions A and B is ``mean_s metric(A_s) - mean_s metric(B_s)``. The test images are a sample, and so
are the seeds (each gives another labelled subset and another training run), so each bootstrap
replicate draws both:

- test-image indices with replacement, one draw shared by A, B and every seed: the comparison is
  paired, so what both get right or wrong on an image cancels, and only their disagreement counts;
- seed indices with replacement, shared by A and B: A and B of the same seed (the same labelled subset,
  and, where one pretraining run serves every seed, the same pretraining) stay together.

The interval is the percentile interval of the replicates (2000 by default, from a fixed RNG seed, so a
report is reproducible). Verdicts: ``above`` when the whole interval is above 0, ``below`` when it is below
0, ``unresolved`` otherwise.

Speed: a metric is computed for every replicate at once from weighted counts: a replicate is a vector of
image multiplicities (how often each test image was drawn), so its confusion matrix is the weighted count
of (target, prediction) pairs, a matrix product for all replicates together; AUROC is the weighted
Mann-Whitney statistic over the images sorted once by score. The draws depend only on the test set, so
each seed of each condition is replicated once (:func:`replicate`) and any number of intervals and
comparisons combine those replicates (:func:`interval`, :func:`paired_difference`). The formulas follow
scikit-learn's definitions (``tests/test_intervals.py`` checks them against ``sklearn.metrics`` on real
resamples), which are the definitions :mod:`cass.evaluation.metrics` reports with torchmetrics:

- multi-class macro averages run over the classes that occur in the targets or the predictions of the
  replicate; balanced accuracy over the classes that occur in the targets;
- multi-label macro averages run over every label (a label never seen nor predicted scores 0);
- AUROC (one-vs-rest per class, or per label) averages the classes with both positives and negatives.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

REPLICATES = 2000
LEVEL = 0.95
SEED = 0
BLOCK = 256
"""Replicates evaluated together: memory is this many x test images x 8 bytes per array."""

ABOVE, BELOW, UNRESOLVED = "above", "below", "unresolved"


@dataclass(frozen=True)
class Replicated:
    """One seed's metric on all test images (``point``) and under each replicate's draw of them (``values``).

    ``draws`` names the draws: the same test targets, number of replicates and RNG seed give the same
    image draws, so the values of any two conditions on the same test images are paired replicate by
    replicate, and a seed's values can be computed once and reused by every comparison it is part of.
    """

    point: float
    values: np.ndarray
    """(R,)"""
    draws: tuple[str, int, int]
    """(digest of the test targets, replicates, RNG seed)."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval."""

    estimate: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        """``above`` (the interval lies above 0), ``below``, or ``unresolved`` (it contains 0, or is undefined)."""
        if self.low > 0:
            return ABOVE
        if self.high < 0:
            return BELOW
        return UNRESOLVED


Counts = tuple[np.ndarray, np.ndarray, np.ndarray]
"""Weighted true positives, false positives and false negatives per class (or label): (B, C) each."""


def _counts(targets: np.ndarray, predicted: np.ndarray, num_classes: int, weights: np.ndarray) -> Counts:
    """Per-class counts of every replicate; ``weights`` (B, N) are the images' multiplicities."""
    if targets.ndim == 2:  # multi-label: one binary problem per label
        truth, said = targets.astype(bool), predicted.astype(bool)
        return weights @ (truth & said), weights @ (~truth & said), weights @ (truth & ~said)
    pairs = np.zeros((len(targets), num_classes * num_classes))
    pairs[np.arange(len(targets)), targets * num_classes + predicted] = 1.0
    confusion = (weights @ pairs).reshape(len(weights), num_classes, num_classes)  # [replicate, true, predicted]
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    return tp, confusion.sum(axis=1) - tp, confusion.sum(axis=2) - tp


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator``, 0 where the denominator is 0 (scikit-learn's ``zero_division=0``)."""
    return np.divide(numerator, denominator, out=np.zeros_like(numerator, dtype=float), where=denominator > 0)


def _macro(values: np.ndarray, counted: np.ndarray) -> np.ndarray:
    """Mean over the counted classes of each replicate (NaN where none is)."""
    total = counted.sum(axis=1)
    return np.divide((values * counted).sum(axis=1), total, out=np.full(len(values), np.nan), where=total > 0)


def _averaged(counts: Counts, multilabel: bool) -> np.ndarray:
    """Which classes a macro average counts: multi-class, those in the targets or predictions; multi-label, all."""
    tp, fp, fn = counts
    return np.ones_like(tp, dtype=bool) if multilabel else (tp + fp + fn) > 0


def _macro_f1(counts: Counts, multilabel: bool) -> np.ndarray:
    tp, fp, fn = counts
    return _macro(_ratio(2 * tp, 2 * tp + fp + fn), _averaged(counts, multilabel))


def _micro_f1(counts: Counts, multilabel: bool) -> np.ndarray:
    tp, fp, fn = (c.sum(axis=1) for c in counts)
    return _ratio(2 * tp, 2 * tp + fp + fn)


def _macro_recall(counts: Counts, multilabel: bool) -> np.ndarray:
    tp, _, fn = counts
    return _macro(_ratio(tp, tp + fn), _averaged(counts, multilabel))


def _balanced_accuracy(counts: Counts, multilabel: bool) -> np.ndarray:
    tp, _, fn = counts
    return _macro(_ratio(tp, tp + fn), (tp + fn) > 0)


def _auroc_one(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted Mann-Whitney AUROC of one class for every replicate (ties count one half); NaN without
    positives or negatives. The images are sorted once; the weights only change the sums."""
    order = np.argsort(scores, kind="stable")
    sorted_scores, sorted_positive = scores[order], positive[order]
    tied = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])  # first image of each score
    w = weights[:, order]
    pos, neg = w * sorted_positive, w * ~sorted_positive
    if len(tied) < len(scores):  # images of equal score form one group (k-NN vote fractions often tie)
        pos, neg = (np.add.reduceat(x, tied, axis=1) for x in (pos, neg))
    below = np.cumsum(neg, axis=1) - neg
    pairs = pos.sum(axis=1) * neg.sum(axis=1)
    wins = (pos * (below + 0.5 * neg)).sum(axis=1)
    return np.divide(wins, pairs, out=np.full(len(weights), np.nan), where=pairs > 0)


def _auroc(targets: np.ndarray, probabilities: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Macro one-vs-rest AUROC over the classes (or labels) with positives and negatives in the replicate."""
    num_classes = probabilities.shape[1]
    truth = targets.astype(bool) if targets.ndim == 2 else targets[:, None] == np.arange(num_classes)
    per_class = np.stack([_auroc_one(probabilities[:, c], truth[:, c], weights) for c in range(num_classes)], axis=1)
    return _macro(np.nan_to_num(per_class), ~np.isnan(per_class))


CountMetric = Callable[[Counts, bool], np.ndarray]
COUNT_METRICS: dict[str, CountMetric] = {
    "macro_f1": _macro_f1, "micro_f1": _micro_f1, "macro_recall": _macro_recall,
    "balanced_accuracy": _balanced_accuracy,
    "accuracy": _micro_f1,  # multi-class only, where every error is one false positive and one false negative
}
MULTICLASS_METRICS = ("macro_f1", "micro_f1", "accuracy", "macro_recall", "balanced_accuracy", "auroc")
MULTILABEL_METRICS = ("macro_f1", "micro_f1", "macro_recall", "auroc")


def metric_names(multilabel: bool) -> tuple[str, ...]:
    """The metrics this module bootstraps for a task (names as in :mod:`cass.evaluation.metrics`)."""
    return MULTILABEL_METRICS if multilabel else MULTICLASS_METRICS


def metric_values(metric: str, targets: np.ndarray, predicted: np.ndarray, probabilities: np.ndarray,
                  weights: np.ndarray) -> np.ndarray:
    """``metric`` of one set of predictions under each row of image multiplicities ``weights`` (B, N): (B,)."""
    multilabel = targets.ndim == 2
    if metric not in metric_names(multilabel):
        raise ValueError(f"no bootstrap for {metric!r} on {'multi-label' if multilabel else 'multi-class'} data; "
                         f"available: {', '.join(metric_names(multilabel))}")
    if metric == "auroc":
        return _auroc(targets, probabilities, weights)
    return COUNT_METRICS[metric](_counts(targets, predicted, probabilities.shape[1], weights), multilabel)


def _multiplicities(rng: np.random.Generator, replicates: int, size: int) -> np.ndarray:
    """(replicates, size): how often each index is drawn when ``size`` indices are drawn with replacement."""
    draws = rng.integers(0, size, (replicates, size)) + size * np.arange(replicates)[:, None]
    return np.bincount(draws.ravel(), minlength=replicates * size).reshape(replicates, size).astype(float)


@functools.lru_cache(maxsize=1)
def _image_draws(images: int, replicates: int, seed: int) -> tuple[np.ndarray, ...]:
    """The image multiplicities of every replicate, in blocks of :data:`BLOCK` (read-only).

    Kept for the last test-set size: an experiment replicates every cell on the same test images, and
    drawing is most of the cost of the count-based metrics.
    """
    rng = np.random.default_rng([seed, 0])
    blocks = tuple(_multiplicities(rng, min(BLOCK, replicates - start), images)
                   for start in range(0, replicates, BLOCK))
    for block in blocks:
        block.flags.writeable = False
    return blocks


def replicate(metric: str, targets: np.ndarray, predicted: np.ndarray, probabilities: np.ndarray,
              replicates: int = REPLICATES, seed: int = SEED) -> Replicated:
    """``metric`` of one seed's predictions on all test images and under every replicate's image draw.

    ``targets`` (N,) class indices or (N, L) 0/1 labels; ``predicted`` the same shape; ``probabilities`` (N, C).
    """
    if predicted.shape != targets.shape or len(probabilities) != len(targets):
        raise ValueError(f"targets {targets.shape}, predicted {predicted.shape} and probabilities "
                         f"{probabilities.shape} do not describe the same test images")
    blocks = [metric_values(metric, targets, predicted, probabilities, weights)
              for weights in _image_draws(len(targets), replicates, seed)]
    point = metric_values(metric, targets, predicted, probabilities, np.ones((1, len(targets))))
    digest = hashlib.sha1(f"{targets.shape}".encode() + np.ascontiguousarray(targets, dtype=np.int64).tobytes())
    return Replicated(float(point[0]), np.concatenate(blocks), (digest.hexdigest(), replicates, seed))


def _seed_means(seeds: Sequence[Replicated], values: np.ndarray) -> np.ndarray:
    """The mean over a draw of seeds, with replacement, of each replicate of ``values`` (S, R): (R,).

    The seed draws come from the same RNG seed as the image draws (another stream of it), so they too are
    shared by two conditions with the same number of seeds.
    """
    _, replicates, seed = seeds[0].draws
    counts = _multiplicities(np.random.default_rng([seed, 1]), replicates, len(seeds))
    return (counts * values.T).sum(axis=1) / len(seeds)


def _same_draws(seeds: Sequence[Replicated]) -> None:
    if not seeds:
        raise ValueError("an interval needs at least one seed")
    if len({s.draws for s in seeds}) != 1:
        raise ValueError("the seeds were not replicated with the same test images, replicates and RNG seed")


def _interval(estimate: float, replicated: np.ndarray) -> Interval:
    """The percentile interval (replicates whose metric is undefined, e.g. AUROC without positives, left out)."""
    tail = 100 * (1 - LEVEL) / 2
    if np.isnan(replicated).all():
        return Interval(estimate, float("nan"), float("nan"))
    low, high = np.nanpercentile(replicated, [tail, 100 - tail])
    return Interval(estimate, float(low), float(high))


def interval(seeds: Sequence[Replicated]) -> Interval:
    """The mean over seeds of a metric with its interval over test images and seeds."""
    _same_draws(seeds)
    values = np.stack([s.values for s in seeds])
    return _interval(float(np.mean([s.point for s in seeds])), _seed_means(seeds, values))


def paired_difference(a: Sequence[Replicated], b: Sequence[Replicated]) -> Interval:
    """``mean_s metric(a_s) - mean_s metric(b_s)`` with its paired interval; ``a[i]`` and ``b[i]`` must be the
    same seed (the same labelled subset), replicated on the same test images."""
    if len(a) != len(b):
        raise ValueError(f"a paired comparison needs the same seeds on both sides, got {len(a)} and {len(b)}")
    _same_draws([*a, *b])
    values = np.stack([x.values - y.values for x, y in zip(a, b, strict=True)])
    estimate = float(np.mean([x.point for x in a]) - np.mean([y.point for y in b]))
    return _interval(estimate, _seed_means(a, values))
