"""CASS objective and optimisation: the defects of the public notebooks must not come back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_CNN, TINY_VIT

from cass.config import CassConfig, PretrainConfig
from cass.methods.base import Progress
from cass.methods.cass import CASS
from cass.methods.losses import cass_loss


def tiny_cfg(**kw) -> PretrainConfig:
    return PretrainConfig(cnn=TINY_CNN, vit=TINY_VIT, img_size=32, batch_size=4, epochs=2, **kw)


def test_loss_equals_float64_reference():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 13)), rng.normal(size=(7, 13))
    na = a / np.linalg.norm(a, axis=1, keepdims=True)
    nb = b / np.linalg.norm(b, axis=1, keepdims=True)
    reference = np.mean(np.sum((na - nb) ** 2, axis=1))  # squared distance of unit vectors = 2 - 2 cos
    got = cass_loss(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32))
    assert got.item() == pytest.approx(reference, rel=1e-5)


def test_loss_is_zero_only_when_directions_agree():
    z = torch.randn(5, 8)
    assert cass_loss(z, 3 * z).item() == pytest.approx(0, abs=1e-6)
    assert cass_loss(z, -z).item() == pytest.approx(4, abs=1e-5)


@pytest.mark.parametrize("separate", [True, False])
def test_one_step_updates_both_networks(separate):
    torch.manual_seed(0)
    method = CASS(tiny_cfg(cass=CassConfig(embed_dim=32, separate_optimizers=separate)))
    optimizers, _ = method.configure_optimizers(total_steps=10)
    before = {role: dict((n, p.detach().clone()) for n, p in net.named_parameters()) for role, net in method.networks().items()}
    out = method(torch.rand(4, 3, 32, 32), Progress(0, 0, 5, 2))
    out.loss.backward()
    for opt in optimizers:
        opt.step()
    for role, net in method.networks().items():
        changed = {n for n, p in net.named_parameters() if not torch.equal(before[role][n], p)}
        names = list(before[role])
        # Gradients reach both ends of both networks: the input stem and the compared head.
        assert names[0] in changed and names[-1] in changed, f"{role}: {names[0]} or {names[-1]} unchanged"
    assert set(out.outputs) == {"cnn", "vit"} and out.outputs["cnn"].shape == (4, 32)


def test_learning_rate_decays_monotonically_over_the_whole_run():
    method = CASS(tiny_cfg())
    optimizers, schedulers = method.configure_optimizers(total_steps=200)
    lrs = []
    for _ in range(200):
        lrs.append(optimizers[0].param_groups[0]["lr"])
        for opt, sched in zip(optimizers, schedulers):
            opt.step()
            sched.step()
    assert lrs[0] == pytest.approx(1e-3)
    assert all(later <= earlier for earlier, later in zip(lrs, lrs[1:])), "learning rate went back up"
    assert lrs[-1] < 2e-6
    assert all(opt.param_groups[0]["lr"] == optimizers[0].param_groups[0]["lr"] for opt in optimizers)
