"""Epoch metrics: every number equal to scikit-learn's, state cleared between epochs."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch
from scipy.special import expit, softmax
from sklearn import metrics as skm

from cass.evaluation.metrics import (
    ClassificationMetrics,
    compute_metrics,
    constant_prediction_macro_f1,
    recording_predictions,
)
from cass.evaluation.predictions import load_predictions, save_predictions
from cass.utils.rundir import PLAIN_PREDICTIONS, PREDICTIONS, predictions_file

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def approx(value):
    return pytest.approx(value, rel=1e-5, abs=1e-6)


def multiclass_batch(seed: int, n: int = 200, scale: float = 2.0, num_classes: int = 4):
    """Random logits and class targets. With scale < 1 every logit lies in [0, 1), where torchmetrics
    would take raw logits for probabilities unless they are converted first."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 4, generator=gen, dtype=torch.float64) * scale
    if scale < 1:
        logits = logits.abs().clamp(max=0.999)
    return logits, torch.randint(0, num_classes, (n,), generator=gen)


def multilabel_batch(seed: int, n: int = 200, scale: float = 2.0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 4, generator=gen, dtype=torch.float64) * scale
    if scale < 1:
        logits = logits.abs().clamp(max=0.999)
    return logits, torch.randint(0, 2, (n, 4), generator=gen)


@pytest.mark.parametrize("scale", [2.0, 0.5])
def test_multiclass_metrics_equal_scikit_learn(scale):
    logits, targets = multiclass_batch(0, scale=scale)
    got = compute_metrics(logits, targets, CLASSES)
    y, probs = targets.numpy(), softmax(logits.numpy(), axis=1)
    pred = probs.argmax(axis=1)
    assert got["macro_f1"] == approx(skm.f1_score(y, pred, average="macro"))
    assert got["micro_f1"] == approx(skm.f1_score(y, pred, average="micro"))
    assert got["macro_recall"] == approx(skm.recall_score(y, pred, average="macro"))
    assert got["balanced_accuracy"] == approx(skm.balanced_accuracy_score(y, pred))
    assert got["accuracy"] == approx(skm.accuracy_score(y, pred))
    assert got["auroc"] == approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    precision, recall, f1, support = skm.precision_recall_fscore_support(y, pred, average=None)
    for i, name in enumerate(CLASSES):
        row = got["per_class"][name]
        assert row["precision"] == approx(precision[i])
        assert row["recall"] == approx(recall[i])
        assert row["f1"] == approx(f1[i])
        assert row["support"] == support[i]
        assert row["auroc"] == approx(skm.roc_auc_score(y == i, probs[:, i]))
    assert got["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    assert got["num_samples"] == len(y) and got["classes"] == CLASSES


@pytest.mark.parametrize("scale", [2.0, 0.5])
def test_multilabel_metrics_equal_scikit_learn(scale):
    logits, targets = multilabel_batch(1, scale=scale)
    got = compute_metrics(logits, targets, CLASSES, multilabel=True)
    y, probs = targets.numpy(), expit(logits.numpy())
    pred = (probs > 0.5).astype(int)
    assert got["macro_f1"] == approx(skm.f1_score(y, pred, average="macro"))
    assert got["micro_f1"] == approx(skm.f1_score(y, pred, average="micro"))
    assert got["macro_recall"] == approx(skm.recall_score(y, pred, average="macro"))
    assert got["map"] == approx(skm.average_precision_score(y, probs, average="macro"))
    assert got["auroc"] == approx(skm.roc_auc_score(y, probs, average="macro"))
    per_label_balanced = [skm.balanced_accuracy_score(y[:, i], pred[:, i]) for i in range(4)]
    assert got["balanced_accuracy"] == approx(np.mean(per_label_balanced))
    precision, recall, f1, support = skm.precision_recall_fscore_support(y, pred, average=None)
    for i, name in enumerate(CLASSES):
        row = got["per_class"][name]
        assert (row["precision"], row["recall"], row["f1"]) == (approx(precision[i]), approx(recall[i]), approx(f1[i]))
        assert row["support"] == support[i]
        assert row["average_precision"] == approx(skm.average_precision_score(y[:, i], probs[:, i]))
        assert row["auroc"] == approx(skm.roc_auc_score(y[:, i], probs[:, i]))
    assert got["confusion_matrix"] == skm.multilabel_confusion_matrix(y, pred).tolist()


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
def test_class_absent_from_a_small_validation_set_does_not_break_auroc():
    logits, targets = multiclass_batch(2, n=40, num_classes=3)  # "pituitary" never occurs
    got = compute_metrics(logits, targets, CLASSES)
    y, probs = targets.numpy(), softmax(logits.numpy(), axis=1)
    pred = probs.argmax(axis=1)
    assert got["per_class"]["pituitary"]["auroc"] is None
    present_auroc = [skm.roc_auc_score(y == i, probs[:, i]) for i in range(3)]
    assert got["auroc"] == approx(np.mean(present_auroc))
    assert 3 in pred, "the absent class is predicted, so macro recall and balanced accuracy differ"
    assert got["balanced_accuracy"] == approx(skm.balanced_accuracy_score(y, pred))
    assert got["macro_recall"] == approx(skm.recall_score(y, pred, average="macro"))
    assert got["macro_f1"] == approx(skm.f1_score(y, pred, average="macro"))
    json.dumps(got, allow_nan=False)


def test_label_without_positives_is_left_out_of_map_and_auroc():
    logits, targets = multilabel_batch(3, n=30)
    targets[:, 2] = 0
    got = compute_metrics(logits, targets, CLASSES, multilabel=True)
    y, probs = targets.numpy(), expit(logits.numpy())
    kept = [0, 1, 3]
    assert got["per_class"]["notumor"]["auroc"] is None
    assert got["per_class"]["notumor"]["average_precision"] is None
    assert got["map"] == approx(skm.average_precision_score(y[:, kept], probs[:, kept], average="macro"))
    assert got["auroc"] == approx(skm.roc_auc_score(y[:, kept], probs[:, kept], average="macro"))
    json.dumps(got, allow_nan=False)


def test_batches_accumulate_and_compute_resets_between_epochs():
    metrics = ClassificationMetrics(CLASSES)
    # Epoch 1: perfect predictions, so any leak into epoch 2 would raise its scores.
    _, targets1 = multiclass_batch(4)
    metrics.update(torch.nn.functional.one_hot(targets1, 4).double() * 10, targets1)
    assert metrics.compute()["macro_f1"] == 1.0
    logits, targets = multiclass_batch(5)
    for start in range(0, 200, 64):
        metrics.update(logits[start : start + 64], targets[start : start + 64])
    epoch2 = metrics.compute()
    assert epoch2 == compute_metrics(logits, targets, CLASSES)
    assert epoch2["num_samples"] == 200 and epoch2["macro_f1"] < 0.5
    with pytest.raises(RuntimeError, match="no predictions"):
        metrics.compute()


def test_explicit_reset_discards_a_partial_epoch():
    metrics = ClassificationMetrics(CLASSES, multilabel=True)
    metrics.update(*multilabel_batch(6))
    metrics.reset()
    logits, targets = multilabel_batch(7)
    metrics.update(logits, targets)
    assert metrics.compute() == compute_metrics(logits, targets, CLASSES, multilabel=True)


def test_result_is_strict_json():
    result = compute_metrics(*multiclass_batch(8), CLASSES)
    assert json.loads(json.dumps(result, allow_nan=False)) == result


def test_shape_mismatches_name_the_classes():
    metrics = ClassificationMetrics(CLASSES)
    with pytest.raises(ValueError, match="glioma"):
        metrics.update(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets have shape"):
        metrics.update(torch.randn(4, 4), torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="only 0 and 1"):
        ClassificationMetrics(CLASSES, multilabel=True).update(torch.randn(2, 4), torch.full((2, 4), 2))


@pytest.mark.parametrize("multilabel", [False, True])
def test_recorded_predictions_are_what_the_metrics_scored_and_survive_their_file(multilabel, tmp_path):
    logits, targets = (multilabel_batch if multilabel else multiclass_batch)(9, n=50)
    metrics = ClassificationMetrics(CLASSES, multilabel)
    metrics.update(logits[:10], targets[:10])
    metrics.compute()  # outside a recording: nothing is kept
    with recording_predictions() as recorder:
        for start in range(0, 50, 16):
            metrics.update(logits[start : start + 16], targets[start : start + 16])
        scores = metrics.compute()
    kept = recorder.only()
    expected = expit(logits.numpy()) if multilabel else softmax(logits.numpy(), axis=1)
    np.testing.assert_allclose(kept.probabilities, expected, rtol=1e-5)
    np.testing.assert_array_equal(kept.targets, targets.numpy())
    decisions = (expected > 0.5).astype(int) if multilabel else expected.argmax(1)
    np.testing.assert_array_equal(kept.predicted, decisions)
    assert skm.f1_score(targets.numpy(), kept.predicted, average="macro") == approx(scores["macro_f1"])

    keys = [f"img{i}.png" for i in range(50)]
    for name in (PREDICTIONS, PLAIN_PREDICTIONS):  # what cass writes, and what runs before compression wrote
        save_predictions(tmp_path / name, keys, kept)
        read_keys, read = load_predictions(tmp_path / name)
        assert read_keys == keys and read.classes == CLASSES and read.multilabel == multilabel
        np.testing.assert_array_equal(read.targets, kept.targets)
        np.testing.assert_array_equal(read.predicted, kept.predicted)
        np.testing.assert_allclose(read.probabilities, kept.probabilities, rtol=1e-7)
    assert gzip.decompress((tmp_path / PREDICTIONS).read_bytes()) == (tmp_path / PLAIN_PREDICTIONS).read_bytes()
    with pytest.raises(ValueError, match="49 image keys for 50"):
        save_predictions(tmp_path / "short.csv", keys[1:], kept)


def test_a_recording_holds_one_scoring_or_says_so():
    metrics = ClassificationMetrics(CLASSES)
    with recording_predictions() as recorder:
        for seed in (10, 11):
            metrics.update(*multiclass_batch(seed, n=8))
            metrics.compute()
    assert len(recorder.seen) == 2 and [len(p) for p in recorder.seen] == [8, 8]
    with pytest.raises(RuntimeError, match="one scoring, got 2"):
        recorder.only()


def test_a_cells_predictions_file_is_the_compressed_one_unless_an_older_run_left_only_a_plain_csv(tmp_path):
    assert predictions_file(tmp_path) == tmp_path / PREDICTIONS  # nothing yet: where a new cell writes
    (tmp_path / PLAIN_PREDICTIONS).write_text("file,target,pred\n")
    assert predictions_file(tmp_path) == tmp_path / PLAIN_PREDICTIONS
    (tmp_path / PREDICTIONS).write_bytes(gzip.compress(b"file,target,pred\n"))
    assert predictions_file(tmp_path) == tmp_path / PREDICTIONS


def test_the_best_constant_prediction_is_the_most_frequent_class_or_every_label_on():
    targets = np.array([0] * 7 + [1] * 2 + [2])  # predicting 0 everywhere: F1 2*0.7/1.7 for class 0, 0 for 1, 2
    assert constant_prediction_macro_f1(targets, 3, multilabel=False) == approx(2 * 0.7 / 1.7 / 3)
    assert constant_prediction_macro_f1(targets, 3, False) == approx(skm.f1_score(targets, np.zeros(10), average="macro"))
    labels = np.array([[1, 0], [1, 0], [0, 1], [1, 0]])  # every label on: F1 2*0.75/1.75 and 2*0.25/1.25
    assert constant_prediction_macro_f1(labels, 2, multilabel=True) == approx((1.5 / 1.75 + 0.5 / 1.25) / 2)
