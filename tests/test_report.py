"""The experiment report: numbers equal to an independent computation, explanation maps equal to their
formulas, and an HTML page that headless Chromium loads with every figure decoded and non-empty."""

from __future__ import annotations

import base64
import io
import json
import re
import statistics
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import TINY_CNN, TINY_VIT
from PIL import Image
from test_experiment import SMOKE, tiny_split
from typer.testing import CliRunner

from cass.cli.main import app
from cass.config import load_yaml, merge
from cass.experiment.config import STARTING_POINT, ExperimentConfig
from cass.experiment.run import run_experiment
from cass.models.factory import create_network
from cass.reporting.explain import grad_cam_maps, vit_attention_maps
from cass.reporting.report import Report, _section_robustness, clear_gain, readout_verdict, results_table

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def experiment_dir(shared_data, tmp_path_factory) -> Path:
    """The smoke grid with one seed and 100 % labels. Its sweeps list only the base batch size and epochs,
    so the robustness plots are drawn from the main grid's cells without training anything more."""
    root = tmp_path_factory.mktemp("report")
    cfg = merge(load_yaml(ExperimentConfig, SMOKE), {
        "data.data": str(tiny_split(shared_data, root / "data")), "out": str(root / "exp"), "seeds": [0],
        "label_fractions": [1.0], "sweep_batch_sizes": [16], "sweep_epochs": [1],
        "pretrain.accelerator": "cpu", "finetune.accelerator": "cpu",
    })
    return run_experiment(cfg)


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.images.append(values)
        self.sources += [values[k] for k in ("src", "href") if k in values]


def _parse(html: str) -> _Images:
    parser = _Images()
    parser.feed(html)
    return parser


@pytest.mark.slow
def test_html_report_renders_in_chromium_with_every_figure(experiment_dir, tmp_path):
    result = CliRunner().invoke(app, ["report", str(experiment_dir)])
    assert result.exit_code == 0, result.output
    md_path, html_path = experiment_dir / "report" / "report.md", experiment_dir / "report" / "report.html"
    assert str(html_path) in result.output
    md = md_path.read_text()
    figures = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", md)
    expected = {"label_fraction_curves", "pretraining_loss", "collapse", "pretraining_time", "attention", "gradcam",
                "robustness_pretrain_batch_size_1", "robustness_pretrain_epochs_1",
                *(f"confusion_{m}_{a}" for m in ("cass", "cass-vicreg", "dino", "supervised") for a in ("cnn", "vit"))}
    assert {Path(f).stem for f in figures} == expected
    assert "not run" not in md
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings[0] == "## What pretraining added"  # the report opens with the readouts
    for heading in ("## Reading guide", "## Results", "## Pretraining time", "## Reproduce"):
        assert heading in headings
    readouts = md.split("## What pretraining added")[1].split("\n## ")[0]
    for method in ("Starting point (no pretraining)", "CASS", "CASS-VICReg", "DINO"):
        assert f"| {method} | CNN (resnet18) | scratch |" in readouts
    assert "k-NN" in readouts and "Linear probe" in readouts
    assert f"cass experiment --config {experiment_dir / 'experiment.yaml'}" in md

    html = html_path.read_text()
    assert all(s.startswith(("data:image/png;base64,", "#")) for s in _parse(html).sources), "external reference"
    # Let the browser itself report whether it decoded each image: a copy of the page records naturalWidth.
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", "<script>window.addEventListener('load', () => { for (const i of "
                                  "document.images) { i.dataset.w = i.naturalWidth; i.dataset.h = i.naturalHeight; "
                                  "} });</script></body>"))
    assert CHROMIUM.is_file(), "headless Chromium is needed: apt-get install -y chromium (make test does it)"
    dom = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    images = _parse(dom).images
    assert len(images) == len(figures)
    for image in images:
        assert int(image["data-w"]) > 100 and int(image["data-h"]) > 100, image.get("alt")
        png = Image.open(io.BytesIO(base64.b64decode(image["src"].split(",", 1)[1]))).convert("RGB")
        pixels = np.asarray(png)
        assert png.size == (int(image["data-w"]), int(image["data-h"]))
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10, f"{image.get('alt')} is (nearly) one colour"


@pytest.mark.slow
def test_report_without_sweeps_says_not_run_and_a_wrong_directory_is_named(experiment_dir, tmp_path):
    report = Report(experiment_dir)
    report.cfg.sweep_batch_sizes, report.cfg.sweep_epochs = [], []
    text = _section_robustness(report)
    assert "Pretraining batch size: not run" in text and "Pretraining epochs: not run" in text

    missing = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert missing.exit_code == 2 and "not a cass experiment directory" in missing.output


@pytest.mark.slow
def test_results_table_is_mean_and_sample_std_over_seeds(experiment_dir):
    report = Report(experiment_dir)
    template = report.rows[0]
    scores = {0: 0.5, 1: 0.7, 2: 0.95}
    report.main = [{**template, "method": "cass", "arch": "cnn", "init": "scratch", "label_fraction": 1.0,
                    "seed": seed, "test_macro_f1": f1} for seed, f1 in scores.items()]
    table = results_table(report)
    mean, std = statistics.mean(scores.values()), statistics.stdev(scores.values())
    cass_cnn = next(line for line in table.splitlines() if line.startswith("| CASS | CNN"))
    assert f"{mean:.3f} ± {std:.3f} (n=3)" in cass_cnn
    assert "not run" in next(line for line in table.splitlines() if line.startswith("| DINO | CNN"))


def test_a_gain_is_clear_only_beyond_both_spreads_and_with_two_seeds():
    start = (0.50, 0.02, 3)
    assert clear_gain((0.56, 0.03, 3), start)
    assert not clear_gain((0.52, 0.03, 3), start)  # +0.02 is within the pretrained spread
    assert not clear_gain((0.53, 0.01, 3), (0.50, 0.04, 3))  # ... or within the starting point's
    assert not clear_gain((0.90, 0.0, 1), start)  # one seed: no spread to judge by
    assert not clear_gain((0.40, 0.01, 3), start)


@pytest.mark.slow
def test_readout_verdict_names_the_networks_not_clearly_above_their_starting_point(experiment_dir):
    report = Report(experiment_dir)
    template = next(r for r in report.readouts if r["arch"] == "cnn")
    report.cfg.methods, report.cfg.archs, report.cfg.label_fractions = ["cass", "dino", "supervised"], ["cnn"], [1.0]
    scores = {STARTING_POINT: (0.50, 0.52, 0.48), "cass": (0.70, 0.72, 0.68), "dino": (0.51, 0.55, 0.47)}
    report.readouts = [{**template, "method": method, "label_fraction": 1.0, "seed": seed, "test_macro_f1": f1}
                       for method, values in scores.items() for seed, f1 in enumerate(values)]
    verdict = readout_verdict(report, template["mode"])
    assert "DINO CNN" in verdict and "CASS CNN" not in verdict and verdict.startswith("**Not clearly above")
    report.readouts = [r for r in report.readouts if r["method"] != "dino"]
    assert readout_verdict(report, template["mode"]).startswith("Every pretrained network is clearly above")


@pytest.mark.slow
def test_results_json_rows_match_the_cells_metrics(experiment_dir):
    rows = json.loads((experiment_dir / "results.json").read_text())
    for row in rows:
        metrics = json.loads((Path(row["finetune_dir"]) / "metrics.json").read_text())
        assert row["test_macro_f1"] == metrics["macro_f1"] and row["confusion_matrix"] == metrics["confusion_matrix"]
        assert metrics["split"] == "test" and row["val_macro_f1"] == metrics["selection"]["macro_f1"]


def test_attention_map_is_the_class_token_softmax_of_the_last_block():
    torch.manual_seed(0)
    net = create_network(TINY_VIT, num_outputs=4, img_size=64).eval()
    images = torch.rand(2, 3, 64, 64)
    captured = {}
    last = net.model.blocks[-1]
    fused = last.attn.fused_attn
    hook = last.norm1.register_forward_hook(lambda module, args, output: captured.update(x=output))
    with torch.no_grad():
        net(images)
    hook.remove()
    x = captured["x"].double()
    batch, tokens, dim = x.shape
    heads = last.attn.num_heads
    weight, bias = last.attn.qkv.weight.detach().double(), last.attn.qkv.bias.detach().double()
    qkv = (x @ weight.T + bias).reshape(batch, tokens, 3, heads, -1)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    attention = torch.softmax(q @ k.transpose(-2, -1) / (dim // heads) ** 0.5, dim=-1)
    cls = attention[:, :, 0, 1:].mean(1).reshape(batch, 1, 4, 4)
    expected = torch.nn.functional.interpolate(cls, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    low, high = expected.amin((1, 2), keepdim=True), expected.amax((1, 2), keepdim=True)
    expected = ((expected - low) / (high - low)).numpy()
    np.testing.assert_allclose(vit_attention_maps(net, images), expected, atol=1e-5)
    assert last.attn.fused_attn == fused  # switched back after the extraction


def test_grad_cam_is_the_gradient_weighted_last_stage_of_the_predicted_class():
    torch.manual_seed(0)
    net = create_network(TINY_CNN, num_outputs=4, img_size=128).eval()
    images = torch.rand(2, 3, 128, 128)
    captured = {}
    hook = net.model.layer4.register_forward_hook(lambda module, args, output: captured.update(a=output))
    _, logits = net(images)
    hook.remove()
    activations = captured["a"]
    chosen = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
    (gradients,) = torch.autograd.grad(chosen, activations)
    weights = gradients.double().mean((2, 3), keepdim=True)
    cams = torch.relu((weights * activations.detach().double()).sum(1)).numpy()
    expected = []
    for cam in cams:
        cam = (cam - cam.min()) / (cam.max() - cam.min() + 1e-7)
        cam = cv2.resize(np.float32(cam), (128, 128))
        expected.append((cam - cam.min()) / (cam.max() - cam.min() + 1e-7))
    np.testing.assert_allclose(grad_cam_maps(net, images), np.stack(expected), atol=1e-4)
