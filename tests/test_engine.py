"""The pretraining engine on real images: zeroed gradients, logs, exact resume, DDP = 1 process."""

from __future__ import annotations

import csv
import dataclasses
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_CNN, TINY_VIT
from safetensors.torch import load_file
from typer.testing import CliRunner

from cass.cli.main import app
from cass.config import (
    CassVicregConfig,
    ConfigError,
    DataConfig,
    DinoConfig,
    FinetuneConfig,
    PretrainConfig,
    save_yaml,
)
from cass.methods import METHODS
from cass.methods.cass import CASS
from cass.training.finetune import finetune
from cass.training.pretrain import pretrain
from cass.utils.checkpoint import read_info
from cass.utils.rundir import MetricsFile


def engine_cfg(shared_data: Path, out: Path, **kw) -> PretrainConfig:
    values = dict(
        data=DataConfig(data=str(shared_data / "mini-cpu" / "brain_mri_mini_64.npz"), num_workers=0),
        cnn=TINY_CNN, vit=TINY_VIT, img_size=32, batch_size=16, epochs=2, out=str(out), accelerator="cpu",
    )
    values.update(kw)
    return PretrainConfig(**values)


SMALL_DINO = DinoConfig(out_dim=256, hidden_dim=64, bottleneck_dim=32, n_local_crops=2, warmup_epochs=1)
METHOD_CASES = {
    "cass": {},
    "dino-vit": {"method": "dino", "arch": "vit", "dino": SMALL_DINO},
    "dino-cnn": {"method": "dino", "arch": "cnn", "dino": SMALL_DINO},
    "cass-vicreg": {"method": "cass-vicreg", "cass_vicreg": CassVicregConfig(proj_hidden_dim=64, proj_dim=32)},
}


def test_every_registered_method_has_an_engine_case():
    assert {case.get("method", "cass") for case in METHOD_CASES.values()} == set(METHODS)


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return {f"{p.stem}.{k}": v for p in sorted(run_dir.glob("*.safetensors")) if p.stem != "checkpoint"
            for k, v in load_file(p).items()}


def test_gradients_are_zeroed_before_every_step(shared_data, tmp_path, monkeypatch):
    steps = []
    original = CASS.forward

    def checked_forward(self, images, progress):
        stale = [n for n, p in self.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        steps.append(len(stale))
        return original(self, images, progress)

    monkeypatch.setattr(CASS, "forward", checked_forward)
    pretrain(engine_cfg(shared_data, tmp_path / "run", epochs=1))
    # 64 images less the carved test and selection images: a few steps of 16
    assert len(steps) >= 2 and steps == [0] * len(steps), f"gradients left over from the previous step: {steps}"


def test_run_directory_holds_checkpoint_config_metrics_and_diagnostics(shared_data, tmp_path):
    run = pretrain(engine_cfg(shared_data, tmp_path / "run"))
    for name in ("checkpoint.safetensors", "config.yaml", "metrics.csv", "cnn.safetensors", "vit.safetensors"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    rows = read_metrics(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        for key in ("loss", "cnn_output_std", "vit_output_std", "cnn_effective_rank", "vit_effective_rank",
                    "epoch_time_s", "images_per_s", "peak_memory_mb"):
            assert float(row[key]) >= 0, key
    assert float(rows[1]["lr"]) < float(rows[0]["lr"]) < 1e-3
    with pytest.raises(ConfigError, match="--resume"):
        pretrain(engine_cfg(shared_data, tmp_path / "run"))


def test_kept_epochs_are_snapshots_read_like_a_run(shared_data, tmp_path):
    run = pretrain(engine_cfg(shared_data, tmp_path / "run", keep_epochs=[1]))
    snapshot = run / "snapshots" / "epoch_001"
    assert sorted(p.name for p in snapshot.iterdir()) == ["cnn.safetensors", "config.yaml", "vit.safetensors"]
    assert not (run / "snapshots" / "epoch_002").exists()  # the run's own weights are its last epoch
    for role in ("cnn", "vit"):
        assert read_info(snapshot / f"{role}.safetensors")["epoch"] == "1"
        early, last = load_file(snapshot / f"{role}.safetensors"), load_file(run / f"{role}.safetensors")
        assert not all(torch.equal(early[k], last[k]) for k in early)  # epoch 2 moved on
    data = DataConfig(data=str(shared_data / "mini-cpu" / "brain_mri_mini_64.npz"), num_workers=0)
    model = finetune(FinetuneConfig(data=data, source=str(snapshot), arch="vit", mode="knn", knn_ks=[1],
                                    out=str(tmp_path / "knn"), accelerator="cpu"))
    assert read_info(model / "model.safetensors")["timm_name"] == TINY_VIT
    with pytest.raises(ConfigError, match="--keep-epochs"):
        pretrain(engine_cfg(shared_data, tmp_path / "late", keep_epochs=[3]))


@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_interrupted_run_resumes_to_the_same_weights(shared_data, tmp_path, monkeypatch, case):
    reference = pretrain(engine_cfg(shared_data, tmp_path / "reference", **METHOD_CASES[case]))
    method_cls = METHODS[METHOD_CASES[case].get("method", "cass")]

    calls = {"n": 0}
    original = method_cls.forward

    def dies_in_epoch_two(self, images, progress):
        calls["n"] += 1
        if calls["n"] == 6:  # the second step of epoch 2 (4 steps per epoch)
            raise KeyboardInterrupt
        return original(self, images, progress)

    monkeypatch.setattr(method_cls, "forward", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        pretrain(engine_cfg(shared_data, tmp_path / "interrupted", **METHOD_CASES[case]))
    monkeypatch.setattr(method_cls, "forward", original)
    assert [int(r["epoch"]) for r in read_metrics(tmp_path / "interrupted")] == [1]

    resumed = pretrain(engine_cfg(shared_data, tmp_path / "interrupted", **METHOD_CASES[case]), resume=True)
    expected, got = weights(reference), weights(resumed)
    assert expected.keys() == got.keys() and expected
    assert all(torch.equal(expected[k], got[k]) for k in expected), "resumed weights differ"
    assert [r["loss"] for r in read_metrics(reference)] == [r["loss"] for r in read_metrics(resumed)]


def test_swa_averages_weights(shared_data, tmp_path):
    run = pretrain(engine_cfg(shared_data, tmp_path / "swa", epochs=3, swa=True, swa_start=0.0))
    plain = pretrain(engine_cfg(shared_data, tmp_path / "plain", epochs=3))
    averaged, last = load_file(run / "cnn.safetensors"), load_file(plain / "cnn.safetensors")
    assert any(not torch.equal(averaged[k], last[k]) for k in averaged if k.endswith("weight"))


def test_cli_pretrain_then_resume_to_more_epochs(shared_data, tmp_path):
    runner = CliRunner()
    out = tmp_path / "x"
    args = ["pretrain", "--data", str(shared_data / "mini-cpu" / "imagefolder_mini.zip"), "--cnn", TINY_CNN,
            "--vit", TINY_VIT, "--img-size", "32", "--batch-size", "8", "--epochs", "2", "--out", str(out),
            "--num-workers", "0", "--accelerator", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "output_std" in result.output and "effective_rank" in result.output
    result = runner.invoke(app, ["pretrain", "--resume", str(out), "--epochs", "3"])
    assert result.exit_code == 0, result.output
    rows = read_metrics(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    lrs = [float(r["lr"]) for r in rows]
    assert lrs == sorted(lrs, reverse=True)
    assert "epochs: 3" in (out / "config.yaml").read_text()


def test_resume_of_a_run_killed_in_its_first_epoch_starts_it_over(shared_data, tmp_path):
    """Only the config was saved (the run died before its first checkpoint): --resume trains from epoch 1."""
    cfg = engine_cfg(shared_data, tmp_path / "run", epochs=1)
    fresh = pretrain(dataclasses.replace(cfg, out=str(tmp_path / "fresh")))
    (tmp_path / "run").mkdir()
    save_yaml(cfg, tmp_path / "run" / "config.yaml")
    result = CliRunner().invoke(app, ["pretrain", "--resume", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert [int(r["epoch"]) for r in read_metrics(tmp_path / "run")] == [1]
    resumed = weights(tmp_path / "run")
    assert all(torch.equal(resumed[k], v) for k, v in weights(fresh).items())


def test_disk_full_outside_a_checkpoint_is_one_clear_line(shared_data, tmp_path, monkeypatch):
    def full_disk(self, row):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / "metrics.csv"))

    monkeypatch.setattr(MetricsFile, "append", full_disk)
    args = ["pretrain", "--data", str(shared_data / "mini-cpu" / "brain_mri_mini_64.npz"), "--cnn", TINY_CNN,
            "--vit", TINY_VIT, "--img-size", "32", "--epochs", "1", "--out", str(tmp_path / "run"),
            "--num-workers", "0", "--accelerator", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert f"error: disk full while writing {tmp_path / 'run' / 'metrics.csv'}" in result.output
    assert "Traceback" not in result.output


def test_cli_reports_bad_option_without_traceback(tmp_path):
    result = CliRunner().invoke(app, ["pretrain", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "missing" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process(shared_data, tmp_path):
    """Same global batch (16) on 1 process and on 2 gloo processes of 8: same losses and weights.

    The CNN is a ConvNeXt (LayerNorm): BatchNorm statistics depend on the per-process batch on CPU,
    where PyTorch has no SyncBatchNorm.
    """
    runs = {}
    for devices in (1, 2):
        out = tmp_path / f"ddp{devices}"
        cmd = [sys.executable, "-m", "cass.cli.main", "pretrain", "--data",
               str(shared_data / "mini-cpu" / "brain_mri_mini_64.npz"), "--cnn", "convnext_atto", "--vit", TINY_VIT,
               "--img-size", "32", "--batch-size", "16", "--epochs", "2", "--out", str(out), "--num-workers", "0",
               "--accelerator", "cpu", "--devices", str(devices)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[devices] = out
    one, two = read_metrics(runs[1]), read_metrics(runs[2])
    for a, b in zip(one, two, strict=True):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-4, abs=1e-5)
    w1, w2 = weights(runs[1]), weights(runs[2])
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], rtol=1e-3, atol=1e-4, msg=key)


def _nan_at_call(monkeypatch, call: int) -> None:
    original = CASS.forward
    calls = {"n": 0}

    def forward(self, images, progress):
        calls["n"] += 1
        out = original(self, images, progress)
        if calls["n"] == call:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(CASS, "forward", forward)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(shared_data, tmp_path, monkeypatch):
    from cass.training.failures import NonFiniteLossError
    from cass.utils.checkpoint import load_checkpoint

    _nan_at_call(monkeypatch, 6)  # in epoch 2
    with pytest.raises(NonFiniteLossError, match="last good epoch"):
        pretrain(engine_cfg(shared_data, tmp_path / "run"))
    saved, _ = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert saved["train"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in saved["method"].values() if v.is_floating_point())


def test_nonfinite_loss_can_be_skipped_and_counted(shared_data, tmp_path, monkeypatch):
    _nan_at_call(monkeypatch, 2)
    run = pretrain(engine_cfg(shared_data, tmp_path / "run", epochs=1, on_nonfinite_loss="skip"))
    row = read_metrics(run)[0]
    assert int(row["skipped_steps"]) == 1 and float(row["loss"]) == float(row["loss"])  # finite, not NaN
    assert all(torch.isfinite(v).all() for v in weights(run).values())
