"""Decoding one image file into the 8-bit RGB picture every transform expects.

Medical images arrive as 8- or 16-bit greyscale, RGBA, palette PNGs, TIFFs and DICOM. Each is
converted by one fixed rule (see :func:`decode_image`) so that the same file always gives the same
pixels, and anything that cannot be decoded fails here, at a known place, with the file's name,
instead of mid-epoch inside a DataLoader worker.
"""

from __future__ import annotations

import io
import posixpath
import warnings
from typing import IO

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_windowing

from cass.config import DEFAULT_MAX_PIXELS

"""Largest image (width x height) accepted: a guard against decompression bombs."""

BYTES_PER_PIXEL_LIMIT = 8
"""Stores refuse files over this many bytes per allowed pixel (16-bit RGBA, uncompressed) plus
``HEADER_ALLOWANCE``, before reading them: that stops archive bombs cheaply."""
HEADER_ALLOWANCE = 1 << 20

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".dcm", ".dicom"}
)
"""File suffixes read as images when a folder or archive is scanned (other files are reported, not read)."""

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
DICOM_GROUP_TAGS = ("PatientID", "StudyInstanceUID")
"""Tags naming the group of a DICOM image, in order of preference: slices of one patient (or study) must
never be split between training and testing."""


class BadImageError(ValueError):
    """An image cannot be used; the message names the file (and archive member) and the problem."""


def max_file_bytes(max_pixels: int) -> int:
    """The largest file worth reading for an image of at most ``max_pixels`` pixels."""
    return BYTES_PER_PIXEL_LIMIT * max_pixels + HEADER_ALLOWANCE


def is_dicom(data: bytes, name: str) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble; bare datasets only have the suffix."""
    return data[128:132] == b"DICM" or posixpath.splitext(name)[1].lower() in DICOM_SUFFIXES


def dicom_group(file: IO[bytes]) -> str | None:
    """The patient a DICOM file shows (``PatientID``, else its ``StudyInstanceUID``), or None if it has neither.

    Only the header is parsed (``stop_before_pixels``), so grouping a folder of scans costs a fraction of
    decoding it. An unreadable header gives None too: the file is then its own group, and decoding it
    later reports it by name (or skips it with ``skip_bad_images``).
    """
    try:
        ds = pydicom.dcmread(file, force=True, stop_before_pixels=True, specific_tags=list(DICOM_GROUP_TAGS))
        values = (str(ds.get(tag) or "").strip() for tag in DICOM_GROUP_TAGS)
        return next((value for value in values if value), None)
    except Exception:  # as for decoding: hostile bytes raise exceptions of any type
        return None


def decode_image(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode the bytes of one image file into an 8-bit RGB PIL image, fully loaded.

    Conversion rules, applied per image so that no dataset-wide statistics are needed:

    - 8-bit ``RGB`` is returned as is; ``L``/``1``/``CMYK``/``YCbCr`` go through PIL's ``convert("RGB")``
      (greyscale is copied into the three channels).
    - Modes with transparency (``RGBA``, ``LA``, ``PA``, ``P``) are composited on black: a
      transparent pixel carries no image content, and black is the background of most scans.
    - Single-channel images deeper than 8 bits (``I;16*``, ``I``, ``F``) are scaled linearly from
      their own minimum..maximum to 0..255 (a constant image becomes 0): 16-bit scans often use 12
      bits or less, so dividing by 65535 would make them nearly black. 16-bit colour images are
      reduced to 8 bits by PIL itself (it keeps the high byte).
    - DICOM (``DICM`` at offset 128, or a ``.dcm``/``.dicom`` name) is read with pydicom: the
      modality LUT (rescale slope/intercept) is applied, then the first VOI window (centre/width)
      maps values to 0..255 when the file has one, otherwise the min..max rule above;
      ``MONOCHROME1`` is inverted so that high values are bright, as in ``MONOCHROME2``. Colour
      DICOM is taken as RGB after pydicom's colour-space conversion. Multi-frame files are refused.

    Multi-frame files of any format (animated GIF, multi-page TIFF) are refused: which frame to
    train on is the user's decision. Raises :class:`BadImageError` for empty, truncated or
    undecodable data and for images with more than ``max_pixels`` pixels.
    """
    if not data:
        raise BadImageError(f"{name}: empty file (0 bytes)")
    if is_dicom(data, name):
        return _decode_dicom(data, name, max_pixels)
    return _decode_pil(data, name, max_pixels)


def array_to_rgb(array: np.ndarray, name: str) -> Image.Image:
    """An (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array as 8-bit RGB, by the rules of :func:`decode_image`."""
    if array.size == 0:
        raise BadImageError(f"{name}: pixel array of shape {array.shape} holds no pixels")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return _grey_to_rgb(array, name)
    if array.ndim == 3 and array.shape[2] in (3, 4) and array.dtype == np.uint8:
        return _to_rgb(Image.fromarray(array), name)
    raise BadImageError(f"{name}: unsupported pixel array of shape {array.shape} and dtype {array.dtype}")


def _check_pixels(name: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise BadImageError(
            f"{name}: {width}x{height} pixels exceeds the pixel limit of {max_pixels} "
            "(raise max_image_pixels if the image is genuine)"
        )


def _refuse_frames(name: str, frames: int) -> None:
    """Which frame of a stack to train on is the user's decision, so stacks are refused, not sliced."""
    if frames > 1:
        raise BadImageError(f"{name}: multi-frame image ({frames} frames) is not supported; save one frame per file")


def _decode_pil(data: bytes, name: str, max_pixels: int) -> Image.Image:
    # Parsers raise exceptions of many types on hostile bytes (OSError, SyntaxError, ValueError,
    # struct.error, ...): at this boundary every one of them means "not a usable image".
    try:
        with warnings.catch_warnings():
            # Our own limit applies; PIL's warning threshold is a fixed global.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            _refuse_frames(name, getattr(img, "n_frames", 1))
            _check_pixels(name, *img.size, max_pixels)
            img.load()
        return _to_rgb(img, name)
    except BadImageError:
        raise
    except Image.UnidentifiedImageError as err:
        raise BadImageError(f"{name}: not an image (no format PIL reads recognises its content)") from err
    except Image.DecompressionBombError as err:
        raise BadImageError(f"{name}: exceeds PIL's decompression-bomb limit ({err})") from err
    except Exception as err:
        raise BadImageError(f"{name}: cannot decode image ({type(err).__name__}: {err})") from err


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return _grey_to_rgb(np.asarray(img), name)
    if img.mode in ("RGBA", "RGBa", "LA", "La", "P", "PA"):
        # A palette without transparency becomes opaque RGBA, so compositing leaves it unchanged.
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def _grey_to_rgb(values: np.ndarray, name: str) -> Image.Image:
    if values.dtype != np.uint8:
        values = _minmax_to_uint8(values, name)
    return Image.fromarray(values).convert("RGB")


def _finite(values: np.ndarray, name: str, what: str = "pixel values") -> np.ndarray:
    """NaN or infinity would silently become arbitrary 8-bit values, so they are refused."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise BadImageError(f"{name}: {what} include NaN or infinity")
    return values


def _minmax_to_uint8(values: np.ndarray, name: str) -> np.ndarray:
    values = _finite(values, name)
    low, high = values.min(), values.max()
    if high == low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _decode_dicom(data: bytes, name: str, max_pixels: int) -> Image.Image:
    # As for PIL: pydicom parses lazily, so garbage can surface as any exception on any access.
    try:
        return _dicom_to_rgb(pydicom.dcmread(io.BytesIO(data), force=True), name, max_pixels)
    except BadImageError:
        raise
    except Exception as err:
        raise BadImageError(f"{name}: cannot decode DICOM ({type(err).__name__}: {err})") from err


def _dicom_to_rgb(ds: Dataset, name: str, max_pixels: int) -> Image.Image:
    _refuse_frames(name, int(ds.get("NumberOfFrames") or 1))
    _check_pixels(name, int(ds.Columns), int(ds.Rows), max_pixels)
    photometric = str(ds.PhotometricInterpretation)
    pixels = ds.pixel_array
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if pixels.ndim != 3 or pixels.shape[2] != 3:
            raise BadImageError(f"{name}: unsupported DICOM photometric interpretation {photometric!r}")
        return array_to_rgb(pixels if pixels.dtype == np.uint8 else _minmax_to_uint8(pixels, name), name)
    if pixels.ndim != 2:
        raise BadImageError(f"{name}: {photometric} DICOM with pixel array of shape {pixels.shape}")
    values = _dicom_grey(ds, pixels, name)
    if photometric == "MONOCHROME1":
        values = 255 - values
    return Image.fromarray(values).convert("RGB")


def _dicom_grey(ds: Dataset, pixels: np.ndarray, name: str) -> np.ndarray:
    """Stored values -> modality values (e.g. Hounsfield units) -> 0..255 through the window."""
    values = _finite(apply_modality_lut(pixels, ds), name, "rescaled pixel values")
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return _minmax_to_uint8(values, name)
    window = f"values windowed by centre {ds.WindowCenter} and width {ds.WindowWidth}"
    return np.rint(_finite(apply_windowing(values, _window_to_8_bits(ds)), name, window)).astype(np.uint8)


def _window_to_8_bits(ds: Dataset) -> Dataset:
    """The file's VOI window, described so that pydicom's windowing outputs exactly 0..255.

    pydicom's output range follows the file's stored bit depth and rescale; asking it for an 8-bit
    unsigned, unrescaled output keeps the standard's window formula without re-implementing it.
    """
    window = Dataset()
    window.PhotometricInterpretation = "MONOCHROME2"
    window.BitsStored = 8
    window.PixelRepresentation = 0
    window.WindowCenter = ds.WindowCenter
    window.WindowWidth = ds.WindowWidth
    if "VOILUTFunction" in ds:
        window.VOILUTFunction = ds.VOILUTFunction
    return window
