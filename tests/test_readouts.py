"""Frozen-feature readouts (SPEC §2): k and C chosen on the selection split, never on test; k never above the
labelled images; the chosen value recorded in metrics.json, the model directory and the results; predict
works on both readout model directories."""

from __future__ import annotations

import csv
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TINY_CNN
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler
from typer.testing import CliRunner

import cass.evaluation.features as features_module
import cass.training.finetune as ft
from cass.cli.main import app
from cass.config import ConfigError, DataConfig, FinetuneConfig, load_yaml
from cass.data.dataset import ImageSet
from cass.evaluation.inference import evaluate, load_classifier
from cass.evaluation.readouts import READOUT_FILES, fit_logistic, knn_grid
from cass.experiment.config import READOUTS, ExperimentConfig, validate
from cass.experiment.plan import Cell
from cass.experiment.results import cell_row
from cass.reporting.report import readout_name
from cass.utils.checkpoint import read_info


def ft_cfg(data: Path, out: Path, **kw: Any) -> FinetuneConfig:
    values = dict(data=DataConfig(data=str(data), num_workers=0), cnn=TINY_CNN, img_size=32, batch_size=16,
                  out=str(out), accelerator="cpu")
    return FinetuneConfig(**{**values, **kw})


def metrics_of(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "metrics.json").read_text())


# --- k never above the labelled images ----------------------------------------------------------------


def test_knn_grid_caps_k_at_the_bank_size():
    assert knn_grid([1, 5, 10, 20, 50], 4) == [1, 4]
    assert knn_grid([50, 5, 1], 100) == [1, 5, 50]


def test_knn_at_one_percent_never_uses_more_neighbours_than_labelled_images(brain_folder, tmp_path):
    model_dir = ft.finetune(ft_cfg(brain_folder, tmp_path / "m", mode="knn", label_fraction=0.01))
    labelled = len(list(csv.DictReader(open(model_dir / "subset.csv"))))
    readout = metrics_of(model_dir)["readout"]
    assert labelled == 4  # one image per class
    assert readout["grid"] == [1, 4] and readout["k"] in (1, 4)
    assert set(readout["selection_macro_f1_by_k"]) == {"1", "4"}
    assert int(read_info(model_dir / "knn_bank.safetensors")["k"]) == readout["k"]  # what predict uses


# --- chosen on the selection split, not on test -----------------------------------------------------------


def _synthetic_features(images: ImageSet, signal: float) -> np.ndarray:
    """Deterministic features per image file: its class centre plus noise seeded by its file name (not the
    whole key, which may hold the temporary folder's path and would change the draw from run to run)."""
    centres = np.random.default_rng(0).normal(size=(len(images.classes), 8))
    return np.stack([centres[target] * signal + np.random.default_rng(zlib.crc32(key.rsplit("/", 1)[-1].encode())).normal(size=8)
                     for key, target in zip(images.keys, images.targets, strict=True)]).astype(np.float32)


def _sklearn_macro_f1(mode: str, value: float, bank: tuple[np.ndarray, np.ndarray],
                      split: tuple[np.ndarray, np.ndarray]) -> float:
    """Macro-F1 of one grid value computed independently of cass (scikit-learn end to end)."""
    if mode == "knn":
        model = KNeighborsClassifier(n_neighbors=int(value), metric="cosine", weights="distance").fit(*bank)
        predicted = model.predict(split[0])
    else:
        scaler = StandardScaler().fit(bank[0])
        model = LogisticRegression(C=value, max_iter=2000).fit(scaler.transform(bank[0]), bank[1])
        predicted = model.predict(scaler.transform(split[0]))
    return float(f1_score(split[1], predicted, average="macro"))


@pytest.mark.parametrize(("mode", "grid", "signal"), [("knn", [1, 3, 5, 10, 40], 0.4),
                                                       ("logistic", [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0], 0.25)])
def test_setting_is_chosen_on_the_selection_split(brain_folder, tmp_path, monkeypatch, mode, grid, signal):
    calls: list[tuple[np.ndarray, np.ndarray]] = []

    def features(net, images, *args, **kwargs):
        calls.append((_synthetic_features(images, signal), images.targets))
        return calls[-1][0]

    monkeypatch.setattr(ft, "extract_features", features)
    grids = {"knn_ks": grid} if mode == "knn" else {"logistic_cs": grid}
    model_dir = ft.finetune(ft_cfg(brain_folder, tmp_path / "m", mode=mode, **grids))
    bank, selection, test = calls  # each split's features extracted once, reused across the grid
    on_selection = [_sklearn_macro_f1(mode, v, bank, selection) for v in grid]
    on_test = [_sklearn_macro_f1(mode, v, bank, test) for v in grid]
    best = grid[int(np.argmax(on_selection))]
    assert best != grid[int(np.argmax(on_test))], "the features must tell selection from test apart"
    metrics = metrics_of(model_dir)
    setting = "k" if mode == "knn" else "c"
    assert metrics["readout"][setting] == best
    assert metrics["readout"]["grid"] == grid
    recorded = metrics["readout"][f"selection_macro_f1_by_{setting}"]
    assert [recorded[f"{v:g}"] for v in grid] == pytest.approx(on_selection)
    assert metrics["selection"]["macro_f1"] == pytest.approx(max(on_selection))
    assert metrics["macro_f1"] == pytest.approx(on_test[grid.index(best)])  # test scored once, with the chosen one


def test_a_fixed_knn_k_is_the_only_candidate(brain_folder, tmp_path):
    model_dir = ft.finetune(ft_cfg(brain_folder, tmp_path / "m", mode="knn", knn_k=3))
    assert metrics_of(model_dir)["readout"]["grid"] == [3] and metrics_of(model_dir)["readout"]["k"] == 3


# --- the logistic probe ---------------------------------------------------------------------------------


def test_logistic_probe_matches_scikit_learn_for_two_classes_and_multi_label():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 5)) * [1, 2, 3, 4, 5] + 7
    binary = (x[:, 0] + rng.normal(size=30) > 7).astype(np.int64)
    probe = fit_logistic(x, binary, 0.5, num_classes=2, multilabel=False)
    scaler = StandardScaler().fit(x)
    reference = LogisticRegression(C=0.5, max_iter=2000).fit(scaler.transform(x), binary)
    assert np.allclose(probe.logits(x).softmax(1).numpy(), reference.predict_proba(scaler.transform(x)), atol=1e-5)

    labels = np.stack([binary, 1 - binary, np.zeros(30, dtype=np.int64)], axis=1)  # the last label never occurs
    probe = fit_logistic(x, labels, 0.5, num_classes=3, multilabel=True)
    probabilities = probe.logits(x).sigmoid().numpy()
    assert np.allclose(probabilities[:, 0], reference.predict_proba(scaler.transform(x))[:, 1], atol=1e-5)
    assert (probabilities[:, 2] < 1e-6).all()


def test_predict_works_on_knn_and_logistic_model_dirs(brain_folder, tmp_path):
    for mode in ("knn", "logistic"):
        model_dir = ft.finetune(ft_cfg(brain_folder, tmp_path / mode, mode=mode, logistic_cs=[0.01, 1.0]))
        metrics = metrics_of(model_dir)
        out = tmp_path / f"{mode}.csv"
        result = CliRunner().invoke(app, ["predict", "--model", str(model_dir), "--input",
                                          str(brain_folder / "val"), "--out", str(out)])
        assert result.exit_code == 0, result.output
        rows = list(csv.DictReader(open(out)))
        assert len(rows) == 16 and all(abs(sum(float(r[c]) for c in metrics["classes"]) - 1) < 1e-4 for r in rows)
        # The saved readout is the chosen one: evaluating it on val gives the selection scores fine-tuning recorded.
        scores = evaluate(model_dir, brain_folder, tmp_path / f"eval_{mode}", split="val")
        assert scores["macro_f1"] == pytest.approx(metrics["selection"]["macro_f1"], abs=1e-6)
    classifier = load_classifier(tmp_path / "logistic", "cpu")
    info = read_info(tmp_path / "logistic" / "logistic_probe.safetensors")
    assert float(info["c"]) == metrics["readout"]["c"] == classifier.readout.c
    assert classifier.readout.weight.shape == (4, 512) and classifier.readout.mean.shape == (512,)


# --- options, experiments, results ------------------------------------------------------------------------


def test_cli_takes_the_grids_as_repeated_options(monkeypatch):
    seen: dict[str, FinetuneConfig] = {}
    monkeypatch.setattr(ft, "finetune", lambda cfg, resume=False: seen.setdefault("cfg", cfg))
    result = CliRunner().invoke(app, ["finetune", "--knn-ks", "1", "--knn-ks", "7", "--logistic-cs", "0.5"])
    assert result.exit_code == 0, result.output
    assert seen["cfg"].knn_ks == [1, 7] and seen["cfg"].logistic_cs == [0.5] and seen["cfg"].knn_k is None
    seen.clear()
    assert CliRunner().invoke(app, ["finetune"]).exit_code == 0
    assert seen["cfg"].knn_ks == [1, 5, 10, 20, 50] and len(seen["cfg"].logistic_cs) == 6
    result = CliRunner().invoke(app, ["finetune", "--logistic-cs", "0"])
    assert result.exit_code == 2 and "(--logistic-cs): must be > 0" in result.output


def test_empty_grid_is_refused_by_its_option(brain_folder, tmp_path):
    with pytest.raises(ConfigError, match="--knn-ks"):
        ft.finetune(ft_cfg(brain_folder, tmp_path / "m", mode="knn", knn_ks=[]))


def test_experiments_run_both_readouts_and_refuse_linear():
    assert ExperimentConfig().readouts == ["knn", "logistic"]
    with pytest.raises(ConfigError, match="linear readout is now `logistic`"):
        validate(ExperimentConfig(readouts=["knn", "linear"]))


def test_results_rows_carry_the_chosen_k_and_c(tmp_path):
    cfg = ExperimentConfig(out=str(tmp_path))
    for mode, readout in (("knn", {"k": 5}), ("logistic", {"c": 0.1}), ("full", None)):
        cell = Cell("starting-point", "cnn", "scratch", 0.1, 0, None, None, mode)
        cell_dir = tmp_path / "finetune" / cell.name
        cell_dir.mkdir(parents=True)
        (cell_dir / "subset.csv").write_text("index,file\n0,a.png\n")
        scores = {"macro_f1": 0.5, "selection": {"macro_f1": 0.6}, **({"readout": readout} if readout else {})}
        (cell_dir / "metrics.json").write_text(json.dumps(scores))
        row = cell_row(cfg, cell, None, 1.0)
        assert (row["readout_k"], row["readout_c"]) == {"knn": (5, None), "logistic": (None, 0.1),
                                                        "full": (None, None)}[mode]


def test_experiments_made_before_the_grid_keep_their_fixed_k(tmp_path):
    # an experiment.yaml of the 2026-12-03 comparisons: their finetune section fixed k = 20
    (tmp_path / "experiment.yaml").write_text("finetune:\n  knn_k: 20\n")
    old = load_yaml(ExperimentConfig, tmp_path / "experiment.yaml")
    assert old.finetune.knn_k == 20 and "k = 20" in readout_name("knn", old.finetune)
    assert "chosen on the selection split from 1, 5, 10, 20, 50" in readout_name("knn", FinetuneConfig())
    assert "from 0.001, 0.01, 0.1, 1, 10, 100" in readout_name("logistic", FinetuneConfig())


# --- frozen features extracted once per network ------------------------------------------------------


def test_readouts_sharing_a_feature_store_extract_each_network_once_and_score_the_same(brain_folder, tmp_path,
                                                                                        monkeypatch):
    calls: list[int] = []
    real = features_module.extract_features

    def counted(net, images, *args):
        calls.append(len(images))
        return real(net, images, *args)

    monkeypatch.setattr(features_module, "extract_features", counted)
    store = ft.FeatureStore(tmp_path / "features")
    first = metrics_of(ft.finetune(ft_cfg(brain_folder, tmp_path / "knn", mode="knn"), feature_store=store))
    assert len(calls) == 3  # labelled, selection, test
    second = metrics_of(ft.finetune(ft_cfg(brain_folder, tmp_path / "logistic", mode="logistic"), feature_store=store))
    assert len(calls) == 3 and len(list((tmp_path / "features").glob("*.npy"))) == 3  # all three read back
    alone = metrics_of(ft.finetune(ft_cfg(brain_folder, tmp_path / "alone", mode="logistic")))
    assert second["macro_f1"] == alone["macro_f1"] and second["readout"] == alone["readout"]
    assert first["readout"]["k"] >= 1
    other_seed = ft.finetune(ft_cfg(brain_folder, tmp_path / "seed1", mode="knn", seed=1), feature_store=store)
    assert len(calls) == 6 and metrics_of(other_seed)  # another random init: other weights, other features


def test_every_readout_mode_has_one_fit_and_one_saved_file_and_experiments_offer_exactly_those():
    assert set(ft.READOUT_FITS) == set(READOUT_FILES) == set(READOUTS)
    assert set(ft.READOUT_FITS) < set(ft.MODES)
