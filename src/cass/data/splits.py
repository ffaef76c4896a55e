"""Train, selection and test: the three roles of SPEC §2, never mixed.

* **train**: labelled fractions are drawn from it, and pretraining sees its images (without labels);
* **selection** (the data's ``val`` split): early stopping, the best epoch, probe settings;
* **test**: the only split reported; nothing is trained, selected or pretrained on it.

Data with its own ``test`` (and ``val``) split uses it. Data without one gets the missing split carved
from ``train``: a stratified fraction of every class, fixed by ``data.split_seed`` (the same for every
run of an experiment, whatever the run's own seed), so pretraining and every cell agree on the roles.
The carved images are listed in ``held_out.csv`` of every run directory that carved them.

Every split carved here takes whole groups (a patient's slices, near-duplicate files:
:mod:`cass.data.groups`), so no group is in two roles; data whose own splits share a group is refused.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cass.config import DataConfig
from cass.data.dataset import ImageSet
from cass.data.groups import check_group_overlap, with_groups_file
from cass.data.sources import DataError, Splits, load_splits
from cass.data.subsets import (
    _strata,
    _validated,
    subset_size,
)
from cass.utils.atomic import atomic_write_text

HELD_OUT = "held_out.csv"


@dataclasses.dataclass
class Roles:
    """The images of each role, and the splits carved out of ``train`` (split name -> images)."""

    train: ImageSet
    selection: ImageSet | None
    test: ImageSet | None
    carved: dict[str, ImageSet]

    def save_held_out(self, directory: Path) -> None:
        """List the carved images in ``directory``: what this run never trained on (:func:`save_held_out`)."""
        save_held_out(directory, [self])


def save_held_out(directory: Path, sources: Sequence[Roles]) -> None:
    """List the images carved from every source's train (``split,file,group``) in ``directory``'s
    ``held_out.csv``, the first source's first: what a run never trained on. Nothing is written when no
    source was carved. ``group`` is empty for an image without one (it was its own group).
    """
    if not any(roles.carved for roles in sources):
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["split", "file", "group"])
    for roles in sources:
        for split, images in roles.carved.items():
            writer.writerows(zip([split] * len(images), images.keys, images.groups or [None] * len(images)))
    atomic_write_text(Path(directory) / HELD_OUT, buffer.getvalue())


def _groups_by_stratum(strata: np.ndarray, codes: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """``(stratum, its groups)`` for every stratum that is the majority of a group, groups by ascending code.

    A group's stratum is the one most of its images have (ties: the lowest), so a group is never split
    to keep a class share exact. ``codes`` are ``0..G-1`` (:meth:`ImageSet.group_codes`).
    """
    values, index = np.unique(strata, return_inverse=True)
    (group, stratum), counts = np.unique(np.stack([codes, index.reshape(-1)]), axis=1, return_counts=True)
    order = np.lexsort((stratum, -counts, group))  # per group: the most frequent stratum first
    _, first = np.unique(group[order], return_index=True)
    majority = values[stratum[order][first]]
    return [(int(s), np.flatnonzero(majority == s)) for s in np.unique(majority)]


def _fill(groups: np.ndarray, sizes: np.ndarray, quota: int, rng: np.random.Generator) -> list[int]:
    """Whole groups, in an order shuffled by ``rng``, each taken while it still fits in ``quota`` images.

    Passing over a group that does not fit keeps the share near the quota when some groups are large
    (a 27-image cluster gives way to smaller ones); when none fits, the smallest is taken, so every
    stratum gives at least one group. Without groups this is a plain shuffled prefix of ``quota`` images.
    """
    order = rng.permutation(groups)
    taken, room = [], quota
    for group in order:
        if room == 0:
            break
        if sizes[group] <= room:
            taken.append(int(group))
            room -= int(sizes[group])
    return taken or [int(order[np.argmin(sizes[order])])]


def group_sample(strata: np.ndarray, codes: np.ndarray, fraction: float, seed: int,
                 leave_one: bool = False) -> np.ndarray:
    """Sorted indices of whole groups holding about ``fraction`` of every stratum's images, fixed by ``seed``.

    ``strata`` is each image's class (:func:`cass.data.subsets._strata`), ``codes`` its group
    (:meth:`ImageSet.group_codes`). ``leave_one`` caps a stratum's share at all its images but one, for a
    split carved out of train. Greedy filling rather than scikit-learn's ``StratifiedGroupKFold``: that
    gives folds of 1/K (not any fraction), no per-class minimum and, without groups, other images than
    the shuffled prefix that earlier runs carved (this keeps them: same seed, same images).
    """
    sizes = np.bincount(codes)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for _, groups in _groups_by_stratum(strata, codes):
        images = int(sizes[groups].sum())
        quota = subset_size(images, fraction)
        chosen += _fill(groups, sizes, min(quota, images - 1) if leave_one else quota, rng)
    return np.flatnonzero(np.isin(codes, chosen))


def held_out_indices(targets: np.ndarray, fraction: float, seed: int, class_names: list[str],
                     source: str, groups: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of whole groups holding a stratified ``fraction`` of every class, fixed by ``seed``.

    ``groups``: each image's group code (:meth:`ImageSet.group_codes`); None: every image its own group.
    Every class gives at least one group and keeps one: a class with fewer than two groups cannot, and a
    DataError names it.
    """
    strata = _strata(_validated(targets))
    codes = np.arange(len(strata)) if groups is None else np.asarray(groups)
    sizes = np.bincount(codes)
    for stratum, members in _groups_by_stratum(strata, codes):
        if len(members) < 2:
            name = class_names[stratum] if 0 <= stratum < len(class_names) else "(no positive label)"
            raise DataError(f"{source}: class {name!r} has {sizes[members].sum()} image(s) in {len(members)} "
                            "group(s); at least 2 groups are needed to carve a test/selection split from train "
                            "(give the data its own test/ and val/ splits)")
    return group_sample(strata, codes, fraction, seed, leave_one=True)


def _carve(train: ImageSet, fraction: float, seed: int, split: str) -> tuple[ImageSet, ImageSet]:
    held = held_out_indices(train.targets, fraction, seed, train.classes, str(train.source), train.group_codes())
    kept = np.setdiff1d(np.arange(len(train)), held)
    carved = dataclasses.replace(train.subset(held), source=f"{train.source} ({split}, carved from train)")
    return train.subset(kept), carved


def three_roles(data: DataConfig) -> Roles:
    """The train, selection and test images of ``data``, carving from a labelled ``train`` what is missing.

    Unlabelled data (pretraining on a plain folder) has nothing to score, so nothing is carved from it.
    Groups come from ``data.groups`` and the data itself; a group in two of the data's own splits is
    refused unless ``data.allow_group_overlap``.
    """
    splits: Splits = load_splits(data.data, data.val_data, max_pixels=data.max_image_pixels,
                                 group_column=data.group_column)
    if data.groups is not None:
        splits = with_groups_file(splits, data.groups, data.group_column)
    check_group_overlap(splits, data.allow_group_overlap)
    train, val, test = splits.train, splits.val, splits.test
    carved: dict[str, ImageSet] = {}
    if train.targets is None:
        return Roles(_limited(train, data), val, test, carved)
    if test is None:
        train, test = _carve(train, data.test_fraction, data.split_seed, "test")
        carved["test"] = test
    if val is None:
        train, val = _carve(train, data.val_fraction, data.split_seed + 1, "val")
        carved["val"] = val
    return Roles(_limited(train, data), val, test, carved)


def _limited(train: ImageSet, data: DataConfig) -> ImageSet:
    """About ``data.train_images`` of ``train`` in whole groups: stratified when labelled, fixed by ``split_seed``."""
    if data.train_images is None or data.train_images >= len(train):
        return train
    strata = np.zeros(len(train), dtype=np.int64) if train.targets is None else _strata(_validated(train.targets))
    kept = group_sample(strata, train.group_codes(), data.train_images / len(train), data.split_seed + 2)
    return dataclasses.replace(train.subset(kept), source=f"{train.source} ({len(kept)} of {len(train)} images)")
