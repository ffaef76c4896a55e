"""Shared fixtures: the real data under ../shared/data and tiny network names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CASS_SHARED_DATA", REPO.parent / "shared" / "data"))
TINY_CNN = "resnet18"
TINY_VIT = "vit_tiny_patch16_224"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets of the project; tests fail (not skip) when they are missing."""
    assert (SHARED_DATA / "mini-cpu").is_dir(), f"real test data not found at {SHARED_DATA} (set CASS_SHARED_DATA)"
    return SHARED_DATA


@pytest.fixture(scope="module")
def brain_folder(shared_data, tmp_path_factory) -> Path:
    """The 64-image mini brain MRI set as class folders: ``train/`` (48 images) and ``val/`` (16), no
    ``test/`` (so fine-tuning carves one from train)."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("brain")
    data = np.load(shared_data / "mini-cpu" / "brain_mri_mini_64.npz")
    for i, (image, label) in enumerate(zip(data["images"], data["labels"])):
        folder = root / ("val" if i % 4 == 0 else "train") / str(data["classes"][label])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"img{i:03d}.png")
    return root


@pytest.fixture(scope="session", autouse=True)
def _image_cache_dir(tmp_path_factory) -> None:
    """Decoded-image caches of the test runs go to a temporary folder, not the user's ~/.cache/cass."""
    os.environ.setdefault("CASS_CACHE_DIR", str(tmp_path_factory.mktemp("cass-cache")))


def pytest_configure(config) -> None:
    """Under pytest-xdist, one compute thread per worker: ``make test`` runs 2 workers on 2 cores, and two
    workers of two threads each oversubscribe the cores (and the subprocesses they start inherit this)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
