"""Memory of the cache path: the decoded uint8 cache is memory-mapped, so a process's own (anonymous)
memory does not grow with the data set, only the kernel's reclaimable page cache does.

Builds (or reuses) the cache of the Brain Tumor MRI dev train split at 224 px (5,258 images, 0.8 GB),
then runs one epoch of CASS's training data path in this process (no worker processes, so this
process reads every row of the cache; per-image host part + batched augmentation, on the CPU) and
reports its anonymous and file-backed resident memory (Linux /proc) before and at their peak: the
anonymous part stays flat while the file-backed part (the kernel's page cache, which it reclaims
under pressure) grows with what was read. Usage: python benchmarks/bench_cache_memory.py [DATA] [SIZE]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from cass.config import DataConfig, PretrainConfig
from cass.methods.registry import create_method
from cass.training.fabric import make_fabric
from cass.training.pretrain_data import build_train_data


def resident_mb() -> dict[str, float]:
    """RssAnon / RssFile of this process in MB (from /proc/self/status, kB)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) / 1024 for key in ("RssAnon", "RssFile")}


def main() -> None:
    shared = Path(os.environ.get("CASS_SHARED_DATA", "../shared/data"))
    data = sys.argv[1] if len(sys.argv) > 1 else str(shared / "brain-tumor-mri-224" / "brain_tumor_mri_224_dev.zip")
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 224
    cfg = PretrainConfig(data=DataConfig(data=data, num_workers=0, path="cache"), cnn="resnet18",
                         vit="vit_tiny_patch16_224", img_size=size, batch_size=64, accelerator="cpu")
    fabric = make_fabric(None, "cpu", "32-true")
    start = time.perf_counter()
    train = build_train_data(cfg, create_method(cfg), fabric)
    cache = train.dataset.images.store.array
    print(f"cache {train.dataset.images.store.path}: {cache.shape}, {cache.nbytes / 2**20:.0f} MB, "
          f"ready in {time.perf_counter() - start:.0f} s")
    before = resident_mb()
    peak = dict(before)
    start = time.perf_counter()
    for views, _, _ in train.loader:
        train.augment(views)
        now = resident_mb()
        peak = {key: max(peak[key], now[key]) for key in peak}
    seconds = time.perf_counter() - start
    print(f"one epoch ({len(train.dataset)} images, batch 64) in {seconds:.0f} s, "
          f"{len(train.dataset) / seconds:.0f} img/s on the CPU (data path only)")
    print(f"RssAnon {before['RssAnon']:.0f} MB before the epoch, peak {peak['RssAnon']:.0f} MB; "
          f"RssFile {before['RssFile']:.0f} MB before, peak {peak['RssFile']:.0f} MB (page cache, reclaimable)")


if __name__ == "__main__":
    main()
