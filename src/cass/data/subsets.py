"""Label-fraction subsets of a train split: the few labelled images a fine-tuning run may use.

Results at 1 %, 10 % and 100 % labels are comparable only if the smaller subset lies inside the
larger one (otherwise "more labels" is confounded with "other labels"), and a 1 % run on an
imbalanced set must not lose a class entirely (its F1 would be meaningless). Both hold by
construction here: every stratum is shuffled once per seed, the shuffle does not depend on the
fraction, and a fraction keeps a prefix of at least one image of every shuffled stratum.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cass.utils.atomic import atomic_write_text

NO_POSITIVE_LABEL = -1
"""Stratum of multi-label images with no positive label (e.g. "healthy")."""


def check_fraction(fraction: float) -> None:
    """Refuse fractions outside (0, 1]; a common slip is passing 10 for 10 %."""
    if not 0 < fraction <= 1:  # also refuses NaN
        raise ValueError(f"label fraction must be in (0, 1] (0.01 means 1 %), got {fraction!r}")


def subset_size(stratum_size: int, fraction: float) -> int:
    """Images kept from one stratum: the fraction rounded half up, never fewer than one.

    Monotone in ``fraction``, which is what keeps subsets nested.
    """
    return min(stratum_size, max(1, math.floor(fraction * stratum_size + 0.5)))


def _validated(targets: np.ndarray) -> np.ndarray:
    labels = np.asarray(targets)
    if labels.size == 0 or labels.ndim not in (1, 2):
        raise ValueError(
            "targets must be a non-empty array of class indices (N,) or of 0/1 labels (N, C), "
            f"got shape {labels.shape}"
        )
    if labels.ndim == 1 and labels.dtype.kind not in "iu":
        raise ValueError(f"multi-class targets must be integer class indices, got dtype {labels.dtype}")
    if labels.ndim == 2 and not np.isin(labels, (0, 1)).all():
        raise ValueError("multi-label targets must contain only 0 and 1")
    return labels


def _strata(labels: np.ndarray) -> np.ndarray:
    """The stratum of each image: its class, or for multi-label its rarest positive label.

    Stratifying multi-label images by their rarest label is what keeps rare labels represented in
    proportion; frequent labels then follow along with the images that carry them.
    """
    if labels.ndim == 1:
        return labels
    positives = labels.sum(axis=0)
    rarity = np.where(labels > 0, positives[None, :], np.inf)
    return np.where(labels.any(axis=1), rarity.argmin(axis=1), NO_POSITIVE_LABEL)


def _label_cover(labels: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """For each label, its positive image that comes first in its stratum's shuffle.

    Rank-0 images are kept at every fraction, so most labels cost nothing extra; the choice
    depends on the seed only, never on the fraction.
    """
    return np.array(
        [positives[np.argmin(rank[positives])] for positives in map(np.flatnonzero, labels.T) if positives.size],
        dtype=np.int64,
    )


def label_fraction_indices(targets: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the train images kept at ``fraction`` of the labels.

    ``targets`` are class indices (N,) or, for multi-label data, a 0/1 matrix (N, C). For one seed,
    the subsets of increasing fractions are nested and 1.0 returns every image. Multi-label
    subsets stratify by the rarest positive label of each image (images without a positive label
    form their own stratum), and add, for every label a stratum prefix might miss, its positive
    image ranked first in its own stratum: at most C images, the same for every fraction, so
    every label present in the split stays present and the subsets stay nested.
    """
    check_fraction(fraction)
    labels = _validated(targets)
    strata = _strata(labels)
    rng = np.random.default_rng(seed)
    rank = np.empty(len(strata), dtype=np.int64)
    kept = []
    for stratum in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == stratum))
        rank[members] = np.arange(len(members))
        kept.append(members[: subset_size(len(members), fraction)])
    if labels.ndim == 2:
        kept.append(_label_cover(labels, rank))
    return np.unique(np.concatenate(kept))


def save_subset(path: str | Path, keys: Sequence[str], indices: np.ndarray) -> None:
    """Write the files of a subset as a CSV (``index,file``), atomically, into a run directory.

    ``keys`` names every image of the train split (usually its path); ``indices`` select from it.
    The file is what makes a fine-tuning run auditable: it lists exactly which labels were seen.
    """
    path = Path(path)
    chosen = np.asarray(indices)
    if chosen.size and (chosen.min() < 0 or chosen.max() >= len(keys)):
        raise ValueError(f"{path}: subset indices must lie in [0, {len(keys)}), got {chosen.min()}..{chosen.max()}")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["index", "file"])
    writer.writerows((int(i), keys[int(i)]) for i in chosen)
    atomic_write_text(path, buffer.getvalue())
