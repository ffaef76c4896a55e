"""DataLoaders over an image set whose order depends only on (seed, epoch), so a resumed run replays it, the
sampler that draws several pooled sources equally often in that order, and the number of their worker
processes when the config leaves it automatic."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from cass.data.dataset import CacheStore, ImageDataset, ImageSet

DATA_PATHS_IN_USE = ("cache", "pil")
MAX_AUTO_WORKERS = 4


def default_workers(path_in_use: str) -> int:
    """Worker processes when ``data.num_workers`` is None ("automatic"), for the data path in use.

    ``cache``: 0. Images are rows of the uint8 cache, gathered into batches in the main process (and in
    pretraining augmented on the device), so workers only compete with the training for the CPU: on a
    2-core machine 0 workers was fastest both end to end and model-only. ``pil``: every image is decoded
    (and augmented) on the CPU, which workers overlap with training: one per core but the main
    process's, at most 4 (``os.sched_getaffinity``: the cores this process may use, not the machine's).
    """
    if path_in_use not in DATA_PATHS_IN_USE:
        raise ValueError(f"data path in use must be one of {', '.join(DATA_PATHS_IN_USE)}, got {path_in_use!r}")
    if path_in_use == "cache":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(MAX_AUTO_WORKERS, max(0, cores - 1))


def resolve_workers(num_workers: int | None, path_in_use: str) -> int:
    """``num_workers`` when given (always honoured), else :func:`default_workers` of ``path_in_use``."""
    return default_workers(path_in_use) if num_workers is None else num_workers


def path_in_use(images: ImageSet) -> str:
    """``cache`` when ``images`` are rows of a decoded-image cache, else ``pil`` (decoded per image)."""
    return "cache" if isinstance(images.store, CacheStore) else "pil"


def image_loader(
    images: ImageSet, transform: Any, batch_size: int, seed: int, train: bool, workers: int | None = None
) -> DataLoader:
    """Training order depends only on (seed, epoch) (``sampler.set_epoch``), so a resumed run replays it.

    ``workers`` None: :func:`default_workers` for where ``images`` come from.
    """
    dataset = ImageDataset(images, transform, seed=seed)
    batch = min(batch_size, len(images))
    # A final batch of one image breaks BatchNorm in training: drop the remainder when training.
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=train, seed=seed, drop_last=False)
    return DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=train,
                      num_workers=resolve_workers(workers, path_in_use(images)))


def balanced_indices(sizes: Sequence[int], generator: torch.Generator) -> list[int]:
    """One epoch of indices into sets of ``sizes`` laid end to end, each set drawn equally often.

    The epoch keeps the pooled length; each set gets an equal share of it (the first ``length % sets`` one
    more), taken from as many fresh shuffles of its images as the share needs: a small set's images come back
    (each at most once more than any other of them), a large set is subsampled. The shares are then shuffled
    together. Everything is drawn from ``generator``, so the order depends only on its seed.
    """
    total, count = sum(sizes), len(sizes)
    drawn, offset = [], 0
    for part, size in enumerate(sizes):
        share = total // count + (part < total % count)
        rounds = -(-share // size)
        order = torch.cat([torch.randperm(size, generator=generator) for _ in range(rounds)])[:share]
        drawn.append(order + offset)
        offset += size
    pooled = torch.cat(drawn)
    return pooled[torch.randperm(len(pooled), generator=generator)].tolist()


class BalancedSampler(DistributedSampler):
    """A :class:`DistributedSampler` (shuffled, last incomplete batch dropped) whose epoch draws every source
    equally often (:func:`balanced_indices`), ordered by (seed, epoch) alone: rank r takes every r-th index
    of the same list, so any world size sees the same images as one process."""

    def __init__(self, dataset: Any, sizes: Sequence[int], num_replicas: int, rank: int, seed: int) -> None:
        if sum(sizes) != len(dataset):
            raise ValueError(f"source sizes {list(sizes)} do not add up to the {len(dataset)} pooled images")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.sizes = list(sizes)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)  # as DistributedSampler seeds its shuffle
        indices = balanced_indices(self.sizes, generator)[: self.total_size]
        return iter(indices[self.rank : self.total_size : self.num_replicas])
