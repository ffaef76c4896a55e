"""An indexed set of images with their labels, and its torch ``Dataset`` view.

:class:`ImageSet` is what every data source becomes (see :mod:`cass.data.sources`): names, labels
and a store that reads image ``i`` on demand. It stays small and picklable (archives are reopened
in each worker process) so DataLoader workers and DDP processes can each hold a copy.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from cass.data.images import BadImageError, array_to_rgb, decode_image, max_file_bytes

log = logging.getLogger(__name__)


class ImageStore(Protocol):
    """Reads one image given the reference a source recorded for it."""

    def key(self, ref: Any) -> str:
        """The human-readable name of ``ref``, used in messages and as ``ImageSet.keys``."""
        ...

    def load(self, ref: Any, name: str) -> Image.Image:
        """The 8-bit RGB image of ``ref``; :class:`BadImageError` naming ``name`` if unusable."""
        ...


class _EncodedStore(ABC):
    """Images kept as encoded files (PNG, JPEG, DICOM...), decoded by :func:`decode_image`."""

    def __init__(self, max_pixels: int) -> None:
        self.max_pixels = max_pixels

    @abstractmethod
    def key(self, ref: str) -> str: ...

    @abstractmethod
    def read(self, ref: str) -> bytes:
        """The file's bytes; :class:`BadImageError` naming it if it cannot be read."""

    def load(self, ref: str, name: str) -> Image.Image:
        return decode_image(self.read(ref), name, self.max_pixels)

    def _refuse_size(self, ref: str, size: int) -> None:
        """Checked before reading, so a huge file (or archive bomb) is never pulled into memory."""
        if size > max_file_bytes(self.max_pixels):
            raise BadImageError(f"{self.key(ref)}: {size} bytes is too large for the pixel limit {self.max_pixels}")


class FileStore(_EncodedStore):
    """Files on disk; a reference is the file's path."""

    def key(self, ref: str) -> str:
        return ref

    def read(self, ref: str) -> bytes:
        try:
            self._refuse_size(ref, os.path.getsize(ref))
            return Path(ref).read_bytes()
        except OSError as err:
            raise BadImageError(f"{ref}: cannot read file ({err.strerror or err})") from err


class ZipStore(_EncodedStore):
    """Members of a zip archive; a reference is the member name.

    The archive is opened lazily and reopened in every process: a ``ZipFile`` inherited through
    ``fork`` shares its file offset with the parent, which silently corrupts concurrent reads.
    """

    def __init__(self, path: str, max_pixels: int) -> None:
        super().__init__(max_pixels)
        self.path = path
        self._archive: zipfile.ZipFile | None = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_archive": None, "_pid": -1}

    def archive(self) -> zipfile.ZipFile:
        if self._archive is None or self._pid != os.getpid():
            self._archive = zipfile.ZipFile(self.path)
            self._pid = os.getpid()
        return self._archive

    def key(self, ref: str) -> str:
        return f"{self.path}:{ref}"

    def read(self, ref: str) -> bytes:
        try:
            self._refuse_size(ref, self.archive().getinfo(ref).file_size)
            return self.archive().read(ref)
        except BadImageError:
            raise
        except Exception as err:  # BadZipFile, zlib.error, EOFError, RuntimeError (encrypted)...
            raise BadImageError(f"{self.key(ref)}: cannot read archive member ({type(err).__name__}: {err})") from err


class ArrayStore:
    """Images held as rows of an array (MedMNIST-style .npz); a reference is the row index."""

    def __init__(self, source: str, name: str, array: np.ndarray) -> None:
        self.source = source
        self.name = name
        self.array = array

    def key(self, ref: int) -> str:
        return f"{self.source}:{self.name}[{ref}]"

    def load(self, ref: int, name: str) -> Image.Image:
        return array_to_rgb(self.array[ref], name)


class CacheStore:
    """Rows of a decoded-image cache file (:mod:`cass.data.cache`), as (3, S, S) uint8 tensors; a reference
    is the row number.

    Pickled as its path and reopened in each process, so DataLoader workers started by ``spawn``
    map the file themselves instead of receiving a copy of it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._array: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def key(self, ref: int) -> str:
        return f"{self.path}[{ref}]"

    def load(self, ref: int, name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(self.array[ref])).permute(2, 0, 1)


class PooledStore:
    """The stores of several image sets read as one (pretraining on several sources); a reference is
    ``(set number, that set's own reference)``. Pickled as its stores, each of which reopens its files."""

    def __init__(self, stores: Sequence[ImageStore]) -> None:
        self.stores = list(stores)

    def key(self, ref: tuple[int, Any]) -> str:
        part, inner = ref
        return self.stores[part].key(inner)

    def load(self, ref: tuple[int, Any], name: str) -> Any:
        part, inner = ref
        return self.stores[part].load(inner, name)


@dataclass
class ImageSet:
    """Images of one split with their labels, read on demand.

    ``targets`` is None for unlabelled images, an (N,) int64 array of indices into ``classes``, or,
    when ``multilabel``, an (N, C) float32 array of 0/1 per class.
    """

    source: str
    keys: list[str]
    targets: np.ndarray | None
    classes: list[str]
    multilabel: bool
    store: ImageStore = field(repr=False)
    refs: list[Any] = field(repr=False)
    skipped: int = 0
    """How many unreadable images :meth:`check` left out."""
    groups: list[str | None] | None = field(default=None, repr=False)
    """Each image's group (patient, study, near-duplicate cluster), None for an image without one; None
    when no image has one. Every image of a group goes to the same split (:mod:`cass.data.splits`)."""

    @classmethod
    def from_refs(
        cls,
        source: str,
        store: ImageStore,
        refs: Sequence[Any],
        targets: np.ndarray | None = None,
        classes: Sequence[str] = (),
        multilabel: bool = False,
        groups: list[str | None] | None = None,
    ) -> ImageSet:
        keys = [store.key(r) for r in refs]
        return cls(source, keys, targets, list(classes), multilabel, store, list(refs), groups=groups)

    def __len__(self) -> int:
        return len(self.refs)

    def load(self, i: int) -> Image.Image:
        return self.store.load(self.refs[i], self.keys[i])

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageSet:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return dataclasses.replace(
            self,
            keys=[self.keys[i] for i in idx],
            refs=[self.refs[i] for i in idx],
            targets=None if self.targets is None else self.targets[idx],
            groups=None if self.groups is None else [self.groups[i] for i in idx],
        )

    def group_codes(self) -> np.ndarray:
        """An integer per image, shared by the images of one group; an image without a group has its own.

        Codes count up in order of first appearance, so without groups they are ``0..N-1``.
        """
        codes: dict[tuple[bool, Any], int] = {}
        groups = self.groups or [None] * len(self)
        named = ((True, g) if g is not None else (False, i) for i, g in enumerate(groups))
        return np.fromiter((codes.setdefault(name, len(codes)) for name in named), dtype=np.int64, count=len(self))

    def check(self, skip_bad: bool = False) -> ImageSet:
        """Decode every image once, so a bad file stops the run before training, not mid-epoch.

        Raises the first :class:`BadImageError`; with ``skip_bad`` logs each bad file and returns
        the readable images, with the number left out added to ``skipped``.
        """
        good: list[int] = []
        for i in range(len(self)):
            try:
                self.load(i)
            except BadImageError as err:
                if not skip_bad:
                    raise BadImageError(f"{err} (skip_bad_images / --skip-bad-images skips such files)") from err
                log.warning("skipping unreadable image: %s", err)
            else:
                good.append(i)
        if self.refs and not good:
            raise BadImageError(f"{self.source}: none of its {len(self)} images is readable")
        checked = self.subset(good)
        checked.skipped = self.skipped + len(self) - len(good)
        if checked.skipped > self.skipped:
            log.warning("%s: skipped %d unreadable image(s) of %d", self.source, len(self) - len(good), len(self))
        return checked


def pooled(sets: Sequence[ImageSet]) -> ImageSet:
    """Every image of ``sets`` as one unlabelled set, in order (the first set's images keep their indices, so
    a single source reads and augments exactly as on its own); one set is returned as it is.

    Labels are dropped: the sources' class lists differ, and pretraining reads no labels. So are groups,
    whose names are only unique within their source; each source's groups were used when its splits were carved.
    """
    if len(sets) == 1:
        return sets[0]
    return ImageSet(
        source=" + ".join(images.source for images in sets),
        keys=[key for images in sets for key in images.keys],
        targets=None, classes=[], multilabel=False,
        store=PooledStore([images.store for images in sets]),
        refs=[(part, ref) for part, images in enumerate(sets) for ref in images.refs],
        skipped=sum(images.skipped for images in sets),
    )


class ImageDataset(torch.utils.data.Dataset):
    """``(view, target, index)`` for each image of an :class:`ImageSet`.

    The transform's randomness is drawn from torch's generator seeded by (seed, epoch, index), so
    an image's augmentation is the same whichever worker or DDP process loads it. ``target`` is
    the class index, a float 0/1 vector for multi-label sets, or -1 for unlabelled images.
    The epoch lives in shared memory, so :meth:`set_epoch` also reaches persistent workers
    (call it before iterating the epoch's DataLoader).
    """

    def __init__(self, images: ImageSet, transform: Callable[[Image.Image], Any], seed: int = 0) -> None:
        self.images = images
        self.transform = transform
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, int | torch.Tensor, int]:
        img = self.images.load(i)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(view_seed(self.seed, self.epoch, i))
            view = self.transform(img)
        return view, self._target(i), i

    def _target(self, i: int) -> int | torch.Tensor:
        targets = self.images.targets
        if targets is None:
            return -1
        if self.images.multilabel:
            return torch.from_numpy(np.asarray(targets[i], dtype=np.float32))
        return int(targets[i])


def view_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 64-bit seed per (seed, epoch, index): nearby triples give unrelated streams."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0])
