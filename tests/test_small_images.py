"""Networks for 28-64 px images: the small CNN stem and the ViT patch size, from Python, YAML and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import yaml
from conftest import TINY_CNN, TINY_VIT
from safetensors.torch import save_file
from typer.testing import CliRunner

from cass.cli.main import app
from cass.config import ConfigError, DataConfig, FinetuneConfig, PretrainConfig, load_yaml
from cass.models.factory import create_network
from cass.training.finetune import finetune
from cass.training.pretrain import pretrain
from cass.utils.schedules import step_decay_lambda


def test_small_stem_keeps_a_28px_image_large_until_the_last_stage():
    standard = create_network(TINY_CNN, num_outputs=2)
    small = create_network(TINY_CNN, num_outputs=2, cnn_stem="small")
    assert small.model.conv1.kernel_size == (3, 3) and small.model.conv1.stride == (1, 1)
    assert isinstance(small.model.maxpool, torch.nn.Identity)
    x = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        # 28 -> 28 -> 14 -> 7 -> 4 with the small stem; the 7x7/2 stem and max-pool leave 1x1 at the last stage.
        assert small.model.forward_features(x).shape[-2:] == (4, 4)
        assert standard.model.forward_features(x).shape[-2:] == (1, 1)


def test_small_stem_refuses_a_network_without_a_resnet_stem():
    with pytest.raises(ConfigError, match="cnn_stem 'small'"):
        create_network(TINY_VIT, num_outputs=2, img_size=32, cnn_stem="small")
    with pytest.raises(ConfigError, match="cnn_stem must be one of"):
        create_network(TINY_CNN, num_outputs=2, cnn_stem="tiny")


def test_standard_weights_are_resampled_into_the_small_stem(tmp_path):
    torch.manual_seed(0)
    donor = timm.create_model(TINY_CNN, pretrained=False, num_classes=3)
    save_file(donor.state_dict(), str(tmp_path / "w.safetensors"))
    net = create_network(TINY_CNN, init=str(tmp_path / "w.safetensors"), num_outputs=3, cnn_stem="small")
    kernel, original = net.model.conv1.weight, donor.conv1.weight
    assert kernel.shape[-2:] == (3, 3)
    # A flat image gets the same response: each filter's sum is preserved by the resampling.
    assert torch.allclose(kernel.sum(dim=(2, 3)), original.sum(dim=(2, 3)), atol=1e-4)
    assert torch.equal(net.model.layer1[0].conv1.weight, donor.layer1[0].conv1.weight)


def test_vit_patch_size_gives_16_patches_or_more_and_resamples_loaded_weights(tmp_path):
    donor = timm.create_model(TINY_VIT, pretrained=False, num_classes=0)
    save_file(donor.state_dict(), str(tmp_path / "vit.safetensors"))
    net = create_network(TINY_VIT, init=str(tmp_path / "vit.safetensors"), num_outputs=0, img_size=28, patch_size=4)
    assert net.model.patch_embed.grid_size == (7, 7)
    assert net.model.patch_embed.proj.weight.shape[-2:] == (4, 4)
    assert net.model.pos_embed.shape[1] == 49 + 1  # class token + 7x7 patches, resampled from 14x14
    assert torch.equal(net.model.blocks[0].attn.qkv.weight, donor.blocks[0].attn.qkv.weight)
    assert net.features(torch.rand(2, 3, 28, 28)).shape == (2, donor.num_features)


def test_step_schedule_is_medmnist_v2s():
    factor = step_decay_lambda(100)
    assert [factor(s) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


@pytest.mark.slow
def test_pretrain_and_finetune_carry_the_small_image_options(shared_data, tmp_path):
    """A run pretrained with both options records them; fine-tuning from it and predicting rebuild the same
    networks (weights load strictly), from Python and from the CLI and YAML."""
    data = shared_data / "medmnist" / "breastmnist.npz"
    run = pretrain(PretrainConfig(data=DataConfig(data=str(data), num_workers=0, train_images=64), cnn=TINY_CNN,
                                  vit=TINY_VIT, img_size=28, cnn_stem="small", vit_patch_size=4, batch_size=16,
                                  epochs=1, out=str(tmp_path / "pre"), accelerator="cpu"))
    saved = load_yaml(PretrainConfig, run / "config.yaml")
    assert (saved.cnn_stem, saved.vit_patch_size) == ("small", 4)
    for arch in ("cnn", "vit"):
        cfg = FinetuneConfig(data=DataConfig(data=str(data), num_workers=0, train_images=64), source=str(run),
                             arch=arch, epochs=1, batch_size=16, min_steps=0, out=str(tmp_path / arch),
                             accelerator="cpu")
        model_dir = finetune(cfg)
        assert json.loads((model_dir / "metrics.json").read_text())["split"] == "test"
    yaml_file = tmp_path / "ft.yaml"
    yaml_file.write_text(yaml.safe_dump({"source": "scratch", "arch": "cnn", "cnn": TINY_CNN, "cnn_stem": "small",
                                         "img_size": 28, "epochs": 1, "batch_size": 16, "min_steps": 0,
                                         "schedule": "step", "select_metric": "auroc", "augment": "none",
                                         "data": {"data": str(data), "num_workers": 0, "train_images": 64}}))
    runner = CliRunner()
    result = runner.invoke(app, ["finetune", "--config", str(yaml_file), "--out", str(tmp_path / "cli"),
                                 "--accelerator", "cpu"])
    assert result.exit_code == 0, result.output
    assert load_yaml(FinetuneConfig, tmp_path / "cli" / "config.yaml").cnn_stem == "small"
    result = runner.invoke(app, ["evaluate", "--model", str(tmp_path / "cli"), "--data", str(data), "--split", "test",
                                 "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["num_samples"] == 156
    result = runner.invoke(app, ["finetune", "--from", "scratch", "--cnn", TINY_CNN, "--cnn-stem", "big",
                                 "--data", str(data), "--out", str(tmp_path / "bad")])
    assert result.exit_code != 0 and "cnn_stem" in result.output + str(result.exception)


def test_unknown_recipe_choices_are_refused_by_option(tmp_path):
    for key, flag in (("schedule", "--schedule"), ("select_metric", "--select-metric"), ("augment", "--augment")):
        with pytest.raises(ConfigError, match=flag):
            finetune(FinetuneConfig(out=str(tmp_path / key), **{key: "nope"}))


def test_model_metadata_names_the_stem(tmp_path: Path):
    from cass.models.factory import Network

    net = create_network(TINY_CNN, num_outputs=2, cnn_stem="small")
    assert isinstance(net, Network) and net.shape_info() == {"cnn_stem": "small", "patch_size": ""}
