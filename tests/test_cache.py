"""The decoded uint8 image cache (cass.data.cache): content, reuse, keying, memory mapping, atomic builds."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cass.config import ConfigError, DataConfig
from cass.data import BadImageError, open_images
from cass.data import cache as cache_module
from cass.data.cache import (
    cache_fits,
    cache_key,
    cache_resize,
    open_cache,
    readable_images,
)
from cass.data.dataset import CacheStore
from cass.data.transforms import cass_augmentation, eval_transform

SIZE = 32


@pytest.fixture(scope="module")
def blood(shared_data: Path) -> np.ndarray:
    """Real 64 px colour blood-cell images, (N, 64, 64, 3) uint8."""
    return np.load(shared_data / "mini-cpu" / "blood_pbc_mini_64.npz")["images"]


def png_folder(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"img_{i:02d}.png")
    return folder


def test_cache_holds_the_pil_path_first_step_memory_mapped(shared_data, tmp_path):
    images = open_images(shared_data / "mini-cpu" / "brain_mri_mini_64.npz")
    cache = open_cache(images, SIZE, tmp_path)
    assert isinstance(cache.array, np.memmap) and Path(cache.array.filename) == cache.path
    assert cache.array.shape == (len(images), SIZE, SIZE, 3) and cache.array.dtype == np.uint8
    first_step = cass_augmentation(SIZE).transforms[0]  # the PIL path's Resize
    for i in range(len(images)):
        expected = np.asarray(first_step(images.load(i)))
        np.testing.assert_array_equal(cache.array[i], expected)
        loaded = cache.images.load(i)
        assert loaded.dtype == torch.uint8 and loaded.shape == (3, SIZE, SIZE)
        np.testing.assert_array_equal(loaded.permute(1, 2, 0).numpy(), expected)
    assert cache.images.keys == images.keys
    np.testing.assert_array_equal(cache.images.targets, images.targets)


def test_an_existing_cache_is_reused_not_rebuilt(shared_data, tmp_path, monkeypatch):
    source = shared_data / "mini-cpu" / "imagefolder_mini.zip"
    first = open_cache(open_images(source), SIZE, tmp_path)

    def no_build(*args):
        raise AssertionError("rebuilt an existing cache")

    monkeypatch.setattr(cache_module, "_build", no_build)
    again = open_cache(open_images(source), SIZE, tmp_path)  # another process would open the source anew
    assert again.path == first.path
    np.testing.assert_array_equal(again.array, first.array)


def test_changed_added_or_removed_images_give_a_new_cache(blood, tmp_path):
    folder = png_folder(tmp_path / "images", blood[:6])
    key = cache_key(open_images(folder), cache_resize(SIZE))
    first = open_cache(open_images(folder), SIZE, tmp_path / "cache")

    changed = folder / "img_03.png"
    Image.fromarray(blood[10]).save(changed)
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # coarse file systems
    images = open_images(folder)
    assert cache_key(images, cache_resize(SIZE)) != key
    second = open_cache(images, SIZE, tmp_path / "cache")
    assert second.path != first.path
    row = images.keys.index(str(changed))
    np.testing.assert_array_equal(second.array[row], np.asarray(cache_resize(SIZE)(Image.fromarray(blood[10]))))

    keys = {cache_key(open_images(folder), cache_resize(SIZE))}
    (folder / "img_05.png").unlink()
    keys.add(cache_key(open_images(folder), cache_resize(SIZE)))
    Image.fromarray(blood[30]).save(folder / "img_99.png")
    keys.add(cache_key(open_images(folder), cache_resize(SIZE)))
    keys.add(cache_key(open_images(folder), cache_resize(SIZE + 1)))
    assert len(keys) == 4


def test_a_zip_member_with_other_content_gives_a_new_cache(blood, tmp_path):
    def archive(folder: str, third: np.ndarray) -> Path:
        path = tmp_path / folder / "images.zip"
        path.parent.mkdir()
        with zipfile.ZipFile(path, "w") as zf:
            for i, image in enumerate([blood[0], blood[1], third]):
                Image.fromarray(image).save(tmp_path / "member.png")
                zf.write(tmp_path / "member.png", f"img_{i}.png")
        return path

    a, b = archive("a", blood[2]), archive("b", blood[3])
    a_images, b_images = open_images(a), open_images(b)
    assert [k.split(":")[-1] for k in a_images.keys] == [k.split(":")[-1] for k in b_images.keys]
    assert cache_key(a_images, cache_resize(SIZE)) != cache_key(b_images, cache_resize(SIZE))
    assert cache_key(open_images(a), cache_resize(SIZE)) == cache_key(a_images, cache_resize(SIZE))


def test_a_crash_while_building_leaves_no_cache(blood, tmp_path, monkeypatch):
    images = open_images(png_folder(tmp_path / "images", blood[:8]))
    original = cache_module._Decode.__getitem__

    def dies_at_five(self, i):
        if i == 5:
            raise RuntimeError("power cut")
        return original(self, i)

    monkeypatch.setattr(cache_module._Decode, "__getitem__", dies_at_five)
    with pytest.raises(RuntimeError, match="power cut"):
        open_cache(images, SIZE, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.npy")), "a partial cache was left behind"
    monkeypatch.setattr(cache_module._Decode, "__getitem__", original)
    assert open_cache(images, SIZE, tmp_path / "cache").array.shape[0] == 8


BUILD_IN_PROCESS = """
import sys, time
from pathlib import Path
import cass.data.cache as c
from cass.data import open_images
built = c._build
def counted(*args):
    print("BUILT", flush=True)
    return built(*args)
c._build = counted
slow = c._Decode.__getitem__
c._Decode.__getitem__ = lambda self, i: (time.sleep(0.05), slow(self, i))[1]
go = Path(sys.argv[3])
while not go.exists():
    time.sleep(0.01)
cache = c.open_cache(open_images(sys.argv[1]), 32, sys.argv[2])
print("SUM", int(cache.array.sum()), flush=True)
"""


def test_processes_opening_a_cache_together_build_it_once(blood, tmp_path):
    folder = png_folder(tmp_path / "images", blood[:24])
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", BUILD_IN_PROCESS, str(folder), str(tmp_path / "cache"), str(go)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    time.sleep(3)  # both imported and waiting
    go.touch()
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    printed = [out.split() for out, _ in outputs]
    assert sum(words.count("BUILT") for words in printed) == 1, printed
    sums = {words[words.index("SUM") + 1] for words in printed}
    assert len(sums) == 1, printed
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1


def test_unreadable_images_stop_the_run_or_are_skipped_and_remembered(blood, tmp_path, monkeypatch):
    folder = png_folder(tmp_path / "images", blood[:3])
    (folder / "img_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(BadImageError, match="img_broken.png"):
        open_cache(open_images(folder), SIZE, tmp_path / "cache")
    monkeypatch.setattr(cache_module, "_build", lambda *a: pytest.fail("rebuilt"))
    cache = open_cache(open_images(folder), SIZE, tmp_path / "cache", skip_bad=True)
    assert len(cache.images) == 3 and cache.images.skipped == 1
    assert all("broken" not in key for key in cache.images.keys)
    for i in range(3):
        row = cache.images.refs[i]
        np.testing.assert_array_equal(cache.images.load(i).permute(1, 2, 0).numpy(), cache.array[row])


def test_the_store_pickles_as_a_path_not_its_pixels(shared_data, tmp_path):
    cache = open_cache(open_images(shared_data / "mini-cpu" / "brain_mri_mini_64.npz"), SIZE, tmp_path)
    store = cache.images.store
    assert isinstance(store, CacheStore)
    store.load(0, "x")  # maps the file
    blob = pickle.dumps(store)
    assert len(blob) < 1000 < cache.array.nbytes
    assert torch.equal(pickle.loads(blob).load(7, "x"), store.load(7, "x"))


def test_cache_fits_needs_room_unless_it_exists(shared_data, tmp_path, monkeypatch):
    images = open_images(shared_data / "mini-cpu" / "brain_mri_mini_64.npz")
    assert cache_fits(images, SIZE, tmp_path / "new")
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 10**6})())
    assert not cache_fits(images, SIZE, tmp_path / "new")
    open_cache(images, SIZE, tmp_path / "new")
    assert cache_fits(images, SIZE, tmp_path / "new")


@pytest.mark.parametrize("path", ["auto", "cache", "pil"])
def test_readable_images_give_the_evaluation_pixels_whichever_path(shared_data, tmp_path, path):
    """Fine-tuning reads through the cache unless told not to; the evaluation transform sees the same pixels."""
    images = open_images(shared_data / "mini-cpu" / "brain_mri_mini_64.npz")
    data = DataConfig(path=path, cache_dir=str(tmp_path))
    readable = readable_images(data, images, SIZE)
    assert isinstance(readable.store, CacheStore) == (path != "pil")
    assert readable.keys == images.keys
    evaluate = eval_transform(SIZE)
    for i in range(0, len(images), 7):
        torch.testing.assert_close(evaluate(readable.load(i)), evaluate(images.load(i)), rtol=0, atol=0)


def test_an_unknown_data_path_is_refused_naming_the_option(shared_data, tmp_path):
    images = open_images(shared_data / "mini-cpu" / "brain_mri_mini_64.npz")
    with pytest.raises(ConfigError, match="data.path must be one of auto, pil, cache, got 'fast'"):
        readable_images(DataConfig(path="fast", cache_dir=str(tmp_path)), images, SIZE)
