"""Does fine-tuning longer change a committed comparison? (issue 19, item 3)

Reruns every fine-tuned (``mode: full``) cell of a finished experiment with twice its budget: twice the
evaluations (``epochs``) and twice the minimum optimiser steps, everything else (pretrained networks,
labelled subset, seed, selection split, early stopping) as it was. Per condition (method, network, init,
label fraction) it then gives the paired difference of test macro-F1, doubled minus original, with its 95 %
interval (bootstrap over test images and seeds, the same draws on both sides) and a verdict. The budget was
enough where every verdict is ``unresolved`` (doubling moved no cell's mean by more than its interval).

    .venv/bin/python benchmarks/finetune_budget_doubling.py runs/EXPERIMENT --out runs/EXPERIMENT_doubled \
        --results results/EXPERIMENT/budget_doubling

Needs the experiment's run directory (its pretraining runs hold the weights the cells start from).
Rerunning skips finished cells and resumes an interrupted one. Writes ``budget_doubling.csv`` and
``budget_doubling.md`` to ``--results``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import time
from collections import defaultdict
from pathlib import Path

from cass import FinetuneConfig, finetune
from cass.config import load_yaml
from cass.evaluation.intervals import paired_difference
from cass.experiment.comparisons import KeptPredictions
from cass.experiment.results import RESULTS_JSON
from cass.training.finetune import finished
from cass.utils.rundir import CHECKPOINT, CONFIG

METRIC = "macro_f1"
CONDITION = ("method", "arch", "init", "label_fraction")


def doubled(cfg: FinetuneConfig, out: Path) -> FinetuneConfig:
    """The same run with twice the evaluations and twice the minimum steps, written to ``out``."""
    return dataclasses.replace(cfg, epochs=2 * cfg.epochs, min_steps=2 * cfg.min_steps, out=str(out))


def full_cells(experiment: Path) -> list[dict]:
    """The experiment's finished fine-tuning cells (readouts train nothing: no budget to double)."""
    return [row for row in json.loads((experiment / RESULTS_JSON).read_text()) if row["mode"] == "full"]


def run_doubled(experiment: Path, out: Path, rows: list[dict]) -> None:
    for i, row in enumerate(rows, 1):
        name = Path(row["finetune_dir"]).name
        target = out / "finetune" / name
        if finished(target):
            continue
        cfg = load_yaml(FinetuneConfig, experiment / "finetune" / name / CONFIG)
        start = time.perf_counter()
        print(f"[{i}/{len(rows)}] {name}: {cfg.epochs} -> {2 * cfg.epochs} evaluations", flush=True)
        finetune(doubled(cfg, target), resume=(target / CHECKPOINT).exists())
        print(f"  {time.perf_counter() - start:.0f} s", flush=True)


def compare(experiment: Path, out: Path, rows: list[dict]) -> list[dict]:
    """Per condition: original and doubled means, the paired difference with its interval and verdict."""
    original, longer = KeptPredictions(experiment), KeptPredictions(out)
    by_condition: dict[tuple, list[str]] = defaultdict(list)
    for row in rows:
        by_condition[tuple(row[k] for k in CONDITION)].append(Path(row["finetune_dir"]).name)
    table = []
    for condition, cells in by_condition.items():
        cells = [c for c in cells if finished(out / "finetune" / c)]
        if not cells:
            continue
        base, twice = original.seeds(cells, METRIC), longer.seeds(cells, METRIC)
        result = paired_difference(twice, base)
        table.append({**dict(zip(CONDITION, condition, strict=True)), "seeds": len(cells),
                      "original": sum(s.point for s in base) / len(base),
                      "doubled": sum(s.point for s in twice) / len(twice),
                      "diff": result.estimate, "low": result.low, "high": result.high, "verdict": result.verdict})
    return table


def write(results: Path, table: list[dict], experiment: Path, planned: int) -> None:
    results.mkdir(parents=True, exist_ok=True)
    with open(results / "budget_doubling.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    done = sum(r["seeds"] for r in table)
    moved = [r for r in table if r["verdict"] != "unresolved"]
    lines = [f"# Fine-tuning budget doubled: {experiment.name}", "",
             f"{done} of {planned} fine-tuned cells rerun with twice the evaluations and minimum steps. Test "
             f"macro-F1, mean over seeds; difference doubled − original with its paired 95 % interval (bootstrap "
             "over test images and seeds).", "",
             "| method | network | init | labels | seeds | original | doubled | difference [95 % interval] | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['arch']} | {r['init']} | {r['label_fraction']:g} | {r['seeds']} | "
              f"{r['original']:.3f} | {r['doubled']:.3f} | {r['diff']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}] | "
              f"{r['verdict']} |" for r in table]
    lines += ["", "Doubling moved no cell beyond its interval: the budget was enough." if not moved else
              f"Doubling moved {len(moved)} of {len(table)} conditions beyond their interval: the original budget "
              "had not converged there."]
    (results / "budget_doubling.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path, help="a finished experiment's run directory (runs/NAME)")
    parser.add_argument("--out", type=Path, required=True, help="where the doubled cells are trained")
    parser.add_argument("--results", type=Path, required=True, help="where the table is written")
    args = parser.parse_args()
    rows = full_cells(args.experiment)
    run_doubled(args.experiment, args.out, rows)
    table = compare(args.experiment, args.out, rows)
    write(args.results, table, args.experiment, len(rows))
    print((args.results / "budget_doubling.md").read_text())


if __name__ == "__main__":
    main()
