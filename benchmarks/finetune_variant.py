"""Does a fine-tuning choice change a committed comparison? (issue 19, item 3)

Reruns the fine-tuned (``mode: full``) cells of a finished experiment with one change, everything else
(pretrained networks, labelled subset, seed, selection split, early stopping) as it was, and compares each
condition (method, network, init, label fraction) paired, changed minus original:

* on the **selection split** (val), the mean macro-F1 of the chosen evaluation, which is where a choice such
  as the loss may be made;
* on the **test split**, the difference of test macro-F1 with its 95 % interval (bootstrap over test images
  and seeds, the same draws on both sides) and a verdict, which says whether the choice mattered.

Changes: ``--double-budget`` (twice the evaluations and twice the minimum optimiser steps: the budget was
enough where no verdict is ``above`` or ``below``), or any fine-tuning options with ``--set KEY=VALUE``
(YAML values), e.g. ``--set loss=ce`` (cross-entropy against the default focal loss) or
``--set vit_layer_decay=1`` with ``--only arch=vit`` (layer-wise learning-rate decay off).

    .venv/bin/python benchmarks/finetune_variant.py runs/EXPERIMENT --double-budget \\
        --out runs/EXPERIMENT_doubled --results results/EXPERIMENT/budget_doubling
    .venv/bin/python benchmarks/finetune_variant.py runs/EXPERIMENT --set loss=ce \\
        --out runs/EXPERIMENT_ce --results results/EXPERIMENT/loss_ce

Needs the experiment's run directory (its pretraining runs hold the weights the cells start from).
Rerunning skips finished cells and resumes an interrupted one. Writes ``variant.csv`` and ``variant.md`` to
``--results``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from cass import FinetuneConfig, finetune
from cass.config import load_yaml, merge
from cass.evaluation.intervals import paired_difference
from cass.experiment.comparisons import KeptPredictions
from cass.experiment.results import RESULTS_JSON
from cass.training.finetune import finished
from cass.utils.rundir import CHECKPOINT, CONFIG, SCORES

METRIC = "macro_f1"
CONDITION = ("method", "arch", "init", "label_fraction")


@dataclasses.dataclass(frozen=True)
class Variant:
    """What changes: option overrides, and whether the budget (evaluations, minimum steps) is doubled."""

    overrides: dict[str, Any]
    double_budget: bool

    def apply(self, cfg: FinetuneConfig, out: Path) -> FinetuneConfig:
        changed = merge(cfg, self.overrides, where="--set")
        if self.double_budget:
            changed = dataclasses.replace(changed, epochs=2 * cfg.epochs, min_steps=2 * cfg.min_steps)
        return dataclasses.replace(changed, out=str(out))

    def describe(self) -> str:
        parts = [f"{key} = {value}" for key, value in self.overrides.items()]
        return ", ".join(parts + (["twice the evaluations and minimum steps"] if self.double_budget else []))


def full_cells(experiment: Path, only: dict[str, str]) -> list[dict]:
    """The experiment's finished fine-tuning cells (readouts train nothing), those matching ``only``."""
    rows = [row for row in json.loads((experiment / RESULTS_JSON).read_text()) if row["mode"] == "full"]
    return [row for row in rows if all(str(row[key]) == value for key, value in only.items())]


def run_variant(experiment: Path, out: Path, rows: list[dict], variant: Variant) -> None:
    for i, row in enumerate(rows, 1):
        name = Path(row["finetune_dir"]).name
        target = out / "finetune" / name
        if finished(target):
            continue
        cfg = load_yaml(FinetuneConfig, experiment / "finetune" / name / CONFIG)
        start = time.perf_counter()
        print(f"[{i}/{len(rows)}] {name}: {variant.describe()}", flush=True)
        finetune(variant.apply(cfg, target), resume=(target / CHECKPOINT).exists())
        print(f"  {time.perf_counter() - start:.0f} s", flush=True)


def selection_score(cell_dir: Path) -> float:
    """Selection-split macro-F1 of the evaluation the run kept."""
    return json.loads((cell_dir / SCORES).read_text())["selection"][METRIC]


def compare(experiment: Path, out: Path, rows: list[dict]) -> list[dict]:
    """Per condition: original and changed means on both splits, the paired test difference with its interval."""
    original, changed = KeptPredictions(experiment), KeptPredictions(out)
    by_condition: dict[tuple, list[str]] = defaultdict(list)
    for row in rows:
        by_condition[tuple(row[k] for k in CONDITION)].append(Path(row["finetune_dir"]).name)
    table = []
    for condition, cells in by_condition.items():
        cells = [c for c in cells if finished(out / "finetune" / c)]
        if not cells:
            continue
        base, other = original.seeds(cells, METRIC), changed.seeds(cells, METRIC)
        result = paired_difference(other, base)
        table.append({**dict(zip(CONDITION, condition, strict=True)), "seeds": len(cells),
                      "val_original": statistics.mean(selection_score(experiment / "finetune" / c) for c in cells),
                      "val_changed": statistics.mean(selection_score(out / "finetune" / c) for c in cells),
                      "original": statistics.mean(s.point for s in base),
                      "changed": statistics.mean(s.point for s in other),
                      "diff": result.estimate, "low": result.low, "high": result.high, "verdict": result.verdict})
    return table


def write(results: Path, table: list[dict], experiment: Path, planned: int, variant: Variant) -> None:
    results.mkdir(parents=True, exist_ok=True)
    with open(results / "variant.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    done = sum(r["seeds"] for r in table)
    moved = [r for r in table if r["verdict"] != "unresolved"]
    better_on_val = sum(r["val_changed"] > r["val_original"] for r in table)
    lines = [f"# Fine-tuning changed ({variant.describe()}): {experiment.name}", "",
             f"{done} of {planned} fine-tuned cells rerun with {variant.describe()}. Macro-F1, mean over seeds, "
             "on the selection split (val, where a choice is made) and the test split; test difference changed − "
             "original with its paired 95 % interval (bootstrap over test images and seeds).", "",
             "| method | network | init | labels | seeds | val original | val changed | test original | "
             "test changed | test difference [95 % interval] | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['arch']} | {r['init']} | {r['label_fraction']:g} | {r['seeds']} | "
              f"{r['val_original']:.3f} | {r['val_changed']:.3f} | {r['original']:.3f} | {r['changed']:.3f} | "
              f"{r['diff']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}] | {r['verdict']} |" for r in table]
    lines += ["", f"The change scored higher on the selection split in {better_on_val} of {len(table)} conditions.",
              "On test it moved no condition beyond its interval." if not moved else
              f"On test it moved {len(moved)} of {len(table)} conditions beyond their interval "
              f"({sum(r['verdict'] == 'above' for r in moved)} above, {sum(r['verdict'] == 'below' for r in moved)} "
              "below)."]
    (results / "variant.md").write_text("\n".join(lines) + "\n")


def parse_pairs(pairs: list[str], flag: str, typed: bool) -> dict[str, Any]:
    """``KEY=VALUE`` strings as a dict (values read as YAML when ``typed``: ``1`` is a number)."""
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} {pair!r}: expected KEY=VALUE")
        parsed[key] = yaml.safe_load(value) if typed else value
    return parsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path, help="a finished experiment's run directory (runs/NAME)")
    parser.add_argument("--out", type=Path, required=True, help="where the changed cells are trained")
    parser.add_argument("--results", type=Path, required=True, help="where the table is written")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a fine-tuning option changed in every rerun cell (repeatable), e.g. loss=ce")
    parser.add_argument("--double-budget", action="store_true", help="twice the evaluations and minimum steps")
    parser.add_argument("--only", action="append", default=[], metavar="COLUMN=VALUE",
                        help="rerun only the cells with this results.csv value (repeatable), e.g. arch=vit")
    args = parser.parse_args()
    variant = Variant(parse_pairs(args.overrides, "--set", typed=True), args.double_budget)
    if not variant.overrides and not variant.double_budget:
        raise SystemExit("nothing changes: give --set KEY=VALUE or --double-budget")
    rows = full_cells(args.experiment, parse_pairs(args.only, "--only", typed=False))
    if not rows:
        raise SystemExit(f"{args.experiment / RESULTS_JSON}: no finished fine-tuned cell matches {args.only}")
    run_variant(args.experiment, args.out, rows, variant)
    table = compare(args.experiment, args.out, rows)
    write(args.results, table, args.experiment, len(rows), variant)
    print((args.results / "variant.md").read_text())


if __name__ == "__main__":
    main()
