"""The published MedMNIST v2 supervised rows, reproduced with cass's own fine-tuning engine (issue 19).

MedMNIST v2 (Yang et al., Sci Data 2023, Table 3) trains "ResNet-18 (28)" from random init on the official
28 px splits: Adam 1e-3, batch 128, 100 epochs, learning rate x0.1 at epochs 50 and 75, cross-entropy,
no augmentation, the model chosen on validation AUC, reported on test (AUC and accuracy). "(28)" is a
ResNet-18 whose first layer is a 3x3 stride-1 convolution without max-pool: ``--cnn-stem small``.

Recipes (rows of ``summary.csv``):

* ``medmnist-v2``: the recipe above, every evaluation one pass, no early stopping;
* ``cass-default``: the same network with cass's own fine-tuning defaults (focal loss with inverse class
  weights, the paper's augmentation, Adam 3e-4 with cosine decay, early stopping on selection macro-F1).

Every run is a ``cass finetune`` model directory under ``--out`` (resumable: an interrupted run continues
from its last evaluation, a finished one is skipped), so the script can be stopped and rerun at will;
``--results`` receives ``runs.csv`` (one row per finished run, with wall and CPU seconds) and
``summary.csv`` (mean and std over the finished seeds, beside the published row).

    python benchmarks/medmnist_reference.py                        # both data sets, 3 seeds, both recipes
    python benchmarks/medmnist_reference.py --datasets breastmnist --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cass import DataConfig, FinetuneConfig, finetune
from cass.training.finetune import finished
from cass.utils.atomic import atomic_write_text
from cass.utils.rundir import csv_text, read_csv

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "medmnist"

PUBLISHED = {  # MedMNIST v2, Table 3, ResNet-18 (28): test AUC, ACC (../shared/data/medmnist/PROVENANCE.md)
    "breastmnist": (0.901, 0.863),
    "pneumoniamnist": (0.944, 0.854),
}
MODEL = "resnet18 (small stem, 28 px)"
SEEDS = 3
"""Seeds per dataset and recipe that the issue asks for; ``summary.csv`` says how many of them finished."""

RECIPES = {
    "medmnist-v2": dict(epochs=100, batch_size=128, lr=1e-3, schedule="step", select_metric="auroc", augment="none",
                        loss="ce", class_weights="none", min_steps=0, patience=100, warmup=0.0),
    "cass-default": dict(),
}
"""Fine-tuning options per recipe, over the common ones in :func:`run_config` (``{}``: cass's defaults)."""


@dataclass(frozen=True)
class Run:
    dataset: str
    recipe: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.dataset}_{self.recipe}_seed{self.seed}"


def run_config(run: Run, out: Path, accelerator: str = "cpu") -> FinetuneConfig:
    """The ``cass finetune`` configuration of one run: supervised ResNet-18 (28) from random init."""
    return FinetuneConfig(
        data=DataConfig(data=str(DATA / f"{run.dataset}.npz")), source="scratch", arch="cnn", cnn="resnet18",
        cnn_stem="small", img_size=28, seed=run.seed, out=str(out / run.name), accelerator=accelerator,
        **RECIPES[run.recipe],
    )


def device_name(accelerator: str) -> str:
    """What a run's seconds were measured on (``runs.csv``): the GPU's name, or the CPU with its cores."""
    if accelerator != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU, {os.cpu_count()} cores"


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (data-loading workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_one(run: Run, out: Path, timings: Path, accelerator: str) -> None:
    """Train (or resume) one run; its wall and CPU seconds are appended to ``timings`` when it finishes here."""
    model_dir = out / run.name
    if finished(model_dir):
        return
    wall, cpu = time.perf_counter(), cpu_seconds()
    finetune(run_config(run, out, accelerator), resume=model_dir.exists())
    record = {"run": run.name, "wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(cpu_seconds() - cpu, 1),
              "device": device_name(accelerator)}
    with timings.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def _timings(timings: Path) -> dict[str, dict[str, float | str]]:
    """Per run, the sum over its sessions (a resumed run is timed in pieces) and the device of the last one."""
    total: dict[str, dict[str, float | str]] = {}
    if timings.is_file():
        for line in timings.read_text().splitlines():
            rec = json.loads(line)
            slot = total.setdefault(rec["run"], {"wall_s": 0.0, "cpu_s": 0.0})
            slot["wall_s"] += rec["wall_s"]
            slot["cpu_s"] += rec["cpu_s"]
            slot["device"] = rec.get("device", "CPU, 2 cores")  # the first runs, before devices were recorded
    return total


def _kept_rows(results: Path) -> dict[tuple[str, str, int], dict[str, str]]:
    """The runs already in ``runs.csv`` (perhaps trained on another machine, their model directories gone)."""
    path = results / "runs.csv"
    if not path.is_file():
        return {}
    # Runs kept before devices were recorded all ran on the 2-core CPU (no GPU had been lent then).
    rows = [{**row, "device": row.get("device") or "CPU, 2 cores"} for row in read_csv(path)]
    return {(row["dataset"], row["recipe"], int(row["seed"])): row for row in rows}


def write_results(runs: list[Run], out: Path, results: Path) -> None:
    """``runs.csv`` (every finished run: those kept there before, and those finished under ``out``) and
    ``summary.csv`` (mean/std over each row's finished seeds, of :data:`SEEDS` planned, published row beside)."""
    results.mkdir(parents=True, exist_ok=True)
    times = _timings(out / "timings.jsonl")
    kept = _kept_rows(results)
    for run in runs:
        if not finished(out / run.name):
            continue
        m = json.loads((out / run.name / "metrics.json").read_text())
        kept[(run.dataset, run.recipe, run.seed)] = {
            "dataset": run.dataset, "recipe": run.recipe, "seed": run.seed, "test_auc": m["auroc"],
            "test_acc": m["accuracy"], "test_macro_f1": m["macro_f1"], "val_auc": m["selection"]["auroc"],
            "best_evaluation": m["epoch"], "steps": m["steps"], **times.get(run.name, {})}
    rows = [kept[key] for key in sorted(kept)]
    _write_csv(results / "runs.csv", rows)
    summary = []
    for dataset in sorted(PUBLISHED):
        for recipe in sorted(RECIPES):
            done = [r for r in rows if (r["dataset"], r["recipe"]) == (dataset, recipe)]
            summary.append(_summary_row(dataset, recipe, done))
    _write_csv(results / "summary.csv", summary)


def _summary_row(dataset: str, recipe: str, done: list[dict]) -> dict[str, str | float]:
    auc, acc = [float(r["test_auc"]) for r in done], [float(r["test_acc"]) for r in done]
    return {
        "dataset": dataset, "model": MODEL, "recipe": recipe, "seeds": f"{len(done)} of {SEEDS}",
        "test_auc": _mean(auc), "test_auc_std": _std(auc), "test_acc": _mean(acc), "test_acc_std": _std(acc),
        "published_auc": PUBLISHED[dataset][0], "published_acc": PUBLISHED[dataset][1],
    }


def _mean(values: list[float]) -> str:
    return f"{statistics.fmean(values):.4f}" if values else ""


def _std(values: list[float]) -> str:
    return f"{statistics.stdev(values):.4f}" if len(values) > 1 else ""


def _write_csv(path: Path, rows: list[dict]) -> None:
    if rows:
        atomic_write_text(path, csv_text(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(PUBLISHED), choices=list(PUBLISHED))
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "medmnist_reference")
    parser.add_argument("--results", type=Path, default=REPO / "results" / "medmnist_reference")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu", "auto"],
                        help="where to train (runs.csv records the device of each run's seconds)")
    args = parser.parse_args()
    # Smaller data set first, and every seed of a recipe before the next: a stopped run leaves whole rows.
    runs = [Run(d, r, s) for d in args.datasets for r in args.recipes for s in args.seeds]
    args.out.mkdir(parents=True, exist_ok=True)
    for run in runs:
        run_one(run, args.out, args.out / "timings.jsonl", args.accelerator)
        write_results(runs, args.out, args.results)


if __name__ == "__main__":
    main()
