"""Experiments that share a pretraining run (issue 20): an init can be the networks of one pretraining run,
given as a run directory or as a pool of sources the experiment pretrains once, so every dataset's readouts
and fine-tuning start from the same backbone; resumable and checked like the rest of the grid."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner
from conftest import TINY_CNN, TINY_VIT
from test_experiment import tiny_split

import cass.experiment.run as experiment
from cass.cli.main import app
from cass.config import ConfigError, DataConfig, FinetuneConfig, PretrainConfig, from_dict, load_yaml, save_yaml, to_dict
from cass.experiment.config import STARTING_POINT, ExperimentConfig, InitSpec, validate
from cass.experiment.comparisons import stated_comparisons
from cass.experiment.plan import finetune_config, plan, pool_config, pool_dir, pretrain_config, pretrain_run
from cass.experiment.run import run_experiment

POOL_OPTIONS = {"method": "cass-vicreg", "cass_vicreg.proj_hidden_dim": 64, "cass_vicreg.proj_dim": 32,
                "diagnostics_samples": 16}


def pooled_grid(out: Path, pool: list[DataConfig], **kw) -> ExperimentConfig:
    values = dict(
        inits=[InitSpec("scratch"), InitSpec("pooled", pool=pool, pool_options=dict(POOL_OPTIONS))],
        methods=["supervised"], archs=["cnn"], readouts=["knn"], label_fractions=[1.0], seeds=[0],
        pretrain=PretrainConfig(cnn=TINY_CNN, vit=TINY_VIT, img_size=32, batch_size=16, epochs=1, accelerator="cpu"),
        finetune=FinetuneConfig(epochs=1, batch_size=16, min_steps=0, accelerator="cpu"), out=str(out))
    values.update(kw)
    return ExperimentConfig(**values)


def test_a_pool_init_is_planned_as_one_shared_run(tmp_path):
    pool = [DataConfig(data="a.zip", groups="a.csv"), DataConfig(data="b.npz", train_images=500)]
    cfg = pooled_grid(tmp_path / "exp", pool, seeds=[4, 5], methods=["cass-vicreg", "supervised"])
    validate(cfg)
    assert from_dict(ExperimentConfig, to_dict(cfg)) == cfg  # round-trips through experiment.yaml
    run = pool_config(cfg, cfg.inits[1])
    assert run.sources() == pool and run.method == "cass-vicreg" and run.cass_vicreg.proj_dim == 32
    assert run.seed == 4 and run.out == str(tmp_path / "exp" / "pool" / "pooled") and run.cnn == TINY_CNN
    cells = plan(cfg)
    pooled = [c for c in cells if c.init == "pooled"]
    assert {(c.method, c.mode) for c in pooled} == {
        (STARTING_POINT, "knn"), ("cass-vicreg", "knn"), ("cass-vicreg", "full"), ("supervised", "full")}
    network = str(pool_dir(cfg, cfg.inits[1]) / "cnn.safetensors")
    for cell in pooled:
        run_cell = pretrain_run(cfg, cell)
        if run_cell is None:  # the pooled backbone read out and fine-tuned as it is, for every seed
            assert finetune_config(cfg, cell, None).source == network
        else:  # per-dataset pretraining continues from the pooled backbone
            init = Path(pretrain_config(cfg, run_cell).init)
            assert (init / "cnn.safetensors").resolve() == Path(network).resolve()
    # stated across inits: the pooled backbone against random init and against per-dataset pretraining
    across = [(s.a, s.a_init, s.b, s.b_init, s.mode) for s in stated_comparisons(cfg) if s.a_init is not None]
    assert across == [(STARTING_POINT, "pooled", STARTING_POINT, "scratch", "knn"),
                      (STARTING_POINT, "pooled", "cass-vicreg", "scratch", "knn"),
                      ("supervised", "pooled", "supervised", "scratch", "full"),
                      ("supervised", "pooled", "cass-vicreg", "scratch", "full")]
    # and against a stand-in for ImageNet weights, under which only the supervised baseline runs
    standin = InitSpec("blood-supervised", cnn_weights="c.safetensors", vit_weights="v.safetensors",
                       methods=["supervised"])
    with_standin = dataclasses.replace(cfg, inits=[*cfg.inits, standin])
    across = [(s.a, s.a_init, s.b, s.b_init, s.mode) for s in stated_comparisons(with_standin) if s.a_init]
    assert across[4:] == [(STARTING_POINT, "pooled", STARTING_POINT, "blood-supervised", "knn"),
                          ("supervised", "pooled", "supervised", "blood-supervised", "full")]
    # the pooled backbone used as it is: no per-dataset pretraining continued from it
    as_is = pooled_grid(tmp_path / "exp", pool, methods=["cass-vicreg", "supervised"], inits=[
        InitSpec("scratch"), InitSpec("pooled", pool=pool, pool_options=dict(POOL_OPTIONS), methods=["supervised"])])
    validate(as_is)
    assert {(c.method, c.init, c.mode) for c in plan(as_is)} == {
        (STARTING_POINT, "scratch", "knn"), ("cass-vicreg", "scratch", "knn"), ("cass-vicreg", "scratch", "full"),
        ("supervised", "scratch", "full"), (STARTING_POINT, "pooled", "knn"), ("supervised", "pooled", "full")}
    as_is.inits[1].methods = ["dino"]
    with pytest.raises(ConfigError, match=r"init 'pooled': methods \['dino'\] must be a non-empty subset"):
        validate(as_is)
    # a grid with no self-supervised method still reads out the pooled backbone beside the other inits
    supervised_only = [c for c in plan(pooled_grid(tmp_path / "x", pool)) if c.mode == "knn"]
    assert {(c.method, c.init) for c in supervised_only} == {(STARTING_POINT, "scratch"), (STARTING_POINT, "pooled")}


def test_bad_pooled_inits_are_refused_by_name(tmp_path):
    pool = [DataConfig(data="a.zip")]

    def refused(init: InitSpec, match: str, **kw) -> None:
        with pytest.raises(ConfigError, match=match):
            validate(pooled_grid(tmp_path / "exp", pool, inits=[init], **kw))

    refused(InitSpec("p", pool_options={"epochs": 2}), "pool_options without a pool")
    refused(InitSpec("p", pool=pool, run=str(tmp_path)), "give run or pool alone")
    refused(InitSpec("scratch", pool=pool), "give run or pool alone")
    refused(InitSpec("p", pool=pool, pool_options={"cnn": "resnet50"}), r"pool_options: cnn cannot be set")
    refused(InitSpec("p", pool=pool, pool_options={"no_such": 1}), r"init 'p': pool_options: unknown option no_such")
    refused(InitSpec("p", pool=pool, pool_options={"method": "dino", "arch": "vit"}), "a dino run trains no cnn",
            archs=["cnn", "vit"])
    refused(InitSpec("p", run=str(tmp_path / "nowhere")), "no config.yaml there")
    run = tmp_path / "run"
    run.mkdir()
    save_yaml(PretrainConfig(method="cass-vicreg", cnn="resnet34", vit=TINY_VIT), run / "config.yaml")
    refused(InitSpec("p", run=str(run)), r"has no cnn\.safetensors")
    (run / "cnn.safetensors").touch()
    refused(InitSpec("p", run=str(run)), r"networks are not the experiment's: cnn 'resnet34' \(experiment: 'resnet18'\)")
    save_yaml(PretrainConfig(method="cass-vicreg", cnn=TINY_CNN, vit=TINY_VIT), run / "config.yaml")
    validate(pooled_grid(tmp_path / "exp", pool, inits=[InitSpec("p", run=str(run))]))


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_experiment_pretrains_its_pool_once_and_every_cell_of_the_init_starts_from_it(shared_data, tmp_path,
                                                                                       monkeypatch):
    data = tiny_split(shared_data, tmp_path / "data")
    blood = DataConfig(data=str(shared_data / "mini-cpu" / "blood_pbc_mini_64.npz"), train_images=16, num_workers=0)
    cfg = pooled_grid(tmp_path / "exp", [DataConfig(data=str(data), num_workers=0), blood],
                      data=DataConfig(data=str(data), num_workers=0))
    calls: dict[str, list] = {"pretrain": [], "finetune": []}
    real_pretrain, real_finetune = experiment.pretrain, experiment.finetune
    monkeypatch.setattr(experiment, "pretrain", lambda c, resume=False: calls["pretrain"].append(c.out)
                        or real_pretrain(c, resume=resume))
    monkeypatch.setattr(experiment, "finetune", lambda c, resume=False, **kw: calls["finetune"].append(c.out)
                        or real_finetune(c, resume=resume, **kw))
    out = run_experiment(cfg)
    pool = out / "pool" / "pooled"
    assert calls["pretrain"] == [str(pool)] and len(calls["finetune"]) == 4
    assert not (pool / "checkpoint.safetensors").exists()  # finished: only its networks and records stay
    record = json.loads((pool / "sources.json").read_text())
    assert [s["data"] for s in record["sources"]] == [str(data), blood.data]
    rows = {(r["method"], r["init"], r["mode"]): r for r in read_rows(out / "results.csv")}
    assert len(rows) == 4
    for key in ((STARTING_POINT, "pooled", "knn"), ("supervised", "pooled", "full")):
        ft_dir = Path(rows[key]["finetune_dir"])
        assert load_yaml(FinetuneConfig, ft_dir / "config.yaml").source == str(pool / "cnn.safetensors")
        # the pool read the experiment's data with the same split options: its test images were kept out of it
        tested = {r["file"] for r in read_rows(ft_dir / "held_out.csv") if r["split"] == "test"}
        assert tested and tested <= {r["file"] for r in read_rows(pool / "held_out.csv") if r["split"] == "test"}
    assert load_yaml(FinetuneConfig, Path(rows[("supervised", "scratch", "full")]["finetune_dir"]) / "config.yaml"
                     ).source == "scratch"

    shared = {(r["a"], r["init"], r["b"], r["b_init"], r["mode"]) for r in read_rows(out / "comparisons.csv")
              if r["comparison"] == "shared backbone" and r["metric"] == "macro_f1"}
    assert shared == {(STARTING_POINT, "pooled", STARTING_POINT, "scratch", "knn"),
                      ("supervised", "pooled", "supervised", "scratch", "full")}
    # the pooled backbone's model card carries those comparisons (cass export --experiment)
    exported = CliRunner().invoke(app, ["export", str(pool), "--out", str(tmp_path / "export"), "--experiment", str(out)])
    assert exported.exit_code == 0, exported.output
    card = (tmp_path / "export" / "MODEL_CARD.md").read_text()
    downstream = card[card.index("## Downstream"):card.index("## Recipe")]
    assert downstream.count(f"| `{out.name}` | CNN | 100% |") == 2
    assert "| the `scratch` starting point |" in downstream and "| supervised from `scratch` |" in downstream
    not_an_init = CliRunner().invoke(app, ["export", str(out / "pool" / "nowhere"), "--out", str(tmp_path / "e2"),
                                           "--experiment", str(out)])
    assert not_an_init.exit_code != 0 and "none of its inits is the run" in not_an_init.output

    calls["pretrain"], calls["finetune"] = [], []
    run_experiment(cfg)  # resumed: nothing is redone
    assert calls == {"pretrain": [], "finetune": []}
    changed = ExperimentConfig(**{**cfg.__dict__, "inits": [cfg.inits[0], InitSpec(
        "pooled", pool=cfg.inits[1].pool, pool_options={**POOL_OPTIONS, "epochs": 2})]})
    with pytest.raises(ConfigError, match=r"pool/pooled/config.yaml was written with a different configuration"):
        run_experiment(changed)
