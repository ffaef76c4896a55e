"""Image transforms: the CASS augmentation of SPEC §1 and the deterministic evaluation transform.

Both take a PIL RGB image and return a float tensor in [0, 1]; each network normalises it with its
own mean and std (:class:`cass.models.Network`), since CASS feeds one tensor to two networks whose
timm configs may disagree. Randomness comes from torch's global
generator, which :class:`cass.data.dataset.ImageDataset` seeds per (seed, epoch, image) so that the
same run sees the same augmentations whatever the number of workers or processes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

Transform = Callable[..., torch.Tensor]

TO_FLOAT = (v2.ToImage(), v2.ToDtype(torch.float32, scale=True))


def cass_augmentation(img_size: int) -> Transform:
    """The single view of SPEC §1, fed unchanged to both networks.

    Resize; p=0.3 colour jitter + perspective; p=0.3 colour jitter + affine (±10°); flips p=0.3 each.
    """
    jitter = (0.2, 0.2, 0.2)
    return v2.Compose(
        [
            v2.Resize((img_size, img_size), antialias=True),
            v2.RandomApply([v2.ColorJitter(*jitter), v2.RandomPerspective(distortion_scale=0.2, p=1.0)], p=0.3),
            v2.RandomApply([v2.ColorJitter(*jitter), v2.RandomAffine(degrees=10)], p=0.3),
            v2.RandomVerticalFlip(p=0.3),
            v2.RandomHorizontalFlip(p=0.3),
            *TO_FLOAT,
        ]
    )


def eval_transform(img_size: int) -> Transform:
    """Resize only: what validation, prediction and embedding use."""
    return v2.Compose([v2.Resize((img_size, img_size), antialias=True), *TO_FLOAT])
