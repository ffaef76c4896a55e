"""Fine-tuning shares the engine's policies: early stopping, exact resume, non-finite losses, finished
model directories without resume state, atomic files, the k of k-NN models, which network of a run."""

from __future__ import annotations

import csv
import errno
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CNN, TINY_VIT
from safetensors.torch import load_file
from sklearn.neighbors import KNeighborsClassifier
from typer.testing import CliRunner

import cass.training.finetune as ft
from cass.cli.main import app
from cass.config import (
    ConfigError,
    DataConfig,
    FinetuneConfig,
    PretrainConfig,
    save_yaml,
)
from cass.data.sources import open_images
from cass.evaluation.features import extract_features, read_model_info
from cass.evaluation.inference import embed, evaluate, load_classifier
from cass.training.failures import NonFiniteLossError
from cass.training.finetune import finetune, resolve_backbone
from cass.training.swa import SWA
from cass.utils import atomic
from cass.utils.atomic import WriteError
from cass.utils.checkpoint import load_checkpoint, save_weights

STATE = "checkpoint.safetensors"


def ft_cfg(data: Path, out: Path, **kw) -> FinetuneConfig:
    values = {"data": DataConfig(data=str(data), num_workers=0), "cnn": TINY_CNN, "vit": TINY_VIT, "img_size": 32,
              "epochs": 2, "batch_size": 16, "min_steps": 0, "out": str(out), "accelerator": "cpu"}
    return FinetuneConfig(**{**values, **kw})


def history(model_dir: Path) -> list[dict[str, str]]:
    with open(model_dir / "history.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _fail_on_replace_of(monkeypatch, name: str) -> None:
    """The disk fills up exactly when ``name`` is renamed into place."""
    real = atomic.os.replace

    def replace(src, dst):
        if Path(dst).name == name:
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)


# --- early stopping -------------------------------------------------------------------------------


def test_early_stopping_on_a_plateau_stops_after_patience_evaluations(brain_folder, tmp_path):
    # Only the head learns, at a learning rate too small to move any prediction: the score is flat.
    model_dir = finetune(ft_cfg(brain_folder, tmp_path / "m", mode="linear", lr=1e-12, min_lr=1e-12,
                                epochs=6, patience=2))
    rows = history(model_dir)
    assert len(rows) == 3  # of 6 epochs: best at 1, then two evaluations without a better macro-F1
    assert len({r["macro_f1"] for r in rows}) == 1
    assert json.loads((model_dir / "metrics.json").read_text())["epoch"] == 1
    assert not (model_dir / STATE).exists()  # an early stop is a normal end


def test_early_stopping_reports_and_keeps_the_best_epochs_model(brain_folder, tmp_path, monkeypatch):
    scripted = iter([0.5, 0.7, 0.6, 0.6, 0.9, 0.9, 0.9, 0.9])
    weights_at: dict[int, dict[str, torch.Tensor]] = {}
    real_validate = ft._validate

    def validate(net, *args):
        val_loss, scores = real_validate(net, *args)
        weights_at[len(weights_at) + 1] = {k: v.detach().clone() for k, v in net.model.state_dict().items()}
        return val_loss, {**scores, "macro_f1": next(scripted)}

    monkeypatch.setattr(ft, "_validate", validate)
    model_dir = finetune(ft_cfg(brain_folder, tmp_path / "m", epochs=8, patience=2, lr=1e-3))
    assert [int(r["epoch"]) for r in history(model_dir)] == [1, 2, 3, 4]  # 0.7 at 2, then 2 worse evaluations
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["epoch"] == 2 and metrics["selection"]["macro_f1"] == 0.7  # chosen on the selection split
    saved = load_file(model_dir / "model.safetensors")
    assert all(torch.equal(saved[k], weights_at[2][k]) for k in saved)
    assert not all(torch.equal(saved[k], weights_at[4][k]) for k in saved)  # not the last epoch's
    assert not (model_dir / STATE).exists()
    assert metrics["converged"] is True  # early stopping ended it


def test_a_run_still_improving_at_its_budget_is_recorded_as_not_converged(brain_folder, tmp_path, monkeypatch,
                                                                           capsys):
    scripted = iter([0.2, 0.3, 0.4])  # every evaluation better than the last; then the real test score
    real_validate = ft._validate

    def validate(net, *args):
        val_loss, scores = real_validate(net, *args)
        return val_loss, {**scores, "macro_f1": next(scripted, scores["macro_f1"])}

    monkeypatch.setattr(ft, "_validate", validate)
    model_dir = finetune(ft_cfg(brain_folder, tmp_path / "m", epochs=3, patience=2))
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["epoch"] == 3 and metrics["converged"] is False
    assert "not converged" in capsys.readouterr().out


# --- optimiser: warm-up and layer-wise learning-rate decay ---------------------------------------


def test_learning_rate_warms_up_then_decays(brain_folder, tmp_path):
    # 6 evaluations of 1 pass each; half of the steps warm up: the rate rises to lr, then the cosine falls.
    model_dir = finetune(ft_cfg(brain_folder, tmp_path / "m", epochs=6, patience=6, lr=1e-3, warmup=0.5))
    rates = [float(r["lr"]) for r in history(model_dir)]
    assert rates[0] < rates[1] < rates[2] and rates[2] == pytest.approx(1e-3, rel=0.35)
    assert rates[3] > rates[4] > rates[5]


def _groups(arch: str, init: str, **kw) -> list[dict]:
    cfg = FinetuneConfig(cnn=TINY_CNN, vit=TINY_VIT, **kw)
    backbone = ft.Backbone(TINY_VIT if arch == "vit" else TINY_CNN, "scratch", None, 32, arch,
                           vit_patch_size=8)
    net = ft.build_classifier(backbone, 3)
    return ft.parameter_groups(cfg, ft.Backbone(**{**backbone.__dict__, "init": init}), net), net


def test_a_pretrained_transformer_learns_at_layer_decayed_rates(tmp_path):
    groups, net = _groups("vit", str(tmp_path / "run"), lr=1e-3, vit_layer_decay=0.5)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in net.parameters())  # every weight once
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    model = net.model
    head, first_block, last_block = (rate[id(next(m.parameters()))]
                                      for m in (model.head, model.blocks[0], model.blocks[-1]))
    assert head == pytest.approx(1e-3)
    assert last_block == pytest.approx(0.5e-3)  # one block below the head: x0.5
    assert first_block == pytest.approx(1e-3 * 0.5 ** len(model.blocks))
    assert rate[id(model.patch_embed.proj.weight)] < first_block


@pytest.mark.parametrize("arch, init, kw", [("vit", "scratch", {}), ("cnn", "pretrained-run", {}),
                                            ("vit", "pretrained-run", {"vit_layer_decay": 1.0})])
def test_layer_decay_is_not_applied_from_scratch_to_cnns_or_when_off(arch, init, kw):
    groups, net = _groups(arch, init, lr=1e-3, **kw)
    assert len(groups) == 1 and groups[0]["lr"] == 1e-3
    assert len(groups[0]["params"]) == len(list(net.parameters()))


def test_linear_mode_optimises_the_head_alone():
    groups, net = _groups("vit", "pretrained-run", lr=1e-3, mode="linear")
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in net.model.get_classifier().parameters()]
    assert len(groups) == 1 and not any(p.requires_grad for p in net.model.blocks.parameters())


# --- kill and resume ------------------------------------------------------------------------------


def _rng_drawing_loss(monkeypatch) -> None:
    """A loss that draws from the global RNG on every step, as dropout does: resuming must restore it."""
    real = ft.create_loss

    def create_loss(*args, **kwargs):
        loss_fn = real(*args, **kwargs)

        class Noisy(torch.nn.Module):
            def forward(self, logits, targets):
                return loss_fn(logits, targets) * (1 + 0.1 * torch.rand(()))

        return Noisy()

    monkeypatch.setattr(ft, "create_loss", create_loss)


def test_killed_and_resumed_finetune_ends_with_the_uninterrupted_weights(brain_folder, tmp_path, monkeypatch):
    _rng_drawing_loss(monkeypatch)
    whole = finetune(ft_cfg(brain_folder, tmp_path / "whole", epochs=3, lr=1e-3))

    real_set_epoch = torch.utils.data.DistributedSampler.set_epoch

    def killed_at_epoch_2(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        real_set_epoch(self, epoch)

    cfg = ft_cfg(brain_folder, tmp_path / "killed", epochs=3, lr=1e-3)
    with monkeypatch.context() as m:
        m.setattr(torch.utils.data.DistributedSampler, "set_epoch", killed_at_epoch_2)
        with pytest.raises(KeyboardInterrupt):
            finetune(cfg)
    killed = Path(cfg.out)
    assert (killed / STATE).is_file() and not (killed / "metrics.json").exists()  # interrupted: resumable
    assert load_checkpoint(killed / STATE)[0]["progress"]["epoch"] == 1

    finetune(cfg, resume=True)
    assert not (killed / STATE).exists()
    a, b = load_file(whole / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    columns = ("epoch", "train_loss", "val_loss", "lr", "macro_f1")
    assert [[r[c] for c in columns] for r in history(whole)] == [[r[c] for c in columns] for r in history(killed)]
    assert json.loads((whole / "metrics.json").read_text()) == json.loads((killed / "metrics.json").read_text())


# --- finished model directories -------------------------------------------------------------------


def test_finished_finetune_drops_its_resume_state_and_resuming_it_does_nothing(brain_folder, tmp_path,
                                                                               monkeypatch):
    cfg = ft_cfg(brain_folder, tmp_path / "m", epochs=2)
    model_dir = finetune(cfg)
    assert not (model_dir / STATE).exists()
    assert {"model.safetensors", "metrics.json", "history.csv", "subset.csv", "config.yaml"} <= {
        p.name for p in model_dir.iterdir()}
    before = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}

    def no_data(*args, **kwargs):
        raise AssertionError("a finished model directory was trained again")

    monkeypatch.setattr(ft, "three_roles", no_data)
    assert finetune(cfg, resume=True) == model_dir  # what `cass experiment` does for a cell without cell.json
    assert {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()} == before
    with pytest.raises(ConfigError, match="already holds a fine-tuned model"):
        finetune(cfg)


def test_scores_are_written_atomically_and_the_resume_state_outlives_a_failed_write(brain_folder, tmp_path,
                                                                                    monkeypatch):
    cfg = ft_cfg(brain_folder, tmp_path / "m", epochs=2)
    with monkeypatch.context() as m:
        _fail_on_replace_of(m, "metrics.json")
        with pytest.raises(WriteError, match="metrics.json"):
            finetune(cfg)
    out = Path(cfg.out)
    assert not (out / "metrics.json").exists() and not list(out.glob(".metrics.json.*"))  # no half file
    assert (out / STATE).is_file()
    finetune(cfg, resume=True)  # nothing left to train: writes the scores, drops the state
    assert json.loads((out / "metrics.json").read_text())["epoch"] in (1, 2)
    assert not (out / STATE).exists() and len(history(out)) == 2


# --- non-finite loss ------------------------------------------------------------------------------


def _nan_loss_from_step(monkeypatch, first_bad_step: int) -> None:
    real = ft.create_loss

    def create_loss(*args, **kwargs):
        loss_fn = real(*args, **kwargs)
        steps = [0]

        class Exploding(torch.nn.Module):
            def forward(self, logits, targets):
                loss = loss_fn(logits, targets)
                if torch.is_grad_enabled():  # training steps, not validation
                    steps[0] += 1
                    if steps[0] >= first_bad_step:
                        return loss * float("nan")
                return loss

        return Exploding()

    monkeypatch.setattr(ft, "create_loss", create_loss)


def test_nonfinite_loss_stops_before_saving_and_names_the_run(brain_folder, tmp_path, monkeypatch):
    # 40 train images after the test split is carved, batch 10 (a quarter of them): 4 steps per epoch
    _nan_loss_from_step(monkeypatch, 5)
    cfg = ft_cfg(brain_folder, tmp_path / "m", epochs=3)
    with pytest.raises(NonFiniteLossError) as err:
        finetune(cfg)
    message = str(err.value)
    assert "epoch 2" in message and str(cfg.out) in message and "last good epoch (1)" in message
    out = Path(cfg.out)
    assert len(history(out)) == 1 and not (out / "metrics.json").exists()
    assert load_checkpoint(out / STATE)[0]["progress"]["epoch"] == 1

    out2 = tmp_path / "cli"
    result = CliRunner().invoke(app, ["finetune", "--from", "scratch", "--cnn", TINY_CNN, "--data", str(brain_folder),
                                      "--out", str(out2), "--epochs", "3", "--min-steps", "0", "--img-size", "32", "--num-workers", "0",
                                      "--accelerator", "cpu"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "loss became nan" in error[0] and str(out2) in error[0]


# --- k-NN models keep their k, embeddings are written atomically ----------------------------------


@pytest.fixture(scope="module")
def knn3_model(brain_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("knn") / "m"
    return finetune(ft_cfg(brain_folder, out, mode="knn", knn_k=3))


def test_knn_model_predicts_with_the_k_it_was_made_with(brain_folder, knn3_model, tmp_path):
    classifier = load_classifier(knn3_model, "cpu")
    assert classifier.readout.k == 3
    images = open_images(brain_folder, split="val")
    scores = classifier.logits(images)
    bank = classifier.readout
    features = extract_features(classifier.net, images, classifier.img_size, 64, classifier.device)

    def sklearn_scores(k: int) -> np.ndarray:
        knn = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="distance")
        knn.fit(bank.features, bank.targets)
        proba = np.zeros((len(features), len(classifier.classes)))
        proba[:, knn.classes_] = knn.predict_proba(features)
        return np.log(np.clip(proba, 1e-8, 1.0))

    assert np.allclose(scores.numpy(), sklearn_scores(3), atol=1e-5)
    assert not np.allclose(scores.numpy(), sklearn_scores(20), atol=1e-3)
    # The scores of `cass evaluate` are the ones fine-tuning measured with k=3.
    result = evaluate(knn3_model, brain_folder, tmp_path / "eval", split="val")
    measured = json.loads((knn3_model / "metrics.json").read_text())["selection"]["macro_f1"]
    assert result["macro_f1"] == pytest.approx(measured)


def test_embed_replaces_features_atomically(brain_folder, knn3_model, tmp_path, monkeypatch):
    out = embed(knn3_model, brain_folder / "val", tmp_path / "emb")
    first = np.load(out / "features.npy")
    assert first.shape == (16, 512)
    (out / "features.npy").write_bytes(np.lib.format.magic(1, 0))  # an old file unlike the new one
    old = (out / "features.npy").read_bytes()
    _fail_on_replace_of(monkeypatch, "features.npy")
    with pytest.raises(WriteError, match="features.npy"):
        embed(knn3_model, brain_folder / "val", out)
    assert (out / "features.npy").read_bytes() == old and not list(out.glob(".features.npy.*"))
    monkeypatch.undo()
    embed(knn3_model, brain_folder / "val", out)
    assert np.array_equal(np.load(out / "features.npy"), first)
    assert not list(out.glob("*.tmp*")) and not list(out.glob("*.npy.npy"))


# --- which network of a pretraining run -----------------------------------------------------------


@pytest.fixture
def fake_dino_run(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    """What a DINO pretraining of a ResNet-18 leaves: its config and the exported CNN weights."""
    import timm

    run = tmp_path / "dino"
    run.mkdir()
    save_yaml(PretrainConfig(method="dino", arch="cnn", cnn=TINY_CNN, vit=TINY_VIT, img_size=32), run / "config.yaml")
    torch.manual_seed(1)
    state = timm.create_model(TINY_CNN, pretrained=False, num_classes=0).state_dict()
    save_weights(run / "cnn.safetensors", state, {"role": "cnn", "timm_name": TINY_CNN})
    return run, state


def test_single_network_run_finetunes_without_arch(brain_folder, fake_dino_run, tmp_path):
    run, exported = fake_dino_run
    assert FinetuneConfig().arch is None
    model_dir = finetune(ft_cfg(brain_folder, tmp_path / "m", source=str(run), mode="knn"))
    info = read_model_info(model_dir)
    assert info["arch"] == "cnn" and info["timm_name"] == TINY_CNN
    tuned = load_file(model_dir / "model.safetensors")
    assert all(torch.equal(tuned[k], v) for k, v in exported.items())  # the run's weights, not a fresh net

    with pytest.raises(ConfigError, match=r"dino run of its cnn only, not a vit; use --arch cnn"):
        resolve_backbone(ft_cfg(brain_folder, tmp_path / "x", source=str(run), arch="vit"))
    result = CliRunner().invoke(app, ["finetune", "--from", str(run), "--data", str(brain_folder), "--mode", "knn",
                                      "--out", str(tmp_path / "cli"), "--num-workers", "0", "--accelerator", "cpu"])
    assert result.exit_code == 0, result.output
    assert read_model_info(tmp_path / "cli")["arch"] == "cnn"


def test_arch_defaults_to_the_cnn_for_two_network_runs_and_baselines(tmp_path):
    run = tmp_path / "cass"
    run.mkdir()
    save_yaml(PretrainConfig(method="cass", arch="vit", cnn=TINY_CNN, vit=TINY_VIT), run / "config.yaml")
    assert resolve_backbone(FinetuneConfig(source=str(run))).role == "cnn"
    assert resolve_backbone(FinetuneConfig(source=str(run), arch="vit")).name == TINY_VIT
    assert resolve_backbone(FinetuneConfig(cnn=TINY_CNN)).name == TINY_CNN


def test_finetune_names_no_method():
    """Which networks a run trained is the method's to say (the registry), not a list of names here."""
    source = Path(ft.__file__).read_text()
    assert not re.search(r"""[!=]=\s*["'](cass|dino)["']|["'](cass|dino)["']\s*[!=]=""", source)


# --- the source is checked first ------------------------------------------------------------------


def test_missing_source_is_reported_before_the_data(brain_folder, tmp_path):
    missing = tmp_path / "nonexistent"
    with pytest.raises(ConfigError, match=rf"--from {re.escape(str(missing))}"):
        finetune(ft_cfg(brain_folder / "train", tmp_path / "m", source=str(missing)))  # no validation split either
    assert not (tmp_path / "m").exists()
    result = CliRunner().invoke(app, ["finetune", "--from", str(missing), "--out", str(tmp_path / "cli")])
    assert result.exit_code == 2 and f"--from {missing}" in result.output


# --- stochastic weight averaging ------------------------------------------------------------------


def test_swa_weights_are_the_mean_of_the_snapshots():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    swa = SWA({"cnn": net}, start_epoch=1)
    snapshots = []
    for epoch in range(1, 5):  # epoch 1 is not after start_epoch: not averaged
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn_like(p))
        if epoch > 1:
            snapshots.append([p.detach().clone() for p in net.parameters()])
        swa.update({"cnn": net}, finished_epoch=epoch)
    assert len(snapshots) == 3
    averaged = list(swa.models["cnn"].module.parameters())
    for avg, *snaps in zip(averaged, *snapshots):
        assert torch.allclose(avg, torch.stack(snaps).mean(dim=0), atol=1e-6)
    restored = SWA({"cnn": torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))}, start_epoch=1)
    restored.load_state_dict(swa.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.models["cnn"].module.parameters(), averaged))
