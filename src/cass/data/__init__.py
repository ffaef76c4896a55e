"""Reading users' images: formats and layouts (:mod:`.sources`), decoding (:mod:`.images`),
the indexed image set and its torch view (:mod:`.dataset`), augmentations (:mod:`.transforms`), and the
roles of its splits: groups (:mod:`.groups`), carved splits (:mod:`.splits`), label fractions (:mod:`.subsets`)."""

from cass.data.dataset import ImageDataset, ImageSet
from cass.data.images import DEFAULT_MAX_PIXELS, BadImageError, decode_image
from cass.data.sources import DataError, Splits, load_splits, open_images, sample_path

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "BadImageError",
    "DataError",
    "ImageDataset",
    "ImageSet",
    "Splits",
    "decode_image",
    "load_splits",
    "open_images",
    "sample_path",
]
