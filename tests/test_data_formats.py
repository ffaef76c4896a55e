"""Every supported layout and pixel format gives the images and labels it should (cass.data)."""

from __future__ import annotations

import csv
import io
import pickle
import re
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from cass.data import (
    BadImageError,
    DataError,
    ImageDataset,
    ImageSet,
    decode_image,
    load_splits,
    open_images,
    sample_path,
)
from cass.data.transforms import cass_augmentation

REPO = Path(__file__).resolve().parents[1]
PER_CLASS = 3


@pytest.fixture(scope="module")
def brain(shared_data: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """3 real 64 px brain MRI slices per class: images (N,64,64) uint8, labels, class names."""
    npz = np.load(shared_data / "mini-cpu" / "brain_mri_mini_64.npz")
    labels = npz["labels"]
    keep = np.concatenate([np.flatnonzero(labels == c)[:PER_CLASS] for c in np.unique(labels)])
    return npz["images"][keep], labels[keep], [str(c) for c in npz["classes"]]


def as_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


def index_of(key: str) -> int:
    """Every file written below is named by its row in the reference arrays, e.g. img_07.png."""
    return int(re.findall(r"\d+", key)[-1])


def assert_same_images(images: ImageSet, brain: tuple, labelled: bool = True) -> None:
    """Each loaded image equals its reference slice pixel for pixel, with the reference's class."""
    pixels, labels, classes = brain
    assert len(images) == len(pixels)
    assert sorted(index_of(k) for k in images.keys) == list(range(len(pixels)))
    for i, key in enumerate(images.keys):
        j = index_of(key)
        np.testing.assert_array_equal(np.asarray(images.load(i)), as_rgb(pixels[j]), err_msg=key)
        if labelled:
            assert images.classes[images.targets[i]] == classes[labels[j]], key
    if not labelled:
        assert images.targets is None and images.classes == []


def write_folder(root: Path, brain: tuple, labelled: bool = True) -> Path:
    pixels, labels, classes = brain
    for j, (img, label) in enumerate(zip(pixels, labels, strict=True)):
        folder = root / classes[label] if labelled else root
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"img_{j:02d}.png")
    return root


def write_csv(root: Path, brain: tuple) -> Path:
    """A CSV beside an images/ folder, rows in reverse order (order must not matter)."""
    pixels, labels, classes = brain
    (root / "images").mkdir(parents=True)
    rows = []
    for j, (img, label) in enumerate(zip(pixels, labels, strict=True)):
        Image.fromarray(img).save(root / "images" / f"img_{j:02d}.png")
        rows.append([f"images/img_{j:02d}.png", classes[label]])
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "label"], *reversed(rows)])
    return root / "labels.csv"


def zip_folder(folder: Path, out: Path, top: str = "") -> Path:
    """Zip every file under ``folder``, optionally wrapped in one top-level folder as zip tools do."""
    with zipfile.ZipFile(out, "w") as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, (Path(top) / f.relative_to(folder)).as_posix())
    return out


def test_every_format_loads_the_same_images(tmp_path: Path, brain: tuple) -> None:
    pixels, labels, classes = brain
    folder = write_folder(tmp_path / "folder", brain)
    csv_file = write_csv(tmp_path / "csv", brain)
    npz = tmp_path / "set.npz"
    np.savez(npz, images=pixels, labels=labels[:, None], classes=np.array(classes))  # (N, 1) labels
    sources = [
        folder,
        csv_file,
        zip_folder(folder, tmp_path / "folder.zip"),
        zip_folder(folder, tmp_path / "wrapped.zip", top="my_scans"),
        zip_folder(csv_file.parent, tmp_path / "csv.zip"),
        f"{zip_folder(csv_file.parent, tmp_path / 'named.zip')}/labels.csv",
        npz,
    ]
    for source in sources:
        images = open_images(source)
        assert images.classes == classes, source
        assert not images.multilabel
        assert_same_images(images, brain)


def test_unlabelled_formats(tmp_path: Path, brain: tuple) -> None:
    folder = write_folder(tmp_path / "flat", brain, labelled=False)
    npz = tmp_path / "unlabelled.npz"
    np.savez(npz, images=brain[0])
    with open(tmp_path / "paths.csv", "w") as f:
        f.write("path\n" + "".join(f"flat/img_{j:02d}.png\n" for j in range(len(brain[0]))))
    for source in [folder, zip_folder(folder, tmp_path / "flat.zip"), npz, tmp_path / "paths.csv"]:
        assert_same_images(open_images(source), brain, labelled=False)


def test_split_roots_in_folder_zip_and_npz(tmp_path: Path, brain: tuple) -> None:
    pixels, labels, classes = brain
    root = tmp_path / "root"
    # train keeps every class; val only the last two: its class indices must follow train's.
    val_mask = np.isin(labels, [2, 3]) & (np.arange(len(labels)) % PER_CLASS == 0)
    for split, mask in [("train", ~val_mask), ("val", val_mask)]:
        write_folder(root / split, (pixels, labels, classes))
        for j in np.flatnonzero(~mask):
            (root / split / classes[labels[j]] / f"img_{j:02d}.png").unlink()
    for d in root.glob("val/*"):
        if not any(d.iterdir()):
            d.rmdir()
    npz = tmp_path / "splits.npz"
    np.savez(
        npz,
        train_images=pixels[~val_mask],
        train_labels=labels[~val_mask],
        val_images=pixels[val_mask],
        val_labels=labels[val_mask],
        classes=np.array(classes),
    )
    for source in [root, zip_folder(root, tmp_path / "root.zip"), zip_folder(root, tmp_path / "w.zip", top="data")]:
        splits = load_splits(source)
        assert splits.test is None
        assert splits.train.classes == splits.val.classes == classes
        for part, mask in [(splits.train, ~val_mask), (splits.val, val_mask)]:
            assert sorted(index_of(k) for k in part.keys) == list(np.flatnonzero(mask))
            for i, key in enumerate(part.keys):
                assert part.targets[i] == labels[index_of(key)], key
                np.testing.assert_array_equal(np.asarray(part.load(i)), as_rgb(pixels[index_of(key)]))
    splits = load_splits(npz)
    assert splits.val.targets.tolist() == labels[val_mask].tolist()
    assert len(splits.train) == (~val_mask).sum()
    with pytest.raises(DataError, match="holds the splits"):
        open_images(root)
    assert len(open_images(root, split="val")) == val_mask.sum()


def test_val_data_overrides_and_must_share_classes(tmp_path: Path, brain: tuple) -> None:
    pixels, labels, classes = brain
    train = write_folder(tmp_path / "train", brain)
    keep = labels == 1
    val = write_folder(tmp_path / "val", (pixels[keep], labels[keep], classes))
    splits = load_splits(train, val_data=val)
    assert splits.val.classes == classes and set(splits.val.targets.tolist()) == {1}
    (val / "unknown_class").mkdir()
    shutil.copy(next(val.rglob("*.png")), val / "unknown_class" / "x.png")
    with pytest.raises(DataError, match="unknown_class"):
        load_splits(train, val_data=val)


def test_shared_imagefolder_zip(shared_data: Path) -> None:
    mini = shared_data / "mini-cpu" / "imagefolder_mini.zip"
    whole = open_images(mini).check()
    assert len(whole) == 28 and whole.classes == ["blood_pbc", "brain_mri"]
    assert Counter(whole.targets.tolist()) == {0: 16, 1: 12}
    brain = open_images(f"{mini}/brain_mri").check()
    assert brain.classes == ["glioma", "meningioma", "notumor", "pituitary"]
    assert Counter(brain.targets.tolist()) == {c: 3 for c in range(4)}
    assert all(brain.load(i).size == (224, 224) and brain.load(i).mode == "RGB" for i in range(len(brain)))


def test_medmnist_npz_official_splits(shared_data: Path) -> None:
    breast = load_splits(shared_data / "medmnist-small" / "breastmnist.npz")
    assert (len(breast.train), len(breast.val), len(breast.test)) == (546, 78, 156)
    assert breast.train.classes == ["0", "1"] and breast.train.targets.dtype == np.int64
    raw = np.load(shared_data / "medmnist-small" / "breastmnist.npz")
    np.testing.assert_array_equal(np.asarray(breast.test.load(5)), as_rgb(raw["test_images"][5]))
    assert breast.test.keys[5].endswith("breastmnist.npz:test_images[5]")
    pneumonia = load_splits(shared_data / "medmnist-small" / "pneumoniamnist_balanced_subset.npz")
    assert pneumonia.val.targets.tolist() == raw_labels(shared_data, "val")


def raw_labels(shared_data: Path, split: str) -> list[int]:
    raw = np.load(shared_data / "medmnist-small" / "pneumoniamnist_balanced_subset.npz")
    return raw[f"{split}_labels"][:, 0].tolist()  # stored as (N, 1)


def test_shipped_sample_is_the_default_and_rebuilds_identically(tmp_path: Path) -> None:
    splits = load_splits(None)
    assert splits.train.classes == ["glioma", "meningioma", "notumor", "pituitary"]
    assert Counter(splits.train.targets.tolist()) == {c: 60 for c in range(4)}
    assert Counter(splits.val.targets.tolist()) == {c: 20 for c in range(4)}
    names = {k.rsplit("/", 1)[1] for k in splits.train.keys}
    assert names.isdisjoint(k.rsplit("/", 1)[1] for k in splits.val.keys)
    assert sample_path().stat().st_size < 3 * 2**20
    splits.val.check()
    out = tmp_path / "sample.zip"
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_sample.py"), "--out", str(out)], check=True)
    assert out.read_bytes() == sample_path().read_bytes()
    assert (tmp_path / "PROVENANCE.md").read_text() == (sample_path().parent / "PROVENANCE.md").read_text()


def test_multilabel_csv(tmp_path: Path, brain: tuple) -> None:
    pixels = brain[0][:4]
    truth = np.array([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]], dtype=np.float32)
    lines = ["path,oedema,tumour,shift"]
    for j, row in enumerate(truth):
        Image.fromarray(pixels[j]).save(tmp_path / f"img_{j:02d}.png")
        lines.append(f"img_{j:02d}.png," + ",".join(str(int(v)) for v in row))
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    images = open_images(tmp_path / "labels.csv")
    assert images.multilabel and images.classes == ["oedema", "tumour", "shift"]
    assert images.targets.dtype == np.float32
    np.testing.assert_array_equal(images.targets, truth)
    dataset = ImageDataset(images, lambda img: torch.zeros(1))
    target = dataset[2][1]
    assert target.dtype == torch.float32 and target.tolist() == [1.0, 1.0, 1.0]


def test_numeric_class_names_sort_numerically(tmp_path: Path, brain: tuple) -> None:
    for j, name in enumerate(["2", "10", "1"]):
        (tmp_path / name).mkdir()
        Image.fromarray(brain[0][j]).save(tmp_path / name / f"img_{j:02d}.png")
    assert open_images(tmp_path).classes == ["1", "2", "10"]


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def minmax_reference(values: np.ndarray) -> np.ndarray:
    """The documented rule for >8-bit images, computed independently in float64."""
    v = values.astype(np.float64)
    return np.rint((v - v.min()) / (v.max() - v.min()) * 255).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_greyscale_is_scaled_min_max(fmt: str) -> None:
    values = np.arange(40 * 30, dtype=np.uint16).reshape(40, 30) * 3 + 100  # a 12-bit-like range
    decoded = decode_image(encode(Image.fromarray(values), fmt), f"x.{fmt.lower()}")
    assert decoded.mode == "RGB" and decoded.size == (30, 40)
    np.testing.assert_array_equal(np.asarray(decoded), as_rgb(minmax_reference(values)))


def test_16_bit_colour_keeps_the_high_byte() -> None:
    """PIL reads 48-bit PNGs as 8-bit RGB; the documented rule is its high byte, not min-max."""
    values = (np.arange(4 * 5 * 3).reshape(4, 5, 3) * 900 + 7).astype(">u2")
    rows = b"".join(b"\0" + row.tobytes() for row in values)  # filter type 0 per row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 5, 4, 16, 2, 0, 0, 0)  # 16 bits per sample, colour type RGB
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    np.testing.assert_array_equal(np.asarray(decode_image(png, "rgb48.png")), values >> 8)


def test_float_tiff_is_scaled_min_max() -> None:
    values = np.linspace(-3.5, 7.25, 24 * 16, dtype=np.float32).reshape(24, 16)
    decoded = decode_image(encode(Image.fromarray(values), "TIFF"), "x.tif")
    np.testing.assert_array_equal(np.asarray(decoded), as_rgb(minmax_reference(values)))


def test_greyscale_rgba_and_palette_rules(brain: tuple) -> None:
    grey = brain[0][0]
    np.testing.assert_array_equal(np.asarray(decode_image(encode(Image.fromarray(grey), "PNG"), "g.png")), as_rgb(grey))

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (20, 24, 4), dtype=np.uint8)
    decoded = np.asarray(decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), "a.png")).astype(int)
    on_black = rgba[..., :3].astype(np.float64) * rgba[..., 3:] / 255  # composited on black
    assert np.abs(decoded - on_black).max() <= 1

    palette = Image.fromarray(rng.integers(0, 4, (10, 12), dtype=np.uint8), "P")
    colours = [255, 0, 0, 0, 255, 0, 0, 0, 255, 200, 200, 200]
    palette.putpalette(colours)
    lut = np.array(colours).reshape(4, 3)
    np.testing.assert_array_equal(np.asarray(decode_image(encode(palette, "PNG"), "p.png")), lut[np.asarray(palette)])
    palette.info["transparency"] = 3  # index 3 is transparent: black
    decoded = np.asarray(decode_image(encode(palette, "PNG"), "t.png"))
    expected = lut[np.asarray(palette)]
    expected[np.asarray(palette) == 3] = 0
    np.testing.assert_array_equal(decoded, expected)


def dicom(pixels: np.ndarray, photometric: str = "MONOCHROME2", preamble: bool = True, **tags: object) -> bytes:
    """A minimal secondary-capture DICOM file holding ``pixels`` (frames, rows, cols) or (rows, cols)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    for tag, value in tags.items():
        setattr(ds, tag, value)
    ds.PixelData = pixels.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=preamble)
    return buf.getvalue()


def dicom_window_reference(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 (LINEAR) into 0..255, in float64."""
    x = values.astype(np.float64)
    c, w = centre - 0.5, width - 1
    y = np.clip(((x - c) / w + 0.5), 0, 1)
    y[x <= c - w / 2] = 0
    y[x > c + w / 2] = 1
    return np.rint(y * 255).astype(np.uint8)


def test_dicom_rescale_and_window() -> None:
    stored = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 3
    data = dicom(stored, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400)
    assert data[128:132] == b"DICM"
    hounsfield = stored * 2.0 - 1024
    expected = dicom_window_reference(hounsfield, 40, 400)
    assert 0 < expected.mean() < 255  # the window cuts both ends of this image
    np.testing.assert_array_equal(np.asarray(decode_image(data, "ct")), as_rgb(expected))


def test_dicom_monochrome1_is_inverted_and_signed_values_rescaled() -> None:
    stored = np.arange(-200, 200, dtype=np.int16).reshape(20, 20)
    mono2 = np.asarray(decode_image(dicom(stored, RescaleSlope=0.5, RescaleIntercept=10), "a.dcm"))
    mono1 = np.asarray(decode_image(dicom(stored, "MONOCHROME1", RescaleSlope=0.5, RescaleIntercept=10), "b.dcm"))
    np.testing.assert_array_equal(mono2, as_rgb(minmax_reference(stored * 0.5 + 10)))
    np.testing.assert_array_equal(mono1, 255 - mono2)


def test_dicom_without_preamble_or_suffix(tmp_path: Path) -> None:
    stored = np.arange(64, dtype=np.uint8).reshape(8, 8)
    bare = dicom(stored, preamble=False)
    assert bare[128:132] != b"DICM"
    np.testing.assert_array_equal(np.asarray(decode_image(bare, "scan.dcm"))[..., 0], minmax_reference(stored))
    (tmp_path / "IM0001").write_bytes(dicom(stored))  # PACS exports often have no suffix
    (tmp_path / "notes").write_text("not an image")
    images = open_images(tmp_path)
    assert [Path(k).name for k in images.keys] == ["IM0001"]


def test_multiframe_dicom_is_refused() -> None:
    frames = np.zeros((3, 8, 8), dtype=np.uint16)
    with pytest.raises(BadImageError, match=r"stack\.dcm: multi-frame image \(3 frames\)"):
        decode_image(dicom(frames), "stack.dcm")


def pydicom_file(name: str) -> tuple[bytes, pydicom.Dataset]:
    """A real DICOM file from pydicom's bundled test data, with its parsed dataset."""
    path = Path(get_testdata_file(name, download=False))
    return path.read_bytes(), pydicom.dcmread(path)


def test_real_dicom_files() -> None:
    ct, ds = pydicom_file("CT_small.dcm")  # rescale to Hounsfield units, no window
    hounsfield = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(np.asarray(decode_image(ct, "CT_small.dcm")), as_rgb(minmax_reference(hounsfield)))
    mr, ds = pydicom_file("MR_small.dcm")  # a window, no rescale
    expected = dicom_window_reference(ds.pixel_array, float(ds.WindowCenter), float(ds.WindowWidth))
    np.testing.assert_array_equal(np.asarray(decode_image(mr, "MR_small.dcm")), as_rgb(expected))
    rgb, ds = pydicom_file("SC_rgb_small_odd.dcm")
    np.testing.assert_array_equal(np.asarray(decode_image(rgb, "SC_rgb_small_odd.dcm")), ds.pixel_array)
    stack, _ = pydicom_file("SC_rgb_rle_2frame.dcm")
    with pytest.raises(BadImageError, match=r"SC_rgb_rle_2frame\.dcm: multi-frame image \(2 frames\)"):
        decode_image(stack, "SC_rgb_rle_2frame.dcm")


def test_image_set_pickles_and_reads_zip_in_workers(tmp_path: Path, brain: tuple) -> None:
    images = open_images(zip_folder(write_folder(tmp_path / "f", brain), tmp_path / "f.zip"))
    images.load(0)  # opens the archive in this process first
    copy = pickle.loads(pickle.dumps(images))
    np.testing.assert_array_equal(np.asarray(copy.load(3)), np.asarray(images.load(3)))
    dataset = ImageDataset(images, cass_augmentation(32), seed=1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2)
    in_workers = torch.cat([views for views, _, _ in loader])
    in_process = torch.stack([dataset[i][0] for i in range(len(dataset))])
    torch.testing.assert_close(in_workers, in_process, rtol=0, atol=0)


def test_augmentation_is_seeded_per_seed_epoch_and_index(tmp_path: Path, brain: tuple) -> None:
    images = open_images(write_folder(tmp_path / "f", brain))
    augment = cass_augmentation(32)
    a, b = ImageDataset(images, augment, seed=7), ImageDataset(images, augment, seed=7)
    torch.manual_seed(123)  # the global generator must not matter
    first = [a[i][0] for i in range(len(a))]
    torch.manual_seed(456)
    assert all(torch.equal(x, b[i][0]) for i, x in enumerate(first))
    assert a[5][1:] == (images.targets[5], 5)
    b.set_epoch(1)
    changed = sum(not torch.equal(x, b[i][0]) for i, x in enumerate(first))
    assert changed >= len(first) // 2  # each view is randomly augmented with p ~ 0.8
    other_seed = ImageDataset(images, augment, seed=8)
    assert any(not torch.equal(x, other_seed[i][0]) for i, x in enumerate(first))


def test_set_epoch_reaches_persistent_workers(tmp_path: Path, brain: tuple) -> None:
    images = open_images(write_folder(tmp_path / "f", brain))
    dataset = ImageDataset(images, cass_augmentation(32), seed=3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=6, num_workers=2, persistent_workers=True)
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        seen = torch.cat([views for views, _, _ in loader])
        expected = torch.stack([dataset[i][0] for i in range(len(dataset))])
        torch.testing.assert_close(seen, expected, rtol=0, atol=0)


def test_unlabelled_target_is_minus_one(tmp_path: Path, brain: tuple) -> None:
    images = open_images(write_folder(tmp_path / "flat", brain, labelled=False))
    assert ImageDataset(images, lambda img: torch.zeros(1))[0][1] == -1
