"""Fine-tuning, probes and the model directory (finetune -> evaluate / predict / embed) on real images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CNN, TINY_VIT
from PIL import Image
from typer.testing import CliRunner

from cass.cli.main import app
from cass.config import DataConfig, FinetuneConfig, PretrainConfig
from cass.evaluation.inference import evaluate, predict
from cass.training.finetune import finetune
from cass.training.pretrain import pretrain


def write_pngs(shared_data: Path, root: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """The 64 brain-MRI mini images as PNG files; returns (relative paths, labels, class names)."""
    data = np.load(shared_data / "mini-cpu" / "brain_mri_mini_64.npz")
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(data["images"]):
        Image.fromarray(image).save(root / f"img{i:03d}.png")
        paths.append(f"img{i:03d}.png")
    return paths, data["labels"], [str(c) for c in data["classes"]]


@pytest.fixture(scope="module")
def pretrained_run(brain_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "run"
    cfg = PretrainConfig(data=DataConfig(data=str(brain_folder), num_workers=0), cnn=TINY_CNN, vit=TINY_VIT,
                         img_size=32, batch_size=16, epochs=1, out=str(out), accelerator="cpu")
    return pretrain(cfg)


def ft_cfg(data: Path, out: Path, **kw) -> FinetuneConfig:
    values = dict(data=DataConfig(data=str(data), num_workers=0), cnn=TINY_CNN, vit=TINY_VIT, img_size=32,
                  epochs=2, batch_size=16, min_steps=0, out=str(out), accelerator="cpu")
    values.update(kw)
    return FinetuneConfig(**values)


@pytest.mark.parametrize("mode", ["knn", "linear"])
@pytest.mark.parametrize("arch", ["cnn", "vit"])
def test_probes_run_on_a_pretrained_checkpoint(brain_folder, pretrained_run, tmp_path, mode, arch):
    model_dir = finetune(ft_cfg(brain_folder, tmp_path / "m", source=str(pretrained_run), arch=arch, mode=mode))
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert 0 <= metrics["macro_f1"] <= 1 and len(metrics["confusion_matrix"]) == 4
    held_out = csv.DictReader(open(model_dir / "held_out.csv"))
    test_images = [row["file"] for row in held_out if row["split"] == "test"]
    assert metrics["split"] == "test" and sum(map(sum, metrics["confusion_matrix"])) == len(test_images) == 8
    assert metrics["selection"]["num_samples"] == 16  # the val/ folder chose; the carved test split reports
    result = evaluate(model_dir, brain_folder, tmp_path / "eval", split="val")
    assert result["macro_f1"] == pytest.approx(metrics["selection"]["macro_f1"], abs=1e-6)


def test_linear_mode_trains_only_the_head(brain_folder, pretrained_run, tmp_path):
    from safetensors.torch import load_file

    model_dir = finetune(ft_cfg(brain_folder, tmp_path / "m", source=str(pretrained_run), arch="cnn", mode="linear"))
    tuned, pre = load_file(model_dir / "model.safetensors"), load_file(pretrained_run / "cnn.safetensors")
    assert all(np.array_equal(tuned[k].numpy(), pre[k].numpy()) for k in tuned if not k.startswith("fc."))
    assert tuned["fc.weight"].shape == (4, 512)


def test_full_finetune_keeps_best_model_and_writes_subset(brain_folder, tmp_path):
    model_dir = finetune(ft_cfg(brain_folder, tmp_path / "m", label_fraction=0.1, epochs=3))
    rows = list(csv.DictReader(open(model_dir / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    best = json.loads((model_dir / "metrics.json").read_text())
    assert best["selection"]["macro_f1"] == pytest.approx(max(float(r["macro_f1"]) for r in rows))  # chosen on val
    subset = list(csv.DictReader(open(model_dir / "subset.csv")))
    assert len(subset) == 4  # 10% of 48 train images, at least one per class


def test_multilabel_csv_through_finetune_evaluate_predict(shared_data, tmp_path):
    paths, labels, classes = write_pngs(shared_data, tmp_path / "images")
    # Two labels per image: "tumour" (anything but notumor) and "glioma".
    header = ["path", "tumour", "glioma"]
    rows = [[p, int(classes[y] != "notumor"), int(classes[y] == "glioma")] for p, y in zip(paths, labels)]
    for name, part in (("train.csv", rows[16:]), ("val.csv", rows[:16])):
        with open(tmp_path / "images" / name, "w", newline="") as fh:
            csv.writer(fh).writerows([header, *part])
    cfg = ft_cfg(tmp_path / "images" / "train.csv", tmp_path / "ml")
    cfg.data.val_data = str(tmp_path / "images" / "val.csv")
    model_dir = finetune(cfg)
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert {"macro_f1", "map", "auroc"} <= metrics.keys()
    result = evaluate(model_dir, tmp_path / "images" / "val.csv", tmp_path / "eval")
    assert result["macro_f1"] == pytest.approx(metrics["selection"]["macro_f1"], abs=1e-6)
    out = predict(model_dir, tmp_path / "images" / "val.csv", tmp_path / "pred.csv")
    predicted = list(csv.DictReader(open(out)))
    assert len(predicted) == 16 and list(predicted[0]) == ["path", "pred", "tumour", "glioma"]


def test_cli_evaluate_predict_embed_on_unseen_folder_and_class_mismatch(brain_folder, shared_data, tmp_path):
    runner = CliRunner()
    model_dir = tmp_path / "model"
    result = runner.invoke(app, ["finetune", "--from", "scratch", "--arch", "cnn", "--cnn", TINY_CNN, "--data",
                                 str(brain_folder), "--out", str(model_dir), "--epochs", "1", "--min-steps", "0", "--img-size", "32",
                                 "--num-workers", "0", "--accelerator", "cpu"])
    assert result.exit_code == 0, result.output
    unseen = tmp_path / "unseen"  # the blood-cell images of the mini zip were never seen by the model
    import zipfile

    with zipfile.ZipFile(shared_data / "mini-cpu" / "imagefolder_mini.zip") as zf:
        zf.extractall(unseen)
    brain_unseen = unseen / "brain_mri"
    result = runner.invoke(app, ["evaluate", "--model", str(model_dir), "--data", str(brain_unseen),
                                 "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ev" / "confusion_matrix.png").stat().st_size > 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert {"macro_f1", "micro_f1", "macro_recall", "balanced_accuracy", "auroc"} <= metrics.keys()
    result = runner.invoke(app, ["predict", "--model", str(model_dir), "--input", str(brain_unseen),
                                 "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 12 and set(rows[0]) == {"path", "pred", "glioma", "meningioma", "notumor", "pituitary"}
    assert all(abs(sum(float(r[c]) for c in ("glioma", "meningioma", "notumor", "pituitary")) - 1) < 1e-4 for r in rows)
    result = runner.invoke(app, ["embed", "--model", str(model_dir), "--input", str(brain_unseen),
                                 "--out", str(tmp_path / "emb")])
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "emb" / "features.npy").shape == (12, 512)
    result = runner.invoke(app, ["evaluate", "--model", str(model_dir), "--data", str(unseen / "blood_pbc"),
                                 "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "class set does not match" in result.output


def test_data_without_val_or_test_gets_both_carved_from_train(brain_folder, tmp_path):
    model_dir = finetune(ft_cfg(brain_folder / "train", tmp_path / "m", epochs=1))
    held_out = list(csv.DictReader(open(model_dir / "held_out.csv")))
    carved = {split: {row["file"] for row in held_out if row["split"] == split} for split in ("val", "test")}
    trained = {row["file"] for row in csv.DictReader(open(model_dir / "subset.csv"))}
    assert len(carved["test"]) >= 4 and len(carved["val"]) >= 4  # at least one image of each of 4 classes
    assert not carved["test"] & carved["val"] and not (carved["test"] | carved["val"]) & trained


def test_dino_checkpoint_finetunes_through_the_cli(brain_folder, tmp_path):
    from cass.config import DinoConfig

    run = pretrain(PretrainConfig(
        method="dino", arch="vit", data=DataConfig(data=str(brain_folder), num_workers=0), vit=TINY_VIT, img_size=32,
        batch_size=16, epochs=1, out=str(tmp_path / "dino"), accelerator="cpu",
        dino=DinoConfig(out_dim=256, hidden_dim=64, bottleneck_dim=32, n_local_crops=2)))
    assert (run / "vit.safetensors").is_file() and not (run / "cnn.safetensors").exists()
    result = CliRunner().invoke(app, ["finetune", "--from", str(run), "--arch", "cnn", "--data", str(brain_folder),
                                      "--out", str(tmp_path / "bad"), "--epochs", "1", "--accelerator", "cpu"])
    assert result.exit_code == 2 and "--arch vit" in result.output
    model_dir = finetune(ft_cfg(brain_folder, tmp_path / "ft", source=str(run), arch="vit", epochs=1))
    assert json.loads((model_dir / "metrics.json").read_text())["macro_f1"] >= 0
