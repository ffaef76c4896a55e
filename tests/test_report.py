"""The experiment report: numbers equal to an independent computation, explanation maps equal to their
formulas, and an HTML page that headless Chromium loads with every figure decoded and non-empty."""

from __future__ import annotations

import base64
import dataclasses
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
from sklearn import metrics as skm
from test_experiment import SMOKE, tiny_split
from typer.testing import CliRunner

from cass.cli.main import app
from cass.config import load_yaml, merge
from cass.evaluation.predictions import load_predictions
from cass.experiment.comparisons import (
    AGAINST_METHOD,
    AGAINST_SUPERVISED,
    COMPARISONS_CSV,
    COMPARISONS_JSON,
    PRETRAINING_ADDED,
    KeptPredictions,
)
from cass.experiment.config import STARTING_POINT, ExperimentConfig, PublishedResult
from cass.experiment.run import run_experiment
from cass.models.factory import create_network
from cass.reporting.explain import grad_cam_maps, vit_attention_maps
from cass.reporting.report import (
    Report,
    _cell_interval,
    _groups,
    _section_published,
    _section_robustness,
    constant_caption,
    convergence_caption,
    method_name,
    pretraining_added_verdict,
    published_table,
    readout_table,
    resolved_findings,
    results_table,
)
from cass.utils.rundir import MODEL, PREDICTIONS, read_csv

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
    expected = {"comparisons", "label_fraction_curves", "pretraining_loss", "collapse", "pretraining_time", "attention",
                "gradcam", "robustness_pretrain_batch_size_1", "robustness_pretrain_epochs_1",
                *(f"confusion_{m}_{a}" for m in ("cass", "cass-vicreg", "dino", "supervised") for a in ("cnn", "vit"))}
    assert {Path(f).stem for f in figures} == expected
    assert "not run" not in md
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings[:2] == ["## Stated comparisons", "## What pretraining added"]  # opens with the verdicts
    stated = md.split("## Stated comparisons")[1].split("\n## ")[0]
    assert "![paired differences with their 95 % intervals](figures/comparisons.png)" in stated
    primary = [r for r in json.loads((experiment_dir / COMPARISONS_JSON).read_text()) if r["metric"] == "macro_f1"]
    verdicts = [line for line in stated.splitlines() if line.startswith("- ")]
    assert len(verdicts) == len(primary) > 0
    for line, row in zip(verdicts, primary, strict=True):
        assert line.startswith(f"- {method_name(row['a'])} − ")
        assert f"{row['diff']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}] {row['verdict']}" in line
    results = md.split("## Results")[1].split("\n## ")[0]
    assert "95 % interval: a bootstrap over test images" in results and "±" not in results
    for heading in ("## Reading guide", "## Results", "## Pretraining time", "## Reproduce"):
        assert heading in headings
    readouts = md.split("## What pretraining added")[1].split("\n## ")[0]
    for method in ("Starting point (no pretraining)", "CASS", "CASS-VICReg", "DINO"):
        assert f"| {method} | CNN (resnet18) | scratch |" in readouts
    assert "k-NN" in readouts and "L2 logistic regression" in readouts
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
def test_results_table_is_the_mean_over_seeds_with_its_interval(experiment_dir):
    report = Report(experiment_dir)
    lines = results_table(report).splitlines()
    for (method, arch), rows in _groups(report.main, "method", "arch").items():
        line = next(line for line in lines if line.startswith(f"| {method_name(method)} | {report.network(arch)} |"))
        estimate, low, high = map(float, re.search(r"\| (\S+) \[(\S+), (\S+)\] \(n=1\)( †)?( ‡)? \|$", line).groups()[:3])
        assert estimate == pytest.approx(statistics.mean(r["test_macro_f1"] for r in rows), abs=6e-4)  # torchmetrics
        assert 0 <= low < high <= 1, line


@pytest.mark.slow
def test_published_scores_are_set_beside_every_cell_at_their_fraction_with_where_its_interval_lies(experiment_dir):
    report = Report(experiment_dir)
    cells = _groups(report.main, "method", "arch", "init")
    (method, arch, init), first = next(iter(cells.items()))
    auroc, accuracy = (_cell_interval(report, first, metric) for metric in ("auroc", "accuracy"))
    scores = {"auroc": auroc.low - 0.001, "accuracy": accuracy.estimate}  # the first cell: above it, then level
    published = PublishedResult(name="MedMNIST v2, ResNet-18 (28)", scores=scores)
    lines = published_table(report, published).splitlines()
    assert lines[0] == "| method | network | init | AUROC (macro, one-vs-rest) | accuracy |"
    assert lines[2] == (f"| **MedMNIST v2, ResNet-18 (28)** (published) |  |  | {scores['auroc']:.3f} | "
                        f"{accuracy.estimate:.3f} |")
    assert len(lines) == 3 + len(cells)
    verdict = r"\S+ \[\S+, \S+\]: (above it|level|below it)"
    assert all(re.search(rf"\| {verdict} \| {verdict} \|$", line) for line in lines[3:]), lines
    name = f"| {method_name(method)} | {report.network(arch)} | {init} |"
    mine = next(line for line in lines if line.startswith(name))
    assert mine.endswith(f"[{auroc.low:.3f}, {auroc.high:.3f}]: above it | "
                         f"{accuracy.estimate:.3f} [{accuracy.low:.3f}, {accuracy.high:.3f}]: level |")
    report.cfg.published = [dataclasses.replace(published, recipe="28 px, 100 epochs.", source="Yang et al. 2023")]
    section = _section_published(report)
    assert "Trained: 28 px, 100 epochs. Source: Yang et al. 2023." in section and lines[2] in section


@pytest.mark.slow
def test_cells_that_did_not_converge_or_beat_a_constant_prediction_are_marked_and_counted(experiment_dir, tmp_path):
    report = Report(experiment_dir)
    report.kept = KeptPredictions(tmp_path)
    template = report.rows[0]
    ran = [("cnn", 0, True, True), ("cnn", 1, False, True), ("vit", 0, True, False), ("vit", 1, True, True)]
    report.main = [{**template, "method": "cass", "arch": arch, "init": "scratch", "label_fraction": 1.0,
                    "seed": seed, "test_macro_f1": 0.5, "converged": converged, "above_constant": learnt}
                   for arch, seed, converged, learnt in ran]
    lines = results_table(report).splitlines()
    assert next(line for line in lines if line.startswith("| CASS | CNN")).endswith("(n=2) † |")
    assert next(line for line in lines if line.startswith("| CASS | Transformer")).endswith("(n=2) ‡ |")
    assert "in 3 of 4 runs" in convergence_caption(report.main)
    assert "most frequent class for every image" in constant_caption(report.main)
    assert "(1 of 4 runs)" in constant_caption(report.main)
    older = [{**row, "converged": None, "above_constant": None} for row in report.main]  # cells from before
    assert convergence_caption(older) == constant_caption(older) == ""


@pytest.mark.slow
def test_the_demo_headline_lists_only_resolved_comparisons_largest_first(experiment_dir, monkeypatch):
    base = {"comparison": "pretraining added", "b": STARTING_POINT, "arch": "cnn", "init": "scratch", "mode": "knn",
            "label_fraction": 0.1, "metric": "macro_f1"}
    stated = [{**base, "a": "cass", "diff": 0.20, "low": 0.05, "high": 0.35, "verdict": "above"},
              {**base, "a": "dino", "diff": -0.30, "low": -0.45, "high": -0.10, "verdict": "below"},
              {**base, "a": "cass-vicreg", "diff": 0.40, "low": -0.02, "high": 0.80, "verdict": "unresolved"},
              {**base, "a": "cass", "metric": "accuracy", "diff": 0.5, "low": 0.4, "high": 0.6, "verdict": "above"}]
    monkeypatch.setattr(Report, "comparisons", property(lambda self: stated))
    lines = resolved_findings(experiment_dir).splitlines()
    assert lines[0].startswith("- DINO") and lines[0].endswith("-0.300 [-0.450, -0.100] below")
    assert lines[1].startswith("- CASS − starting point") and "above" in lines[1]
    assert lines[2] == "(1 other comparison(s) unresolved: their interval contains 0.)"  # accuracy not counted
    assert resolved_findings(experiment_dir, most=1).splitlines()[1] == "- ... and 1 more resolved (comparisons.csv)"
    monkeypatch.setattr(Report, "comparisons", property(lambda self: stated[2:3]))
    assert resolved_findings(experiment_dir).startswith("None of the 1 stated comparisons is resolved")


@pytest.mark.slow
def test_cells_without_kept_predictions_fall_back_to_mean_and_sample_std(experiment_dir, tmp_path):
    report = Report(experiment_dir)
    report.kept = KeptPredictions(tmp_path)  # cells finished before cass kept per-image predictions
    template = report.rows[0]
    scores = {0: 0.5, 1: 0.7, 2: 0.95}
    report.main = [{**template, "method": "cass", "arch": "cnn", "init": "scratch", "label_fraction": 1.0,
                    "seed": seed, "test_macro_f1": f1} for seed, f1 in scores.items()]
    table = results_table(report)
    mean, std = statistics.mean(scores.values()), statistics.stdev(scores.values())
    cass_cnn = next(line for line in table.splitlines() if line.startswith("| CASS | CNN"))
    assert f"{mean:.3f} ± {std:.3f} (n=3)" in cass_cnn
    assert "not run" in next(line for line in table.splitlines() if line.startswith("| DINO | CNN"))


@pytest.mark.slow
def test_pretraining_added_names_the_networks_whose_paired_interval_is_not_above_zero(experiment_dir):
    report = Report(experiment_dir)
    mode = report.cfg.readouts[0]
    report.cfg.methods, report.cfg.archs, report.cfg.label_fractions = ["cass", "dino", "supervised"], ["cnn"], [1.0]
    row = {"comparison": PRETRAINING_ADDED, "b": STARTING_POINT, "arch": "cnn", "init": "scratch", "mode": mode,
           "label_fraction": 1.0, "metric": "macro_f1", "n_seeds": 3, "n_test_images": 50}
    report.comparisons = [{**row, "a": "cass", "diff": 0.2, "low": 0.1, "high": 0.3, "verdict": "above"},
                          {**row, "a": "dino", "diff": 0.04, "low": -0.02, "high": 0.1, "verdict": "unresolved"}]
    verdict = pretraining_added_verdict(report, mode)
    assert verdict.startswith("**Not above") and "DINO CNN (resnet18) from scratch at 100% (unresolved)" in verdict
    assert "CASS CNN" not in verdict
    assert "; Δ +0.200 [+0.100, +0.300] above" in readout_table(report, mode)
    report.comparisons = report.comparisons[:1]
    assert pretraining_added_verdict(report, mode).startswith("Every pretrained network is above")


@pytest.mark.slow
def test_every_cell_keeps_its_test_predictions_as_scored(experiment_dir):
    """Readouts too (their weights are not kept): the file gives back the reported confusion matrix and macro-F1."""
    rows = json.loads((experiment_dir / "results.json").read_text())
    assert {r["mode"] for r in rows} > {"full"}
    for row in rows:
        cell = Path(row["finetune_dir"])
        keys, kept = load_predictions(cell / PREDICTIONS)
        assert len(keys) == len(set(keys)) == row["num_test_images"] == len(kept)
        assert kept.classes == row["classes"] and np.allclose(kept.probabilities.sum(axis=1), 1, atol=1e-5)
        confusion = skm.confusion_matrix(kept.targets, kept.predicted, labels=range(len(kept.classes)))
        assert confusion.tolist() == row["confusion_matrix"]
        macro_f1 = skm.f1_score(kept.targets, kept.predicted, average="macro")
        assert macro_f1 == pytest.approx(row["test_macro_f1"], abs=1e-6)
        assert row["above_constant"] == (row["val_macro_f1"] > row["val_constant_macro_f1"] + 1e-6)
        assert (cell / MODEL).is_file() == (row["mode"] == "full" and row["method"] != STARTING_POINT)


@pytest.mark.slow
def test_the_experiment_states_every_comparison_from_its_kept_predictions(experiment_dir):
    cfg = load_yaml(ExperimentConfig, experiment_dir / "experiment.yaml")
    rows = read_csv(experiment_dir / COMPARISONS_CSV)
    assert rows == [{k: "" if v is None else str(v) for k, v in r.items()}
                    for r in json.loads((experiment_dir / COMPARISONS_JSON).read_text())]
    pretrained = ["cass", "cass-vicreg", "dino"]
    method_pairs = [(AGAINST_METHOD, "cass", "dino"), (AGAINST_METHOD, "cass-vicreg", "cass"),
                    (AGAINST_METHOD, "cass-vicreg", "dino")]
    per_mode = {mode: [(PRETRAINING_ADDED, m, STARTING_POINT) for m in pretrained] for mode in cfg.readouts}
    per_mode["full"] = [(AGAINST_SUPERVISED, m, "supervised") for m in pretrained]
    expected = {(kind, a, b, mode, arch, metric) for mode, baselines in per_mode.items()
                for kind, a, b in [*baselines, *method_pairs]
                for arch in ("cnn", "vit") for metric in ("macro_f1", "accuracy", "auroc")}
    assert {(r["comparison"], r["a"], r["b"], r["mode"], r["arch"], r["metric"]) for r in rows} == expected
    results = json.loads((experiment_dir / "results.json").read_text())
    for row in rows:
        for side in ("a", "b"):  # the bootstrap's point estimate from the CSV equals torchmetrics' score
            scored = [r[f"test_{row['metric']}"] for r in results
                      if (r["method"], r["arch"], r["mode"]) == (row[side], row["arch"], row["mode"])
                      and r["pretrain_batch_size"] in (None, cfg.pretrain.batch_size)
                      and r["pretrain_epochs"] in (None, cfg.pretrain.epochs)]
            assert float(row[f"{side}_mean"]) == pytest.approx(statistics.mean(scored), abs=1e-5)
        diff, low, high = (float(row[k]) for k in ("diff", "low", "high"))
        assert diff == pytest.approx(float(row["a_mean"]) - float(row["b_mean"]))
        assert row["verdict"] == ("above" if low > 0 else "below" if high < 0 else "unresolved")
        assert row["n_seeds"] == "1" and row["covers"] == "test images only (one seed)"
        assert int(row["n_test_images"]) == results[0]["num_test_images"]


@pytest.mark.slow
def test_rerunning_a_finished_experiment_trains_rewrites_and_bootstraps_nothing(experiment_dir):
    compared, results = experiment_dir / COMPARISONS_CSV, experiment_dir / "results.json"
    before = compared.stat().st_mtime_ns, results.stat().st_mtime_ns
    cfg = load_yaml(ExperimentConfig, experiment_dir / "experiment.yaml")
    assert run_experiment(cfg) == experiment_dir
    assert (compared.stat().st_mtime_ns, results.stat().st_mtime_ns) == before  # so a script can skip its report
    compared.unlink()  # a directory without its comparisons (written before they existed) gets them
    run_experiment(cfg)
    assert compared.is_file()


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


def test_did_not_learn_rests_on_the_backbone_and_the_readout_intervals():
    """A collapsed backbone and readouts never above their starting point are 'did not learn', each naming its
    measurement; a network with one readout above its start is not, whatever its other warnings say."""
    from types import SimpleNamespace

    from cass.evaluation.diagnostics import COLLAPSED
    from cass.reporting.report import _did_not_learn

    def added(method: str, arch: str, verdict: str, diff: float) -> dict:
        return {"comparison": "pretraining added", "metric": "macro_f1", "a": method, "arch": arch, "init": "scratch",
                "mode": "knn", "label_fraction": 0.1, "diff": diff, "low": diff - 0.02, "high": diff + 0.02,
                "verdict": verdict}

    runs = [{"method": "cass", "arch": "cnn+vit", "init": "scratch", "seed": 0,
             "warnings": f"the vit {COLLAPSED}: std fell | the cnn backbone did not improve its k-NN"},
            {"method": "dino", "arch": "vit", "init": "scratch", "seed": 0, "warnings": "DINO loss near ln K"}]
    comparisons = [added("cass", "cnn", "below", -0.1), added("cass", "vit", "unresolved", 0.01),
                   added("dino", "vit", "above", 0.05)]
    cfg = SimpleNamespace(pretrain=SimpleNamespace(cnn="resnet18", vit="vit_tiny_patch16_224"))
    report = SimpleNamespace(runs=runs, comparisons=comparisons, cfg=cfg,
                             network=lambda arch: {"cnn": "CNN", "vit": "Transformer"}[arch])
    lines = _did_not_learn(report)
    assert len(lines) == 3, lines
    assert lines[0].startswith("**Did not learn (backbone):** CASS") and COLLAPSED in lines[0]
    assert "k-NN" not in lines[0]  # the k-NN check is a warning, not a verdict
    assert any("(readout):** CASS CNN" in line and "-0.100" in line for line in lines)
    assert any("(readout):** CASS Transformer" in line and "unresolved" in line for line in lines)
    assert not any("DINO" in line for line in lines)
