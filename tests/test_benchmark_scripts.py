"""The benchmark scripts' own logic (their runs are benchmarks, not tests): how a fine-tuning variant is
applied to a committed cell's configuration."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from cass.config import ConfigError, FinetuneConfig

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
