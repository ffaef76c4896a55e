"""Build the Brain MRI sample shipped in the package (``src/cass/sample/``).

A seeded choice of images per class from the development split of the Brain Tumor MRI set, keeping
its train/val split and ImageFolder layout. The JPEG bytes are copied unchanged and the zip is
written with fixed timestamps and member order, so rebuilding gives byte-identical files.

    python scripts/build_sample.py
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import zipfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CASS_SHARED_DATA", REPO.parent / "shared" / "data"))
SOURCE = SHARED_DATA / "brain-tumor-mri-224" / "brain_tumor_mri_224_dev.zip"
OUT = REPO / "src" / "cass" / "sample" / "brain_mri_sample.zip"
COMMAND = "python scripts/build_sample.py"
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
"""The earliest time a zip can record: any fixed value makes the archive reproducible."""


def choose(names: list[str], per_split: dict[str, int], seed: int) -> list[str]:
    """``per_split[split]`` members of each ``split/class/`` folder, drawn with a seed independent of listing order."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name in names:
        split, label, _ = name.split("/", 2)
        groups[split, label].append(name)
    chosen = []
    for (split, label), members in sorted(groups.items()):
        if split in per_split:
            rng = random.Random(f"{seed}/{split}/{label}")
            chosen += rng.sample(sorted(members), per_split[split])
    return sorted(chosen)


def build(source: Path, out: Path, per_split: dict[str, int], seed: int) -> list[str]:
    """Write the sample zip (stored, not deflated: JPEGs do not compress) and return its members."""
    with zipfile.ZipFile(source) as src:
        members = choose([i.filename for i in src.infolist() if not i.is_dir()], per_split, seed)
        out.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
            for name in members:
                info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
                info.external_attr = 0o644 << 16
                dst.writestr(info, src.read(name))
    return members


def provenance(source: Path, out: Path, members: list[str], per_split: dict[str, int], seed: int) -> str:
    counts: dict[str, int] = defaultdict(int)
    for name in members:
        counts["/".join(name.split("/")[:2])] += 1
    table = "\n".join(f"| `{folder}/` | {n} |" for folder, n in sorted(counts.items()))
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    return f"""# Shipped sample: Brain Tumor MRI, {len(members)} images

`brain_mri_sample.zip` is what `cass demo` (and any run without `--data`) uses. It is a small real
subset of the Kaggle "Brain Tumor MRI Dataset" (M. Nickparvar), as copied in the project's shared
data folder `brain-tumor-mri-224/{source.name}` (see that folder's PROVENANCE.md: source repository
KomalChaudhari8/BRAIN_TUMOR_APP @ 1fac2c320ad3f98cb71ce79d5d1490a953eaa1ec).

## Licence
- The Kaggle listing says "CC0: Public Domain" (read in third-party READMEs citing it; the Kaggle page
  itself was not seen: verify before publishing).
- The figshare part (Cheng et al. 2017) is CC BY 4.0. If results are published, cite Cheng et al.
  and the Kaggle dataset.

## How it was built
- Command, from the repository root: `{COMMAND}` (seed {seed}).
- {per_split.get("train", 0)} `train` and {per_split.get("val", 0)} `val` images per class, drawn
  with a seeded random choice from the development split, which keeps the source's split:
  train and val were separated by near-duplicate cluster, so no image here has a near duplicate
  in the other split. The source's held-out split is not used.
- Layout `{{train,val}}/{{class}}/{{file}}.jpg`; the 224 px JPEG bytes are copied unchanged (no
  re-encoding); ZIP_STORED with fixed timestamps, so rebuilding gives the same bytes.

| folder | images |
|---|---|
{table}

sha256 `{digest}`
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=SOURCE, help="brain_tumor_mri_224_dev.zip")
    parser.add_argument("--out", type=Path, default=OUT, help="the zip to write; PROVENANCE.md goes beside it")
    parser.add_argument("--train-per-class", type=int, default=60)
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    per_split = {"train": args.train_per_class, "val": args.val_per_class}
    members = build(args.source, args.out, per_split, args.seed)
    (args.out.parent / "PROVENANCE.md").write_text(provenance(args.source, args.out, members, per_split, args.seed))
    print(f"wrote {args.out} ({len(members)} images, {args.out.stat().st_size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
