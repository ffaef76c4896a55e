"""Train, selection and test never mix (SPEC §2): no test image is trained on, selected on or pretrained on;
and a 1 % cell gets its minimum number of optimiser steps."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CNN, TINY_VIT

from cass.config import DataConfig, FinetuneConfig, PretrainConfig
from cass.data.sources import DataError
from cass.data.splits import HELD_OUT, held_out_indices, three_roles
from cass.training.finetune import finetune, labelled_batch_size, passes_per_evaluation
from cass.training.pretrain import pretrain

BRAIN_ZIP = "brain-tumor-mri-224/brain_tumor_mri_224_dev.zip"


def listed(path: Path, split: str) -> set[str]:
    return {row["file"] for row in csv.DictReader(open(path)) if row["split"] == split}


def test_carving_is_stratified_disjoint_and_fixed_by_the_split_seed(brain_folder):
    data = DataConfig(data=str(brain_folder))
    roles = three_roles(data)
    assert set(roles.test.keys).isdisjoint(roles.train.keys) and set(roles.test.keys).isdisjoint(roles.selection.keys)
    assert set(np.unique(roles.test.targets)) == set(range(4))  # every class is in the test split
    assert three_roles(data).test.keys == roles.test.keys  # same seed, same split
    other = three_roles(DataConfig(data=data.data, split_seed=1))
    assert other.test.keys != roles.test.keys and len(other.test) == len(roles.test)


def test_train_images_subsets_train_only_stratified_and_fixed(shared_data):
    data = DataConfig(data=str(shared_data / BRAIN_ZIP))
    full = three_roles(data)
    small = three_roles(DataConfig(data=data.data, train_images=400))
    assert abs(len(small.train) - 400) <= 4 and set(small.train.keys) <= set(full.train.keys)
    assert small.test.keys == full.test.keys and small.selection.keys == full.selection.keys
    share = np.bincount(small.train.targets) / len(small.train)
    np.testing.assert_allclose(share, np.bincount(full.train.targets) / len(full.train), atol=0.01)
    assert three_roles(DataConfig(data=data.data, train_images=400)).train.keys == small.train.keys


def test_a_class_too_small_to_split_is_named():
    targets = np.array([0, 0, 0, 1, 2, 2])
    with pytest.raises(DataError, match="class 'b' has 1 image"):
        held_out_indices(targets, 0.2, 0, ["a", "b", "c"], "scans/")


@pytest.mark.slow
def test_no_test_image_is_pretrained_trained_or_selected_on(brain_folder, tmp_path):
    data = DataConfig(data=str(brain_folder), num_workers=0)
    run = pretrain(PretrainConfig(data=data, cnn=TINY_CNN, vit=TINY_VIT, img_size=32, batch_size=8, epochs=1,
                                  out=str(tmp_path / "pre"), accelerator="cpu"))
    test_images = listed(run / HELD_OUT, "test")
    assert test_images  # the pretraining run lists what it never saw
    seen: list[str] = []
    import cass.training.pretrain_data as pretrain_data

    real = pretrain_data.ImageDataset

    class Recording(real):  # every image the pretraining loader is built over
        def __init__(self, images, *args, **kwargs):
            seen.extend(images.keys)
            super().__init__(images, *args, **kwargs)

    pretrain_data.ImageDataset = Recording
    try:
        pretrain(PretrainConfig(data=data, cnn=TINY_CNN, vit=TINY_VIT, img_size=32, batch_size=8, epochs=1,
                                out=str(tmp_path / "pre2"), accelerator="cpu"))
    finally:
        pretrain_data.ImageDataset = real
    roles = three_roles(data)
    assert sorted(seen) == sorted(roles.train.keys)  # exactly the train images left after carving
    assert set(seen).isdisjoint(test_images) and set(seen).isdisjoint(roles.selection.keys)

    model = finetune(FinetuneConfig(data=data, source=str(run), arch="cnn", img_size=32, epochs=2, min_steps=0,
                                    batch_size=8, out=str(tmp_path / "ft"), accelerator="cpu"))
    assert listed(model / HELD_OUT, "test") == test_images  # pretraining and fine-tuning agree on the split
    trained = {row["file"] for row in csv.DictReader(open(model / "subset.csv"))}
    assert trained.isdisjoint(test_images)
    metrics = json.loads((model / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["num_samples"] == len(test_images)
    assert metrics["selection"]["num_samples"] == 16  # selection used the val/ folder, not the test split


def test_step_budget_helpers():
    assert labelled_batch_size(64, 52) == 13  # never one step per pass
    assert labelled_batch_size(64, 4) == 2 and labelled_batch_size(16, 5000) == 16
    assert passes_per_evaluation(epochs=4, min_steps=200, steps_per_pass=4) == 13  # 4 x 13 x 4 = 208 >= 200
    assert passes_per_evaluation(epochs=50, min_steps=200, steps_per_pass=100) == 1


@pytest.mark.slow
def test_a_one_percent_cell_on_the_brain_set_gets_its_minimum_steps(shared_data, tmp_path):
    cfg = FinetuneConfig(data=DataConfig(data=str(shared_data / BRAIN_ZIP), num_workers=0), cnn=TINY_CNN,
                         img_size=32, label_fraction=0.01, epochs=2, min_steps=40, batch_size=64,
                         out=str(tmp_path / "ft"), accelerator="cpu")
    model = finetune(cfg)
    labelled = sum(1 for _ in csv.DictReader(open(model / "subset.csv")))
    history = list(csv.DictReader(open(model / "history.csv")))
    assert labelled < 64  # the 1 % subset is smaller than the batch size
    assert int(history[-1]["step"]) >= 40 and len(history) == 2
    assert int(history[0]["step"]) >= 4 * 1  # several steps per pass, not one
