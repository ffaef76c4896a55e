"""The benchmark scripts' own logic (their runs are benchmarks, not tests): how a fine-tuning variant is
applied to a committed cell's configuration, how training time is added up, how reference runs are kept."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from cass.config import ConfigError, FinetuneConfig
from cass.utils.rundir import read_csv

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


variant_script = load_script("finetune_variant")


def test_a_variant_changes_only_what_it_names_and_writes_elsewhere(tmp_path):
    cell = FinetuneConfig(epochs=30, min_steps=100, loss="focal", vit_layer_decay=0.75, seed=2, out="runs/x")
    overrides = variant_script.parse_pairs(["loss=ce", "vit_layer_decay=1"], "--set", typed=True)
    assert overrides == {"loss": "ce", "vit_layer_decay": 1}
    changed = variant_script.Variant(overrides, double_budget=False).apply(cell, tmp_path / "y")
    assert (changed.loss, changed.vit_layer_decay, changed.epochs, changed.min_steps) == ("ce", 1.0, 30, 100)
    assert changed.seed == 2 and changed.out == str(tmp_path / "y")
    doubled = variant_script.Variant({}, double_budget=True).apply(cell, tmp_path / "z")
    assert (doubled.epochs, doubled.min_steps, doubled.loss) == (60, 200, "focal")
    with pytest.raises(ConfigError, match="--set: unknown option no_such"):
        variant_script.Variant({"no_such": 1}, double_budget=False).apply(cell, tmp_path / "w")
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        variant_script.parse_pairs(["loss"], "--set", typed=True)


def test_training_time_adds_up_every_run_and_cell_of_each_benchmark_folder_found(tmp_path):
    time_script = load_script("training_time")
    experiment = tmp_path / "pooled" / "brain"
    experiment.mkdir(parents=True)
    (experiment / "pretraining.csv").write_text("method,time_s\ncass,100.5\ndino,200\n")
    (experiment / "results.csv").write_text("mode,finetune_time_s\nfull,30\nknn,\nlogistic,6\n")
    (experiment / "finetune" / "cell").mkdir(parents=True)  # an experiment's own folders are not benchmarks
    (experiment / "finetune" / "cell" / "metrics.csv").write_text("epoch,epoch_time_s\n1,5\n")
    (tmp_path / "pooled" / "metrics.csv").write_text("epoch,epoch_time_s\n1,3000\n2,600\n")
    (tmp_path / "search").mkdir()
    assert time_script._folders([tmp_path / "pooled", tmp_path / "search"]) == [tmp_path / "pooled", experiment]
    spent = time_script.training_time(experiment)
    assert (spent.pretraining_runs, spent.pretraining_s, spent.cells, spent.cells_s) == (2, 300.5, 3, 36)
    assert spent.hours == pytest.approx(336.5 / 3600)
    assert time_script._row(tmp_path / "pooled") == [str(tmp_path / "pooled"), "1 pretraining run, 2 epochs (3,600 s)",
                                                      "1.00", "not recorded"]


def test_medmnist_reference_keeps_the_runs_already_recorded_when_more_seeds_finish(tmp_path):
    reference = load_script("medmnist_reference")
    results, out = tmp_path / "results", tmp_path / "runs"
    results.mkdir()
    (results / "runs.csv").write_text("dataset,recipe,seed,test_auc,test_acc\nbreastmnist,medmnist-v2,0,0.89,0.85\n")
    run = reference.Run("breastmnist", "medmnist-v2", 1)  # finished here, on a GPU
    (out / run.name).mkdir(parents=True)
    (out / run.name / "metrics.json").write_text(
        '{"auroc": 0.91, "accuracy": 0.87, "macro_f1": 0.8, "selection": {"auroc": 0.9}, "epoch": 40, "steps": 160}')
    (out / "timings.jsonl").write_text('{"run": "%s", "wall_s": 60.0, "cpu_s": 50.0, "device": "H100"}\n' % run.name)
    reference.write_results([run], out, results)
    rows = read_csv(results / "runs.csv")
    assert [(r["seed"], r["test_auc"], r["device"]) for r in rows] == [("0", "0.89", "CPU, 2 cores"),
                                                                        ("1", "0.91", "H100")]
    summary = {(r["dataset"], r["recipe"]): r for r in read_csv(results / "summary.csv")}
    breast = summary[("breastmnist", "medmnist-v2")]
    assert (breast["seeds"], breast["test_auc"], breast["test_acc"]) == ("2 of 3", "0.9000", "0.8600")
    assert summary[("pneumoniamnist", "medmnist-v2")]["seeds"] == "0 of 3"
