"""Pretraining on several sources at once (issue 20): each source's selection and test images (whole groups)
stay out, sources of any size and channel count become one input, balanced sampling, and the CLI, YAML
and Python describe the same sources."""

from __future__ import annotations

import collections
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CNN, TINY_VIT
from PIL import Image
from typer.testing import CliRunner

import cass.training.pretrain as engine
from cass.cli.main import app
from cass.config import CassVicregConfig, ConfigError, DataConfig, PretrainConfig, load_yaml, save_yaml, to_dict
from cass.data.loaders import BalancedSampler, balanced_indices
from cass.data.sources import DataError
from cass.methods.registry import create_method
from cass.training.fabric import make_fabric
from cass.training.pretrain_data import build_train_data


@pytest.fixture(scope="module")
def sources(shared_data, tmp_path_factory) -> list[DataConfig]:
    """Four real sources unlike each other: greyscale brain MRI at 64 px with a groups file (pairs of images
    share a patient), RGB blood cells at 64 px, BreastMNIST at 28 px with its own val and test splits (40 of its
    train images), and an unlabelled folder of blood-cell files of several sizes in L, RGB and RGBA."""
    root = tmp_path_factory.mktemp("sources")
    groups = root / "brain_groups.csv"
    with open(groups, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "patient"])
        writer.writerows([f"images[{i}]", f"p{i // 2}"] for i in range(64))
    folder = root / "unlabelled"
    folder.mkdir()
    blood = np.load(shared_data / "mini-cpu" / "blood_pbc_mini_64.npz")["images"]
    for i, image in enumerate(blood[:18]):
        size, mode = (40, 64, 100)[i % 3], ("L", "RGB", "RGBA")[i % 3]
        Image.fromarray(image).convert(mode).resize((size, size + i % 2)).save(folder / f"cell{i:02d}.png")
    mini = shared_data / "mini-cpu"
    return [
        DataConfig(data=str(mini / "brain_mri_mini_64.npz"), groups=str(groups), group_column="patient", num_workers=0),
        DataConfig(data=str(mini / "blood_pbc_mini_64.npz"), num_workers=0),
        DataConfig(data=str(shared_data / "medmnist-small" / "breastmnist.npz"), train_images=40, num_workers=0),
        DataConfig(data=str(folder), num_workers=0),
    ]


def pool_cfg(sources: list[DataConfig], out: Path, **kw) -> PretrainConfig:
    values = dict(method="cass-vicreg", data=sources[0], more_data=sources[1:], cnn=TINY_CNN, vit=TINY_VIT,
                  img_size=32, batch_size=16, epochs=1, accelerator="cpu", out=str(out), diagnostics_samples=32,
                  cass_vicreg=CassVicregConfig(proj_hidden_dim=64, proj_dim=32))
    values.update(kw)
    return PretrainConfig(**values)


def epoch_keys(data, epoch: int = 0) -> list[str]:
    """The names of the images one epoch of the pretraining loader reads, in order."""
    data.loader.sampler.set_epoch(epoch)
    return [data.dataset.images.keys[i] for i in data.loader.sampler]


@pytest.mark.parametrize("path", ["cache", "pil"])
def test_no_selection_or_test_image_of_any_source_reaches_pretraining(sources, tmp_path, path):
    cfg = pool_cfg([DataConfig(**{**to_dict(s), "path": path}) for s in sources], tmp_path / "run")
    data = build_train_data(cfg, create_method(cfg), make_fabric(None, "cpu", "auto"))
    assert data.path == path and len(data.sources) == 4
    read = set(epoch_keys(data))
    assert read and read <= set(data.dataset.images.keys)
    for source in data.sources:
        held = [images for images in (source.roles.selection, source.roles.test) if images is not None]
        assert not read & {key for images in held for key in images.keys}
        assert set(source.images.keys) <= set(source.roles.train.keys)
    brain = data.sources[0].roles
    assert {"test", "val"} == set(brain.carved)
    patients = {g for images in (brain.selection, brain.test) for g in images.groups}
    trained = {g for key, g in zip(brain.train.keys, brain.train.groups, strict=True) if key in read}
    assert patients and trained and not patients & trained  # whole patients kept out
    breast = data.sources[2]
    assert not breast.roles.carved and len(breast.images) == 40  # its own val/test; train_images honoured
    assert len(data.sources[3].images) == 18 and data.sources[3].roles.test is None  # unlabelled: nothing carved
    # every source, whatever its size and channels, comes to the network as the same 3 x 32 x 32 input
    views, _, index = next(iter(data.loader))
    batch = data.augment(views)
    assert batch.shape == (16, 3, 32, 32) and batch.is_floating_point()
    # one source reads exactly what it reads alone (same images, same order)
    alone = pool_cfg([DataConfig(**{**to_dict(sources[1]), "path": path})], tmp_path / "alone")
    single = build_train_data(alone, create_method(alone), make_fabric(None, "cpu", "auto"))
    assert single.dataset.images.keys == data.sources[1].images.keys


def test_balanced_sources_are_drawn_equally_in_a_fixed_order():
    sizes = [5, 40, 12]
    draws = balanced_indices(sizes, torch.Generator().manual_seed(3))
    assert len(draws) == 57 and sorted(draws) != list(range(57))
    per_source = collections.Counter(np.searchsorted(np.cumsum(sizes), draws, side="right"))
    assert sorted(per_source.values()) == [19, 19, 19]
    small = collections.Counter(i for i in draws if i < 5)
    assert max(small.values()) - min(small.values()) <= 1  # a small source's images come back evenly

    class Pool:
        def __len__(self) -> int:
            return 57

    def ranks(world: int, epoch: int) -> list[list[int]]:
        samplers = [BalancedSampler(Pool(), sizes, world, rank, seed=7) for rank in range(world)]
        for sampler in samplers:
            sampler.set_epoch(epoch)
        return [list(sampler) for sampler in samplers]

    (one,), (even, odd) = ranks(1, 2), ranks(2, 2)
    assert one == ranks(1, 2)[0] != ranks(1, 3)[0]  # (seed, epoch) alone fix the order
    assert [i for pair in zip(even, odd, strict=True) for i in pair] == one[:56]  # DDP: the same images


def test_balance_sources_draws_each_source_equally_per_epoch(sources, tmp_path):
    cfg = pool_cfg(sources[1:3], tmp_path / "run", balance_sources=True, data=DataConfig(**{
        **to_dict(sources[1]), "train_images": 12}))  # 12 blood-cell images against 40 BreastMNIST images
    data = build_train_data(cfg, create_method(cfg), make_fabric(None, "cpu", "auto"))
    blood, breast = (len(source.images) for source in data.sources)
    assert blood < breast == 40
    for epoch in (0, 1):
        counts = collections.Counter("blood" in key for key in epoch_keys(data, epoch))
        assert sorted(counts.values()) == [(blood + breast) // 2, (blood + breast + 1) // 2]
        assert counts[True] > blood  # the smaller source's images come back within the epoch


def test_a_bad_second_source_is_named(sources, tmp_path):
    broken = [sources[0], DataConfig(data=str(tmp_path / "missing.zip"))]
    with pytest.raises(DataError, match=r"pretraining source 2 of 2 \(more_data\[0\]: .*missing\.zip\)"):
        build_train_data(pool_cfg(broken, tmp_path / "a"), None, make_fabric(None, "cpu", "auto"))
    with pytest.raises(ConfigError, match=r"more_data\[0\]\.data: name the images"):
        build_train_data(pool_cfg([sources[0], DataConfig()], tmp_path / "b"), None, None)
    with pytest.raises(ConfigError, match=r"more_data\[1\]\.data: .* is already pretraining source 1"):
        build_train_data(pool_cfg([sources[0], sources[1], sources[0]], tmp_path / "c"), None, None)
    with pytest.raises(ConfigError, match=r"more_data\[0\]\.test_fraction: must be in \(0, 1\)"):
        load_yaml(PretrainConfig, _yaml(tmp_path, "more_data:\n  - {data: x.zip, test_fraction: 1.5}\n"))


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pretrain.yaml"
    path.write_text(text)
    return path


def test_cli_repeated_data_yaml_list_and_python_give_the_same_sources(sources, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(engine, "pretrain", lambda cfg, resume=False: seen.append(cfg) or Path(cfg.out))
    paths = [s.data for s in sources[1:3]]
    args = ["pretrain", "--data", paths[0], "--data", paths[1], "--train-images", "40", "--num-workers", "0",
            "--balance-sources"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    yaml = _yaml(tmp_path, f"balance_sources: true\ndata: {{data: {paths[0]}, train_images: 40, num_workers: 0}}\n"
                           f"more_data:\n  - {{data: {paths[1]}, train_images: 40, num_workers: 0}}\n")
    python = PretrainConfig(data=DataConfig(data=paths[0], train_images=40, num_workers=0), balance_sources=True,
                            more_data=[DataConfig(data=paths[1], train_images=40, num_workers=0)])
    assert seen[0].sources() == load_yaml(PretrainConfig, yaml).sources() == python.sources()
    assert seen[0] == load_yaml(PretrainConfig, yaml) == python
    # a config's sources are replaced by the typed ones; one typed --data is one source
    result = CliRunner().invoke(app, ["pretrain", "--config", str(yaml), "--data", paths[1]])
    assert result.exit_code == 0, result.output
    assert [s.data for s in seen[1].sources()] == [paths[1]] and seen[1].data.train_images == 40
    # a file of one source cannot be shared between several
    result = CliRunner().invoke(app, ["pretrain", "--data", paths[0], "--data", paths[1], "--groups", "g.csv"])
    assert result.exit_code == 2 and "--groups names one source's file" in result.output


def test_pooled_run_records_its_sources_and_never_sees_held_out_images(sources, tmp_path, capsys):
    run = engine.pretrain(pool_cfg(sources, tmp_path / "run"))
    record = json.loads((run / "sources.json").read_text())
    assert [s["data"] for s in record["sources"]] == [s.data for s in sources]
    assert [s["pretraining_images"] for s in record["sources"]] == [48, 48, 40, 18]
    assert record["pretraining_images"] == 154 and not record["balance_sources"]
    assert [s["test_images_kept_out"] for s in record["sources"]] == [8, 8, 156, 0]
    assert all(len(s["fingerprint"]) == 32 for s in record["sources"])
    with open(run / "held_out.csv", newline="") as fh:
        held = list(csv.DictReader(fh))
    assert {row["file"].split(":")[0] for row in held} == {sources[0].data, sources[1].data}  # carved sources
    assert {row["split"] for row in held} == {"test", "val"}
    output = capsys.readouterr().out
    assert "pretraining on 154 images from 4 source(s)" in output and "fingerprint" in output
    saved = load_yaml(PretrainConfig, run / "config.yaml")
    assert saved.sources() == [DataConfig(**to_dict(s)) for s in sources]
    save_yaml(saved, tmp_path / "again.yaml")  # the run's config rebuilds the same pool
    assert load_yaml(PretrainConfig, tmp_path / "again.yaml") == saved
