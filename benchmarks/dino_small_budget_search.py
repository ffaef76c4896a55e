"""When does DINO learn on a small medical set at CPU scale? (issue 11, item 5: the documented search)

Data: a stratified 2,000-image subset of the Brain-MRI dev train split and the whole val split, decoded
once at 64 px into an .npz (built here, deterministic). Each setting pretrains a resnet18 DINO student
(64 px global crops, 2 local crops, batch 32, 3 epochs = 186 steps, 1-epoch warm-ups) and records the
per-epoch loss against ln K, the teacher's entropy and the teacher-student KL, then reads the teacher
backbone with a cosine k-NN (k = 20, 25 % of the subset's labels, scored on val) against the same
network at random init. Writes ``OUT/search.json`` and prints a table.

    .venv/bin/python benchmarks/dino_small_budget_search.py OUT [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from cass import DataConfig, FinetuneConfig, PretrainConfig, finetune, pretrain
from cass.config import merge
from cass.data.sources import load_splits
from cass.evaluation.subsets import label_fraction_indices
from cass.utils.rundir import METRICS, read_csv

ZIP = Path(__file__).resolve().parents[2] / "shared/data/brain-tumor-mri-224/brain_tumor_mri_224_dev.zip"
BASE = {"method": "dino", "arch": "cnn", "cnn": "resnet18", "img_size": 64, "batch_size": 32, "epochs": 3,
        "seed": 0, "accelerator": "cpu", "dino.out_dim": 1024, "dino.n_local_crops": 2,
        "dino.local_crop_fraction": 0.5, "dino.warmup_epochs": 1, "dino.warmup_teacher_temp_epochs": 1}
SETTINGS = {
    "recipe (base_lr 5e-4: lr 6e-5)": {},
    "lr 1e-3": {"dino.base_lr": 8e-3},
    "lr 1e-3, teacher temp 0.04 fixed": {"dino.base_lr": 8e-3, "dino.teacher_temp": 0.04},
    "lr 1e-3, teacher temp 0.02": {"dino.base_lr": 8e-3, "dino.teacher_temp": 0.02, "dino.warmup_teacher_temp": 0.02},
    "lr 1e-3, temp 0.02, momentum 0.99": {"dino.base_lr": 8e-3, "dino.teacher_temp": 0.02,
                                          "dino.warmup_teacher_temp": 0.02, "dino.momentum_teacher": 0.99},
    "lr 1e-3, temp 0.02, out_dim 256": {"dino.base_lr": 8e-3, "dino.teacher_temp": 0.02,
                                        "dino.warmup_teacher_temp": 0.02, "dino.out_dim": 256},
    "lr 1e-3, temp 0.02, batch 16": {"dino.base_lr": 1.6e-2, "dino.teacher_temp": 0.02,
                                     "dino.warmup_teacher_temp": 0.02, "batch_size": 16},
    "lr 5e-3, temp 0.02, momentum 0.99": {"dino.base_lr": 4e-2, "dino.teacher_temp": 0.02,
                                          "dino.warmup_teacher_temp": 0.02, "dino.momentum_teacher": 0.99},
}


def build_subset(path: Path, size: int = 64, count: int = 2000) -> None:
    """2,000 train images (stratified, seed 0) and every val image, resized to ``size`` px, as an .npz."""
    splits = load_splits(ZIP)
    fraction = count / len(splits.train)
    chosen = label_fraction_indices(splits.train.targets, fraction, seed=0)
    resize = v2.Compose([v2.PILToTensor(), v2.Resize((size, size), antialias=True)])

    def arrays(images, indices):
        return np.stack([resize(images.load(int(i))).permute(1, 2, 0).numpy() for i in indices])

    np.savez(path, train_images=arrays(splits.train, chosen), train_labels=splits.train.targets[chosen],
             val_images=arrays(splits.val, range(len(splits.val))), val_labels=splits.val.targets,
             classes=np.array(splits.train.classes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--only", nargs="*", help="run only these setting names")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_path = out / "brain_mri_2000_64px.npz"
    if not data_path.is_file():
        build_subset(data_path)
    data = DataConfig(data=str(data_path), num_workers=0)
    results_path = out / "search.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}

    def knn(source: str, where: Path) -> float:
        shutil.rmtree(where, ignore_errors=True)
        model = finetune(FinetuneConfig(data=data, source=source, arch="cnn", cnn="resnet18", mode="knn",
                                        label_fraction=0.25, img_size=64, knn_k=20, out=str(where),
                                        accelerator="cpu"))
        return json.loads((model / "metrics.json").read_text())["macro_f1"]

    if "random init" not in results:
        results["random init"] = {"knn_macro_f1": knn("scratch", out / "knn_scratch")}
    for name, overrides in SETTINGS.items():
        if (args.only and name not in args.only) or name in results:
            continue
        cfg = merge(PretrainConfig(data=data), {**BASE, **overrides, "out": str(out / f"run{len(results)}")})
        shutil.rmtree(cfg.out, ignore_errors=True)
        torch.manual_seed(0)
        start = time.perf_counter()
        run = pretrain(cfg)
        rows = read_csv(run / METRICS)
        results[name] = {
            "overrides": overrides, "lr": cfg.dino.base_lr * cfg.batch_size / 256, "ln_k": math.log(cfg.dino.out_dim),
            "loss": [float(r["loss"]) for r in rows],
            "teacher_entropy": [float(r["teacher_entropy"]) for r in rows],
            "teacher_student_kl": [float(r["teacher_student_kl"]) for r in rows],
            "cnn_output_std": [float(r["cnn_output_std"]) for r in rows],
            "wall_s": time.perf_counter() - start,
            "knn_macro_f1": knn(str(run), out / f"knn_{len(results)}"),
        }
        (run / "checkpoint.safetensors").unlink(missing_ok=True)
        results_path.write_text(json.dumps(results, indent=2))
    results_path.write_text(json.dumps(results, indent=2))
    print(f"random init k-NN macro-F1 {results['random init']['knn_macro_f1']:.3f}")
    print(f"{'setting':42s} {'lr':>8s} {'ln K':>6s} {'loss per epoch':>22s} {'teacher H':>10s} {'KL':>7s} {'kNN':>6s}")
    for name, r in results.items():
        if name == "random init":
            continue
        losses = " ".join(f"{v:.3f}" for v in r["loss"])
        print(f"{name:42s} {r['lr']:8.1e} {r['ln_k']:6.3f} {losses:>22s} {r['teacher_entropy'][-1]:10.3f} "
              f"{r['teacher_student_kl'][-1]:7.3f} {r['knn_macro_f1']:6.3f}")


if __name__ == "__main__":
    main()
