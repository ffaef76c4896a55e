"""Train, selection and test: the three roles of SPEC §2, never mixed.

* **train**: labelled fractions are drawn from it, and pretraining sees its images (without labels);
* **selection** (the data's ``val`` split): early stopping, the best epoch, probe settings;
* **test**: the only split reported; nothing is trained, selected or pretrained on it.

Data with its own ``test`` (and ``val``) split uses it. Data without one gets the missing split carved
from ``train``: a stratified fraction of every class, fixed by ``data.split_seed`` (the same for every
run of an experiment, whatever the run's own seed), so pretraining and every cell agree on the roles.
The carved images are listed in ``held_out.csv`` of every run directory that carved them.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path

import numpy as np

from cass.config import DataConfig
from cass.data.dataset import ImageSet
from cass.data.sources import DataError, Splits, load_splits
from cass.evaluation.subsets import (
    _strata,
    _validated,
    label_fraction_indices,
    subset_size,
)
from cass.utils.atomic import atomic_write_text

HELD_OUT = "held_out.csv"


@dataclasses.dataclass
class Roles:
    """The images of each role, and which of them were carved out of ``train`` (split name -> files)."""

    train: ImageSet
    selection: ImageSet | None
    test: ImageSet | None
    carved: dict[str, list[str]]

    def save_held_out(self, directory: Path) -> None:
        """List the carved images (``split,file``) in ``directory``: what this run never trained on."""
        if not self.carved:
            return
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["split", "file"])
        writer.writerows((split, key) for split, keys in self.carved.items() for key in keys)
        atomic_write_text(Path(directory) / HELD_OUT, buffer.getvalue())


def held_out_indices(targets: np.ndarray, fraction: float, seed: int, class_names: list[str],
                     source: str) -> np.ndarray:
    """Sorted indices of a stratified ``fraction`` of every class (at least one image each), fixed by ``seed``.

    A class with fewer than two images cannot give one away and keep one: a DataError names it.
    """
    strata = _strata(_validated(targets))
    rng = np.random.default_rng(seed)
    chosen = []
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        if len(members) < 2:
            name = class_names[stratum] if 0 <= stratum < len(class_names) else "(no positive label)"
            raise DataError(f"{source}: class {name!r} has {len(members)} image(s); at least 2 are needed to carve "
                            "a test/selection split from train (give the data its own test/ and val/ splits)")
        count = min(len(members) - 1, subset_size(len(members), fraction))
        chosen.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(chosen))


def _carve(train: ImageSet, fraction: float, seed: int, split: str) -> tuple[ImageSet, ImageSet]:
    held = held_out_indices(train.targets, fraction, seed, train.classes, str(train.source))
    kept = np.setdiff1d(np.arange(len(train)), held)
    carved = dataclasses.replace(train.subset(held), source=f"{train.source} ({split}, carved from train)")
    return train.subset(kept), carved


def three_roles(data: DataConfig) -> Roles:
    """The train, selection and test images of ``data``, carving from a labelled ``train`` what is missing.

    Unlabelled data (pretraining on a plain folder) has nothing to score, so nothing is carved from it.
    """
    splits: Splits = load_splits(data.data, data.val_data, max_pixels=data.max_image_pixels)
    train, val, test = splits.train, splits.val, splits.test
    carved: dict[str, list[str]] = {}
    if train.targets is None:
        return Roles(_limited(train, data), val, test, carved)
    if test is None:
        train, test = _carve(train, data.test_fraction, data.split_seed, "test")
        carved["test"] = list(test.keys)
    if val is None:
        train, val = _carve(train, data.val_fraction, data.split_seed + 1, "val")
        carved["val"] = list(val.keys)
    return Roles(_limited(train, data), val, test, carved)


def _limited(train: ImageSet, data: DataConfig) -> ImageSet:
    """At most ``data.train_images`` of ``train``: stratified when labelled, fixed by ``split_seed``."""
    if data.train_images is None or data.train_images >= len(train):
        return train
    seed = data.split_seed + 2
    if train.targets is None:
        kept = np.sort(np.random.default_rng(seed).permutation(len(train))[: data.train_images])
    else:
        kept = label_fraction_indices(train.targets, data.train_images / len(train), seed)
    return dataclasses.replace(train.subset(kept), source=f"{train.source} ({len(kept)} of {len(train)} images)")
