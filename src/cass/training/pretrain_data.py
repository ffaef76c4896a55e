"""The pretraining images as batches, through the data path ``data.path`` chooses.

By default the images are decoded once into a memory-mapped uint8 cache and augmented in batches on
the device (:mod:`cass.data.cache`, :mod:`cass.data.device_augment`); otherwise per image with PIL in
DataLoader workers. The order of images depends only on (seed, epoch) and each image's augmentation on
(seed, epoch, index), so a resumed run, a run with more workers and a DDP run with the same global batch
all see the same data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from lightning.fabric import Fabric
from torch.utils.data import DataLoader, DistributedSampler

from cass.config import ConfigError, PretrainConfig
from cass.data.cache import open_cache, wants_cache
from cass.data.dataset import ImageDataset, ImageSet
from cass.data.device_augment import DeviceAugment, UnsupportedAugmentation
from cass.data.loaders import resolve_workers
from cass.data.splits import Roles, three_roles
from cass.methods.base import PretrainMethod

log = logging.getLogger(__name__)


def make_loader(dataset: ImageDataset, cfg: PretrainConfig, fabric: Fabric, path: str) -> DataLoader:
    """Shuffled by (seed, epoch) identically for any world size: rank r takes every r-th image.

    ``path`` (``cache`` or ``pil``) sets the worker count when ``data.num_workers`` is automatic.
    """
    world = fabric.world_size
    if cfg.batch_size % world:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    per_process = cfg.batch_size // world
    workers = resolve_workers(cfg.data.num_workers, path)
    if len(dataset) < cfg.batch_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the {len(dataset)} training images")
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
class TrainData:
    """The training images as batches, and what turns a batch on the device into the method's views."""

    dataset: ImageDataset
    loader: DataLoader
    augment: Callable[[Any], Any]
    """Applied after the batch reaches the device: the batched augmentation of the cache path, else nothing."""
    path: str
    """``cache`` or ``pil``: the data path in use."""
    roles: Roles
    """The run's train / selection / test images; pretraining reads ``train`` only."""


def build_train_data(cfg: PretrainConfig, method: PretrainMethod, fabric: Fabric) -> TrainData:
    """The training split, without any test or selection images carved from it (:mod:`cass.data.splits`),
    through the data path ``cfg.data.path`` chooses (the same in every process)."""
    roles = three_roles(cfg.data)
    augment = _device_augment(cfg, method, roles.train)
    if fabric.broadcast(augment is not None):  # free disk space may differ between nodes; rank 0 decides
        augment = augment or DeviceAugment(method.train_transform(), method.source_size)
        cache = open_cache(
            roles.train, method.source_size, cfg.data.cache_dir, cfg.data.skip_bad_images, cfg.data.num_workers
        )
        dataset = ImageDataset(cache.images, augment.host, seed=cfg.seed)
        return TrainData(dataset, make_loader(dataset, cfg, fabric, "cache"), augment, "cache", roles)
    train_images = roles.train.check(skip_bad=cfg.data.skip_bad_images)
    dataset = ImageDataset(train_images, method.train_transform(), seed=cfg.seed)
    return TrainData(dataset, make_loader(dataset, cfg, fabric, "pil"), _as_loaded, "pil", roles)


def _device_augment(cfg: PretrainConfig, method: PretrainMethod, images: ImageSet) -> DeviceAugment | None:
    """The method's augmentation for the cache path, or None for the PIL path (``auto`` logs why)."""
    if not wants_cache(cfg.data, images, method.source_size):
        return None
    try:
        return DeviceAugment(method.train_transform(), method.source_size)
    except UnsupportedAugmentation as err:
        if cfg.data.path == "cache":
            raise ConfigError(f"data.path cache: {err}") from err
        log.info("data.path auto: using the PIL path (%s)", err)
        return None
