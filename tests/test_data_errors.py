"""Broken and hostile inputs give a clear error naming the file, or a counted skip (cass.data)."""

from __future__ import annotations

import io
import logging
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.data import get_testdata_file

from cass.data import BadImageError, DataError, decode_image, load_splits, open_images


@pytest.fixture(scope="module")
def jpeg(shared_data: Path) -> bytes:
    """A real 224 px brain MRI JPEG."""
    with zipfile.ZipFile(shared_data / "mini-cpu" / "imagefolder_mini.zip") as z:
        return z.read("brain_mri/glioma/Tr-gl_0584.jpg")


@pytest.fixture(scope="module")
def png(shared_data: Path) -> bytes:
    """A real 64 px brain MRI slice as PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.load(shared_data / "mini-cpu" / "brain_mri_mini_64.npz")["images"][0]).save(buf, "PNG")
    return buf.getvalue()


def bad_files(jpeg: bytes, png: bytes) -> dict[str, bytes]:
    return {
        "empty.png": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": png[: len(png) * 2 // 3],
        "text.png": b"this is not an image at all\n" * 20,
    }


@pytest.mark.parametrize("name", ["empty.png", "truncated.jpg", "truncated.png", "text.png"])
def test_undecodable_bytes_raise_bad_image_naming_the_file(name: str, jpeg: bytes, png: bytes) -> None:
    with pytest.raises(BadImageError, match=rf"^scans/{name}: "):
        decode_image(bad_files(jpeg, png)[name], f"scans/{name}")


def test_content_decides_not_the_extension(png: bytes) -> None:
    assert decode_image(png, "mislabelled.jpg").size == (64, 64)


def make_folder_with_bad_files(root: Path, jpeg: bytes, png: bytes) -> None:
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for j in range(3):
            (root / cls / f"good_{j}.png").write_bytes(png)
    for name, data in bad_files(jpeg, png).items():
        (root / "b" / name).write_bytes(data)


def test_check_stops_at_a_bad_file_or_skips_and_counts(tmp_path: Path, jpeg: bytes, png: bytes, caplog) -> None:
    make_folder_with_bad_files(tmp_path, jpeg, png)
    images = open_images(tmp_path)
    assert len(images) == 10
    with pytest.raises(BadImageError, match=r"b/empty\.png: empty file.*--skip-bad-images"):
        images.check()
    with caplog.at_level(logging.WARNING):
        good = images.check(skip_bad=True)
    assert good.skipped == 4 and len(good) == 6
    assert all("good_" in k for k in good.keys)
    assert good.targets.tolist() == [0, 0, 0, 1, 1, 1]
    assert "skipped 4 unreadable image(s) of 10" in caplog.text and "truncated.jpg" in caplog.text
    with pytest.raises(BadImageError, match="none of its 4 images is readable"):
        open_images(tmp_path / "b").subset([0, 4, 5, 6]).check(skip_bad=True)  # the bad files, by name


def test_bad_zip_member_is_named(tmp_path: Path, jpeg: bytes, png: bytes) -> None:
    with zipfile.ZipFile(tmp_path / "set.zip", "w") as z:
        z.writestr("scans/ok.png", png)
        z.writestr("scans/cut.jpg", jpeg[:500])
    images = open_images(tmp_path / "set.zip")
    with pytest.raises(BadImageError, match=r"set\.zip:scans/cut\.jpg: cannot decode"):
        images.check()


def test_non_image_files_are_skipped_and_reported(tmp_path: Path, png: bytes, caplog) -> None:
    (tmp_path / "scan.png").write_bytes(png)
    (tmp_path / "README.txt").write_text("about these scans")
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / ".DS_Store").write_bytes(b"\0\0")
    with caplog.at_level(logging.WARNING):
        images = open_images(tmp_path)
    assert [Path(k).name for k in images.keys] == ["scan.png"]
    assert "ignored 2 non-image file(s)" in caplog.text and "README.txt" in caplog.text


def test_folder_layout_errors(tmp_path: Path, png: bytes) -> None:
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "x.png").write_bytes(png)
    (tmp_path / "loose.png").write_bytes(png)
    with pytest.raises(DataError, match="both directly in the folder"):
        open_images(tmp_path)
    (tmp_path / "loose.png").unlink()
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "empty_class" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"empty_class.*hold no images"):
        open_images(tmp_path)
    with pytest.raises(DataError, match="no images found"):
        open_images(tmp_path / "empty_class")
    with pytest.raises(DataError, match="no such file or folder"):
        open_images(tmp_path / "missing")
    with pytest.raises(DataError, match="no 'val' split"):
        open_images(tmp_path, split="val")


def write_csv(root: Path, text: str, png: bytes, images: tuple[str, ...] = ("a.png", "b.png")) -> Path:
    for name in images:
        (root / name).write_bytes(png)
    (root / "labels.csv").write_text(text)
    return root / "labels.csv"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("path,label\na.png,x\nc.png,y\n", r"1 listed file\(s\) not found.*c\.png \(line 3\)"),
        ("path,label\na.png,x\n../b.png,y\n", r"line 3: path '\.\./b\.png' is empty or outside"),
        ("path,label\na.png,x\n/etc/hosts,y\n", r"line 3: path '/etc/hosts' is empty or outside"),
        ("path,label\na.png,x\nb.png,y\n./a.png,x\n", r"line 4: 'a\.png' repeats line 2"),
        ("path,label\na.png,x\nb.png,\n", r"line 3: empty label"),
        ("path,label\na.png,x\nb.png\n", r"line 3: 1 fields, the header has 2"),
        ("file,label\na.png,x\n", r"no 'path' column"),
        ("path,label\n", r"no rows under the header"),
        ("", r"empty CSV"),
        ("path,oedema\na.png,1\nb.png,yes\n", r"line 3: column 'oedema' is 'yes', expected 0 or 1"),
    ],
)
def test_csv_errors_name_the_file_and_line(tmp_path: Path, png: bytes, text: str, problem: str) -> None:
    csv_file = write_csv(tmp_path, text, png)
    with pytest.raises(DataError, match=rf"labels\.csv.*{problem}"):
        open_images(csv_file)


def test_csv_paths_inside_their_folder_are_fine(tmp_path: Path, png: bytes) -> None:
    (tmp_path / "img").mkdir()
    csv_file = write_csv(tmp_path, "path,label\nimg/../a.png,x\nimg\\c.png,y\n", png, ("a.png", "img/c.png"))
    assert open_images(csv_file).targets.tolist() == [0, 1]


def test_zip_members_escaping_the_root_are_refused(tmp_path: Path, png: bytes) -> None:
    for member in ("../evil.png", "ok/../../evil.png", "/abs.png"):
        archive = tmp_path / "evil.zip"
        with zipfile.ZipFile(archive, "w") as z:
            z.writestr("cls/good.png", png)
            z.writestr(zipfile.ZipInfo(member), png)
        with pytest.raises(DataError, match=rf"member '{member}' escapes the archive's root"):
            open_images(archive)


def test_zip_csv_escaping_the_archive_is_refused(tmp_path: Path, png: bytes) -> None:
    with zipfile.ZipFile(tmp_path / "set.zip", "w") as z:
        z.writestr("set/a.png", png)
        z.writestr("set/labels.csv", "path,label\na.png,x\n../../outside.png,y\n")
    with pytest.raises(DataError, match=r"set\.zip:set/labels\.csv, line 3: path '\.\./\.\./outside\.png'"):
        open_images(tmp_path / "set.zip")


def test_not_a_zip_or_npz(tmp_path: Path) -> None:
    (tmp_path / "fake.zip").write_bytes(b"PK not really")
    (tmp_path / "fake.npz").write_bytes(b"nope")
    (tmp_path / "data.bin").write_bytes(b"nope")
    with pytest.raises(DataError, match=r"fake\.zip: not a readable zip"):
        open_images(tmp_path / "fake.zip")
    with pytest.raises(DataError, match=r"fake\.npz: not a readable \.npz"):
        open_images(tmp_path / "fake.npz")
    with pytest.raises(DataError, match=r"data\.bin: not a folder, \.csv, \.zip or \.npz"):
        open_images(tmp_path / "data.bin")


@pytest.mark.parametrize(
    ("arrays", "problem"),
    [
        ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.array([0, 1, 2])}, r"3 labels for 4 images"),
        ({"images": np.zeros((2, 8, 8), np.uint8), "labels": np.array([0, -1])}, r"labels must be non-negative"),
        ({"images": np.zeros((2, 8, 8), np.uint8), "labels": np.array([0.5, 1])}, r"labels must be non-negative"),
        ({"images": np.zeros((2, 8, 8, 2), np.uint8)}, r"images has shape \(2, 8, 8, 2\)"),
        ({"images": np.zeros((2, 8, 8, 3), np.float32)}, r"dtype float32"),
        ({"images": np.zeros((2, 8, 8), np.uint8), "labels": np.array([[0, 2], [1, 0]])}, r"must be 0 or 1"),
        (
            {"images": np.zeros((2, 8, 8), np.uint8), "labels": np.array([0, 3]), "classes": np.array(["a", "b"])},
            r"need 4 classes but 2 are named",
        ),
        ({"pixels": np.zeros((2, 8, 8), np.uint8)}, r"no 'images' array"),
        ({"images": np.array([None, 1], dtype=object)}, r"cannot read array 'images'"),
    ],
)
def test_npz_errors(tmp_path: Path, arrays: dict, problem: str) -> None:
    np.savez(tmp_path / "set.npz", **arrays)
    with pytest.raises(DataError, match=rf"set\.npz: .*{problem}"):
        open_images(tmp_path / "set.npz")


def test_multilabel_and_single_label_splits_disagree(tmp_path: Path, png: bytes) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    write_csv(tmp_path / "train", "path,label\na.png,x\nb.png,y\n", png)
    write_csv(tmp_path / "val", "path,x,y\na.png,1,0\nb.png,1,1\n", png)
    with pytest.raises(DataError, match=r"is multi-label but .* is single-label"):
        load_splits(tmp_path)


def test_pixel_limit(png: bytes) -> None:
    with pytest.raises(BadImageError, match=r"big\.png: 64x64 pixels exceeds the pixel limit of 4000"):
        decode_image(png, "big.png", max_pixels=4000)
    assert decode_image(png, "ok.png", max_pixels=64 * 64).size == (64, 64)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a huge size in its header: what a decompression bomb looks like before decoding."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_decompression_bombs_are_refused_before_decoding() -> None:
    with pytest.raises(BadImageError, match=r"bomb\.png: 12000x12000 pixels exceeds the pixel limit of 100000000"):
        decode_image(png_header_only(12_000, 12_000), "bomb.png")
    # A limit raised above PIL's own hard limit still refuses through PIL, with the same error type.
    with pytest.raises(BadImageError, match=r"bomb\.png: exceeds PIL's decompression-bomb limit"):
        decode_image(png_header_only(50_000, 50_000), "bomb.png", max_pixels=10**10)


def test_oversized_archive_member_is_not_read(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("scan.png", b"\0" * (3 << 20))  # compresses to a few KiB
    images = open_images(tmp_path / "bomb.zip", max_pixels=1000)
    with pytest.raises(BadImageError, match=r"bomb\.zip:scan\.png: 3145728 bytes is too large"):
        images.load(0)


def test_multi_frame_images_are_refused(png: bytes) -> None:
    frames = [Image.open(io.BytesIO(png)), Image.open(io.BytesIO(png)).rotate(90)]
    buf = io.BytesIO()
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:])
    with pytest.raises(BadImageError, match=r"stack\.tif: multi-frame image \(2 frames\)"):
        decode_image(buf.getvalue(), "stack.tif")


def test_nan_in_float_image(tmp_path: Path) -> None:
    values = np.ones((4, 4), dtype=np.float32)
    values[1, 2] = np.nan
    np.savez(tmp_path / "f.npz", images=values[None])
    with pytest.raises(BadImageError, match=r"f\.npz:images\[0\]: pixel values include NaN"):
        open_images(tmp_path / "f.npz").load(0)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_files_fail_only_with_bad_image_error(data: st.DataObject, jpeg: bytes, png: bytes) -> None:
    """Flipped, cut and spliced bytes of real PNG, JPEG and DICOM files never escape as another error."""
    ct = Path(get_testdata_file("CT_small.dcm", download=False)).read_bytes()
    name, original = data.draw(st.sampled_from([("x.png", png), ("x.jpg", jpeg), ("x.dcm", ct)]))
    blob = bytearray(original[: data.draw(st.integers(0, len(original)))])
    for _ in range(data.draw(st.integers(0, 8))):
        if blob:
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    try:
        img = decode_image(bytes(blob), name, max_pixels=10**6)
    except BadImageError as err:
        assert str(err).startswith(name)
    else:
        assert img.mode == "RGB"
