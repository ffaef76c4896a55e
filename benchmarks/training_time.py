"""The training time of every committed benchmark, from its own files (issue 19, item 6).

    .venv/bin/python benchmarks/training_time.py              # every folder under results/
    .venv/bin/python benchmarks/training_time.py results/X    # some of them

Prints one Markdown row per folder: experiments (``results.csv`` and ``pretraining.csv``: seconds of the
pretraining epochs and of each fine-tuning or readout cell), pretraining runs (``metrics.csv``: seconds of
its epochs) and the MedMNIST reference runs (``runs.csv``: wall seconds per run), with the machine it ran
on. Loading images, reports and bootstraps are not counted, so a benchmark's wall time is somewhat longer.
Folders that record no time (searches written before times were kept) are listed as such.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cass.experiment.results import PRETRAINING_CSV, RESULTS_CSV, training_time
from cass.utils.markdown import markdown_table
from cass.utils.rundir import METRICS, read_csv


def _machine(folder: Path) -> str:
    """The device of the last session that wrote an experiment folder (``environment.json``), if recorded."""
    path = folder / "environment.json"
    if not path.is_file():
        return "not recorded"
    last = json.loads(path.read_text())[-1]
    return f"{last['device']}, {last['cpu_count']} cores"


def _row(folder: Path) -> list[str] | None:
    """[folder, what was timed, hours, machine], or None for a folder that holds no benchmark."""
    if (folder / RESULTS_CSV).is_file() and (folder / PRETRAINING_CSV).is_file():
        spent = training_time(folder)
        what = (f"{spent.pretraining_runs} pretraining runs ({spent.pretraining_s:,.0f} s), "
                f"{spent.cells} cells ({spent.cells_s:,.0f} s)")
        return [str(folder), what, f"{spent.hours:.2f}", _machine(folder)]
    if (folder / METRICS).is_file():
        epochs = read_csv(folder / METRICS)
        seconds = sum(float(row["epoch_time_s"]) for row in epochs)
        return [str(folder), f"1 pretraining run, {len(epochs)} epochs ({seconds:,.0f} s)", f"{seconds / 3600:.2f}",
                "not recorded"]
    if (folder / "runs.csv").is_file():
        runs = read_csv(folder / "runs.csv")
        seconds = sum(float(run["wall_s"]) for run in runs)
        devices = sorted({run.get("device") or "not recorded" for run in runs})
        return [str(folder), f"{len(runs)} training run(s) ({seconds:,.0f} s)", f"{seconds / 3600:.2f}",
                "; ".join(devices)]
    return None


def _folders(roots: list[Path]) -> list[Path]:
    """Every folder at or below the roots that holds a benchmark's files; an experiment's own subfolders
    (``finetune/``, ``pretrain/``, ``report/``) are not benchmarks of their own."""
    found = []
    for root in roots:
        if _row(root) is not None:
            found.append(root)
        if not (root / RESULTS_CSV).is_file():
            found += _folders(sorted(p for p in root.iterdir() if p.is_dir()))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", type=Path, help="results folders (default: every one under results/)")
    args = parser.parse_args()
    roots = args.folders or sorted(p for p in Path("results").iterdir() if p.is_dir())
    rows, untimed = [], []
    for root in roots:
        folders = _folders([root])
        rows += [row for folder in folders if (row := _row(folder))]
        if not folders:
            untimed.append(str(root))
    print(markdown_table(["results", "what was timed", "hours", "machine"], rows))
    if untimed:
        print(f"\nNo training time recorded in: {', '.join(untimed)}.")


if __name__ == "__main__":
    main()
