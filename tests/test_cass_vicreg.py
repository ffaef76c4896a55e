"""cass-vicreg: its loss against an independent float64 transcription of VICReg's formula, its place in
the registry, and the reason it exists: on real images it keeps both networks' outputs varied where
faithful CASS collapses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import TINY_CNN, TINY_VIT

from cass.config import (
    CassVicregConfig,
    ConfigError,
    DataConfig,
    FinetuneConfig,
    PretrainConfig,
)
from cass.methods.base import Progress
from cass.methods.cass_vicreg import CassVicreg
from cass.methods.losses import cross_vicreg_loss
from cass.methods.registry import create_method, method_class
from cass.training.finetune import finetune
from cass.training.pretrain import pretrain
from cass.utils.checkpoint import read_info
from cass.utils.rundir import METRICS, read_csv


def vicreg_reference(a: np.ndarray, b: np.ndarray, lam: float, mu: float, nu: float) -> float:
    """VICReg (Bardes et al. 2022, eq. 1-4 and the authors' averaging of the two variance terms),
    written out element by element in float64."""
    n, d = a.shape
    invariance = sum((a[i, j] - b[i, j]) ** 2 for i in range(n) for j in range(d)) / (n * d)

    def variance(z: np.ndarray) -> float:
        total = 0.0
        for j in range(d):
            column = z[:, j]
            var = sum((x - column.mean()) ** 2 for x in column) / (n - 1)
            total += max(0.0, 1.0 - math.sqrt(var + 1e-4))
        return total / d

    def covariance(z: np.ndarray) -> float:
        centred = z - z.mean(axis=0)
        total = 0.0
        for j in range(d):
            for k in range(d):
                if j != k:
                    total += (sum(centred[i, j] * centred[i, k] for i in range(n)) / (n - 1)) ** 2
        return total / d

    return lam * invariance + mu * (variance(a) + variance(b)) / 2 + nu * (covariance(a) + covariance(b))


@pytest.mark.parametrize("scale", [0.1, 1.0, 3.0])  # below, at and above the variance target
def test_loss_equals_float64_reference(scale):
    rng = np.random.default_rng(1)
    a, b = scale * rng.normal(size=(9, 6)), scale * rng.normal(size=(9, 6))
    got = cross_vicreg_loss(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32),
                            invariance_weight=25, variance_weight=25, covariance_weight=1)
    assert got.loss.item() == pytest.approx(vicreg_reference(a, b, 25, 25, 1), rel=1e-5)
    assert got.invariance.item() == pytest.approx(vicreg_reference(a, b, 1, 0, 0), rel=1e-5)


def test_a_constant_output_is_costly_where_cass_loss_is_zero():
    from cass.methods.losses import cass_loss

    constant = torch.ones(16, 32)
    assert cass_loss(constant, constant).item() == pytest.approx(0, abs=1e-6)
    terms = cross_vicreg_loss(constant, constant)
    assert terms.invariance.item() == 0 and terms.covariance.item() == 0
    assert terms.variance.item() == pytest.approx(1 - math.sqrt(1e-4), rel=1e-4)  # every std is 0: full hinge
    assert terms.loss.item() == pytest.approx(25 * (1 - math.sqrt(1e-4)), rel=1e-4)


def test_registered_with_its_own_config_section_and_refuses_a_batch_of_one():
    cls = method_class("cass-vicreg")
    assert cls is CassVicreg and cls.trains_both_networks and cls.config_section == "cass_vicreg"
    assert cls.roles("vit") == ("cnn", "vit")
    with pytest.raises(ConfigError, match="batch-size"):
        create_method(PretrainConfig(method="cass-vicreg", cnn=TINY_CNN, vit=TINY_VIT, img_size=32, batch_size=1))


def test_one_step_trains_both_networks_and_their_projectors():
    torch.manual_seed(0)
    cfg = PretrainConfig(method="cass-vicreg", cnn=TINY_CNN, vit=TINY_VIT, img_size=32, batch_size=8,
                         cass_vicreg=CassVicregConfig(proj_hidden_dim=64, proj_dim=16))
    method = create_method(cfg)
    optimizers, _ = method.configure_optimizers(total_steps=10)
    watched = {"cnn": method.cnn, "vit": method.vit, "cnn_projector": method.cnn_projector,
               "vit_projector": method.vit_projector}
    before = {k: [p.detach().clone() for p in m.parameters()] for k, m in watched.items()}
    out = method(torch.rand(8, 3, 32, 32), Progress(0, 0, 5, 2))
    out.loss.backward()
    for opt in optimizers:
        opt.step()
    for key, module in watched.items():
        assert not all(torch.equal(b, p) for b, p in zip(before[key], module.parameters())), f"{key} unchanged"
    assert out.outputs["cnn"].shape == (8, 16) and set(out.features) == {"cnn", "vit"}


@pytest.mark.slow
def test_keeps_outputs_varied_where_faithful_cass_collapses_on_real_images(shared_data, tmp_path):
    """Same networks, data, batch and schedule; only the objective differs (the committed check in
    BENCHMARKS.md runs the same comparison at 64 px on the whole brain-MRI train split)."""
    data = DataConfig(num_workers=0)  # the shipped brain-MRI sample: 240 train, 80 val images
    final_std = {}
    for method in ("cass", "cass-vicreg"):
        run = pretrain(PretrainConfig(method=method, data=data, cnn=TINY_CNN, vit=TINY_VIT, img_size=32,
                                      batch_size=16, epochs=4, seed=0, out=str(tmp_path / method),
                                      accelerator="cpu"))
        last = read_csv(run / METRICS)[-1]
        final_std[method] = min(float(last["cnn_output_std"]), float(last["vit_output_std"]))
    threshold = 0.1  # output std: 1 = isotropic, 0 = every image gives the same output
    assert final_std["cass"] < threshold, final_std
    assert final_std["cass-vicreg"] > 3 * threshold, final_std


@pytest.mark.slow
def test_exports_backbones_that_fine_tuning_reads(shared_data, tmp_path):
    data = DataConfig(num_workers=0)  # the shipped brain-MRI sample: 240 train, 80 val images
    run = pretrain(PretrainConfig(method="cass-vicreg", data=data, cnn=TINY_CNN, vit=TINY_VIT, img_size=32,
                                  batch_size=16, epochs=1, out=str(tmp_path / "run"), accelerator="cpu",
                                  cass_vicreg=CassVicregConfig(proj_hidden_dim=64, proj_dim=32)))
    for role in ("cnn", "vit"):
        info = read_info(run / f"{role}.safetensors")
        assert info["method"] == "cass-vicreg" and info["role"] == role
        model = finetune(FinetuneConfig(data=data, source=str(run), arch=role, mode="knn", label_fraction=1.0,
                                        img_size=32, out=str(tmp_path / f"knn_{role}"), accelerator="cpu"))
        assert (model / "model.safetensors").is_file()
