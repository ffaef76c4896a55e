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
