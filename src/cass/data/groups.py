"""Groups of images that must stay in one role: a patient's slices, a study's views, near-duplicate files.

An image's group comes from a groups file (``data.groups``, matched here), else from a CSV data file's
group column or a DICOM file's PatientID (read with the images, :mod:`cass.data.sources`); an image
with none is its own group. Splits carved by :mod:`cass.data.splits` take whole groups; a group the
data's own splits already put in two roles is a leak, refused by :func:`check_group_overlap`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import posixpath
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from cass.data.dataset import ImageSet
from cass.data.sources import EXAMPLES, SPLITS, DataError, Splits

log = logging.getLogger(__name__)

PATH_COLUMN = "path"
GROUPS_OPTION = "data.groups (--groups)"


def named_splits(splits: Splits) -> list[tuple[str, ImageSet]]:
    """``(name, images)`` of every split the data has, in ``train, val, test`` order."""
    return [(name, images) for name in SPLITS if (images := getattr(splits, name)) is not None]


def read_groups_file(path: str | Path, column: str) -> dict[str, str]:
    """Path -> group of every row of the groups file at ``path`` that names a group.

    The path column is ``path``, else the one column whose name starts with ``path`` (a manifest's
    ``path_in_zip``); paths are normalised to POSIX form. A path listed twice with two groups is refused.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the groups file of {GROUPS_OPTION} ({err})") from err
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip() for h in next(reader, [])]
    paths = _path_column(path, header)
    if column not in header:
        raise DataError(f"{path}: no group column {column!r} (header: {header}); name it with "
                        "data.group_column (--group-column)")
    table: dict[str, str] = {}
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(f"{path}, line {reader.line_num}: {len(row)} fields, the header has {len(header)}")
            image = posixpath.normpath(row[paths].strip().replace("\\", "/"))
            group = row[header.index(column)].strip()
            if group and table.setdefault(image, group) != group:
                raise DataError(f"{path}, line {reader.line_num}: {image!r} is in group {group!r} and, on an "
                                f"earlier line, in group {table[image]!r}")
    except csv.Error as err:
        raise DataError(f"{path}, line {reader.line_num}: {err}") from err
    if not table:
        raise DataError(f"{path}: no row names a group in column {column!r}")
    return table


def _path_column(path: str | Path, header: list[str]) -> int:
    """Index of the column naming the images: ``path``, else the only column starting with ``path``."""
    if PATH_COLUMN in header:
        return header.index(PATH_COLUMN)
    candidates = [i for i, h in enumerate(header) if h.startswith(PATH_COLUMN)]
    if len(candidates) != 1:
        raise DataError(f"{path}: the groups file needs a 'path' column (or exactly one column whose name starts "
                        f"with 'path'), header: {header}")
    return candidates[0]


def _tails(key: str) -> Iterator[str]:
    """``key`` and each trailing part of it that starts after a ``/`` or ``:``, longest first.

    An image is named ``/data/scans/train/a/x.png`` on disk, ``scans.zip:train/a/x.png`` in a zip and
    ``scans.npz:train_images[3]`` in an .npz; a groups file names it by any of these tails.
    """
    key = key.replace("\\", "/")
    yield key
    for separator in re.finditer(r"[/:]", key):
        yield key[separator.end():]


def with_groups_file(splits: Splits, path: str | Path, column: str) -> Splits:
    """``splits`` with each image listed in the groups file at ``path`` put in the group it names there.

    An image matches the longest of its names' tails (:func:`_tails`) that the file lists; a row matched by
    two images is ambiguous and refused (list longer paths). A file naming none of the images is a
    mistake and refused; images it does not list keep the group they had (or stay their own), with a
    warning that counts them.
    """
    table = read_groups_file(path, column)
    matched: dict[str, str] = {}
    grouped: dict[str, ImageSet] = {}
    for name, images in named_splits(splits):
        groups = list(images.groups or [None] * len(images))
        for i, key in enumerate(images.keys):
            row = next((tail for tail in _tails(key) if tail in table), None)
            if row is None:
                continue
            if row in matched:
                raise DataError(f"{path}: {row!r} matches both {matched[row]} and {key}: list longer paths")
            matched[row] = key
            groups[i] = table[row]
        grouped[name] = dataclasses.replace(images, groups=groups)
    total = sum(len(images) for images in grouped.values())
    if not matched:
        example = next(iter(grouped.values())).keys[0]
        raise DataError(f"{path}: none of its {len(table)} paths (e.g. {next(iter(table))!r}) names one of the "
                        f"{total} images (e.g. {example!r}); a path must be an image's name or its end")
    if len(matched) < total:
        log.warning("%s: %d of %d images are not listed; each keeps its own group", path, total - len(matched), total)
    return Splits(**grouped)


def check_group_overlap(splits: Splits, allow: bool) -> None:
    """Refuse a group that the data's own splits put in two roles (or, with ``allow``, warn loudly).

    Such a group leaks: a patient trained on and tested on inflates the test score. The message names
    the first groups, their splits and how many there are.
    """
    named = named_splits(splits)
    found: dict[str, list[str]] = {}
    for name, images in named:
        for group in dict.fromkeys(g for g in images.groups or () if g is not None):
            found.setdefault(group, []).append(name)
    shared = {group: names for group, names in found.items() if len(names) > 1}
    if not shared:
        return
    examples = ", ".join(f"{group!r} ({' and '.join(names)})" for group, names in list(shared.items())[:EXAMPLES])
    sources = "; ".join(f"{name}: {images.source}" for name, images in named)
    message = (f"{len(shared)} group(s) are in more than one split of the data, e.g. {examples} ({sources}): "
               "their images leak between training and scoring")
    if not allow:
        raise DataError(f"{message}; put each group in one split, or set data.allow_group_overlap "
                        "(--allow-group-overlap) to go on with a warning")
    log.warning(message)
    print(f"WARNING: {message} (data.allow_group_overlap is set: going on)", file=sys.stderr)
