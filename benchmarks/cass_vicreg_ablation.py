"""What each term of ``cass-vicreg`` is worth on brain MRI (issue 18, item 7).

``cass-vicreg`` optimises VICReg's loss between the CNN's and the Transformer's projections (an MSE
agreement term, a variance hinge and a covariance penalty); CASS's ``2 - 2 cos`` is not in it. This
ablation pretrains five variants with everything else equal, and reads each network out on frozen features:

* ``full``: the defaults (25 MSE + 25 variance + 1 covariance);
* ``no-variance``: variance weight 0;
* ``no-covariance``: covariance weight 0;
* ``cos-instead-of-mse``: CASS's ``2 - 2 cos`` (weight 25) in place of the MSE;
* ``cos-beside-mse``: CASS's ``2 - 2 cos`` (weight 25) beside the MSE.

Protocol: the brain comparison's (brain_mri_cpu.yaml): resnet18 + vit_tiny_patch16_224 at 64 px, batch 32,
3 epochs on a 2,000-image train subset, test split carved by near-duplicate cluster; readouts at 10 % labels
(k-NN with k and logistic regression with C chosen on val), scored on test. Each variant is compared with
``full`` and with the same networks at random init, as paired differences with 95 % intervals (bootstrap over
test images and seeds; with one seed they cover the test images only, and the table says so).

    .venv/bin/python benchmarks/cass_vicreg_ablation.py [--seeds 0 1 2] [--out runs/cass_vicreg_ablation]

Rerunning skips finished runs. Writes ``ablation.csv`` and ``ablation.md`` to ``--results``.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from cass import DataConfig, FinetuneConfig, PretrainConfig, finetune, pretrain
from cass.config import merge
from cass.evaluation.intervals import interval, paired_difference, replicate
from cass.evaluation.predictions import load_predictions
from cass.training.finetune import finished
from cass.utils.rundir import METRICS, predictions_file

REPO = Path(__file__).resolve().parents[1]
BRAIN = REPO.parent / "shared" / "data" / "brain-tumor-mri-224"
DATA = DataConfig(data=str(BRAIN / "brain_tumor_mri_224_dev.zip"), groups=str(BRAIN / "manifest_dev.csv"),
                  group_column="dup_group", train_images=2000)
VARIANTS = {
    "full": {},
    "no-variance": {"cass_vicreg.variance_weight": 0.0},
    "no-covariance": {"cass_vicreg.covariance_weight": 0.0},
    "cos-instead-of-mse": {"cass_vicreg.invariance_weight": 0.0, "cass_vicreg.cosine_weight": 25.0},
    "cos-beside-mse": {"cass_vicreg.cosine_weight": 25.0},
}
RANDOM_INIT = "random-init"
ARCHS = ("cnn", "vit")
READOUTS = ("knn", "logistic")
LABEL_FRACTION = 0.1


def pretrain_config(variant: str, seed: int, out: Path) -> PretrainConfig:
    base = PretrainConfig(method="cass-vicreg", data=DATA, cnn="resnet18", vit="vit_tiny_patch16_224", img_size=64,
                          batch_size=32, epochs=3, seed=seed, accelerator="cpu", out=str(out))
    return merge(base, VARIANTS[variant], where=f"variant {variant}")


def pretrained(variant: str, seed: int, root: Path) -> tuple[Path, float]:
    """The variant's pretraining run (resumed or reused when already there) and its wall time in this call."""
    out = root / f"{variant}_seed{seed}"
    start = time.perf_counter()
    run = pretrain(pretrain_config(variant, seed, out), resume=(out / "config.yaml").is_file())
    (run / "checkpoint.safetensors").unlink(missing_ok=True)  # finished: the exported weights are what we keep
    return run, time.perf_counter() - start


def readout(source: str, arch: str, mode: str, seed: int, out: Path) -> Path:
    if not finished(out):
        finetune(FinetuneConfig(data=DATA, source=source, arch=arch, cnn="resnet18", vit="vit_tiny_patch16_224",
                                img_size=64, mode=mode, label_fraction=LABEL_FRACTION, seed=seed, save_model=False,
                                accelerator="cpu", out=str(out)), resume=out.exists())
    return out


def replicated(cell: Path):
    _, predictions = load_predictions(predictions_file(cell))
    return replicate("macro_f1", predictions.targets, predictions.predicted, predictions.probabilities)


def final_backbone(run: Path, arch: str) -> dict[str, str]:
    """The last epoch's backbone std and effective rank of one network (the learning check)."""
    with (run / METRICS).open() as fh:
        last = list(csv.DictReader(fh))[-1]
    return {key: f"{float(last[f'{arch}_{key}']):.3f}" for key in ("backbone_std", "backbone_rank")
            if f"{arch}_{key}" in last}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "cass_vicreg_ablation")
    parser.add_argument("--results", type=Path, default=REPO / "results" / "cass_vicreg_ablation")
    args = parser.parse_args()
    cells: dict[tuple[str, str, str, int], Path] = {}
    runs: dict[tuple[str, int], Path] = {}
    for seed in args.seeds:
        for variant in VARIANTS:
            runs[variant, seed], seconds = pretrained(variant, seed, args.out / "pretrain")
            print(f"{variant} seed {seed}: pretraining {seconds:.0f} s", flush=True)
        for arch in ARCHS:
            for mode in READOUTS:
                for variant in [RANDOM_INIT, *VARIANTS]:
                    source = "scratch" if variant == RANDOM_INIT else str(runs[variant, seed])
                    cells[variant, arch, mode, seed] = readout(
                        source, arch, mode, seed, args.out / "readouts" / f"{variant}_{arch}_{mode}_seed{seed}")
    rows = []
    for arch in ARCHS:
        for mode in READOUTS:
            rep = {v: [replicated(cells[v, arch, mode, s]) for s in args.seeds] for v in [RANDOM_INIT, *VARIANTS]}
            for variant in VARIANTS:
                vs_full = paired_difference(rep[variant], rep["full"])
                vs_init = paired_difference(rep[variant], rep[RANDOM_INIT])
                rows.append({
                    "variant": variant, "network": arch, "readout": mode, "seeds": len(args.seeds),
                    "macro_f1": f"{interval(rep[variant]).estimate:.3f}",
                    "vs_full": f"{vs_full.estimate:+.3f}", "vs_full_low": f"{vs_full.low:+.3f}",
                    "vs_full_high": f"{vs_full.high:+.3f}", "vs_full_verdict": vs_full.verdict,
                    "vs_random_init": f"{vs_init.estimate:+.3f}", "vs_random_init_low": f"{vs_init.low:+.3f}",
                    "vs_random_init_high": f"{vs_init.high:+.3f}", "vs_random_init_verdict": vs_init.verdict,
                    **final_backbone(runs[variant, args.seeds[0]], arch),
                })
    args.results.mkdir(parents=True, exist_ok=True)
    with (args.results / "ablation.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    covers = "test images and seeds" if len(args.seeds) > 1 else "test images only (one pretraining seed)"
    lines = [f"Test macro-F1 at {LABEL_FRACTION:.0%} labels; differences with 95 % intervals over {covers}.", "",
             "| variant | network | readout | macro-F1 | vs full | vs random init | backbone std / rank |",
             "|---|---|---|---:|---|---|---|"]
    lines += [f"| {r['variant']} | {r['network']} | {r['readout']} | {r['macro_f1']} | {r['vs_full']} "
              f"[{r['vs_full_low']}, {r['vs_full_high']}] {r['vs_full_verdict']} | {r['vs_random_init']} "
              f"[{r['vs_random_init_low']}, {r['vs_random_init_high']}] {r['vs_random_init_verdict']} | "
              f"{r.get('backbone_std', '')} / {r.get('backbone_rank', '')} |" for r in rows]
    (args.results / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
