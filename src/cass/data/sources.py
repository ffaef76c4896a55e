"""Finding a user's images and labels: folders, CSVs, zips of either, MedMNIST-style .npz.

Layout rules (one set, shared by folders and zip archives):

- A root whose sub-folders are ``train/`` (required), ``val/`` and ``test/`` holds those splits.
- A root holding exactly one ``.csv`` file is read through that CSV (paths relative to it).
- Otherwise images directly in the root are unlabelled, and each sub-folder is a class holding
  every image below it (at any depth). Mixing the two is refused: a label must never be guessed.
- Hidden entries (``.name``, ``__MACOSX``) are ignored; other files whose suffix is not an image
  suffix (or, without a suffix, that are not DICOM) are skipped and reported in the log.
- A zip whose entries all sit in one top-level folder is read from inside that folder, and
  ``archive.zip/inner/path`` names a folder or CSV inside an archive.

A CSV has a ``path`` column and either a ``label`` column (one class per image; other columns
are ignored) or one 0/1 column per label (multi-label). Without other columns it is unlabelled.
Its group column (``group`` unless ``group_column`` says otherwise) is never a label: it names each
image's group (patient, study); an empty cell leaves the image its own group. DICOM files not grouped
by a CSV are grouped by their PatientID (else StudyInstanceUID), read from their header.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import posixpath
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import IO

import numpy as np

from cass.config import DEFAULT_GROUP_COLUMN
from cass.data.dataset import ArrayStore, FileStore, ImageSet, ZipStore
from cass.data.images import (
    DEFAULT_MAX_PIXELS,
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    BadImageError,
    dicom_group,
    is_dicom,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SAMPLE_NAME = "brain_mri_sample.zip"
EXAMPLES = 3
"""How many offending entries an error or warning lists."""
MAX_CLASSES = 100_000
"""Class indices in arrays must stay below this: a larger one is a damaged file, not a class
(ImageNet-21k has 21,841), and would otherwise make a list of that many class names."""


class DataError(ValueError):
    """A dataset's layout, CSV or arrays are wrong; the message names the file or option."""


@dataclass
class Splits:
    """The images a run uses: ``train`` always; ``val``/``test`` when the data provides them."""

    train: ImageSet
    val: ImageSet | None = None
    test: ImageSet | None = None


def sample_path() -> Path:
    """The real Brain MRI sample shipped inside the package (see ``cass/sample/PROVENANCE.md``)."""
    path = Path(str(resources.files("cass") / "sample" / SAMPLE_NAME))
    if not path.is_file():
        raise DataError(
            f"the shipped sample {path} is missing: reinstall cass or rebuild it with scripts/build_sample.py"
        )
    return path


def open_images(
    path: str | Path, split: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
    group_column: str = DEFAULT_GROUP_COLUMN,
) -> ImageSet:
    """The images (and labels) at ``path``: a folder, CSV, zip or .npz, by the module's layout rules.

    ``split`` picks ``train``/``val``/``test`` from a root that has splits; such a root must be
    given a split (or read with :func:`load_splits`) so that its split folders are never taken
    for classes. ``group_column`` is the CSV column of the images' groups.
    """
    return _open_source(path, max_pixels, group_column).images(split)


def load_splits(
    data: str | Path | None = None, val_data: str | Path | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
    group_column: str = DEFAULT_GROUP_COLUMN,
) -> Splits:
    """Train, validation and test images of a run.

    ``data`` with splits gives all of them; otherwise it is all ``train``. ``None`` is the shipped
    sample. ``val_data`` replaces the validation split (its ``val`` split if it has splits). The
    validation and test classes are re-indexed to the training classes; a class the training
    images lack is refused. ``group_column`` is the CSV column of the images' groups.
    """
    source = _open_source(sample_path() if data is None else data, max_pixels, group_column)
    found = source.splits()
    train = source.images("train" if found else None)
    val, test = (source.images(s) if s in found else None for s in ("val", "test"))
    if val_data is not None:
        other = _open_source(val_data, max_pixels, group_column)
        val = other.images("val" if other.splits() else None)
    return Splits(train, _aligned(train, val), _aligned(train, test))


def _aligned(train: ImageSet, other: ImageSet | None) -> ImageSet | None:
    """``other`` with its targets indexed by ``train.classes``, or a DataError if they cannot be."""
    if other is None or train.targets is None or other.targets is None:
        return other
    if other.multilabel != train.multilabel:
        kinds = {True: "multi-label", False: "single-label"}
        raise DataError(f"{other.source} is {kinds[other.multilabel]} but {train.source} is {kinds[train.multilabel]}")
    if train.multilabel:
        if set(other.classes) != set(train.classes):
            raise DataError(f"{other.source} has labels {other.classes}, but {train.source} has {train.classes}")
        targets = other.targets[:, [other.classes.index(c) for c in train.classes]]
    else:
        unknown = sorted(set(other.classes) - set(train.classes))
        if unknown:
            raise DataError(f"{other.source} has classes {unknown} that {train.source} lacks ({train.classes})")
        targets = np.array([train.classes.index(c) for c in other.classes], dtype=np.int64)[other.targets]
    return dataclasses.replace(other, targets=targets, classes=list(train.classes))


class _Source(ABC):
    name: str

    @abstractmethod
    def splits(self) -> list[str]:
        """The splits this source holds, in ``SPLITS`` order; empty when it is one set of images."""

    @abstractmethod
    def _read(self, split: str | None) -> ImageSet: ...

    def images(self, split: str | None) -> ImageSet:
        found = self.splits()
        if split is None and found:
            raise DataError(f"{self.name} holds the splits {found}: pick one, or load them with load_splits")
        if split is not None and split not in found:
            raise DataError(f"{self.name} has no {split!r} split (splits found: {found or 'none'})")
        return self._read(split)


def _open_source(path: str | Path, max_pixels: int, group_column: str = DEFAULT_GROUP_COLUMN) -> _Source:
    path = Path(path)
    if path.is_dir():
        return _DiskTree(path, FileStore(max_pixels), group_column)
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix == ".zip":
            return _zip_source(path, "", max_pixels, group_column)
        if suffix == ".npz":
            return _Npz(path)
        if suffix == ".csv":
            return _Csv(_DiskTree(path.parent, FileStore(max_pixels), group_column), path.name)
        raise DataError(f"{path}: not a folder, .csv, .zip or .npz file")
    archive = next((p for p in path.parents if p.suffix.lower() == ".zip" and p.is_file()), None)
    if archive is None:
        raise DataError(f"{path}: no such file or folder")
    return _zip_source(archive, path.relative_to(archive).as_posix(), max_pixels, group_column)


def _zip_source(path: Path, inner: str, max_pixels: int, group_column: str) -> _Source:
    store = ZipStore(str(path), max_pixels)
    try:
        members = frozenset(i.filename for i in store.archive().infolist() if not i.is_dir())
    except Exception as err:  # BadZipFile, NotImplementedError (zip version), UnicodeDecodeError (names)...
        raise DataError(f"{path}: not a readable zip archive ({type(err).__name__}: {err})") from err
    for member in members:
        if _escapes(member):
            raise DataError(f"{path}: member {member!r} escapes the archive's root; refusing the archive")
    root = _ZipTree(store, members, "", group_column)
    if not inner:
        return root.unwrapped()
    if inner in members and inner.lower().endswith(".csv"):
        return _Csv(root, inner)
    if any(m.startswith(inner + "/") for m in members):
        return root.sub(inner)
    raise DataError(f"{path}: no CSV or folder {inner!r} inside the archive")


def _escapes(path: str) -> bool:
    """Absolute, drive-qualified, or climbing above the root with '..' ('a/../b' stays inside)."""
    posix = path.replace("\\", "/")
    norm = posixpath.normpath(posix)
    return posix.startswith("/") or bool(re.match(r"[A-Za-z]:", posix)) or norm == ".." or norm.startswith("../")


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.split("/"))


class _Tree(_Source):
    """A folder of files, on disk or inside a zip; paths are relative POSIX paths."""

    store: FileStore | ZipStore
    files: list[str]
    """Every non-hidden file below the root, sorted (a cached property of each kind of tree)."""
    group_column: str
    """The column of a CSV in this tree that names each image's group."""

    @abstractmethod
    def ref(self, rel: str) -> str:
        """The store reference of the file at ``rel``."""

    @abstractmethod
    def exists(self, rel: str) -> bool: ...

    @abstractmethod
    def sub(self, folder: str) -> _Tree: ...

    @abstractmethod
    def open_binary(self, rel: str) -> IO[bytes]:
        """The file at ``rel``, opened for reading bytes (as a context manager)."""

    def head(self, rel: str, size: int) -> bytes:
        """The first ``size`` bytes of a file, to recognise DICOM files without a suffix."""
        try:
            with self.open_binary(rel) as f:
                return f.read(size)
        except Exception:  # unreadable or damaged: not recognised as an image, so reported as ignored
            return b""

    def groups(self, rels: list[str], given: list[str | None] | None = None) -> list[str | None] | None:
        """The group of each file: ``given`` (a CSV's column), else a DICOM file's patient; None if none has one."""
        given = given or [None] * len(rels)
        found = [group or self._dicom_group(rel) for group, rel in zip(given, rels, strict=True)]
        return found if any(group is not None for group in found) else None

    def _dicom_group(self, rel: str) -> str | None:
        """PatientID (else StudyInstanceUID) of a DICOM file: named ``.dcm``/``.dicom``, or without a suffix."""
        suffix = posixpath.splitext(rel)[1].lower()
        if suffix not in DICOM_SUFFIXES and (suffix or not is_dicom(self.head(rel, 132), rel)):
            return None
        try:
            with self.open_binary(rel) as file:
                return dicom_group(file)
        except Exception:  # unreadable: its own group here; decoding it reports it by name
            return None

    def read_text(self, rel: str) -> str:
        try:
            return self.store.read(self.ref(rel)).decode("utf-8-sig")
        except (BadImageError, UnicodeDecodeError) as err:
            raise DataError(f"{self.store.key(self.ref(rel))}: cannot read as UTF-8 text ({err})") from err

    def _top_dirs(self) -> set[str]:
        return {f.split("/", 1)[0] for f in self.files if "/" in f}

    def _csv_file(self) -> str | None:
        found = [f for f in self.files if "/" not in f and f.lower().endswith(".csv")]
        if len(found) > 1:
            raise DataError(f"{self.name} holds several CSV files {found[:EXAMPLES]}: name the one to use")
        return found[0] if found else None

    def splits(self) -> list[str]:
        dirs = self._top_dirs()
        if self._csv_file() is not None or "train" not in dirs or not dirs <= set(SPLITS):
            return []
        loose = [f for f in self.files if "/" not in f and self._is_image(f)]
        if loose:
            raise DataError(f"{self.name} holds split folders and also images outside them, e.g. {loose[0]}")
        return [s for s in SPLITS if s in dirs]

    def _read(self, split: str | None) -> ImageSet:
        tree = self if split is None else self.sub(split)
        csv_file = tree._csv_file()
        return _Csv(tree, csv_file).images(None) if csv_file else tree._read_folder()

    def _is_image(self, rel: str) -> bool:
        suffix = posixpath.splitext(rel)[1].lower()
        return suffix in IMAGE_SUFFIXES or (not suffix and is_dicom(self.head(rel, 132), rel))

    def _read_folder(self) -> ImageSet:
        images = [f for f in self.files if self._is_image(f)]
        image_set = set(images)
        ignored = [f for f in self.files if f not in image_set]
        if ignored:
            log.warning("%s: ignored %d non-image file(s), e.g. %s", self.name, len(ignored), ignored[:EXAMPLES])
        if not images:
            raise DataError(f"{self.name}: no images found (image suffixes: {' '.join(sorted(IMAGE_SUFFIXES))})")
        loose = [f for f in images if "/" not in f]
        if len(loose) == len(images):
            return ImageSet.from_refs(self.name, self.store, [self.ref(f) for f in images], groups=self.groups(images))
        if loose:
            nested = next(f for f in images if "/" in f)
            raise DataError(
                f"{self.name}: images both directly in the folder ({loose[0]}) and in class folders ({nested}): "
                "put every image in a class folder, or none"
            )
        labels = [f.split("/", 1)[0] for f in images]
        classes = _sorted_classes(set(labels))
        empty = sorted(self._top_dirs() - set(classes))
        if empty:
            raise DataError(f"{self.name}: class folder(s) {empty[:EXAMPLES]} hold no images")
        index = {c: i for i, c in enumerate(classes)}
        targets = np.array([index[label] for label in labels], dtype=np.int64)
        return ImageSet.from_refs(self.name, self.store, [self.ref(f) for f in images], targets, classes,
                                  groups=self.groups(images))


class _DiskTree(_Tree):
    def __init__(self, root: Path, store: FileStore, group_column: str) -> None:
        self.root = root
        self.store = store
        self.group_column = group_column
        self.name = str(root)

    @cached_property
    def files(self) -> list[str]:
        found = []
        # followlinks: class folders are often symlinks into a shared image store.
        for folder, dirs, names in os.walk(self.root, followlinks=True):
            dirs[:] = [d for d in dirs if not _hidden(d)]
            rel = Path(folder).relative_to(self.root).as_posix()
            found += [posixpath.join(rel, n) if rel != "." else n for n in names if not _hidden(n)]
        return sorted(found)

    def ref(self, rel: str) -> str:
        return str(self.root / rel)

    def exists(self, rel: str) -> bool:
        return (self.root / rel).is_file()

    def sub(self, folder: str) -> _DiskTree:
        return _DiskTree(self.root / folder, self.store, self.group_column)

    def open_binary(self, rel: str) -> IO[bytes]:
        return open(self.root / rel, "rb")


class _ZipTree(_Tree):
    def __init__(self, store: ZipStore, members: frozenset[str], prefix: str, group_column: str) -> None:
        self.store = store
        self.members = members
        self.prefix = prefix
        self.group_column = group_column
        self.name = f"{store.path}:{prefix}" if prefix else store.path

    @cached_property
    def files(self) -> list[str]:
        n = len(self.prefix)
        return sorted(m[n:] for m in self.members if m.startswith(self.prefix) and not _hidden(m[n:]))

    def ref(self, rel: str) -> str:
        return self.prefix + rel

    def exists(self, rel: str) -> bool:
        return self.prefix + rel in self.members

    def sub(self, folder: str) -> _ZipTree:
        return _ZipTree(self.store, self.members, f"{self.prefix}{folder}/", self.group_column)

    def open_binary(self, rel: str) -> IO[bytes]:
        return self.store.archive().open(self.ref(rel))

    def unwrapped(self) -> _Tree:
        """The single top-level folder most zip tools wrap around their content, unless it is a split."""
        tops = {f.split("/", 1)[0] for f in self.files}
        if len(tops) != 1:
            return self
        top = tops.pop()
        return self if top in SPLITS or top in self.files else self.sub(top)


class _Csv(_Source):
    """A CSV listing image paths relative to its own folder (never escaping it), with labels."""

    def __init__(self, tree: _Tree, rel: str) -> None:
        self.tree = tree.sub(posixpath.dirname(rel)) if "/" in rel else tree
        self.file = posixpath.basename(rel)
        self.name = tree.store.key(tree.ref(rel))

    def splits(self) -> list[str]:
        return []

    def _read(self, split: str | None) -> ImageSet:
        rows, header = self._rows()
        paths = self._paths(rows, header.index("path"))
        column = self.tree.group_column
        targets, classes, multilabel = _csv_labels(self.name, rows, header, column)
        given = [cells[header.index(column)] or None for _, cells in rows] if column in header else None
        refs = [self.tree.ref(p) for p in paths]
        return ImageSet.from_refs(self.name, self.tree.store, refs, targets, classes, multilabel,
                                  self.tree.groups(paths, given))

    def _rows(self) -> tuple[list[tuple[int, list[str]]], list[str]]:
        """(line number, cells) for each data row, and the stripped header."""
        reader = csv.reader(io.StringIO(self.tree.read_text(self.file), newline=""))  # any line ending
        try:
            header = [h.strip() for h in next(reader)]
            rows = [(reader.line_num, [c.strip() for c in row]) for row in reader if any(c.strip() for c in row)]
        except StopIteration:
            raise DataError(f"{self.name}: empty CSV (a header with a 'path' column is needed)") from None
        except csv.Error as err:
            raise DataError(f"{self.name}, line {reader.line_num}: {err}") from err
        if "path" not in header:
            raise DataError(f"{self.name}: no 'path' column (header: {header})")
        if not rows:
            raise DataError(f"{self.name}: no rows under the header")
        for line, cells in rows:
            if len(cells) != len(header):
                raise DataError(f"{self.name}, line {line}: {len(cells)} fields, the header has {len(header)}")
        return rows, header

    def _paths(self, rows: list[tuple[int, list[str]]], column: int) -> list[str]:
        paths: dict[str, int] = {}
        for line, cells in rows:
            path = cells[column].replace("\\", "/")
            if not path or _escapes(path):
                raise DataError(
                    f"{self.name}, line {line}: path {cells[column]!r} is empty or outside the CSV's folder"
                )
            path = posixpath.normpath(path)
            if path in paths:
                raise DataError(f"{self.name}, line {line}: {path!r} repeats line {paths[path]}")
            paths[path] = line
        missing = [f"{p} (line {line})" for p, line in paths.items() if not self.tree.exists(p)]
        if missing:
            raise DataError(f"{self.name}: {len(missing)} listed file(s) not found, e.g. {missing[:EXAMPLES]}")
        return list(paths)


def _csv_labels(
    name: str, rows: list[tuple[int, list[str]]], header: list[str], group_column: str
) -> tuple[np.ndarray | None, list[str], bool]:
    """Targets, classes and whether they are multi-label, by the CSV rules of the module docstring."""
    if "label" in header:
        column = header.index("label")
        for line, cells in rows:
            if not cells[column]:
                raise DataError(f"{name}, line {line}: empty label")
        labels = [cells[column] for _, cells in rows]
        classes = _sorted_classes(set(labels))
        index = {c: i for i, c in enumerate(classes)}
        return np.array([index[label] for label in labels], dtype=np.int64), classes, False
    columns = [i for i, h in enumerate(header) if h not in ("path", group_column)]
    if not columns:
        return None, [], False
    targets = np.zeros((len(rows), len(columns)), dtype=np.float32)
    for r, (line, cells) in enumerate(rows):
        for c, i in enumerate(columns):
            if cells[i] not in ("0", "1"):
                raise DataError(f"{name}, line {line}: column {header[i]!r} is {cells[i]!r}, expected 0 or 1")
            targets[r, c] = float(cells[i])
    return targets, [header[i] for i in columns], True


def _sorted_classes(names: Iterable[str]) -> list[str]:
    """Numeric class names in numeric order (2 before 10), others alphabetically."""
    names = list(names)
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


class _Npz(_Source):
    """MedMNIST-style arrays: ``images``/``labels`` or ``{split}_images``/``{split}_labels``, optional ``classes``.

    Labels (N,) or (N, 1) are class indices; (N, C) with C > 1 are multi-label 0/1. Without a
    ``classes`` array, classes are named by index and counted over every split, so that a split
    missing the last class still agrees with the others.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = str(path)
        with self._open() as npz:
            self.keys = set(npz.files)

    def _open(self) -> np.lib.npyio.NpzFile:
        try:
            return np.load(self.path, allow_pickle=False)
        except Exception as err:  # BadZipFile, ValueError, OSError...: all mean "not a usable .npz"
            raise DataError(f"{self.path}: not a readable .npz file ({type(err).__name__}: {err})") from err

    def splits(self) -> list[str]:
        return [s for s in SPLITS if f"{s}_images" in self.keys] if "train_images" in self.keys else []

    def _read(self, split: str | None) -> ImageSet:
        prefix = f"{split}_" if split else ""
        if f"{prefix}images" not in self.keys:
            raise DataError(f"{self.path}: no '{prefix}images' array (arrays: {sorted(self.keys)})")
        with self._open() as npz:
            arrays = {k: self._array(npz, k) for k in self.keys if k.endswith(("images", "labels", "classes"))}
        images = arrays[f"{prefix}images"]
        self._check_images(f"{prefix}images", images)
        store = ArrayStore(self.name, f"{prefix}images", images)
        source = f"{self.path}:{split}" if split else self.name
        labels = arrays.get(f"{prefix}labels")
        if labels is None:
            return ImageSet.from_refs(source, store, range(len(images)))
        if labels.ndim not in (1, 2):
            raise DataError(f"{self.path}: {prefix}labels has shape {labels.shape}; expected (N,), (N, 1) or (N, C)")
        if len(labels) != len(images):
            raise DataError(f"{self.path}: {len(labels)} {prefix}labels for {len(images)} {prefix}images")
        names = arrays.get(f"{prefix}classes", arrays.get("classes"))
        classes = None if names is None else [str(c) for c in names.reshape(-1)]
        if labels.ndim == 2 and labels.shape[1] > 1:
            targets = self._multilabel(labels, f"{prefix}labels")
            classes = classes or [str(i) for i in range(labels.shape[1])]
        else:
            targets = self._indices(labels, f"{prefix}labels")
            classes = classes or [str(i) for i in range(self._class_count(arrays))]
        width = targets.shape[1] if targets.ndim == 2 else int(targets.max(initial=-1)) + 1
        if (targets.ndim == 2 and width != len(classes)) or width > len(classes):
            raise DataError(f"{self.path}: {prefix}labels need {width} classes but {len(classes)} are named")
        return ImageSet.from_refs(source, store, range(len(images)), targets, classes, targets.ndim == 2)

    def _array(self, npz: np.lib.npyio.NpzFile, key: str) -> np.ndarray:
        try:
            return npz[key]
        except Exception as err:  # object arrays (pickles) are refused by allow_pickle=False
            raise DataError(f"{self.path}: cannot read array {key!r} ({type(err).__name__}: {err})") from err

    def _check_images(self, key: str, images: np.ndarray) -> None:
        grey = images.ndim == 3 and images.dtype.kind in "uif"
        colour = images.ndim == 4 and images.shape[3] in (1, 3, 4) and images.dtype == np.uint8
        if not (grey or colour) or len(images) == 0:
            raise DataError(
                f"{self.path}: {key} has shape {images.shape} and dtype {images.dtype}; expected (N,H,W) "
                "greyscale (any numeric type) or (N,H,W,1|3|4) uint8"
            )

    def _indices(self, labels: np.ndarray, key: str) -> np.ndarray:
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if (
            labels.ndim != 1
            or labels.dtype.kind not in "uifb"
            or (labels < 0).any()
            or (labels >= MAX_CLASSES).any()
            or (labels != np.rint(labels)).any()
        ):
            raise DataError(
                f"{self.path}: {key} must be non-negative integers below {MAX_CLASSES} of shape (N,) or (N, 1)"
            )
        return labels.astype(np.int64)

    def _class_count(self, arrays: dict[str, np.ndarray]) -> int:
        single = {k: a for k, a in arrays.items() if k.endswith("labels") and (a.ndim == 1 or a.shape[1:] == (1,))}
        return max(int(self._indices(a, k).max(initial=-1)) for k, a in single.items()) + 1

    def _multilabel(self, labels: np.ndarray, key: str) -> np.ndarray:
        if not np.isin(labels, (0, 1)).all():
            raise DataError(f"{self.path}: multi-label {key} must be 0 or 1")
        return labels.astype(np.float32)
