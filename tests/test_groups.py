"""Groups (patients, studies, near-duplicate clusters) never cross roles (SPEC §2): carved splits take whole
groups, from a groups file, a CSV column or DICOM's PatientID; data whose own splits share a group is refused."""

from __future__ import annotations

import csv
import hashlib
import logging
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data_formats import dicom

from cass.config import DataConfig
from cass.data.dataset import ImageSet
from cass.data.sources import DataError, open_images
from cass.data.splits import HELD_OUT, held_out_indices, three_roles

BRAIN = "brain-tumor-mri-224"
BRAIN_ZIP = f"{BRAIN}/brain_tumor_mri_224_dev.zip"
MANIFEST = f"{BRAIN}/manifest_dev.csv"


def roles_of(sets: dict[str, ImageSet]) -> dict[str, set[str]]:
    """Group -> the roles holding its images."""
    found: dict[str, set[str]] = {}
    for role, images in sets.items():
        for group in images.groups:
            found.setdefault(group, set()).add(role)
    return found


def md5s(archive: zipfile.ZipFile, images: ImageSet) -> set[str]:
    return {hashlib.md5(archive.read(key.split(".zip:", 1)[1])).hexdigest() for key in images.keys}


def write_groups(path: Path, rows: dict[str, str], column: str = "group") -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", column])
        writer.writerows(rows.items())
    return path


@pytest.fixture(scope="module")
def mini_brain(shared_data) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The 64 real greyscale brain MRI images (64 px), their labels and class names."""
    data = np.load(shared_data / "mini-cpu" / "brain_mri_mini_64.npz")
    return data["images"], data["labels"], [str(c) for c in data["classes"]]


def test_brain_zip_carved_splits_share_no_cluster_and_no_identical_file(shared_data):
    zip_path, manifest = shared_data / BRAIN_ZIP, str(shared_data / MANIFEST)
    archive = zipfile.ZipFile(zip_path)
    # train/ only, so both test and selection are carved; per image, exact duplicates land in two roles
    ungrouped = three_roles(DataConfig(data=f"{zip_path}/train"))
    assert md5s(archive, ungrouped.train) & md5s(archive, ungrouped.test)

    roles = three_roles(DataConfig(data=f"{zip_path}/train", groups=manifest, group_column="dup_group"))
    sets = {"train": roles.train, "selection": roles.selection, "test": roles.test}
    assert all(None not in images.groups for images in sets.values())  # the manifest names every image
    assert all(len(found) == 1 for found in roles_of(sets).values())
    hashes = {role: md5s(archive, images) for role, images in sets.items()}
    assert not hashes["train"] & hashes["test"] and not hashes["train"] & hashes["selection"]
    assert not hashes["test"] & hashes["selection"]
    for carved, per_image in ((roles.test, ungrouped.test), (roles.selection, ungrouped.selection)):
        share = np.bincount(carved.targets, minlength=4) / np.bincount(per_image.targets, minlength=4)
        np.testing.assert_allclose(share, 1, atol=0.1)  # stratified as per image: about 15 % of every class

    # the shipped train/ and val/ splits keep clusters apart, so the whole zip passes the overlap check
    whole = three_roles(DataConfig(data=str(zip_path), groups=manifest, group_column="dup_group"))
    assert all(len(found) == 1 for found in roles_of({"train": whole.train, "val": whole.selection,
                                                        "test": whole.test}).values())


def test_train_images_takes_whole_clusters(shared_data):
    data = DataConfig(data=str(shared_data / BRAIN_ZIP), groups=str(shared_data / MANIFEST),
                      group_column="dup_group", train_images=400)
    full = three_roles(DataConfig(data=data.data, groups=data.groups, group_column=data.group_column))
    small = three_roles(data)
    kept = set(small.train.keys)
    dropped = {g for key, g in zip(full.train.keys, full.train.groups) if key not in kept}
    assert abs(len(kept) - 400) <= 8 and kept <= set(full.train.keys)
    assert not set(small.train.groups) & dropped


def mini_csv(root: Path, mini_brain, group_of, extra: str = "label") -> Path:
    """The mini brain images as PNGs listed in ``root/labels.csv`` with a ``patient`` column."""
    images, labels, classes = mini_brain
    rows = []
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(root / f"img{i:02d}.png")
        value = classes[label] if extra == "label" else str(int(label % 2))
        rows.append([f"img{i:02d}.png", value, group_of(i)])
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", extra, "patient"], *rows])
    return root / "labels.csv"


def test_csv_group_column_keeps_patients_whole_and_is_listed_in_held_out(mini_brain, tmp_path):
    def patient(i: int) -> str:
        return "" if i % 9 == 0 else f"p{i % 13}"  # mixed-class patients; some images without one

    table = mini_csv(tmp_path, mini_brain, patient)
    roles = three_roles(DataConfig(data=str(table), group_column="patient", test_fraction=0.25, val_fraction=0.25))
    sets = {"train": roles.train, "selection": roles.selection, "test": roles.test}
    named = {g for g in map(patient, range(64)) if g}
    found = roles_of(sets)
    assert named <= set(found) and all(len(found[g]) == 1 for g in named)
    assert sum(g is None for images in sets.values() for g in images.groups) == sum(not patient(i) for i in range(64))

    roles.save_held_out(tmp_path / "run")
    rows = list(csv.DictReader(open(tmp_path / "run" / HELD_OUT)))
    listed = {(row["split"], row["file"]): row["group"] for row in rows}
    expected = {(split, key): group or "" for split, images in roles.carved.items()
                for key, group in zip(images.keys, images.groups)}
    assert listed == expected and {"test", "val"} == {row["split"] for row in rows}


def test_group_column_is_never_a_label(mini_brain, tmp_path):
    images = open_images(mini_csv(tmp_path, mini_brain, lambda i: f"p{i // 4}", extra="odd"), group_column="patient")
    assert images.multilabel and images.classes == ["odd"] and images.groups[:5] == ["p0"] * 4 + ["p1"]


def test_dicom_patients_are_never_split(mini_brain, tmp_path):
    pixels, labels, classes = mini_brain
    patients = {("train", "glioma"): ["A", "B"], ("train", "notumor"): ["C", "D"],
                ("val", "glioma"): ["E"], ("val", "notumor"): ["F"]}
    slices = iter(pixels[(labels == classes.index("glioma")) | (labels == classes.index("notumor"))])
    for (split, label), ids in patients.items():
        folder = tmp_path / split / label
        folder.mkdir(parents=True)
        for patient in ids:
            for n in range(3):  # a PACS export's bare name (no suffix) for the last slice
                name = f"{patient}_{n}.dcm" if n < 2 else f"IM_{patient}{n}"
                (folder / name).write_bytes(dicom(next(slices), PatientID=patient))
    for seed in range(4):
        roles = three_roles(DataConfig(data=str(tmp_path), split_seed=seed, test_fraction=0.3))
        found = roles_of({"train": roles.train, "val": roles.selection, "test": roles.test})
        assert set(found) == set("ABCDEF") and all(len(where) == 1 for where in found.values())
        assert len(roles.test) == 6 and len(set(roles.test.groups)) == 2  # one whole patient of each class


def test_dicom_without_patient_is_grouped_by_study(mini_brain, tmp_path):
    pixels = mini_brain[0]
    (tmp_path / "study.dcm").write_bytes(dicom(pixels[0], StudyInstanceUID="1.2.3"))
    (tmp_path / "patient.dcm").write_bytes(dicom(pixels[1], PatientID="P9", StudyInstanceUID="1.2.3"))
    (tmp_path / "plain.png").write_bytes(b"")  # not DICOM: its own group, not read here
    assert open_images(tmp_path).groups == ["P9", None, "1.2.3"]
    with zipfile.ZipFile(tmp_path / "scans.zip", "w") as archive:  # read from inside an archive alike
        for name in ("study.dcm", "patient.dcm", "plain.png"):
            archive.write(tmp_path / name, f"scans/{name}")
    assert open_images(tmp_path / "scans.zip").groups == ["P9", None, "1.2.3"]


def groups_over_splits(folder: Path) -> dict[str, str]:
    """``split/class/file`` -> patient, four consecutive images per patient (one of them in val/)."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    return {f: f"patient{int(f.rsplit('img', 1)[1][:3]) // 4}" for f in files}


def test_a_group_in_two_given_splits_is_refused_by_name(brain_folder, tmp_path):
    groups = groups_over_splits(brain_folder)
    data = DataConfig(data=str(brain_folder), groups=str(write_groups(tmp_path / "g.csv", groups)))
    with pytest.raises(DataError) as err:
        three_roles(data)
    shared = len(set(groups.values()))
    assert f"{shared} group(s)" in str(err.value) and "'patient0' (train and val)" in str(err.value)
    assert "allow_group_overlap" in str(err.value)


def test_allow_group_overlap_warns_loudly_and_goes_on(brain_folder, tmp_path, caplog, capsys):
    groups = groups_over_splits(brain_folder)
    data = DataConfig(data=str(brain_folder), groups=str(write_groups(tmp_path / "g.csv", groups)),
                      allow_group_overlap=True)
    with caplog.at_level(logging.WARNING):
        roles = three_roles(data)
    assert len(roles.selection) == 16 and roles.test is not None
    assert "'patient0' (train and val)" in caplog.text and "'patient0' (train and val)" in capsys.readouterr().err


def test_groups_file_rows_must_name_images_unambiguously(brain_folder, tmp_path):
    folder = shutil.copytree(brain_folder, tmp_path / "data")
    files = list(groups_over_splits(folder))
    by_name = {f.rsplit("/", 1)[1]: f"g{i}" for i, f in enumerate(files)}  # listed by file name alone
    three_roles(DataConfig(data=str(folder), groups=str(write_groups(tmp_path / "a.csv", by_name))))
    split, label, name = files[1].split("/")
    longer = {f"{label}/{name}": "long", name: "short"}  # the longest matching path wins
    roles = three_roles(DataConfig(data=str(folder), groups=str(write_groups(tmp_path / "b.csv", longer))))
    found = roles_of({"train": roles.train, "val": roles.selection, "test": roles.test})
    assert set(found) == {"long", None}

    other = "val" if split == "train" else "train"
    (folder / other / label).mkdir(exist_ok=True)
    shutil.copy(folder / files[1], folder / other / label / name)  # two images now end in the same name
    with pytest.raises(DataError, match=f"'{name}' matches both"):
        three_roles(DataConfig(data=str(folder), groups=str(tmp_path / "a.csv")))
    with pytest.raises(DataError, match="names one of the 65 images"):
        three_roles(DataConfig(data=str(folder), groups=str(write_groups(tmp_path / "c.csv", {"n.png": "x"}))))
    with pytest.raises(DataError, match="no group column 'dup_group'"):
        three_roles(DataConfig(data=str(folder), groups=str(tmp_path / "c.csv"), group_column="dup_group"))


def test_a_class_in_one_group_cannot_be_carved():
    targets = np.array([0, 0, 0, 0, 1, 1, 1])
    groups = np.array([0, 1, 2, 2, 3, 3, 3])
    with pytest.raises(DataError, match="class 'b' has 3 image.s. in 1 group"):
        held_out_indices(targets, 0.3, 0, ["a", "b"], "scans/", groups)
    held = {tuple(held_out_indices(targets[:4], 0.5, seed, ["a"], "scans/", groups[:4])) for seed in range(20)}
    assert held == {(0, 1), (2, 3)}  # whole groups filling the quota of 2 images, in the seed's order
