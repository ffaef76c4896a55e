"""Label-fraction subsets: stratified, nested, never missing a class, fixed by the seed."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cass.data.subsets import label_fraction_indices, save_subset

FRACTIONS = (0.01, 0.1, 0.25, 1.0)


@pytest.fixture(scope="module")
def breast_labels(shared_data) -> np.ndarray:
    """BreastMNIST train labels: 147 malignant vs 399 benign, an imbalanced real split."""
    return np.load(shared_data / "medmnist-small" / "breastmnist.npz")["train_labels"].astype(np.int64)


@pytest.fixture(scope="module")
def brain_labels(shared_data) -> np.ndarray:
    """64 Brain MRI labels, 16 per class: 1 % of a class rounds to zero images."""
    return np.load(shared_data / "mini-cpu" / "brain_mri_mini_64.npz")["labels"]


@pytest.fixture(params=["breast_labels", "brain_labels"])
def real_labels(request) -> np.ndarray:
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_every_class_keeps_its_share_within_rounding(real_labels, fraction):
    kept = label_fraction_indices(real_labels, fraction, seed=0)
    for cls in np.unique(real_labels):
        available = int(np.sum(real_labels == cls))
        got = int(np.sum(real_labels[kept] == cls))
        assert got >= 1
        assert got == 1 or abs(got - fraction * available) <= 0.5, (cls, got, available)


def test_one_percent_keeps_one_image_per_class_when_the_share_rounds_to_zero(brain_labels):
    kept = label_fraction_indices(brain_labels, 0.01, seed=3)
    assert sorted(brain_labels[kept].tolist()) == [0, 1, 2, 3]


def test_imbalanced_split_rounds_each_class_separately(breast_labels):
    kept = label_fraction_indices(breast_labels, 0.01, seed=0)
    assert np.bincount(breast_labels[kept]).tolist() == [1, 4]  # 1.47 -> 1, 3.99 -> 4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_subsets_are_nested_and_full_fraction_is_everything(real_labels, seed):
    subsets = [set(label_fraction_indices(real_labels, f, seed).tolist()) for f in FRACTIONS]
    for small, large in zip(subsets, subsets[1:]):
        assert small < large
    assert subsets[-1] == set(range(len(real_labels)))


def test_same_seed_same_files_other_seed_other_files(breast_labels):
    first = label_fraction_indices(breast_labels, 0.1, seed=7)
    again = label_fraction_indices(breast_labels.copy(), 0.1, seed=7)
    other = label_fraction_indices(breast_labels, 0.1, seed=8)
    np.testing.assert_array_equal(first, again)
    assert set(first.tolist()) != set(other.tolist())
    assert np.all(np.diff(first) > 0), "indices are sorted and unique"


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, 10, float("nan")])
def test_fraction_outside_unit_interval_is_refused(breast_labels, fraction):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        label_fraction_indices(breast_labels, fraction, seed=0)


def test_float_class_targets_are_refused():
    with pytest.raises(ValueError, match="integer class indices"):
        label_fraction_indices(np.array([0.0, 1.0, 1.0]), 0.5, seed=0)


@settings(max_examples=60, deadline=None)
@given(
    labels=arrays(np.int64, st.integers(1, 60), elements=st.integers(0, 5)),
    fractions=st.lists(st.floats(0.001, 1.0), min_size=2, max_size=2).map(sorted),
    seed=st.integers(0, 2**31 - 1),
)
def test_multiclass_properties_hold_for_any_labels(labels, fractions, seed):
    small, large = (set(label_fraction_indices(labels, f, seed).tolist()) for f in fractions)
    assert small <= large
    assert set(labels[sorted(small)].tolist()) == set(labels.tolist())


@settings(max_examples=60, deadline=None)
@given(
    labels=arrays(np.int64, st.tuples(st.integers(1, 40), st.integers(1, 5)), elements=st.integers(0, 1)),
    fractions=st.lists(st.floats(0.001, 1.0), min_size=2, max_size=2).map(sorted),
    seed=st.integers(0, 2**31 - 1),
)
def test_multilabel_subsets_are_nested_and_keep_every_label(labels, fractions, seed):
    small, large = (label_fraction_indices(labels, f, seed) for f in fractions)
    assert set(small.tolist()) <= set(large.tolist())
    np.testing.assert_array_equal(labels[small].any(axis=0), labels.any(axis=0))
    np.testing.assert_array_equal(label_fraction_indices(labels, 1.0, seed), np.arange(len(labels)))


def test_multilabel_label_hidden_behind_a_rarer_one_is_kept():
    # Label 2 is on images 0 and 1 only, which are stratified under labels 0 and 1 (equal counts:
    # the lower label wins), so no stratum is label 2's. At 10 % each two-image stratum keeps one
    # image, often images 5 and 6, which lack label 2: the subset must still contain it.
    labels = np.zeros((50, 3), dtype=np.int64)
    labels[[0, 5], 0] = 1
    labels[[1, 6], 1] = 1
    labels[[0, 1], 2] = 1
    for seed in range(20):
        kept = label_fraction_indices(labels, 0.1, seed)
        assert labels[kept].any(axis=0).all(), seed
        assert set(kept.tolist()) <= set(label_fraction_indices(labels, 0.5, seed).tolist())


def test_multilabel_stratifies_by_rarest_label(brain_labels):
    # Real labels as a one-hot matrix plus an "abnormal" label on every tumour image: each image's
    # rarest label is its tumour class, so the proportions must match the multi-class subset's.
    onehot = np.eye(4, dtype=np.int64)[brain_labels]
    abnormal = (brain_labels != 2).astype(np.int64)[:, None]
    kept = label_fraction_indices(np.hstack([onehot, abnormal]), 0.25, seed=0)
    assert np.bincount(brain_labels[kept], minlength=4).tolist() == [4, 4, 4, 4]


def test_saved_subset_lists_the_files_used(tmp_path, brain_labels):
    keys = [f"train/class{label}/img{i:03d}.png" for i, label in enumerate(brain_labels)]
    kept = label_fraction_indices(brain_labels, 0.1, seed=0)
    path = tmp_path / "run" / "subset.csv"
    save_subset(path, keys, kept)
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["index"]) for r in rows] == kept.tolist()
    assert [r["file"] for r in rows] == [keys[i] for i in kept]
    assert [p.name for p in path.parent.iterdir()] == ["subset.csv"], "no temporary file left behind"


def test_saving_indices_outside_the_split_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="subset.csv"):
        save_subset(tmp_path / "subset.csv", ["a.png", "b.png"], np.array([0, 2]))
