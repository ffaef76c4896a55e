"""The pretraining images as batches, through the data path ``data.path`` chooses.

By default the images are decoded once into a memory-mapped uint8 cache and augmented in batches on
the device (:mod:`cass.data.cache`, :mod:`cass.data.device_augment`); otherwise per image with PIL in
DataLoader workers. The order of images depends only on (seed, epoch) and each image's augmentation on
(seed, epoch, index), so a resumed run, a run with more workers and a DDP run with the same global batch
all see the same data.

Several sources (``data``, then each of ``more_data``) are pretrained on together. Each source's roles are
found on its own (:func:`~cass.data.splits.three_roles`: its own splits, groups, fractions and
``train_images``) and only its train images are read, each source through its own cache (the one fine-tuning
on that source reuses); the readable images of all sources then form one set, in source order
(:func:`~cass.data.dataset.pooled`). Sources of any size and channel count come to the same input: every
image is decoded to 8-bit RGB and resized to the training size by the cache or by the transform.
``balance_sources`` draws each source equally often per epoch (:class:`~cass.data.loaders.BalancedSampler`).
One source reads, orders and augments exactly as before sources could be pooled.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from torch.utils.data import DataLoader, DistributedSampler

from cass.config import ConfigError, DataConfig, PretrainConfig
from cass.data.cache import CacheError, images_fingerprint, open_cache, wants_cache
from cass.data.dataset import ImageDataset, ImageSet, pooled
from cass.data.device_augment import DeviceAugment, UnsupportedAugmentation
from cass.data.images import BadImageError
from cass.data.loaders import BalancedSampler, resolve_workers
from cass.data.sources import DataError, sample_path
from cass.data.splits import Roles, save_held_out, three_roles
from cass.methods.base import PretrainMethod
from cass.utils.atomic import atomic_write_text
from cass.utils.rundir import SOURCES

log = logging.getLogger(__name__)


def make_loader(dataset: ImageDataset, cfg: PretrainConfig, fabric: Fabric, path: str,
                sizes: Sequence[int]) -> DataLoader:
    """Shuffled by (seed, epoch) identically for any world size: rank r takes every r-th image.

    ``path`` (``cache`` or ``pil``) sets the worker count when ``data.num_workers`` is automatic; ``sizes``
    are the images of each source, in pooled order (drawn equally often with ``balance_sources``).
    """
    world = fabric.world_size
    if cfg.batch_size % world:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    per_process = cfg.batch_size // world
    workers = resolve_workers(cfg.data.num_workers, path)
    if len(dataset) < cfg.batch_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the {len(dataset)} training images")
    if cfg.balance_sources and len(sizes) > 1:
        sampler: DistributedSampler = BalancedSampler(dataset, sizes, world, fabric.global_rank, cfg.seed)
    else:
        sampler = DistributedSampler(
            dataset, num_replicas=world, rank=fabric.global_rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
    return DataLoader(
        dataset,
        batch_size=per_process,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,  # no worker start-up per epoch; the epoch is shared memory
    )


def _as_loaded(views: Any) -> Any:
    return views


@dataclass
class Source:
    """One source of pretraining images: its options, its roles and the train images the run reads of it."""

    data: DataConfig
    roles: Roles
    images: ImageSet
    """Its readable train images (rows of its cache on the cache path)."""
    fingerprint: str | None
    """:func:`~cass.data.cache.images_fingerprint` of its train images; None when they cannot have one."""

    @property
    def name(self) -> str:
        return self.data.data or str(sample_path())

    def record(self) -> dict[str, Any]:
        """What ``sources.json`` says of this source."""
        held = {role: 0 if images is None else len(images)
                for role, images in (("selection", self.roles.selection), ("test", self.roles.test))}
        return {"data": self.name, "val_data": self.data.val_data, "groups": self.data.groups,
                "group_column": self.data.group_column, "train_images_option": self.data.train_images,
                "pretraining_images": len(self.images), "skipped_unreadable": self.images.skipped,
                "selection_images_kept_out": held["selection"], "test_images_kept_out": held["test"],
                "carved_from_train": sorted(self.roles.carved), "fingerprint": self.fingerprint}

    def describe(self) -> str:
        held = [f"{len(images)} {role}" for role, images in (("selection", self.roles.selection),
                                                              ("test", self.roles.test)) if images is not None]
        kept = f" ({' and '.join(held)} images kept out)" if held else ""
        return f"{self.name}: {len(self.images)} train images{kept}, fingerprint {self.fingerprint or 'none'}"


@dataclass
class TrainData:
    """The training images as batches, and what turns a batch on the device into the method's views."""

    dataset: ImageDataset
    loader: DataLoader
    augment: Callable[[Any], Any]
    """Applied after the batch reaches the device: the batched augmentation of the cache path, else nothing."""
    path: str
    """``cache`` or ``pil``: the data path in use."""
    sources: list[Source]
    """Every source, the first (``data``) first."""

    @property
    def roles(self) -> Roles:
        """The first source's train / selection / test images: what the online checks read (one set of labels)."""
        return self.sources[0].roles

    def save(self, directory: Path, balanced: bool) -> None:
        """``held_out.csv`` (every source's carved images: what the run never sees) and ``sources.json``."""
        save_held_out(directory, [source.roles for source in self.sources])
        record = {"pretraining_images": len(self.dataset), "balance_sources": balanced and len(self.sources) > 1,
                  "sources": [source.record() for source in self.sources]}
        atomic_write_text(Path(directory) / SOURCES, json.dumps(record, indent=2))

    def describe(self, balanced: bool) -> str:
        """One line per source, after one for the pool, for the console."""
        how = ", each drawn equally often" if balanced and len(self.sources) > 1 else ""
        lines = [f"pretraining on {len(self.dataset)} images from {len(self.sources)} source(s){how}:"]
        return "\n".join(lines + [f"  {i}. {source.describe()}" for i, source in enumerate(self.sources, 1)])


def build_train_data(cfg: PretrainConfig, method: PretrainMethod, fabric: Fabric) -> TrainData:
    """The train split of every source, without any test or selection images carved from it
    (:mod:`cass.data.splits`), pooled, through the data path the sources' ``path`` options choose (the
    same in every process; the cache only when every source can be cached)."""
    sources = cfg.sources()
    _check_sources(cfg)
    roles = []
    for index, data in enumerate(sources):
        with _naming(index, sources):
            roles.append(three_roles(data))
    augment = _device_augment(method, sources, roles)
    if fabric.broadcast(augment is not None):  # free disk space may differ between nodes; rank 0 decides
        augment = augment or DeviceAugment(method.train_transform(), method.source_size)

        def read(data: DataConfig, train: ImageSet) -> ImageSet:
            return open_cache(train, method.source_size, data.cache_dir, data.skip_bad_images,
                              cfg.data.num_workers).images

        transform, on_device, path = augment.host, augment, "cache"
    else:
        def read(data: DataConfig, train: ImageSet) -> ImageSet:
            return train.check(skip_bad=data.skip_bad_images)

        transform, on_device, path = method.train_transform(), _as_loaded, "pil"
    found = []
    for index, (data, source_roles) in enumerate(zip(sources, roles, strict=True)):
        with _naming(index, sources):
            found.append(Source(data, source_roles, read(data, source_roles.train), _fingerprint(source_roles.train)))
    dataset = ImageDataset(pooled([source.images for source in found]), transform, seed=cfg.seed)
    loader = make_loader(dataset, cfg, fabric, path, [len(source.images) for source in found])
    return TrainData(dataset, loader, on_device, path, found)


def _check_sources(cfg: PretrainConfig) -> None:
    """Every further source names its images, and no source is named twice (it would count double)."""
    seen: dict[str, str] = {}
    for index, data in enumerate(cfg.sources()):
        where = _where(index)
        if data.data is None and index > 0:
            raise ConfigError(f"{where}.data: name the images of pretraining source {index + 1} (only the "
                              "first source, data.data, defaults to the shipped sample)")
        name = str(Path(data.data).resolve()) if data.data is not None else "(the shipped sample)"
        if name in seen:
            raise ConfigError(f"{where}.data: {data.data} is already pretraining source {seen[name]}; "
                              "name each source once")
        seen[name] = f"{index + 1} ({where})"


def _where(index: int) -> str:
    """The config section of source ``index``: ``data``, then ``more_data[0]``..."""
    return "data" if index == 0 else f"more_data[{index - 1}]"


@contextmanager
def _naming(index: int, sources: Sequence[DataConfig]) -> Iterator[None]:
    """With several sources, an error about a source's data says which source it is."""
    if len(sources) == 1:
        yield
        return
    try:
        yield
    except (ConfigError, DataError, BadImageError) as err:
        name = sources[index].data or "the shipped sample"
        raise type(err)(f"pretraining source {index + 1} of {len(sources)} ({_where(index)}: {name}): {err}") from err


def _fingerprint(images: ImageSet) -> str | None:
    try:
        return images_fingerprint(images)
    except CacheError:
        return None


def _device_augment(method: PretrainMethod, sources: Sequence[DataConfig],
                    roles: Sequence[Roles]) -> DeviceAugment | None:
    """The method's augmentation for the cache path, or None for the PIL path (``auto`` logs why): the cache
    only when every source's ``path`` option allows it and its images fit."""
    pairs = zip(sources, roles, strict=True)
    if not all(wants_cache(data, source_roles.train, method.source_size) for data, source_roles in pairs):
        return None
    try:
        return DeviceAugment(method.train_transform(), method.source_size)
    except UnsupportedAugmentation as err:
        if any(data.path == "cache" for data in sources):
            raise ConfigError(f"data.path cache: {err}") from err
        log.info("data.path auto: using the PIL path (%s)", err)
        return None
