"""Does cass-vicreg keep learning where faithful CASS collapses? (issue 12's acceptance check)

For one data set: pretrain faithful ``cass`` and ``cass-vicreg`` (resnet18 + vit_tiny_patch16_224,
64 px, 3 epochs, the train split, batch 32; cass-vicreg also at batch 16), then read every pretrained
network and the same network at random init with a cosine k-NN (k = 20) on frozen features, 10 % of the
train labels (stratified, seed 0), scored on the ``val/`` split. Nothing is selected on that split
(k is fixed, nothing is trained on it), so it serves as the test split here.

Writes ``OUT/summary.json`` (per-epoch output std of both networks, epoch times, k-NN macro-F1) and
prints a table. Usage (one torch job at a time on a 2-core machine):

    .venv/bin/python benchmarks/cass_vicreg_check.py DATA.zip OUT [--epochs 3] [--img-size 64] [--runs ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from cass import DataConfig, FinetuneConfig, PretrainConfig, finetune, pretrain
from cass.utils.rundir import METRICS, read_csv

RUNS = (("cass", 32), ("cass-vicreg", 32), ("cass-vicreg", 16))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--label-fraction", type=float, default=0.1)
    parser.add_argument("--runs", nargs="*", default=[f"{m}_bs{b}" for m, b in RUNS],
                        help="which of the runs (default all: " + " ".join(f"{m}_bs{b}" for m, b in RUNS) + ")")
    args = parser.parse_args()
    out = Path(args.out)
    data = DataConfig(data=args.data, num_workers=0)
    summary: dict = {"data": args.data, "epochs": args.epochs, "img_size": args.img_size,
                     "label_fraction": args.label_fraction, "knn_k": 20, "runs": {}, "random_init": {}}

    def knn(source: str, arch: str, where: Path) -> float:
        cfg = FinetuneConfig(data=data, source=source, arch=arch, cnn="resnet18", vit="vit_tiny_patch16_224",
                             mode="knn", label_fraction=args.label_fraction, img_size=args.img_size, knn_k=20,
                             batch_size=64, out=str(where), accelerator="cpu")
        shutil.rmtree(where, ignore_errors=True)
        model_dir = finetune(cfg)
        return json.loads((model_dir / "metrics.json").read_text())["macro_f1"]

    for arch in ("cnn", "vit"):
        summary["random_init"][arch] = knn("scratch", arch, out / f"knn_scratch_{arch}")
    for method, batch in RUNS:
        name = f"{method}_bs{batch}"
        if name not in args.runs:
            continue
        run_dir = out / name
        shutil.rmtree(run_dir, ignore_errors=True)
        start = time.perf_counter()
        pretrain(PretrainConfig(method=method, data=data, cnn="resnet18", vit="vit_tiny_patch16_224",
                                img_size=args.img_size, batch_size=batch, epochs=args.epochs, seed=0,
                                out=str(run_dir), accelerator="cpu"))
        rows = read_csv(run_dir / METRICS)
        summary["runs"][name] = {
            "method": method, "batch_size": batch, "wall_s": time.perf_counter() - start,
            "epoch_time_s": [float(r["epoch_time_s"]) for r in rows],
            "loss": [float(r["loss"]) for r in rows],
            "cnn_output_std": [float(r["cnn_output_std"]) for r in rows],
            "vit_output_std": [float(r["vit_output_std"]) for r in rows],
            "knn_macro_f1": {arch: knn(str(run_dir), arch, out / f"knn_{name}_{arch}") for arch in ("cnn", "vit")},
        }
        (run_dir / "checkpoint.safetensors").unlink(missing_ok=True)  # keep the exported networks only
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"{'run':22s} {'epoch s':>9s} {'CNN std per epoch':>22s} {'ViT std per epoch':>22s} {'kNN CNN':>8s} {'kNN ViT':>8s}")
    print(f"{'random init':22s} {'':>9s} {'':>22s} {'':>22s} {summary['random_init']['cnn']:8.3f} "
          f"{summary['random_init']['vit']:8.3f}")
    for name, run in summary["runs"].items():
        stds = [" ".join(f"{v:.3f}" for v in run[f"{a}_output_std"]) for a in ("cnn", "vit")]
        print(f"{name:22s} {sum(run['epoch_time_s']) / len(run['epoch_time_s']):9.1f} {stds[0]:>22s} {stds[1]:>22s} "
              f"{run['knn_macro_f1']['cnn']:8.3f} {run['knn_macro_f1']['vit']:8.3f}")


if __name__ == "__main__":
    main()
