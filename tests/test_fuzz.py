"""Fuzzing every reader: generated and mutated files fail only with the documented error types.

Each test below feeds its reader a fixed number of examples (hypothesis, derandomized so CI sees
the same files every run) and asserts it ran them all: 10,000 files in total across the image
decoder, CSV, zip, .npz and DICOM readers. A file either gives images that every later step can
use (8-bit RGB, at least one pixel) or fails with :class:`BadImageError` or :class:`DataError`,
the two errors the CLI turns into a one-line message; any other exception is a crash mid-run.
"""

from __future__ import annotations

import csv
import io
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from cass.data import BadImageError, DataError, decode_image, load_splits

DOCUMENTED = (BadImageError, DataError)
EXAMPLES = {"decoder": 4000, "dicom": 1500, "csv": 1500, "zip": 1500, "npz": 1500}
MAX_PIXELS = 10**6

# pydicom warns about every odd header value, and numpy about overflow in its arithmetic on them;
# the property under test is about exceptions (non-finite results are refused by the decoder).
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]


def test_example_counts_reach_ten_thousand() -> None:
    assert sum(EXAMPLES.values()) >= 10_000


def fuzz(reader: str, strategy: st.SearchStrategy, check: Callable[[Any], None]) -> None:
    """Run ``check`` on ``EXAMPLES[reader]`` examples drawn from ``strategy``, and prove that many ran."""
    ran = []

    @settings(max_examples=EXAMPLES[reader], deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def one(example: Any) -> None:
        ran.append(1)
        check(example)

    one()
    assert len(ran) >= EXAMPLES[reader]


def usually(valid: Any, *hostile: Any) -> st.SearchStrategy:
    """``valid`` four times in five, else one of the ``hostile`` values: deep code paths stay reachable."""
    return st.sampled_from([valid] * 4 * len(hostile) + list(hostile))


ONE_IN_FIVE = usually(False, True)


def mostly(draw: st.DrawFn, good: st.SearchStrategy, bad: st.SearchStrategy) -> Any:
    """A value of ``good`` four times in five, else of ``bad``."""
    return draw(bad if draw(ONE_IN_FIVE) else good)


def write_new(path: Path, data: bytes) -> None:
    """Write ``path`` as a new file: rewriting one in place makes ext4 flush it on close, 100 times slower."""
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def read_everything(path: Path | str) -> None:
    """What a run does with ``--data``: find the splits, then decode every image they list."""
    try:
        splits = load_splits(path, max_pixels=MAX_PIXELS)
    except DOCUMENTED:
        return
    for images in (splits.train, splits.val, splits.test):
        if images is None:
            continue
        try:
            good = images.check(skip_bad=True)
        except BadImageError:
            continue
        assert good.skipped + len(good) == len(images)
        for i in range(len(good)):
            assert_usable(good.load(i))


def assert_usable(img: Image.Image) -> None:
    assert img.mode == "RGB" and img.width > 0 and img.height > 0


# --- seeds: small real images in every pixel format -------------------------------------------


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def seeds(shared_data: Path) -> dict[str, bytes]:
    """Files named by their format, all made from one real 64 px brain MRI slice (or real DICOM)."""
    grey = np.load(shared_data / "mini-cpu" / "brain_mri_mini_64.npz")["images"][0][::2, ::2]
    img = Image.fromarray(grey)
    rgb = Image.merge("RGB", (img, img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), img))
    rgba = Image.merge("RGBA", (*rgb.split(), img))
    with zipfile.ZipFile(shared_data / "mini-cpu" / "imagefolder_mini.zip") as z:
        jpeg = z.read("blood_pbc/platelet/PLATELET_495775.jpg")
    dicoms = ("MR_small.dcm", "SC_rgb_small_odd.dcm", "MR_small_RLE.dcm", "rtdose.dcm", "JPEG2000.dcm")
    return {
        "grey.png": encode(img, "PNG"),
        "rgba.png": encode(rgba, "PNG"),
        "palette.png": encode(rgb.quantize(16), "PNG", transparency=0),
        "grey16.png": encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"),
        "real.jpg": jpeg,
        "small.jpg": encode(rgb, "JPEG", quality=50),
        "float.tif": encode(Image.fromarray(grey.astype(np.float32) / 7), "TIFF"),
        "lzw.tif": encode(rgb, "TIFF", compression="tiff_lzw"),
        "anim.gif": encode(img, "GIF", save_all=True, append_images=[rgb.quantize(8)]),
        "pic.bmp": encode(rgb, "BMP"),
        "pic.webp": encode(rgb, "WEBP"),
        "pic.ppm": encode(img, "PPM"),
        **{name: Path(get_testdata_file(name, download=False)).read_bytes() for name in dicoms},
    }


@st.composite
def mutated(draw: st.DrawFn, seeds: dict[str, bytes]) -> tuple[str, bytes]:
    """A seed file with bytes flipped, inserted, deleted, duplicated or cut off (or random bytes)."""
    name = draw(st.sampled_from(sorted(seeds)))
    if draw(st.integers(0, 19)) == 0:
        return name, draw(st.binary(max_size=300))
    blob = bytearray(seeds[name])
    for _ in range(draw(st.integers(0, 6))):
        at = draw(st.integers(0, len(blob)))
        edit = draw(st.sampled_from(["flip", "insert", "delete", "duplicate", "truncate"]))
        if edit == "flip" and at < len(blob):
            blob[at] = draw(st.integers(0, 255))
        elif edit == "insert":
            blob[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif edit == "delete":
            del blob[at : at + draw(st.integers(1, 64))]
        elif edit == "duplicate":
            blob[at:at] = blob[at : at + draw(st.integers(1, 64))]
        elif edit == "truncate":
            del blob[at:]
    return name, bytes(blob)


def test_image_decoder(seeds: dict[str, bytes]) -> None:
    """PNG (8/16-bit, RGBA, palette), JPEG, TIFF, GIF, BMP, WebP, PPM and DICOM, damaged."""

    def check(example: tuple[str, bytes]) -> None:
        name, blob = example
        try:
            img = decode_image(blob, f"scans/{name}", MAX_PIXELS)
        except BadImageError as err:
            assert str(err).startswith(f"scans/{name}: ")
        else:
            assert_usable(img)

    fuzz("decoder", mutated(seeds), check)


# --- DICOM: generated datasets with hostile header values --------------------------------------

WINDOW_VALUES = st.sampled_from(["40", "255", "-1e3", "3\\7", "0", "-1", "1e308", "nan", "inf", "-inf"])


@st.composite
def dicom_files(draw: st.DrawFn) -> tuple[str, bytes]:
    """Mostly well-formed files whose header values are, one at a time, out of range or inconsistent."""
    rows, cols = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    samples, photometric = draw(usually((1, "MONOCHROME2"), (1, "MONOCHROME1"), (3, "RGB"), (3, "YBR_FULL"),
                                        (1, "PALETTE COLOR"), (1, ""), (4, "JUNK")))
    bits = draw(usually(16, 8, 1, 12, 32))
    frames = draw(usually(None, "1", "2", "0", "-3"))
    syntax = draw(usually(ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, RLELossless,
                          JPEGBaseline8Bit))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = draw(usually(rows, 0, 65535)), cols
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits
    ds.BitsStored = draw(usually(bits, 12, 40))
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = draw(st.sampled_from([0, 1]))
    if samples > 1:
        ds.PlanarConfiguration = draw(st.sampled_from([0, 1]))
    if frames is not None:
        ds.NumberOfFrames = frames
    for tag in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        if draw(st.booleans()):
            setattr(ds, tag, draw(WINDOW_VALUES))
    if draw(st.booleans()):
        ds.VOILUTFunction = draw(st.sampled_from(["LINEAR", "LINEAR_EXACT", "SIGMOID", "JUNK"]))
    size = rows * cols * samples * max(bits // 8, 1) * (2 if frames == "2" else 1)
    pixels = draw(st.binary(min_size=size, max_size=size)) + draw(usually(b"", b"\0\0", b"\0" * 7))
    if draw(st.integers(0, 9)) == 0:
        pixels = pixels[: len(pixels) // 2]
    ds.PixelData = encapsulate([pixels or b"\0\0"]) if syntax.is_compressed else pixels
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=syntax != ExplicitVRBigEndian,
               enforce_file_format=draw(st.booleans()))
    blob = bytearray(buf.getvalue())
    for _ in range(draw(usually(0, 2))):
        blob[draw(st.integers(0, len(blob) - 1))] = draw(st.integers(0, 255))
    return draw(st.sampled_from(["scan.dcm", "scan", "scan.DICOM"])), bytes(blob)


def test_dicom_reader(tmp_path: Path) -> None:
    """Generated DICOM files, found in a folder (with or without suffix) and decoded."""

    def check(example: tuple[str, bytes]) -> None:
        name, blob = example
        folder = tmp_path / "dicom"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        (folder / name).write_bytes(blob)
        read_everything(folder)

    fuzz("dicom", dicom_files(), check)


# --- CSV: hostile text beside real images ---------------------------------------------------------

SPELLINGS = {"a.png": ["a.png", "./a.png"], "b.jpg": ["b.jpg", "sub/../b.jpg"],
             "sub/c.png": ["sub/c.png", "sub\\c.png"]}
"""The files beside the fuzzed CSVs, each with the ways a CSV may name it."""
BAD_PATHS = ["../a.png", "/etc/hostname", "C:/x.png", "missing.png", "text.png", "empty.png", "sub", ".", "", " ",
             "a\x00.png", "é.png", '"', "a,b"]
GOOD_LABELS = ["x", "y", "0", "1"]
BAD_LABELS = ["2", "-1", "", " ", "yes", "é", '"', "a,b", "\x00", "\n"]
HEADERS = [["path", "label"], ["path"], ["path", "x", "y"], ["label", "path", "note"], ["PATH", "label"],
           ["\ufeffpath", "label"], ["path", "path"], ["path", "label", "label"], ["path", ""], []]
CSV = {
    "good headers": st.sampled_from(HEADERS[:3]),
    "headers": st.sampled_from(HEADERS),
    "files": st.permutations(sorted(SPELLINGS)),
    "duplicates": st.lists(st.sampled_from(sorted(SPELLINGS)), max_size=2),
    "bad paths": st.sampled_from(BAD_PATHS),
    "good labels": st.sampled_from(GOOD_LABELS),
    "bad labels": st.sampled_from(BAD_LABELS),
    "line ends": st.sampled_from(["\n", "\r\n", "\r"]),
    **{file: st.sampled_from(spellings) for file, spellings in SPELLINGS.items()},
}
"""The strategies :func:`csv_text` draws from, built once (building them per draw is slow)."""


@st.composite
def csv_text(draw: st.DrawFn) -> bytes:
    """A labels CSV, well-formed half the time; otherwise some cells, rows, headers or bytes are wrong."""
    faulty = draw(st.booleans())

    def pick(good: st.SearchStrategy, bad: st.SearchStrategy) -> Any:
        return mostly(draw, good, bad) if faulty else draw(good)

    header = pick(CSV["good headers"], CSV["headers"])
    files = draw(CSV["files"])[: draw(st.integers(1, len(SPELLINGS)))]
    files += pick(st.just([]), CSV["duplicates"])
    rows = [header]
    for file in pick(st.just(files), st.just([])):
        width = len(header) + pick(st.just(0), st.sampled_from([-1, 1]))
        columns = header + [""] * max(width - len(header), 0)
        rows.append([
            pick(CSV[file], CSV["bad paths"]) if column == "path" else pick(CSV["good labels"], CSV["bad labels"])
            for column in columns[:width]
        ])
    buf = io.StringIO()
    csv.writer(buf, lineterminator=draw(CSV["line ends"])).writerows(rows)
    text = buf.getvalue().encode()
    if pick(st.just(False), st.just(True)):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.binary(min_size=1, max_size=4)) + text[at:]
    return text


def write_images(folder: Path, seeds: dict[str, bytes]) -> None:
    """The files the fuzzed CSVs may list: good images, a text file and an empty one."""
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(seeds["grey.png"])
    (folder / "b.jpg").write_bytes(seeds["small.jpg"])
    (folder / "sub" / "c.png").write_bytes(seeds["rgba.png"])
    (folder / "text.png").write_text("not an image\n")
    (folder / "empty.png").write_bytes(b"")


def test_csv_reader(tmp_path: Path, seeds: dict[str, bytes]) -> None:
    """One CSV on its own, or a train and a val CSV whose classes must agree."""
    for split in ("train", "val"):
        write_images(tmp_path / split, seeds)

    def check(example: tuple[bytes, bytes | None]) -> None:
        train, val = example
        write_new(tmp_path / "train" / "labels.csv", train)
        if val is None:
            read_everything(tmp_path / "train" / "labels.csv")
        else:
            write_new(tmp_path / "val" / "labels.csv", val)
            read_everything(tmp_path)

    fuzz("csv", st.tuples(csv_text(), st.none() | csv_text()), check)


# --- zip: generated archives, some with escaping names, some damaged ----------------------------

ZIP = {
    "folders": st.sampled_from(["", "train/", "val/", "a/", "b/", "wrap/", "wrap/a/", "wrap/sub/"]),
    "bad folders": st.sampled_from(["test/", "../", "a/../../", "/", "C:/", "__MACOSX/", ".hidden/"]),
    "files": st.sampled_from(["a.png", "b.jpg", "sub/c.png", "z.dcm", "labels.csv", "noext", "readme.txt"]),
    "garbage": st.binary(max_size=64),
    "methods": st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]),
}


@st.composite
def zip_archives(draw: st.DrawFn, seeds: dict[str, bytes]) -> tuple[bytes, str]:
    """Archives of real images and fuzzed CSVs under usual and hostile names, some bytes damaged."""
    images = st.sampled_from(sorted(seeds)).map(seeds.__getitem__)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for _ in range(draw(usually(3, 1, 6, 0))):
            folder = mostly(draw, ZIP["folders"], ZIP["bad folders"])
            file = draw(ZIP["files"])
            content = draw(csv_text()) if file.endswith(".csv") else mostly(draw, images, ZIP["garbage"])
            method = draw(ZIP["methods"])
            z.writestr(zipfile.ZipInfo(folder + file), content, compress_type=method)
    blob = bytearray(buf.getvalue())
    for _ in range(draw(usually(0, 1, 3))):
        if blob:
            blob[draw(st.integers(0, len(blob) - 1))] = draw(st.integers(0, 255))
    if draw(usually(False, True)):
        blob = blob[: draw(st.integers(0, len(blob)))]
    return bytes(blob), draw(usually("", "/a", "/labels.csv", "/wrap/labels.csv", "/wrap"))


def test_zip_reader(tmp_path: Path, seeds: dict[str, bytes]) -> None:
    def check(example: tuple[bytes, str]) -> None:
        blob, inner = example
        write_new(tmp_path / "set.zip", blob)
        read_everything(f"{tmp_path / 'set.zip'}{inner}")

    fuzz("zip", zip_archives(seeds), check)


# --- npz: generated arrays of every dtype and shape, some files damaged -------------------------

KEYS = ["images", "labels", "classes", "train_images", "train_labels", "val_labels", "test_images", "other"]
DTYPES = ["uint8", "uint16", "int16", "int64", "float32", "float64", "bool", "complex64", "<U3"]
VALUES = st.lists(st.integers(0, 1), min_size=1, max_size=8)
HOSTILE_VALUES = st.lists(st.sampled_from([-1, 2, 3, 2**40, 1e300, 0.5, float("nan"), float("inf")]), min_size=1,
                          max_size=4)


@st.composite
def arrays(draw: st.DrawFn, shapes: st.SearchStrategy, dtypes: st.SearchStrategy) -> np.ndarray:
    shape, dtype = draw(shapes), np.dtype(draw(dtypes))
    values = mostly(draw, VALUES, HOSTILE_VALUES)
    with np.errstate(all="ignore"):
        flat = np.resize(np.array(values, dtype=np.float64), int(np.prod(shape)))
        return (flat.astype(str) if dtype.kind == "U" else flat.astype(dtype)).reshape(shape)


@st.composite
def npz_files(draw: st.DrawFn) -> bytes:
    """Mostly MedMNIST-like files (images, labels, classes per split) with odd shapes, dtypes and values."""
    content = {}
    for prefix in draw(usually([""], ["train_", "val_"], ["train_", "test_"], ["val_"], [])):
        n = draw(usually(3, 1, 0))
        content[f"{prefix}images"] = draw(arrays(
            usually((n, 4, 4), (n, 4, 4, 3), (n, 4, 4, 1), (n, 4, 4, 4), (n, 4), (n, 0, 4), (n, 4, 4, 2)),
            usually("uint8", "uint16", "float32", "int64", "bool", "complex64", "<U3")))
        if draw(usually(True, False)):
            content[f"{prefix}labels"] = draw(arrays(
                usually((n,), (n, 1), (n, 3), (n + 1,), (), (n, 1, 1)), usually("int64", "float64", "bool", "<U3")))
    if draw(usually(False, True)):
        content["classes"] = draw(arrays(usually((3,), (2,), (0,), (2, 2)), st.just("<U3")))
    if draw(usually(False, True)):
        content[draw(st.sampled_from(KEYS))] = draw(arrays(
            st.lists(st.integers(0, 4), max_size=4).map(tuple), st.sampled_from(DTYPES)))
    buf = io.BytesIO()
    (np.savez_compressed if draw(st.booleans()) else np.savez)(buf, **content)
    blob = bytearray(buf.getvalue())
    for _ in range(draw(usually(0, 1, 4))):
        blob[draw(st.integers(0, len(blob) - 1))] = draw(st.integers(0, 255))
    return bytes(blob)


def test_npz_reader(tmp_path: Path) -> None:
    def check(blob: bytes) -> None:
        write_new(tmp_path / "set.npz", blob)
        read_everything(tmp_path / "set.npz")

    fuzz("npz", npz_files(), check)


# --- what this fuzzer found, pinned as plain examples ---------------------------------------------


def test_zip_needing_a_newer_zip_version_is_a_data_error(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.png", b"x")
    blob = bytearray(buf.getvalue())
    central = blob.index(b"PK\x01\x02")
    blob[central + 6] = 99  # "version needed to extract": 9.9 (NotImplementedError inside zipfile)
    (tmp_path / "new.zip").write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"new\.zip: not a readable zip archive \(NotImplementedError"):
        load_splits(tmp_path / "new.zip")


@pytest.mark.parametrize(
    ("labels", "problem"),
    [
        (np.array(7), r"labels has shape \(\); expected"),
        (np.array([0, 2**40]), r"labels must be non-negative integers below 100000"),  # not 2**40 class names
        (np.array([0.0, 1e300]), r"labels must be non-negative integers below 100000"),  # not an int64 overflow
    ],
)
def test_npz_labels_that_are_no_class_indices(tmp_path: Path, labels: np.ndarray, problem: str) -> None:
    np.savez(tmp_path / "set.npz", images=np.zeros((2, 4, 4), np.uint8), labels=labels)
    with pytest.raises(DataError, match=rf"set\.npz: {problem}"):
        load_splits(tmp_path / "set.npz")


def test_npz_images_without_pixels_are_bad_images(tmp_path: Path) -> None:
    np.savez(tmp_path / "set.npz", images=np.zeros((2, 0, 4), np.uint8))
    with pytest.raises(BadImageError, match=r"set\.npz:images\[0\]: pixel array of shape \(0, 4\) holds no pixels"):
        load_splits(tmp_path / "set.npz").train.check()


def test_dicom_window_giving_nan_is_refused() -> None:
    from test_data_formats import dicom

    blob = dicom(np.arange(12, dtype=np.uint16).reshape(3, 4), WindowCenter="nan", WindowWidth="100")
    with pytest.raises(BadImageError, match=r"x\.dcm: values windowed by centre nan and width 100 include NaN"):
        decode_image(blob, "x.dcm")


def test_csv_with_old_mac_line_endings(tmp_path: Path, seeds: dict[str, bytes]) -> None:
    write_images(tmp_path, seeds)
    (tmp_path / "labels.csv").write_bytes(b"path,label\ra.png,x\rsub/c.png,y\r")
    images = load_splits(tmp_path / "labels.csv").train
    assert images.classes == ["x", "y"] and len(images.check()) == 2
