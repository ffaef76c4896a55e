"""A decoded uint8 copy of an image set at the training resolution, memory-mapped from disk.

Decoding and resizing every image in every epoch costs more CPU than a small-batch training step
(SPEC §4: PIL with 16 workers reaches ~4,900 img/s, a big GPU eats 2,500). So the images are decoded
once, resized by the same ``Resize`` the PIL path applies first, and kept as one ``(N, S, S, 3)`` uint8
``.npy`` file that is memory-mapped, never read into RAM at once: a 25,000-image set at 224 px
(3.8 GB) trains on a machine with less memory than that, the page cache holding what fits.

A cache is named by a digest of the resize and, per image, its name and fingerprint (file size and
modification time; a zip member's size and CRC; an .npz file's size and modification time), so an
added, removed or changed image gives a new cache and a stale one is never used. It is built under
a lock (one DDP rank or one run builds, the others wait and reuse it) into a temporary file that is
renamed into place only when complete, so a crash never leaves a partial cache under the final name.

Building the cache decodes every image, so it is also the check for unreadable files that the PIL
path does with :meth:`ImageSet.check`; the list of unreadable images is kept beside the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm.auto import tqdm

from cass.config import ConfigError, DataConfig
from cass.data.dataset import ArrayStore, CacheStore, FileStore, ImageSet, ZipStore
from cass.data.images import BadImageError
from cass.data.loaders import resolve_workers
from cass.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bumped whenever the cache's content for the same images would change."""
CACHE_DIR_ENV = "CASS_CACHE_DIR"
DISK_RESERVE_BYTES = 1 << 30
"""Free space a cache must leave on its disk for :func:`cache_fits`."""


class CacheError(RuntimeError):
    """The images cannot be cached (unknown store, no room, unwritable folder); the message says which."""


def default_cache_dir() -> Path:
    """``$CASS_CACHE_DIR``, else ``$XDG_CACHE_HOME/cass``, else ``~/.cache/cass``."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cass"


def cache_resize(size: int) -> v2.Resize:
    """The resize every cache applies: the first step of :func:`cass.data.transforms.cass_augmentation`."""
    return v2.Resize((size, size), antialias=True)


@dataclass
class ImageCache:
    """An opened cache: the memory-mapped array and the readable images, read from it."""

    path: Path
    array: np.memmap
    """``(N, S, S, 3)`` uint8, one row per image of the source set (unreadable ones left black)."""
    images: ImageSet
    """The readable images with their names and labels; ``images.load(i)`` reads row ``i`` of ``array``."""


def _fingerprint(store: Any, ref: Any) -> tuple[Any, ...]:
    """What changes when the image behind ``ref`` changes, without decoding it."""
    if isinstance(store, FileStore):
        stat = os.stat(ref)
        return stat.st_size, stat.st_mtime_ns
    if isinstance(store, ZipStore):
        info = store.archive().getinfo(ref)
        return info.file_size, info.CRC
    if isinstance(store, ArrayStore) and Path(store.source).is_file():
        stat = os.stat(store.source)
        return store.name, ref, stat.st_size, stat.st_mtime_ns
    raise CacheError(f"{type(store).__name__} images cannot be fingerprinted for a cache; use data.path: pil")


def _digest(header: str, images: ImageSet) -> str:
    """Digest of ``header`` and of every image's name and fingerprint, in order."""
    digest = hashlib.sha256(header.encode())
    for name, ref in zip(images.keys, images.refs, strict=True):
        try:
            fingerprint = _fingerprint(images.store, ref)
        except OSError as err:
            raise BadImageError(f"{name}: cannot read file ({err.strerror or err})") from err
        digest.update(f"\n{name}|{fingerprint}".encode())
    return digest.hexdigest()[:32]


def cache_key(images: ImageSet, resize: v2.Resize) -> str:
    """Digest of the resize and of every image's name and fingerprint, in order."""
    return _digest(f"cass-cache-v{FORMAT_VERSION}|{resize!r}|{len(images)}", images)


def images_fingerprint(images: ImageSet) -> str:
    """Digest of every image's name and fingerprint, in order, at no resolution: what a run records of the
    images it read, so that a later run can tell whether a source changed (an added, removed or modified file).
    Raises :class:`CacheError` for images that cannot be fingerprinted without decoding them."""
    return _digest(f"cass-images|{len(images)}", images)


def cache_bytes(count: int, size: int) -> int:
    return count * size * size * 3


def cache_fits(images: ImageSet, size: int, cache_dir: Path) -> bool:
    """Whether a cache of ``images`` exists already or fits on the disk with room to spare."""
    if (cache_dir / f"{cache_key(images, cache_resize(size))}.npy").is_file():
        return True
    existing = next(p for p in (cache_dir, *cache_dir.parents) if p.exists())
    return cache_bytes(len(images), size) + DISK_RESERVE_BYTES < shutil.disk_usage(existing).free


DATA_PATHS = ("auto", "pil", "cache")
"""``data.path``: ``cache`` forces the uint8 cache, ``pil`` decodes every epoch, ``auto`` caches when it fits."""


def wants_cache(data: DataConfig, images: ImageSet, size: int) -> bool:
    """Whether ``data.path`` sends ``images`` through the cache at ``size`` (``auto`` logs why not)."""
    if data.path not in DATA_PATHS:
        raise ConfigError(f"data.path must be one of {', '.join(DATA_PATHS)}, got {data.path!r}")
    if data.path != "auto":
        return data.path == "cache"
    cache_dir = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
    try:
        if cache_fits(images, size, cache_dir):
            return True
        reason = f"no room for a {len(images)}-image cache in {cache_dir}"
    except (CacheError, BadImageError) as err:
        reason = str(err)
    log.info("data.path auto: using the PIL path (%s)", reason)
    return False


def readable_images(data: DataConfig, images: ImageSet, size: int) -> ImageSet:
    """The readable images of ``images``, read from the cache at ``size`` when ``data.path`` allows.

    Fine-tuning and evaluation transforms begin with the same ``Resize`` the cache applied, which is
    then a no-op, so both paths feed the network the same pixels up to PIL/tensor colour-jitter rounding.
    """
    if wants_cache(data, images, size):
        try:
            return open_cache(images, size, data.cache_dir, data.skip_bad_images, data.num_workers).images
        except CacheError as err:
            raise ConfigError(f"data.path cache: {err}") from err
    return images.check(skip_bad=data.skip_bad_images)


def open_cache(
    images: ImageSet, size: int, cache_dir: str | Path | None = None, skip_bad: bool = False,
    num_workers: int | None = None,
) -> ImageCache:
    """The cache of ``images`` at ``size`` x ``size``, built first if no process has built it yet.

    Unreadable images raise :class:`BadImageError` naming the first one, or with ``skip_bad`` are
    logged and left out of ``images`` (their count added to ``skipped``), as :meth:`ImageSet.check` does.
    ``num_workers`` processes decode in parallel while building (None: as many as the PIL path gets,
    :func:`cass.data.loaders.default_workers`).
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    resize = cache_resize(size)
    key = cache_key(images, resize)
    path = cache_dir / f"{key}.npy"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        if not path.is_file():
            with _locked(cache_dir / f"{key}.lock"):
                # another process may have built it while we waited; building draws from torch's RNG
                # (its DataLoader), and whether this run built the cache must not change its results
                if not path.is_file():
                    with torch.random.fork_rng(devices=[]):
                        _build(images, resize, path, num_workers)
    except OSError as err:
        raise CacheError(f"cannot write the image cache in {cache_dir} ({err}); set data.cache_dir") from err
    bad = json.loads(path.with_suffix(".json").read_text())["unreadable"]
    return ImageCache(path, np.load(path, mmap_mode="r"), _readable(images, path, bad, skip_bad))


def _readable(images: ImageSet, path: Path, bad: dict[str, str], skip_bad: bool) -> ImageSet:
    """``images`` read from the cache at ``path``, without the unreadable ones (or an error naming the first)."""
    if bad and not skip_bad:
        first = next(iter(bad.values()))
        raise BadImageError(f"{first} (skip_bad_images / --skip-bad-images skips such files)")
    for message in bad.values():
        log.warning("skipping unreadable image: %s", message)
    good = [i for i in range(len(images)) if str(i) not in bad]
    if images.refs and not good:
        raise BadImageError(f"{images.source}: none of its {len(images)} images is readable")
    if bad:
        log.warning("%s: skipped %d unreadable image(s) of %d", images.source, len(bad), len(images))
    return dataclasses.replace(
        images.subset(good), store=CacheStore(path), refs=good, skipped=images.skipped + len(bad)
    )


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive lock between processes (POSIX ``flock``; elsewhere the rename alone keeps builds safe)."""
    if sys.platform == "win32":
        yield
        return
    import fcntl

    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class _Decode(Dataset):
    """Image ``i`` decoded and resized as an (S, S, 3) uint8 array, or the message of why it cannot be."""

    def __init__(self, images: ImageSet, resize: v2.Resize) -> None:
        self.images = images
        self.resize = resize

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str]:
        try:
            return i, np.array(self.resize(self.images.load(i))), ""
        except BadImageError as err:
            return i, None, str(err)


def _build(images: ImageSet, resize: v2.Resize, path: Path, num_workers: int | None) -> None:
    """Decode every image into a temporary file, describe it in ``<key>.json``, then rename it into place."""
    size = resize.size[0]
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    loader = DataLoader(_Decode(images, resize), batch_size=None, num_workers=resolve_workers(num_workers, "pil"))
    unreadable: dict[str, str] = {}
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(images), size, size, 3))
        for i, row, error in tqdm(loader, desc=f"caching {len(images)} images at {size} px", leave=False):
            if error:
                unreadable[str(i)] = error
            else:
                array[i] = row
        array.flush()
        del array
        info = {"version": FORMAT_VERSION, "source": images.source, "count": len(images), "size": size,
                "resize": repr(resize), "unreadable": unreadable}
        atomic_write_text(path.with_suffix(".json"), json.dumps(info, indent=1))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("cached %d images at %d px in %s", len(images), size, path)
