"""Learning diagnostics against hand-computed cases: they are what tells a user a method did not learn."""

from __future__ import annotations

import math

import pytest
import torch

from cass.config import PretrainConfig
from cass.evaluation.diagnostics import effective_rank, output_std
from cass.methods.dino import DINOLoss, entropy_of
from cass.methods.registry import method_class


def test_constant_outputs_have_std_zero():
    assert output_std(torch.ones(64, 32) * 3.0) == pytest.approx(0.0, abs=1e-12)


def test_isotropic_outputs_have_std_about_one():
    torch.manual_seed(0)
    assert output_std(torch.randn(4096, 64)) == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_rank_k_features_have_effective_rank_about_k(k):
    # k orthogonal directions with equal energy: singular values all equal, entropy ln k.
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, k)).Q.T  # k x 32, orthonormal rows
    codes = torch.linalg.qr(torch.randn(256, k)).Q * 10  # 256 x k, orthogonal columns of equal norm
    codes = codes - codes.mean(dim=0)  # centred, as effective_rank centres
    assert effective_rank(codes @ basis) == pytest.approx(k, rel=0.05)


def test_uniform_teacher_has_entropy_ln_k_and_a_one_hot_teacher_zero():
    k = 50
    assert entropy_of(torch.full((4, k), 1 / k)).item() == pytest.approx(math.log(k), rel=1e-6)
    assert entropy_of(torch.eye(k)[:4]).item() == pytest.approx(0.0, abs=1e-6)


def test_dino_statistics_a_uniform_teacher_and_student_sit_at_ln_k_with_zero_kl():
    k = 64
    loss = DINOLoss(k, teacher_temp=lambda epoch: 0.04)
    same = [torch.zeros(8, k) for _ in range(4)]  # every logit equal: uniform softmax everywhere
    value, stats = loss.loss_and_statistics(same, same[:2], epoch=0)
    assert value.item() == pytest.approx(math.log(k), rel=1e-6)
    assert stats["teacher_entropy"].item() == pytest.approx(math.log(k), rel=1e-6)
    assert stats["teacher_student_kl"].item() == pytest.approx(0.0, abs=1e-5)


def test_dino_statistics_kl_is_loss_minus_teacher_entropy_on_random_logits():
    torch.manual_seed(0)
    k = 16
    loss = DINOLoss(k, teacher_temp=lambda epoch: 0.07)
    student = [torch.randn(5, k) for _ in range(4)]
    teacher = [torch.randn(5, k) for _ in range(2)]
    value, stats = loss.loss_and_statistics(student, teacher, epoch=0)
    # Reference: mean over (teacher i, student j != i) of KL(q_i || p_j), computed directly.
    q = [torch.softmax(t / 0.07, dim=-1) for t in teacher]
    p = [torch.log_softmax(s / 0.1, dim=-1) for s in student]
    kls = [(qi * (qi.log() - p[j])).sum(-1).mean() for i, qi in enumerate(q) for j in range(4) if j != i]
    assert stats["teacher_student_kl"].item() == pytest.approx(torch.stack(kls).mean().item(), rel=1e-4)


def test_backbone_collapse_warning_is_common_to_every_method():
    cfg = PretrainConfig(epochs=10)
    start = {"epoch": 0, "cnn_backbone_std": 0.2, "cnn_backbone_rank": 50.0}
    history = [start, {"epoch": 5, "loss": 1.0, "cnn_output_std": 0.9, "cnn_backbone_std": 0.01,
                       "cnn_backbone_rank": 50.0}]
    for name in ("cass", "cass-vicreg", "dino"):
        warnings = method_class(name).learning_warnings(history, cfg)
        assert any(w.startswith("the cnn backbone collapsed: the std") for w in warnings), name
        assert not method_class(name).learning_warnings([start, {**history[1], "cnn_backbone_std": 0.1}], cfg)
