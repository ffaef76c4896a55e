"""The comparison grid: shared pretraining runs, honest configs, and a resume that redoes nothing."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import cass.experiment.run as experiment
from cass.cli.main import app
from cass.config import (
    ConfigError,
    FinetuneConfig,
    PretrainConfig,
    from_dict,
    load_yaml,
    merge,
    save_yaml,
    to_dict,
)
from cass.experiment.config import (
    STARTING_POINT,
    ExperimentConfig,
    InitSpec,
    PublishedResult,
    run_labels,
    validate,
)
from cass.experiment.demo import demo_config
from cass.experiment.plan import (
    Cell,
    finetune_config,
    plan,
    pretrain_config,
    pretrain_dir,
    pretrain_run,
)
from cass.experiment.run import run_experiment
from cass.methods.dino import DINO
from cass.reporting.report import write_report

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs" / "experiments").glob("*.yaml"))
SMOKE = REPO / "configs" / "experiments" / "smoke.yaml"


def tiny_split(shared_data: Path, root: Path, train: int = 8, val: int = 4) -> Path:
    """A train/val image folder built from the real brain-MRI fixture: ``train`` + ``val`` images per class."""
    arrays = np.load(shared_data / "mini-cpu" / "brain_mri_mini_64.npz")
    seen: dict[int, int] = {}
    for image, label in zip(arrays["images"], arrays["labels"], strict=True):
        n = seen[int(label)] = seen.get(int(label), -1) + 1
        if n >= train + val:
            continue
        folder = root / ("train" if n < train else "val") / str(arrays["classes"][label])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{n}.png")
    return root


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_committed_configs_load_validate_and_round_trip(path):
    cfg = load_yaml(ExperimentConfig, path)
    assert from_dict(ExperimentConfig, to_dict(cfg)) == cfg
    if all(i.name in ("scratch", "imagenet") for i in cfg.inits):  # stand-in weights exist only once trained
        validate(cfg)


def test_committed_configs_cover_the_issue():
    assert {p.name for p in CONFIGS} >= {"smoke.yaml", "brain_mri_cpu.yaml", "blood_pbc_cpu.yaml", "brain_mri_gpu.yaml"}
    smoke = load_yaml(ExperimentConfig, SMOKE)
    assert smoke.methods == ["cass", "cass-vicreg", "dino", "supervised"] and smoke.archs == ["cnn", "vit"]
    assert smoke.readouts == ["knn", "logistic"]
    assert smoke.label_fractions == [0.1, 1.0] and len(smoke.seeds) == 2
    assert smoke.pretrain.epochs == 1 and smoke.pretrain.img_size == 32


def test_demo_config_is_a_valid_round_tripping_grid():
    cfg = demo_config("somewhere")
    validate(cfg)
    assert from_dict(ExperimentConfig, to_dict(cfg)) == cfg
    assert cfg.seeds == [0] and cfg.label_fractions == [0.01, 0.1, 1.0]
    assert set(cfg.methods) == {"cass", "cass-vicreg", "dino", "supervised"} and cfg.readouts == ["knn", "logistic"]


def test_each_pretraining_run_serves_every_cell_that_needs_it():
    cfg = ExperimentConfig(methods=["cass", "dino", "supervised"], readouts=[], label_fractions=[0.01, 0.1, 1.0],
                           seeds=[0, 1, 2], sweep_batch_sizes=[8, 16, 32], sweep_epochs=[2, 5],
                           sweep_label_fractions=[1.0], pretrain=PretrainConfig(batch_size=16, epochs=5))
    cells = plan(cfg)
    assert len(cells) == len(set(cells)) == len({c.name for c in cells})
    # main grid: 3 methods x 2 archs x 3 fractions x 3 seeds; sweeps: the values other than the base
    # (8, 32; 2) x 2 self-supervised methods x 2 archs x 1 fraction x 3 seeds
    assert len(cells) == 3 * 2 * 3 * 3 + 3 * 2 * 2 * 1 * 3
    runs: dict = {}
    for cell in cells:
        runs.setdefault(pretrain_run(cfg, cell), []).append(cell)
    supervised = runs.pop(None)
    assert len(supervised) == 2 * 3 * 3 and all(c.batch_size is None for c in supervised)
    # CASS: one run per (seed, setting) serves both networks; DINO: one per architecture
    assert sum(r.method == "cass" for r in runs) == 3 * 4 and sum(r.method == "dino" for r in runs) == 2 * 3 * 4
    base = [r for r in runs if (r.batch_size, r.epochs) == (16, 5)]
    for run in base:
        served = runs[run]
        assert {c.label_fraction for c in served} == {0.01, 0.1, 1.0} and {c.seed for c in served} == {run.seed}
        assert {c.arch for c in served} == ({"cnn", "vit"} if run.method == "cass" else {run.arch})
    # the names pretrain_overrides are checked against are the names of the runs the plan makes
    assert run_labels(cfg) == ["cass", "dino-cnn", "dino-vit"] == sorted({r.label for r in runs})

    shared = ExperimentConfig(seeds=[3, 4], pretrain_per_seed=False, readouts=[])
    assert {pretrain_run(shared, c).seed for c in plan(shared) if c.method != "supervised"} == {3}


def test_readouts_cover_every_pretrained_network_and_its_starting_point():
    cfg = ExperimentConfig(label_fractions=[0.1, 1.0], seeds=[0, 1], pretrain=PretrainConfig(batch_size=16, epochs=5))
    readouts = [c for c in plan(cfg) if c.mode != "full"]
    pretrained = [m for m in cfg.methods if m != "supervised"]
    # (every pretrained method + the starting point) x 2 archs x 2 fractions x 2 seeds x (knn, logistic)
    assert len(readouts) == (len(pretrained) + 1) * 2 * 2 * 2 * 2
    for cell in readouts:
        run = pretrain_run(cfg, cell)
        if cell.method == STARTING_POINT:
            assert run is None and finetune_config(cfg, cell, None).source == "scratch"
        else:  # read from the same pretraining run as the fine-tuned cells
            assert run == pretrain_run(cfg, dataclasses.replace(cell, mode="full"))
        assert finetune_config(cfg, cell, None).mode == cell.mode


def test_per_cell_options_and_missing_weights_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="pretrain.seed is set per cell"):
        validate(ExperimentConfig(pretrain=PretrainConfig(seed=3)))
    with pytest.raises(ConfigError, match="finetune.label_fraction is set per cell"):
        validate(ExperimentConfig(finetune=FinetuneConfig(label_fraction=0.5)))
    with pytest.raises(ConfigError, match="methods must be"):
        validate(ExperimentConfig(methods=["cass", "byol"]))
    (tmp_path / "cnn.safetensors").touch()
    with pytest.raises(ConfigError, match="needs vit_weights"):
        validate(ExperimentConfig(inits=[InitSpec("blood-supervised", cnn_weights=str(tmp_path / "cnn.safetensors"))]))
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(ConfigError, match=str(missing)):
        validate(ExperimentConfig(inits=[InitSpec("blood-supervised", str(missing), str(missing))]))
    with pytest.raises(ConfigError, match="label fraction"):
        validate(ExperimentConfig(label_fractions=[10]))


def test_pretrain_overrides_reach_only_their_run_and_bad_ones_are_refused_by_name():
    yaml_values = {"methods": ["cass", "dino"], "pretrain_overrides": {"dino-cnn": {"dino.base_lr": 0.24}}}
    cfg = from_dict(ExperimentConfig, yaml_values)
    validate(cfg)
    assert from_dict(ExperimentConfig, to_dict(cfg)) == cfg
    runs = {pretrain_run(cfg, c) for c in plan(cfg)} - {None}
    lrs = {run.label: pretrain_config(cfg, run).dino.base_lr for run in runs}
    assert lrs == {"cass": None, "dino-cnn": 0.24, "dino-vit": None}  # None: the student's recipe
    with pytest.raises(ConfigError, match=r"pretrain_overrides.dino: no such pretraining run.*dino-cnn"):
        validate(from_dict(ExperimentConfig, {"pretrain_overrides": {"dino": {"dino.base_lr": 1.0}}}))
    with pytest.raises(ConfigError, match="unknown option dino.lr"):
        validate(from_dict(ExperimentConfig, {"pretrain_overrides": {"dino-vit": {"dino.lr": 1.0}}}))
    with pytest.raises(ConfigError, match="pretrain_overrides.cass: epochs must be the same"):
        validate(from_dict(ExperimentConfig, {"pretrain_overrides": {"cass": {"epochs": 9}}}))


def test_stand_in_init_gives_each_network_its_own_weights(tmp_path):
    cnn, vit = tmp_path / "cnn_model.safetensors", tmp_path / "vit_model.safetensors"
    cnn.touch()
    vit.touch()
    cfg = ExperimentConfig(inits=[InitSpec("blood-supervised", str(cnn), str(vit))], out=str(tmp_path / "exp"))
    validate(cfg)
    cass_cell = Cell("cass", "vit", "blood-supervised", 0.1, 0, 16, 100)
    run = pretrain_run(cfg, cass_cell)
    pre = pretrain_config(cfg, run)
    assert (Path(pre.init) / "cnn.safetensors").resolve() == cnn.resolve()
    assert (Path(pre.init) / "vit.safetensors").resolve() == vit.resolve()
    assert finetune_config(cfg, cass_cell, pretrain_dir(cfg, run)).source == pre.out
    supervised = finetune_config(cfg, Cell("supervised", "cnn", "blood-supervised", 0.1, 0, None, None), None)
    assert supervised.source == str(cnn) and supervised.cnn == cfg.pretrain.cnn
    assert "blood-supervised" in supervised.out and "blood-supervised" in pre.out


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_interrupted_experiment_resumes_without_redoing_any_finished_work(shared_data, tmp_path, monkeypatch):
    """The smoke grid (one seed; two pretraining epochs so a run can die after its first) is interrupted
    twice: once before a fine-tuning, once inside a DINO pretraining. Rerunning finishes the grid, resumes
    the pretraining from its checkpoint, and never repeats a finished pretraining or fine-tuning."""
    data = tiny_split(shared_data, tmp_path / "data")
    cfg = merge(load_yaml(ExperimentConfig, SMOKE), {
        "data.data": str(data), "out": str(tmp_path / "exp"), "seeds": [0], "pretrain.epochs": 2,
        "pretrain.accelerator": "cpu", "finetune.accelerator": "cpu", "methods": ["cass", "dino", "supervised"],
        "readouts": [],
    })
    calls: dict[str, list] = {"pretrain": [], "finetune": []}
    fail = {"finetune_call": 3}

    def counted_pretrain(run_cfg, resume=False):
        calls["pretrain"].append((Path(run_cfg.out).name, resume))
        return real_pretrain(run_cfg, resume=resume)

    def counted_finetune(ft_cfg, resume=False, **kw):
        if len(calls["finetune"]) + 1 == fail["finetune_call"]:
            fail["finetune_call"] = 0
            raise KeyboardInterrupt
        calls["finetune"].append(Path(ft_cfg.out).name)
        return real_finetune(ft_cfg, resume=resume, **kw)

    real_pretrain, real_finetune = experiment.pretrain, experiment.finetune
    monkeypatch.setattr(experiment, "pretrain", counted_pretrain)
    monkeypatch.setattr(experiment, "finetune", counted_finetune)

    def session() -> tuple[list, list]:
        calls["pretrain"], calls["finetune"] = [], []
        try:
            run_experiment(cfg)
        except KeyboardInterrupt:
            pass
        return calls["pretrain"], calls["finetune"]

    cells = [c.name for c in plan(cfg)]
    assert len(cells) == 12  # 3 methods x 2 archs x 2 fractions x 1 seed

    pre1, ft1 = session()  # dies before the third fine-tuning
    assert pre1 == [("cass_scratch_bs16_ep2_seed0", False)] and ft1 == cells[:2]

    dino_steps = {"n": 0}
    real_forward = DINO.forward

    def dies_in_epoch_two(self, images, progress):
        dino_steps["n"] += 1
        if dino_steps["n"] == 2:  # 28 train images (4 carved as test) / batch 16 = 1 step per epoch: epoch 2
            raise KeyboardInterrupt
        return real_forward(self, images, progress)

    monkeypatch.setattr(DINO, "forward", dies_in_epoch_two)
    pre2, ft2 = session()  # finishes the CASS cells, then dies inside the first DINO pretraining
    assert pre2 == [("dino-cnn_scratch_bs16_ep2_seed0", False)] and ft2 == cells[2:4]
    dino_run = Path(cfg.out) / "pretrain" / "dino-cnn_scratch_bs16_ep2_seed0"
    first_epoch = read_csv(dino_run / "metrics.csv")
    assert [r["epoch"] for r in first_epoch] == ["1"]

    monkeypatch.setattr(DINO, "forward", real_forward)
    pre3, ft3 = session()
    assert pre3 == [("dino-cnn_scratch_bs16_ep2_seed0", True), ("dino-vit_scratch_bs16_ep2_seed0", False)]
    assert ft3 == cells[4:]
    resumed = read_csv(dino_run / "metrics.csv")
    assert [r["epoch"] for r in resumed] == ["1", "2"] and resumed[0] == first_epoch[0]  # epoch 1 not redone

    assert session() == ([], [])  # a finished experiment reruns nothing
    rows = json.loads((Path(cfg.out) / "results.json").read_text())
    assert [Path(r["finetune_dir"]).name for r in rows] == cells
    for row in rows:
        assert 0 <= row["test_macro_f1"] <= 1 and 0 <= row["val_balanced_accuracy"] <= 1
        assert row["finetune_time_s"] > 0 and Path(row["finetune_config"]).is_file()
        if row["method"] == "supervised":
            assert row["pretrain_time_s"] is None and row["pretrain_config"] is None
        else:
            assert row["pretrain_time_s"] > 0 and Path(row["pretrain_config"]).is_file()
    assert {(r["method"], r["arch"], r["label_fraction"]) for r in rows} == {
        (m, a, f) for m in ("cass", "dino", "supervised") for a in ("cnn", "vit") for f in (0.1, 1.0)}
    # 8 train images per class, 1 carved as test: 10 % of 7 rounds to 1 per class, 100 % is 28
    assert [r["labelled_images"] for r in rows[:2]] == [4, 28]
    table = read_csv(Path(cfg.out) / "results.csv")
    assert len(table) == 12 and {"test_macro_f1", "val_macro_f1", "test_auroc", "test_f1_glioma", "steps", "seed"} <= set(table[0])
    runs = read_csv(Path(cfg.out) / "pretraining.csv")
    assert sorted((r["method"], r["arch"], r["epochs_done"]) for r in runs) == [
        ("cass", "cnn+vit", "2"), ("dino", "cnn", "2"), ("dino", "vit", "2")]

    # The CLI on the saved experiment.yaml is "the same command": it skips everything.
    result = CliRunner().invoke(app, ["experiment", "--config", str(Path(cfg.out) / "experiment.yaml")])
    assert result.exit_code == 0, result.output
    assert result.output.count("done, skipped") == 12 and calls == {"pretrain": [], "finetune": []}

    # Changing a setting of finished cells is refused instead of silently mixing two experiments.
    changed = merge(cfg, {"finetune.lr": 1e-2})
    with pytest.raises(ConfigError, match=r"different configuration .*\(lr: 0.0003 -> 0.01\)"):
        run_experiment(changed)


def test_budget_curve_reads_each_kept_epoch_of_one_run_and_plans_no_fine_tuning(shared_data, tmp_path):
    data = tiny_split(shared_data, tmp_path / "data")
    cfg = merge(load_yaml(ExperimentConfig, SMOKE), {
        "data.data": str(data), "out": str(tmp_path / "exp"), "seeds": [0, 1], "pretrain.epochs": 2,
        "pretrain.accelerator": "cpu", "finetune.accelerator": "cpu", "methods": ["cass"], "archs": ["cnn"],
        "readouts": ["knn"], "label_fractions": [1.0], "readout_epochs": [1], "fine_tune": False,
    })
    cells = plan(cfg)
    assert sorted(c.name for c in cells) == sorted(
        [f"{STARTING_POINT}_cnn_scratch_f1_seed{s}_knn" for s in (0, 1)]
        + [f"cass_cnn_scratch_bs16_ep2{at}_f1_seed{s}_knn" for s in (0, 1) for at in ("", "_at1")])
    run = pretrain_run(cfg, next(c for c in cells if c.at_epoch == 1))
    assert pretrain_config(cfg, run).keep_epochs == [1]
    snapshot = finetune_config(cfg, next(c for c in cells if c.at_epoch == 1 and c.seed == 0), pretrain_dir(cfg, run))
    assert snapshot.source == str(pretrain_dir(cfg, run) / "snapshots" / "epoch_001")

    out = run_experiment(cfg)
    curve = read_csv(out / "budget_curve.csv")
    assert [int(r["epochs"]) for r in curve] == [0, 1, 2]  # starting point, the snapshot, the run's end
    assert curve[0]["step_verdict"] == "" and {r["step_verdict"] for r in curve[1:]} <= {"above", "below", "unresolved"}
    rows = json.loads((out / "results.json").read_text())
    at_one = {r["seed"]: r["test_macro_f1"] for r in rows if r["pretrain_at_epoch"] == 1}
    assert float(curve[1]["macro_f1"]) == pytest.approx(np.mean(list(at_one.values())), abs=1e-9)
    spent = {r["pretrain_at_epoch"]: r["pretrain_time_s"] for r in rows if r["seed"] == 0 and r["method"] == "cass"}
    assert 0 < spent[1] < spent[None]  # the snapshot's time is the run's time up to its epoch
    stated = [r for r in read_csv(out / "comparisons.csv") if r["metric"] == "macro_f1"]
    at_end = [r["test_macro_f1"] for r in rows if r["method"] == "cass" and r["pretrain_at_epoch"] is None]
    assert len(stated) == 1 and float(stated[0]["a_mean"]) == pytest.approx(np.mean(at_end))  # snapshots not in it
    md, _ = write_report(out)
    assert "## Pretraining budget" in md.read_text() and (out / "report" / "figures" / "budget_curve.png").is_file()
    row = next(line for line in md.read_text().splitlines() if line.startswith("| CASS | CNN | k-NN | 100% |"))
    cells = [c.strip() for c in row.strip("|").split("|")]  # method, network, readout, labels, 0/1/2 ep, step...
    assert cells[4:7] == [f"{float(r['macro_f1']):.3f}" for r in curve]
    assert cells[8] == {"above": "still rising", "unresolved": "flattened", "below": "falling"}[curve[2]["step_verdict"]]


def test_readouts_first_then_fine_tuning_adds_cells_without_redoing_any(shared_data, tmp_path):
    """``--readouts-only`` runs the pretraining and the readouts of a grid; the same command without it then
    adds only the fine-tuning cells: every readout and the pretraining run are skipped, not redone."""
    data = tiny_split(shared_data, tmp_path / "data")
    cfg = merge(load_yaml(ExperimentConfig, SMOKE), {
        "data.data": str(data), "out": str(tmp_path / "exp"), "seeds": [0], "pretrain.accelerator": "cpu",
        "finetune.accelerator": "cpu", "methods": ["cass"], "archs": ["cnn"], "readouts": ["knn"],
        "label_fractions": [1.0],
    })
    config = tmp_path / "experiment.yaml"
    save_yaml(cfg, config)
    first = CliRunner().invoke(app, ["experiment", "--config", str(config), "--readouts-only"])
    assert first.exit_code == 0, first.output
    assert {r["mode"] for r in json.loads((Path(cfg.out) / "results.json").read_text())} == {"knn"}
    assert load_yaml(ExperimentConfig, Path(cfg.out) / "experiment.yaml") == cfg  # the whole grid, still to finish
    md, _ = write_report(Path(cfg.out))
    assert "**part-done: 2 of 3 cells finished**" in md.read_text()
    second = CliRunner().invoke(app, ["experiment", "--config", str(config)])
    assert second.exit_code == 0, second.output
    assert second.output.count("done, skipped") == 2 and "ing pretraining" not in second.output  # not redone
    rows = json.loads((Path(cfg.out) / "results.json").read_text())
    assert sorted((r["method"], r["mode"]) for r in rows) == [
        ("cass", "full"), ("cass", "knn"), (STARTING_POINT, "knn")]


@pytest.mark.parametrize("change, message", [
    ({"readout_epochs": [2]}, "readout_epochs"), ({"readout_epochs": [1], "readouts": []}, "needs readouts"),
    ({"fine_tune": False, "readouts": []}, "nothing to run"),
])
def test_budget_options_that_cannot_work_are_refused(change, message):
    cfg = merge(load_yaml(ExperimentConfig, SMOKE), {"pretrain.epochs": 2, **change})
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


@pytest.mark.parametrize("published, message", [
    (PublishedResult(name="paper", scores={"auroc": 0.9}, label_fraction=0.5), "label_fraction 0.5 is not one"),
    (PublishedResult(name="paper", scores={"auc": 0.9}), r"scores \['auc'\] are not metrics"),
    (PublishedResult(name="paper", scores={"accuracy": 86.3}), r"between 0 and 1 \(0.901, not 90.1\)"),
    (PublishedResult(scores={"accuracy": 0.863}), "needs a name and scores"),
])
def test_published_results_that_no_cell_could_be_held_against_are_refused(published, message):
    cfg = dataclasses.replace(load_yaml(ExperimentConfig, SMOKE), label_fractions=[1.0], published=[published])
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
    validate(dataclasses.replace(cfg, published=[PublishedResult(name="paper", scores={"auroc": 0.9})]))


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "pretrain").glob("*.yaml")), ids=lambda p: p.name)
def test_committed_pretraining_configs_load_and_round_trip(path):
    cfg = load_yaml(PretrainConfig, path)
    assert from_dict(PretrainConfig, to_dict(cfg)) == cfg
    for source in cfg.sources():
        assert source.data is None or (path.parent / ".." / ".." / source.data).resolve().exists(), source.data
