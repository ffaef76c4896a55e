"""DataLoaders over an image set whose order depends only on (seed, epoch), so a resumed run replays it."""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader, DistributedSampler

from cass.data.dataset import ImageDataset, ImageSet


def image_loader(images: ImageSet, transform: Any, batch_size: int, seed: int, train: bool, workers: int) -> DataLoader:
    """Training order depends only on (seed, epoch) (``sampler.set_epoch``), so a resumed run replays it."""
    dataset = ImageDataset(images, transform, seed=seed)
    batch = min(batch_size, len(images))
    # A final batch of one image breaks BatchNorm in training: drop the remainder when training.
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=train, seed=seed, drop_last=False)
    return DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=train, num_workers=workers)
