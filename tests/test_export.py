"""A backbone a user can take away (issue 20): ``cass export`` writes plain timm weights that timm loads by
itself and that give the run's features, a model card whose code does what it says, and files that
``cass embed`` and ``cass finetune --from`` take as they are."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import TINY_CNN, TINY_VIT
from PIL import Image
from typer.testing import CliRunner

import cass.training.finetune as finetuning
from cass.cli.main import app
from cass.config import CassVicregConfig, ConfigError, DataConfig, PretrainConfig, load_yaml, save_yaml
from cass.data.sources import open_images
from cass.evaluation.features import extract_features
from cass.models.backbone import backbone_info, load_backbone
from cass.models.factory import create_network, shape_options
from cass.training.export import MODEL_CARD, export_run
from cass.training.finetune import build_classifier, resolve_backbone
from cass.training.pretrain import pretrain
from cass.utils.checkpoint import save_weights


@pytest.fixture(scope="module")
def run(shared_data, tmp_path_factory) -> Path:
    """One epoch of cass-vicreg on two real sources: resnet18 and a ViT-Tiny with 8 px patches, at 32 px."""
    mini = shared_data / "mini-cpu"
    return pretrain(PretrainConfig(
        method="cass-vicreg", data=DataConfig(data=str(mini / "brain_mri_mini_64.npz"), num_workers=0),
        more_data=[DataConfig(data=str(mini / "blood_pbc_mini_64.npz"), train_images=16)], cnn=TINY_CNN,
        vit=TINY_VIT, vit_patch_size=8, img_size=32, batch_size=16, epochs=1, accelerator="cpu",
        diagnostics_samples=32, cass_vicreg=CassVicregConfig(proj_hidden_dim=64, proj_dim=32),
        out=str(tmp_path_factory.mktemp("pooled") / "run")))


def run_network(run_dir: Path, role: str, cfg: PretrainConfig):
    """The network as the run trained it (its own head included), read the way fine-tuning reads a run."""
    return create_network(getattr(cfg, role), init=str(run_dir), role=role, img_size=cfg.img_size,
                          **shape_options(role, cfg.cnn_stem, cfg.vit_patch_size)).eval()


def card_code(card: str, file_name: str) -> str:
    """The Python block the model card gives for ``file_name``."""
    section = card.split(f"### `{file_name}`", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def check_card_loads_the_run(out: Path, run_dir: Path, cfg: PretrainConfig, monkeypatch) -> None:
    """Every block of the card, run as written (from the export folder), gives the run's features."""
    card = (out / MODEL_CARD).read_text()
    monkeypatch.chdir(out)
    images = torch.rand(4, 3, cfg.img_size, cfg.img_size)
    for path in sorted(out.glob("*.safetensors")):
        role = backbone_info(path).arch
        net = run_network(run_dir, role, cfg)
        scope = {"images": (images - net.mean) / net.std}
        with torch.no_grad():
            exec(card_code(card, path.name), scope)  # noqa: S102 - the card's own instructions
            expected = net.features(images)
        assert scope["model"].num_classes == 0
        torch.testing.assert_close(scope["features"], expected, rtol=1e-4, atol=1e-5)


def test_exported_backbones_load_with_timm_and_give_the_runs_features(run, tmp_path, monkeypatch):
    cfg = load_yaml(PretrainConfig, run / "config.yaml")
    out = tmp_path / "export"
    files = export_run(run, out)
    assert [p.name for p in files] == ["cnn-resnet18.safetensors", "vit-vit_tiny_patch16_224.safetensors"]
    images = torch.rand(3, 3, 32, 32)
    for path, kwargs in zip(files, ({}, {"img_size": 32, "patch_size": 8}), strict=True):
        model = timm.create_model(backbone_info(path).timm_name, pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()
        net = run_network(run, backbone_info(path).arch, cfg)
        assert set(model.state_dict()) == set(load_backbone(path).model.state_dict())  # timm's own key names
        with torch.no_grad():
            torch.testing.assert_close(model((images - net.mean) / net.std), net.features(images), rtol=1e-4, atol=1e-5)
    check_card_loads_the_run(out, run, cfg, monkeypatch)
    card = (out / MODEL_CARD).read_text()
    assert "| 1 | `" in card and "| 2 | `" in card and "blood_pbc_mini_64.npz` | 16 |" in card  # sources, counts
    assert "cnn k-NN macro-F1" in card and "\n| 0 |" in card and "\n| 1 |" in card  # the learning checks
    assert "method: cass-vicreg" in card and "cass finetune --from cnn-resnet18.safetensors" in card
    assert "had not finished" not in card


def test_small_stem_backbone_loads_as_the_card_says(tmp_path, monkeypatch):
    """timm cannot build cass's small CNN stem from a name: the card's code builds it, and so does cass."""
    cfg = PretrainConfig(method="cass", cnn=TINY_CNN, vit=TINY_VIT, cnn_stem="small", vit_patch_size=4, img_size=28,
                         epochs=3)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_yaml(cfg, run_dir / "config.yaml")
    for role in ("cnn", "vit"):
        net = create_network(getattr(cfg, role), img_size=28, **shape_options(role, "small", 4))
        save_weights(run_dir / f"{role}.safetensors", net.model.state_dict(), {"epoch": "2"})
    out = tmp_path / "export"
    export_run(run_dir, out)
    check_card_loads_the_run(out, run_dir, cfg, monkeypatch)
    card = (out / MODEL_CARD).read_text()
    assert "model.maxpool = torch.nn.Identity()" in card and "Exported after epoch 2 of 3" in card
    assert "Not recorded: the run was made before cass wrote `sources.json`" in card
    assert load_backbone(out / "cnn-resnet18.safetensors").model.conv1.kernel_size == (3, 3)
    with pytest.raises(ConfigError, match="choose another directory than the run's"):
        export_run(run_dir, run_dir)


def test_embed_and_finetune_take_an_exported_file(run, tmp_path, monkeypatch, shared_data):
    cfg = load_yaml(PretrainConfig, run / "config.yaml")
    cnn, vit = export_run(run, tmp_path / "export")
    folder = tmp_path / "images"
    folder.mkdir()
    arrays = np.load(shared_data / "mini-cpu" / "blood_pbc_mini_64.npz")["images"][:5]
    for i, image in enumerate(arrays):
        Image.fromarray(image).save(folder / f"{i}.png")
    result = CliRunner().invoke(app, ["embed", "--model", str(vit), "--input", str(folder), "--out", str(tmp_path / "f")])
    assert result.exit_code == 0, result.output
    images = open_images(folder).check()
    expected = extract_features(run_network(run, "vit", cfg), images, 32, 64, torch.device("cpu"))
    np.testing.assert_allclose(np.load(tmp_path / "f" / "features.npy"), expected, rtol=1e-4, atol=1e-5)

    typed: list = []
    monkeypatch.setattr(finetuning, "finetune", lambda ft_cfg, resume=False: typed.append(ft_cfg))
    common = ["finetune", "--data", str(shared_data / "mini-cpu" / "brain_mri_mini_64.npz"), "--out", str(tmp_path)]
    for argv in (["--from", str(cnn)], ["--from", str(vit)], ["--from", str(vit), "--img-size", "48"]):
        result = CliRunner().invoke(app, common + argv)
        assert result.exit_code == 0, result.output
    backbones = [resolve_backbone(c) for c in typed]  # the file names its network, shape and size
    assert [(b.name, b.role, b.cnn_stem, b.vit_patch_size, b.img_size) for b in backbones] == [
        (TINY_CNN, "cnn", "timm", None, 32), (TINY_VIT, "vit", "timm", 8, 32), (TINY_VIT, "vit", "timm", 8, 48)]
    for backbone, role in zip(backbones[:2], ("cnn", "vit"), strict=True):  # fine-tuning builds the run's network
        net = build_classifier(backbone, num_classes=4).eval()
        with torch.no_grad():
            x = torch.rand(2, 3, 32, 32)
            torch.testing.assert_close(net.features(x), run_network(run, role, cfg).features(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match=r"holds a cnn backbone \(resnet18\), not a vit"):
        resolve_backbone(dataclasses.replace(typed[0], arch="vit"))
