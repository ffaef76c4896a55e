"""Learning checks on what the user gets (SPEC §2): the backbones' feature std and effective rank on fixed
images, the online k-NN on the selection split, and DINO's loss and teacher entropy over the whole run, each
judged by the functions training itself calls (``PretrainMethod.learning_warnings``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import TINY_CNN, TINY_VIT
from torchvision.transforms import v2

from cass.config import CassVicregConfig, DataConfig, DinoConfig, PretrainConfig
from cass.evaluation.diagnostics import output_std
from cass.evaluation.online import FixedImages, OnlineChecks
from cass.experiment.config import ExperimentConfig
from cass.experiment.plan import PretrainRun, pretrain_dir
from cass.experiment.results import _pretraining_summary
from cass.methods.registry import create_method, method_class
from cass.training.pretrain import pretrain
from cass.utils.rundir import METRICS, START, read_csv

CPU = torch.device("cpu")


def brain_images(shared_data, size: int = 32) -> FixedImages:
    """The 64 real brain-MRI images of the mini set, as the checks hold them (uint8, 3 channels)."""
    data = np.load(shared_data / "mini-cpu" / "brain_mri_mini_64.npz")
    gray = torch.from_numpy(data["images"])[:, None].expand(-1, 3, -1, -1)
    return FixedImages(v2.Resize((size, size), antialias=True)(gray), data["labels"], len(data["classes"]))


def test_the_backbone_not_the_projector_decides_collapse(shared_data):
    """CNN: a collapsed projector over an intact backbone; ViT: a healthy-looking projector over a backbone
    that gives every image nearly the same features (its BatchNorm re-inflates the tiny differences). The
    projector std alone would call the CNN collapsed and the ViT healthy: the verdict says the opposite."""
    torch.manual_seed(0)
    cfg = PretrainConfig(method="cass-vicreg", cnn=TINY_CNN, vit=TINY_VIT, img_size=32,
                         cass_vicreg=CassVicregConfig(proj_hidden_dim=64, proj_dim=32))
    method = create_method(cfg)
    images = brain_images(shared_data)
    checks = OnlineChecks(images, None, batch_size=32)
    start = {"epoch": 0, **checks.measure(method.networks(), CPU, knn=False)}
    with torch.no_grad():
        method.cnn_projector[-1].weight.zero_()
        norm = method.vit.model.norm  # the ViT's last LayerNorm: one large constant plus differences of 1 %
        norm.weight.mul_(1e-2)
        norm.bias.fill_(10.0)
        # The projectors in training mode (batch statistics), as in a training step.
        outputs = {role: projector(checks.features(net, images.pixels, CPU)) for role, net, projector in
                   (("cnn", method.cnn, method.cnn_projector), ("vit", method.vit, method.vit_projector))}
    epoch = {"epoch": 1, "loss": 1.0, **{f"{role}_output_std": output_std(z) for role, z in outputs.items()},
             **checks.measure(method.networks(), CPU, knn=False)}
    assert epoch["cnn_output_std"] < 0.01 and epoch["vit_output_std"] > 0.5, epoch
    assert epoch["cnn_backbone_std"] == pytest.approx(start["cnn_backbone_std"])
    assert epoch["vit_backbone_std"] < 0.05 * start["vit_backbone_std"], (start, epoch)

    warnings = method_class("cass-vicreg").learning_warnings([start, epoch], cfg)
    assert any(w.startswith("the vit backbone collapsed") for w in warnings), warnings
    assert not any("cnn" in w for w in warnings), warnings
    assert not method_class("cass-vicreg").learning_warnings([start, {**epoch, **{
        key: start[key] for key in ("vit_backbone_std", "vit_backbone_rank")}}], cfg)


def test_a_backbone_rank_below_two_is_a_collapse_and_a_falling_rank_alone_is_not():
    cfg = PretrainConfig()
    start = {"epoch": 0, "cnn_backbone_std": 0.1, "cnn_backbone_rank": 60.0}

    def verdict(rank: float) -> list[str]:
        return method_class("cass").learning_warnings([start, {**start, "epoch": 3, "cnn_backbone_rank": rank}], cfg)

    assert not verdict(8.0)  # cass-vicreg's ViT on brain MRI: 67 -> 9 while its k-NN rose
    assert any("effective rank" in w and "1.50" in w and "60.0 before training" in w for w in verdict(1.5))


def test_knn_not_above_its_start_is_reported():
    cfg = PretrainConfig()
    start = {"epoch": 0, "cnn_knn_f1": 0.50}
    flat = [start, {"epoch": 1, "cnn_knn_f1": 0.58}, {"epoch": 2, "loss": 1.0}, {"epoch": 3, "cnn_knn_f1": 0.505}]
    warnings = method_class("cass").learning_warnings(flat, cfg)
    assert any("k-NN" in w and "0.505" in w and "best 0.580, epoch 1" in w for w in warnings), warnings
    assert not method_class("cass").learning_warnings([start, {"epoch": 1, "cnn_knn_f1": 0.56}], cfg)


def dino_cfg() -> PretrainConfig:
    """Warm-ups of 2 epochs; the teacher temperature reaches its final value in epoch 2."""
    return PretrainConfig(method="dino", epochs=10, dino=DinoConfig(out_dim=1024, warmup_epochs=2,
                                                                    warmup_teacher_temp_epochs=2))


def dino_history(losses: list[float], entropies: list[float] | None = None) -> list[dict[str, float]]:
    entropies = entropies or [loss - 1.0 for loss in losses]
    return [{"epoch": i + 1, "loss": loss, "teacher_entropy": h} for i, (loss, h) in enumerate(zip(losses, entropies))]


def test_dino_loss_rising_back_after_its_minimum_is_not_learning():
    warnings = method_class("dino").learning_warnings(dino_history([6.0, 4.0, 3.0, 3.5, 4.2, 4.5]), dino_cfg())
    assert any("its loss ended at 4.500, 1.50 nats above its lowest (3.000, epoch 3)" in w for w in warnings), warnings
    assert any("--dino-teacher-temp and --dino-warmup-teacher-temp 0.035" in w for w in warnings)


def test_dino_steady_decline_is_learning():
    assert not method_class("dino").learning_warnings(dino_history([6.0, 5.0, 4.5, 4.0, 3.6, 3.3]), dino_cfg())


def test_dino_teacher_entropy_rise_counts_from_the_final_temperature():
    losses = [6.0, 5.5, 5.0, 4.8, 4.6, 4.5]
    # Epoch 1 is still at the warm-up temperature: its low entropy is not the minimum the rise counts from.
    assert not method_class("dino").learning_warnings(dino_history(losses, [0.5, 2.0, 2.2, 2.5, 2.8, 2.9]), dino_cfg())
    warnings = method_class("dino").learning_warnings(dino_history(losses, [0.5, 2.0, 2.2, 2.5, 2.8, 3.1]), dino_cfg())
    assert any("teacher entropy ended at 3.100, 1.10 nats above its lowest (2.000, epoch 2)" in w for w in warnings)


def test_dino_loss_near_ln_k_after_warm_up_is_not_learning():
    cfg, ln_k = dino_cfg(), math.log(1024)
    warnings = method_class("dino").learning_warnings(dino_history([ln_k - 0.5] * 5), cfg)
    assert any("DINO is not learning" in w and "within 0.500 of ln K" in w for w in warnings), warnings
    assert not method_class("dino").learning_warnings(dino_history([ln_k - 1.5] * 5), cfg)
    assert not method_class("dino").learning_warnings(dino_history([ln_k] * 2), cfg)  # still warming up


def test_a_short_run_records_the_checks_from_the_start(brain_folder, tmp_path, capsys):
    """Real images, tiny networks: the backbone checks every epoch, the k-NN at the start, every
    ``knn_every`` epochs and at the end, and the experiment's summary of them."""
    experiment = ExperimentConfig(out=str(tmp_path / "exp"))
    run = PretrainRun("cass", None, "scratch", 16, 3, 0)
    pretrain(PretrainConfig(method="cass", data=DataConfig(data=str(brain_folder), num_workers=0), cnn=TINY_CNN,
                            vit=TINY_VIT, img_size=32, batch_size=16, epochs=3, knn_every=2, diagnostics_samples=24,
                            out=str(pretrain_dir(experiment, run)), accelerator="cpu"))
    run_dir = pretrain_dir(experiment, run)
    start, rows = read_csv(run_dir / START), read_csv(run_dir / METRICS)
    assert [row["epoch"] for row in start] == ["0"] and [row["epoch"] for row in rows] == ["1", "2", "3"]
    for role in ("cnn", "vit"):
        for row in (*start, *rows):
            assert 0 < float(row[f"{role}_backbone_std"]) and 1 <= float(row[f"{role}_backbone_rank"]) <= 24
        assert [bool(row[f"{role}_knn_f1"]) for row in (*start, *rows)] == [True, False, True, True]
        assert all(0 <= float(row[f"{role}_knn_f1"]) <= 1 for row in (*start, *rows) if row[f"{role}_knn_f1"])
    console = capsys.readouterr().out
    assert "epoch 0/3 (start)" in console and "vit_knn_f1" in console and "cnn_backbone_rank" in console

    summary = _pretraining_summary(experiment, run)
    assert summary["final_cnn_backbone_std"] == pytest.approx(float(rows[-1]["cnn_backbone_std"]))
    assert summary["start_vit_knn_f1"] == pytest.approx(float(start[0]["vit_knn_f1"]))
    assert summary["best_vit_knn_f1"] == pytest.approx(max(float(rows[i]["vit_knn_f1"]) for i in (1, 2)))
    assert summary["epochs_done"] == 3
