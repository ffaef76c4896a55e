"""Bootstrap intervals: hand-computed cases, and every vectorised metric equal to scikit-learn's on real
bootstrap resamples (the spec forbids an F1 that is not proved against the library)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit, softmax
from sklearn import metrics as skm

from cass.evaluation.intervals import (
    ABOVE,
    BELOW,
    SEED,
    UNRESOLVED,
    _image_draws,
    interval,
    metric_names,
    metric_values,
    paired_difference,
    replicate,
)

TARGETS = np.array([0, 0, 0, 0, 1, 1, 1, 1])


def one_hot(predicted: np.ndarray, num_classes: int = 2) -> np.ndarray:
    return np.eye(num_classes)[predicted]


def seeds(*predictions: np.ndarray, metric: str = "macro_f1", targets: np.ndarray = TARGETS, replicates: int = 500):
    """One replicated seed per array of predicted classes (probabilities: the one-hot decisions)."""
    return [replicate(metric, targets, p, one_hot(p), replicates) for p in predictions]


RIGHT = TARGETS
WRONG = 1 - TARGETS
ALL_ZERO = np.zeros_like(TARGETS)


def test_always_right_against_always_wrong_is_a_degenerate_interval_at_the_point_difference():
    # Every resample: A has macro-F1 1, B has 0 (every class it meets has no true positive).
    above = paired_difference(seeds(RIGHT, RIGHT), seeds(WRONG, WRONG))
    assert (above.estimate, above.low, above.high, above.verdict) == (1.0, 1.0, 1.0, ABOVE)
    below = paired_difference(seeds(WRONG), seeds(RIGHT))
    assert (below.estimate, below.low, below.high, below.verdict) == (-1.0, -1.0, -1.0, BELOW)


def test_a_never_worse_and_better_on_half_the_images_is_above_with_the_hand_computed_difference():
    # B says class 0 for everything: class 0 F1 = 2*4 / (2*4 + 4) = 2/3, class 1 F1 = 0, macro 1/3.
    result = paired_difference(seeds(RIGHT), seeds(ALL_ZERO))
    assert result.estimate == pytest.approx(1 - 1 / 3)
    # A resample of class-0 images only (1 in 256) gives 0; every other one is positive.
    assert 0 < result.low <= result.high <= 1 and result.verdict == ABOVE
    assert paired_difference(seeds(ALL_ZERO), seeds(RIGHT)).verdict == BELOW


def test_identical_conditions_give_exactly_zero_in_every_replicate():
    # Only a paired draw (the same images for A and B) makes each replicate's difference exactly 0.
    half = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    result = paired_difference(seeds(half, RIGHT), seeds(half, RIGHT))
    assert (result.estimate, result.low, result.high, result.verdict) == (0.0, 0.0, 0.0, UNRESOLVED)


def test_seeds_are_resampled_together():
    # Seed 0: A right, B wrong (+1 on every image draw); seed 1 the reverse (-1). A replicate draws two
    # seeds with replacement: (0, 0) gives +1, (1, 1) gives -1 (1/4 each), one of each 0. The 2.5 % and
    # 97.5 % percentiles are therefore -1 and +1, around a point difference of 0.
    result = paired_difference(seeds(RIGHT, WRONG), seeds(WRONG, RIGHT))
    assert (result.estimate, result.low, result.high, result.verdict) == (0.0, -1.0, 1.0, UNRESOLVED)
    # One condition, macro-F1 1 at seed 0 and 0 at seed 1: mean 0.5, interval [0, 1].
    single = interval(seeds(RIGHT, WRONG))
    assert (single.estimate, single.low, single.high) == (0.5, 0.0, 1.0)


def test_an_interval_narrows_with_more_test_images():
    rng = np.random.default_rng(0)
    widths = []
    for n in (40, 400):
        targets = rng.integers(0, 2, n)
        predicted = np.where(rng.random(n) < 0.7, targets, 1 - targets)
        result = interval(seeds(predicted, targets=targets))
        assert result.low < result.estimate < result.high
        widths.append(result.high - result.low)
    assert widths[1] < widths[0] / 2


def test_pairing_needs_the_same_seeds_and_test_images():
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference(seeds(RIGHT, RIGHT), seeds(RIGHT))
    other = np.array([1, 0, 0, 0, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="same test images"):
        paired_difference(seeds(RIGHT), seeds(RIGHT, targets=other))


def multiclass_outputs(seed: int, n: int = 150, num_classes: int = 5, ties: bool = False):
    """Skewed targets (the last class rare, and predicted only on its own images, so a resample can lose it from
    targets and predictions alike) and a model that never predicts class 1."""
    rng = np.random.default_rng(seed)
    targets = rng.choice(num_classes - 1, n, p=[0.35, 0.25, 0.2, 0.2])
    targets[:2] = num_classes - 1  # two images of the rare class: a resample misses it about one time in 7
    logits = rng.normal(size=(n, num_classes))
    logits[np.arange(n), targets] += rng.random(n) * 3
    logits[:, 1] -= 10
    logits[:, -1] += np.where(targets == num_classes - 1, 20, -10)
    probabilities = softmax(logits, axis=1)
    if ties:  # coarse scores, as k-NN vote fractions are
        probabilities = np.round(probabilities, 1)
    return targets, probabilities.argmax(1), probabilities


def resamples(n: int, count: int = 5, seed: int = 1):
    """Bootstrap draws of image indices and the multiplicity vector of each."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        drawn = rng.integers(0, n, n)
        yield drawn, np.bincount(drawn, minlength=n)[None].astype(float)


def one(metric: str, targets, predicted, probabilities, weights) -> float:
    (value,) = metric_values(metric, targets, predicted, probabilities, weights)
    return float(value)


SKLEARN_MULTICLASS = {
    "macro_f1": lambda t, p: skm.f1_score(t, p, average="macro", zero_division=0),
    "micro_f1": lambda t, p: skm.f1_score(t, p, average="micro", zero_division=0),
    "accuracy": skm.accuracy_score,
    "macro_recall": lambda t, p: skm.recall_score(t, p, average="macro", zero_division=0),
    "balanced_accuracy": skm.balanced_accuracy_score,
}


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("metric", list(SKLEARN_MULTICLASS))
def test_count_metrics_equal_sklearn_on_real_resamples(metric):
    targets, predicted, probabilities = multiclass_outputs(0)
    lost_a_class = False
    for drawn, weights in resamples(len(targets), count=20):
        expected = SKLEARN_MULTICLASS[metric](targets[drawn], predicted[drawn])
        assert one(metric, targets, predicted, probabilities, weights) == pytest.approx(expected, abs=1e-12)
        lost_a_class |= 4 not in set(targets[drawn]) | set(predicted[drawn])
    assert lost_a_class  # some resamples hold no trace of the rare class: the macro average leaves it out


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_equals_sklearn_one_vs_rest_on_real_resamples(ties):
    targets, predicted, probabilities = multiclass_outputs(2, ties=ties)
    for drawn, weights in resamples(len(targets)):
        t, p = targets[drawn], probabilities[drawn]
        defined = [c for c in range(5) if 0 < (t == c).sum() < len(t)]
        expected = np.mean([skm.roc_auc_score(t == c, p[:, c]) for c in defined])
        assert one("auroc", targets, predicted, probabilities, weights) == pytest.approx(expected, abs=1e-12)
        if not ties and len(defined) == 5:
            assert expected == pytest.approx(skm.roc_auc_score(t, p, multi_class="ovr", average="macro"))


def multilabel_outputs(seed: int, n: int = 120, labels: int = 4):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, labels)) < [0.5, 0.3, 0.1, 0.02]).astype(int)
    probabilities = expit(rng.normal(size=(n, labels)) + 2 * targets - 1)
    probabilities[:, 3] = 0.1  # never predicted, and a constant score
    return targets, (probabilities > 0.5).astype(int), probabilities


SKLEARN_MULTILABEL = {
    "macro_f1": lambda t, p: skm.f1_score(t, p, average="macro", zero_division=0),
    "micro_f1": lambda t, p: skm.f1_score(t, p, average="micro", zero_division=0),
    "macro_recall": lambda t, p: skm.recall_score(t, p, average="macro", zero_division=0),
}


@pytest.mark.parametrize("metric", [*SKLEARN_MULTILABEL, "auroc"])
def test_multilabel_metrics_equal_sklearn_on_real_resamples(metric):
    targets, predicted, probabilities = multilabel_outputs(3)
    for drawn, weights in resamples(len(targets)):
        t, p, s = targets[drawn], predicted[drawn], probabilities[drawn]
        if metric == "auroc":
            defined = [c for c in range(4) if 0 < t[:, c].sum() < len(t)]
            expected = np.mean([skm.roc_auc_score(t[:, c], s[:, c]) for c in defined])
        else:
            expected = SKLEARN_MULTILABEL[metric](t, p)
        assert one(metric, targets, predicted, probabilities, weights) == pytest.approx(expected, abs=1e-12)


def test_every_replicate_is_the_macro_f1_of_its_resample():
    """The vectorised path (all replicates at once, in blocks) against scikit-learn one replicate at a time."""
    targets, predicted, probabilities = multiclass_outputs(4, n=60)
    result = replicate("macro_f1", targets, predicted, probabilities, replicates=300)
    assert result.point == pytest.approx(skm.f1_score(targets, predicted, average="macro"))
    weights = np.concatenate(_image_draws(60, 300, SEED))
    assert weights.shape == (300, 60) and (weights.sum(axis=1) == 60).all() and np.ptp(result.values) > 0
    for r in range(0, 300, 23):  # both blocks
        drawn = np.repeat(np.arange(60), weights[r].astype(int))
        assert result.values[r] == pytest.approx(skm.f1_score(targets[drawn], predicted[drawn], average="macro"))
    low, high = np.percentile(result.values, [2.5, 97.5])
    assert (interval([result]).low, interval([result]).high) == pytest.approx((low, high))


def test_a_metric_without_a_bootstrap_is_refused_by_name():
    assert "balanced_accuracy" not in metric_names(multilabel=True)
    targets, predicted, probabilities = multilabel_outputs(0)
    with pytest.raises(ValueError, match="balanced_accuracy"):
        metric_values("balanced_accuracy", targets, predicted, probabilities, np.ones((1, len(targets))))
