"""The report of a ``cass experiment`` directory: Markdown plus one self-contained HTML page.

Everything is read back from the files the experiment wrote (``experiment.yaml``, ``results.json``,
``pretraining.csv``, each run's ``metrics.csv`` and each cell's model directory), so a report can be
rebuilt at any time, also from a partly finished experiment. The Markdown is the single source of
the text: the HTML page is that Markdown rendered by the ``markdown`` package, with every figure
embedded as base64 so the page can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import csv
import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import markdown
import numpy as np
import torch

from cass.config import ConfigError, load_yaml
from cass.data.transforms import eval_transform
from cass.evaluation.inference import load_classifier
from cass.evaluation.splits import three_roles
from cass.experiment.config import (
    STARTING_POINT,
    SUPERVISED,
    ExperimentConfig,
    is_self_supervised,
)
from cass.experiment.plan import Cell
from cass.experiment.results import PRETRAINING_CSV, RESULTS_JSON, read_pretraining
from cass.experiment.run import ENVIRONMENT, EXPERIMENT_YAML
from cass.methods.registry import method_class
from cass.reporting.explain import grad_cam_maps, vit_attention_maps
from cass.utils.atomic import atomic_write_text
from cass.utils.plots import (
    Curve,
    plot_bars,
    plot_confusion_matrix,
    plot_curves,
    plot_heatmaps,
)

ARCH_NAMES = {"cnn": "CNN", "vit": "Transformer"}
METRIC_NAMES = {
    "macro_f1": "macro-F1", "micro_f1": "micro-F1", "macro_recall": "macro recall",
    "balanced_accuracy": "balanced accuracy", "auroc": "AUROC (macro, one-vs-rest)", "map": "mAP",
}
EXPLAINED_IMAGES = 4
Row = dict[str, Any]


class Report:
    """What the sections share: the experiment, its rows and runs, and where figures go."""

    def __init__(self, run_dir: Path) -> None:
        if not (run_dir / EXPERIMENT_YAML).is_file() or not (run_dir / RESULTS_JSON).is_file():
            raise ConfigError(f"{run_dir}: not a cass experiment directory (no {EXPERIMENT_YAML} and {RESULTS_JSON})")
        self.run_dir = run_dir
        self.cfg = load_yaml(ExperimentConfig, run_dir / EXPERIMENT_YAML)
        self.rows: list[Row] = json.loads((run_dir / RESULTS_JSON).read_text())
        self.runs = _read_csv(run_dir / PRETRAINING_CSV)
        self.sessions: list[dict[str, Any]] = json.loads((run_dir / ENVIRONMENT).read_text())
        self.figures = run_dir / "report" / "figures"
        self.figures.mkdir(parents=True, exist_ok=True)
        base = self.cfg.pretrain
        base_grid = [r for r in self.rows if r["pretrain_batch_size"] in (None, base.batch_size)
                     and r["pretrain_epochs"] in (None, base.epochs)]
        self.main = [r for r in base_grid if r.get("mode", "full") == self.cfg.finetune.mode
                     and r["method"] != STARTING_POINT]
        self.readouts = [r for r in base_grid if r.get("mode") in self.cfg.readouts]
        self.main_runs = [r for r in self.runs if int(r["batch_size"]) == base.batch_size
                          and int(r["epochs"]) == base.epochs]

    def machine(self) -> str:
        """Where the numbers were measured, with a warning when sessions ran on different machines."""
        first, last = self.sessions[0], self.sessions[-1]
        devices = sorted({f"{s['device']} ({s['cpu_count']} CPU cores)" for s in self.sessions})
        where = (devices[0] if len(devices) == 1 else
                 f"several machines ({'; '.join(devices)}): times from different machines are not comparable")
        started = (f"one session, started {first['date']}" if len(self.sessions) == 1 else
                   f"{len(self.sessions)} sessions, the first started {first['date']}, the last {last['date']}")
        return f"{where}; {last['platform']}, torch {last['torch']}, cass {last['cass']}; {started}"

    def cell_dir(self, row: Row) -> Path:
        """A cell's model directory, found inside this experiment directory even if it was moved."""
        return self.run_dir / "finetune" / Path(row["finetune_dir"]).name

    def pretrain_dir(self, run: dict[str, str]) -> Path:
        return self.run_dir / "pretrain" / Path(run["dir"]).name

    def network(self, arch: str) -> str:
        return f"{ARCH_NAMES[arch]} ({getattr(self.cfg.pretrain, arch)})"

    def figure(self, name: str, alt: str) -> tuple[Path, str]:
        """The PNG path to write and the Markdown that shows it."""
        return self.figures / name, f"![{alt}](figures/{name})"


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file() or not path.read_text().strip():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


Stats = tuple[float, float, int]
"""Mean, sample std and count over seeds (:func:`_mean_std`)."""


def _mean_std(values: Iterable[float]) -> Stats:
    """Mean and sample std (ddof 1; 0 for one value) of the finite values, and how many there were."""
    array = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if not array.size:
        return float("nan"), float("nan"), 0
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0, int(array.size)


def _format(stats: Stats, digits: int = 3) -> str:
    """``mean ± std (n=k)``; a single value has no spread to show, so only ``mean (n=1)``."""
    mean, std, n = stats
    if n == 0:
        return "not run"
    spread = f" ± {std:.{digits}f}" if n > 1 else ""
    return f"{mean:.{digits}f}{spread} (n={n})"


def _groups(rows: list[Row], *keys: str) -> dict[tuple, list[Row]]:
    grouped: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        grouped[tuple(row[k] for k in keys)].append(row)
    return grouped


def _fraction(value: float) -> str:
    return f"{value * 100:g}%"


def method_name(method: str) -> str:
    """How tables name a grid method: the registered method's display name, the supervised baseline, or
    the starting point of the readouts."""
    if is_self_supervised(method):
        return method_class(method).display_name
    return "Starting point (no pretraining)" if method == STARTING_POINT else SUPERVISED.capitalize()


def _series_label(method: str, init: str) -> str:
    return f"{method_name(method)} / {init}"


def results_table(report: Report, metric: str = "macro_f1") -> str:
    """The paper's layout: rows method x architecture (x init), columns label fractions, mean ± std."""
    fractions = report.cfg.label_fractions
    lines = ["| method | network | init | " + " | ".join(_fraction(f) for f in fractions) + " |",
             "|---|---|---|" + "---|" * len(fractions)]
    cells = _groups(report.main, "method", "arch", "init", "label_fraction")
    for method in report.cfg.methods:
        for arch in report.cfg.archs:
            for init in (i.name for i in report.cfg.inits):
                values = []
                for fraction in fractions:
                    values.append(_format(_mean_std(r[f"test_{metric}"] for r in cells.get((method, arch, init, fraction), []))))
                name = f"| {method_name(method)} | {report.network(arch)} | {init} | "
                lines.append(name + " | ".join(values) + " |")
    return "\n".join(lines)


def summary_table(run_dir: str | Path, metric: str = "macro_f1", readout: str | None = None) -> str:
    """The fine-tuning table of an experiment directory as Markdown, or with ``readout`` (``knn``, ``linear``)
    its "what pretraining added" table (what ``cass demo`` prints)."""
    report = Report(Path(run_dir))
    return readout_table(report, readout, metric) if readout else results_table(report, metric)


def _section_results(report: Report) -> str:
    seeds = len(report.cfg.seeds)
    text = [
        "## Results",
        f"Fine-tuning. Test-split macro-F1 (the primary metric), mean ± sample standard deviation over {seeds} "
        "seed(s); `n` is the number of finished seeds. The best evaluation of each run was chosen on the "
        "selection split (`val`); nothing was selected on the test split. Pretraining: batch "
        f"{report.cfg.pretrain.batch_size}, {report.cfg.pretrain.epochs} epochs; fine-tuning mode "
        f"`{report.cfg.finetune.mode}`. Columns are the fraction of the train labels used for fine-tuning.",
        results_table(report, "macro_f1"),
    ]
    present = {k for row in report.main for k, v in row.items() if v is not None}
    for metric in ("micro_f1", "macro_recall", "balanced_accuracy", "auroc", "map"):
        if f"test_{metric}" in present:
            text += [f"### {METRIC_NAMES[metric]}", results_table(report, metric)]
    text.append("Every row of every cell (with per-class F1, the confusion matrix and the config paths) is in "
                "`results.csv` and `results.json`.")
    return "\n\n".join(text)


def _metric_curves(report: Report, rows: list[Row], x_key: str) -> dict[str, dict[str, Curve]]:
    """Macro-F1 against ``x_key``, one panel per architecture, one line per method and init."""
    panels: dict[str, dict[str, Curve]] = {}
    for arch in report.cfg.archs:
        lines: dict[str, Curve] = {}
        for (method, init), group in _groups([r for r in rows if r["arch"] == arch], "method", "init").items():
            by_x = _groups(group, x_key)
            xs = sorted(x for (x,) in by_x)
            stats = [_mean_std(r["test_macro_f1"] for r in by_x[(x,)]) for x in xs]
            lines[_series_label(method, init)] = Curve(xs, [s[0] for s in stats], [s[1] for s in stats])
        if lines:
            panels[report.network(arch)] = lines
    return panels


def _section_fraction_curves(report: Report) -> str:
    path, image = report.figure("label_fraction_curves.png", "macro-F1 against the label fraction")
    plot_curves(_metric_curves(report, report.main, "label_fraction"), path, "fraction of train labels (log)",
                "test macro-F1", logx=True)
    return "\n\n".join(["## Label-fraction curves",
                        "Mean over seeds; error bars are the standard deviation over seeds.", image])


def _run_label(run: dict[str, str]) -> str:
    return f"{_run_method_label(run)} / {run['init']} / seed {run['seed']}"


def _run_method_label(run: dict[str, str]) -> str:
    """``CASS`` for a run that trains both networks, ``DINO-CNN`` for a single-network run."""
    return method_class(run["method"]).label(None if run["arch"] == "cnn+vit" else run["arch"])


def _section_pretraining_curves(report: Report) -> str:
    if not report.main_runs:
        return "## Pretraining curves\n\nNot run (no self-supervised method in this experiment)."
    loss: dict[str, dict[str, Curve]] = defaultdict(dict)
    std: dict[str, Curve] = {}
    rank: dict[str, Curve] = {}
    for run in report.main_runs:
        rows = read_pretraining(report.pretrain_dir(run))
        epochs = [int(r["epoch"]) for r in rows]
        loss[method_class(run["method"]).objective][_run_label(run)] = Curve(epochs, [float(r["loss"]) for r in rows])
        for role in ("cnn", "vit"):
            if f"{role}_output_std" in (rows[0] if rows else {}):
                label = f"{_run_label(run)} ({role})"
                std[label] = Curve(epochs, [float(r[f"{role}_output_std"]) for r in rows])
                rank[label] = Curve(epochs, [float(r[f"{role}_effective_rank"]) for r in rows])
    threshold = report.cfg.pretrain.collapse_threshold
    loss_path, loss_image = report.figure("pretraining_loss.png", "pretraining loss per epoch")
    plot_curves(loss, loss_path, "epoch")
    collapse_path, collapse_image = report.figure("collapse.png", "collapse diagnostics per epoch")
    std_title = "output std (1 = healthy, 0 = collapsed)"
    plot_curves({std_title: std, "effective rank of features": rank}, collapse_path, "epoch",
                thresholds={std_title: (threshold, f"collapse warning ({threshold})")})
    return "\n\n".join([
        "## Pretraining: loss and collapse",
        "Each method has its own objective, so the losses are not comparable across methods. The collapse "
        "diagnostics are comparable: the std of the "
        "L2-normalised outputs, scaled so that isotropic outputs give 1 and a constant output gives 0, and the "
        "effective rank of the pooled features (how many directions the backbone really uses).",
        loss_image, collapse_image,
    ])


def _time_groups(report: Report) -> dict[str, list[float]]:
    """Pretraining seconds per run and method, and, for single-network methods (DINO), both networks'
    runs of one (init, seed) added: the cost of getting a CNN and a Transformer, as one CASS run does."""
    times: dict[str, list[float]] = defaultdict(list)
    pairs: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    for run in report.main_runs:
        seconds = float(run["time_s"])
        cls = method_class(run["method"])
        if cls.trains_both_networks:
            times[f"{cls.display_name} (CNN + ViT, one run)"].append(seconds)
        else:
            times[_run_method_label(run)].append(seconds)
            pairs[(cls.display_name, run["init"], run["seed"])][run["arch"]] = seconds
    for (name, _, _), pair in pairs.items():
        if len(pair) == 2:
            times[f"{name}-ViT + {name}-CNN"].append(pair["vit"] + pair["cnn"])
    return dict(times)


def _section_time(report: Report) -> str:
    times = _time_groups(report)
    if not times:
        return "## Pretraining time\n\nNot run (no self-supervised method in this experiment)."
    stats = {label: _mean_std(values) for label, values in times.items()}
    path, image = report.figure("pretraining_time.png", "pretraining time per run")
    plot_bars({label: (s[0], s[1]) for label, s in stats.items()}, path, "seconds per pretraining run",
              f"{report.cfg.pretrain.epochs} epochs, batch {report.cfg.pretrain.batch_size}")
    lines = ["| run | seconds per run (mean ± std over runs) |", "|---|---|"]
    lines += [f"| {label} | {_format(s, 1)} |" for label, s in stats.items()]
    cass_time = stats.get("CASS (CNN + ViT, one run)")
    ratios = [f"{cass_time[0] / stats[other][0]:.2f}x {other}" for other in list(stats)[1:]
              if cass_time and stats[other][0] > 0]
    text = ["## Pretraining time",
            f"Wall-clock seconds of the training epochs (from each run's `metrics.csv`), measured on "
            f"{report.machine()}. CASS trains both networks in one run, so it is "
            "compared with DINO-ViT, DINO-CNN and both DINO runs together.",
            "\n".join(lines), image]
    if ratios:
        text.insert(3, "CASS took " + ", ".join(ratios) + " (less than 1x = faster).")
    return "\n\n".join(text)


def _section_robustness(report: Report) -> str:
    cfg = report.cfg
    text = ["## Robustness to pretraining batch size and epochs"]
    for key, values, option, xlabel in (
        ("pretrain_batch_size", cfg.sweep_batch_sizes, "sweep_batch_sizes", "pretraining batch size"),
        ("pretrain_epochs", cfg.sweep_epochs, "sweep_epochs", "pretraining epochs"),
    ):
        other = "pretrain_epochs" if key == "pretrain_batch_size" else "pretrain_batch_size"
        fixed = cfg.pretrain.epochs if key == "pretrain_batch_size" else cfg.pretrain.batch_size
        rows = [r for r in report.rows if is_self_supervised(r["method"]) and r[other] == fixed]
        if not values or not rows:
            text.append(f"{xlabel.capitalize()}: not run (set `{option}` in the experiment config).")
            continue
        for fraction in cfg.sweep_label_fractions:
            at = [r for r in rows if r["label_fraction"] == fraction]
            name = f"robustness_{key}_{fraction:g}.png"
            path, image = report.figure(name, f"macro-F1 against the {xlabel}")
            plot_curves(_metric_curves(report, at, key), path, xlabel, f"macro-F1 at {_fraction(fraction)} labels")
            text += [f"{xlabel.capitalize()}, fine-tuned with {_fraction(fraction)} of the labels "
                     "(mean ± std over seeds):", image]
    return "\n\n".join(text)


def _best_cells(report: Report) -> dict[tuple[str, str], Row]:
    """The best fine-tuned cell (highest test macro-F1) of every method and architecture."""
    best: dict[tuple[str, str], Row] = {}
    tuned = [r for r in report.rows if r.get("mode", "full") == report.cfg.finetune.mode and r["method"] != STARTING_POINT]
    for key, group in _groups(tuned, "method", "arch").items():
        best[key] = max(group, key=lambda r: r["test_macro_f1"])
    return best


def _describe_cell(row: Row) -> str:
    return Cell(row["method"], row["arch"], row["init"], row["label_fraction"], row["seed"],
                row["pretrain_batch_size"], row["pretrain_epochs"]).describe()


def _section_confusion(report: Report) -> str:
    text = ["## Confusion matrices",
            "Best cell (highest test macro-F1) of each method and network, on the test split; rows are true classes, "
            "colours the fraction of each true class, numbers the counts."]
    for (method, arch), row in sorted(_best_cells(report).items()):
        matrix = np.asarray(row["confusion_matrix"])
        if matrix.ndim != 2:
            text.append(f"{_describe_cell(row)}: multi-label data, see the per-label table in `results.json`.")
            continue
        path, image = report.figure(f"confusion_{method}_{arch}.png", f"confusion matrix {method} {arch}")
        plot_confusion_matrix(matrix, row["classes"], path, f"{method_name(method)} {arch}: F1 {row['test_macro_f1']:.3f}")
        text += [f"**{_describe_cell(row)}** (macro-F1 {row['test_macro_f1']:.3f})", image]
    return "\n\n".join(text)


def _validation_images(report: Report, img_size: int) -> tuple[torch.Tensor, list[str]]:
    """A few test images, one per class first, as the models' input tensors, with captions."""
    val = three_roles(report.cfg.data).test
    if val is None:
        raise ConfigError(f"{report.cfg.data.data}: no test images to explain")
    picked: dict[int, int] = {}
    if val.targets is not None and val.targets.ndim == 1:
        for index, target in enumerate(val.targets):
            picked.setdefault(int(target), index)
    order = (list(picked.values()) + [i for i in range(len(val)) if i not in picked.values()])[:EXPLAINED_IMAGES]
    transform = eval_transform(img_size)
    captions = [f"true: {val.classes[int(val.targets[i])]}" if val.targets is not None and val.targets.ndim == 1
                else Path(val.keys[i]).name for i in order]
    return torch.stack([transform(val.load(i)) for i in order]), captions


def _section_explanations(report: Report) -> str:
    text = ["## Where the networks look",
            "Best fine-tuned model of each method on the same test images. Transformer: attention of the "
            "class token to each patch in the last block, averaged over heads. CNN: Grad-CAM of the predicted "
            "class at the last stage. Maps are as coarse as the network's last grid (input / 16 for ViT-*/16 "
            "patches, input / 32 for ResNets), and a network fine-tuned for a few epochs looks where it looks: "
            "these are diagnostics, not evidence of clinical relevance."]
    best = _best_cells(report)
    for arch, explain, name, what in (("vit", vit_attention_maps, "attention.png", "Transformer attention"),
                                      ("cnn", grad_cam_maps, "gradcam.png", "CNN Grad-CAM")):
        cells = [best[(m, arch)] for m in report.cfg.methods if (m, arch) in best]
        if arch not in report.cfg.archs or not cells:
            text.append(f"{what}: not run (no {arch} cell finished).")
            continue
        if report.cfg.finetune.mode == "knn":
            text.append(f"{what}: not available for k-NN probes, which have no classification head.")
            continue
        text.append(_explanation_figure(report, cells, explain, name, what))
    return "\n\n".join(text)


def _explanation_figure(report: Report, cells: list[Row], explain: Callable[..., np.ndarray], name: str,
                        what: str) -> str:
    maps: dict[str, np.ndarray] = {}
    images = captions = None
    for row in cells:
        classifier = load_classifier(report.cell_dir(row), device="cpu")
        if images is None:
            images, captions = _validation_images(report, classifier.img_size)
        maps[f"{method_name(row['method'])} ({row['init']}, {_fraction(row['label_fraction'])})"] = explain(
            classifier.net, images)
    path, image = report.figure(name, what)
    plot_heatmaps(images.permute(0, 2, 3, 1).numpy(), maps, path, captions, what)
    return f"{what}:\n\n{image}"


def _section_reproduce(report: Report) -> str:
    run_dir = report.run_dir
    lines = [
        "## Reproduce",
        "The whole grid (rerunning it skips finished cells and resumes interrupted ones), then this report:",
        f"```\ncass experiment --config {run_dir / EXPERIMENT_YAML}\ncass report {run_dir}\n```",
        "One cell alone: `cass pretrain --config PRETRAIN_CONFIG --out NEW_RUN`, then `cass finetune --config "
        "FINETUNE_CONFIG --from NEW_RUN --out NEW_MODEL` (the supervised baseline needs only the second; "
        "without `--from` the fine-tuning starts from this experiment's own pretraining run).",
        "| cell | macro-F1 | fine-tuning config | pretraining config |", "|---|---|---|---|",
    ]
    lines += [f"| {_describe_cell(r)} | {r['test_macro_f1']:.3f} | `{r['finetune_config']}` | "
              f"{'`' + r['pretrain_config'] + '`' if r['pretrain_config'] else '-'} |" for r in report.rows]
    return "\n\n".join(lines[:4]) + "\n\n" + "\n".join(lines[4:])


def _comparison(report: Report, arch: str, init: str) -> str | None:
    """One sentence per (network, init): the methods' macro-F1 per fraction and who beat whom."""
    cells = _groups([r for r in report.main if r["arch"] == arch and r["init"] == init], "method", "label_fraction")
    fractions = report.cfg.label_fractions
    means = {m: [_mean_std(r["test_macro_f1"] for r in cells.get((m, f), []))[0] for f in fractions]
             for m in report.cfg.methods}
    scores = "; ".join(f"{method_name(m)} " + " / ".join("-" if np.isnan(v) else f"{v:.3f}" for v in values)
                       for m, values in means.items())
    columns = " / ".join(map(_fraction, fractions))
    sentence = f"**{report.network(arch)}, init {init}** (macro-F1 at {columns}): {scores}."
    best = []
    for i, fraction in enumerate(fractions):
        scored = {m: values[i] for m, values in means.items() if not np.isnan(values[i])}
        if len(scored) > 1:
            best.append(f"{method_name(max(scored, key=scored.__getitem__))} at {_fraction(fraction)}")
    if best:
        sentence += " Highest mean: " + ", ".join(best) + "."
    return sentence


def _section_reading_guide(report: Report) -> str:
    cfg = report.cfg
    text = ["## Reading guide"]
    text += [s for arch in cfg.archs for init in (i.name for i in cfg.inits) if (s := _comparison(report, arch, init))]
    if len(cfg.seeds) < 2:
        text.append("One seed only: there is no error estimate, and differences of a few points may be noise.")
    else:
        text.append(f"Differences smaller than the standard deviation over the {len(cfg.seeds)} seeds are noise.")
    for run in report.runs:
        for warning in filter(None, (run.get("warnings") or "").split(" | ")):
            text.append(
                f"**Did not learn:** {_run_label(run)} (batch {run['batch_size']}, {run['epochs']} epochs): {warning}. "
                "What fine-tuning gains from this run comes mostly from its initialisation, not from the "
                "self-supervision.")
    stand_ins = [i for i in cfg.inits if i.name not in ("scratch", "imagenet")]
    names = ["`scratch` is random initialisation"] + (
        ["`imagenet` is timm's ImageNet weights"] if any(i.name == "imagenet" for i in cfg.inits) else [])
    names += [f"`{i.name}` is a stand-in for ImageNet weights (SPEC §1): CNN `{i.cnn_weights}`, Transformer "
              f"`{i.vit_weights}`" for i in stand_ins]
    text.append("Initialisations: " + "; ".join(names) + ".")
    return "\n\n".join(text)


def _section_overview(report: Report) -> str:
    cfg = report.cfg
    return "\n\n".join([
        "# CASS experiment report",
        f"Experiment `{report.run_dir}`: data `{cfg.data.data or 'shipped brain-MRI sample'}`, methods "
        f"{', '.join(method_name(m) for m in cfg.methods)}, networks {cfg.pretrain.cnn} (CNN) and "
        f"{cfg.pretrain.vit} (Transformer) at {cfg.pretrain.img_size or 'their default'} px, label fractions "
        f"{', '.join(map(_fraction, cfg.label_fractions))}, seeds {cfg.seeds}; {len(report.rows)} finished "
        f"cells. Run on {report.machine()}.",
    ])


READOUT_NAMES = {"knn": "cosine k-NN (k = {k}) on frozen features", "linear": "linear probe on frozen features"}


def _readout_stats(report: Report, mode: str, metric: str) -> dict[tuple[str, str, str, float], Stats]:
    """Mean, std and count over seeds of every readout group, keyed by (method, arch, init, fraction);
    the starting point is the method ``STARTING_POINT``."""
    groups = _groups(report.readouts, "mode", "method", "arch", "init", "label_fraction")
    return {key[1:]: _mean_std(r[f"test_{metric}"] for r in rows) for key, rows in groups.items() if key[0] == mode}


NOT_RUN: Stats = (float("nan"), float("nan"), 0)


def readout_table(report: Report, mode: str, metric: str = "macro_f1") -> str:
    """Each pretrained network against the same network at its starting point: mean ± std over seeds, and
    the difference of the means (positive: pretraining added something this readout can see)."""
    fractions = report.cfg.label_fractions
    stats = _readout_stats(report, mode, metric)
    lines = ["| method | network | init | " + " | ".join(_fraction(f) for f in fractions) + " |",
             "|---|---|---|" + "---|" * len(fractions)]
    for arch in report.cfg.archs:
        for init in (i.name for i in report.cfg.inits):
            start = [stats.get((STARTING_POINT, arch, init, f), NOT_RUN) for f in fractions]
            lines.append(f"| {method_name(STARTING_POINT)} | {report.network(arch)} | {init} | "
                         + " | ".join(_format(s) for s in start) + " |")
            for method in (m for m in report.cfg.methods if is_self_supervised(m)):
                values = []
                for fraction, base in zip(fractions, start, strict=True):
                    pretrained = stats.get((method, arch, init, fraction), NOT_RUN)
                    missing = np.isnan(pretrained[0]) or np.isnan(base[0])
                    delta = "" if missing else f" ({pretrained[0] - base[0]:+.3f})"
                    values.append(_format(pretrained) + delta)
                lines.append(f"| {method_name(method)} | {report.network(arch)} | {init} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def clear_gain(pretrained: Stats, start: Stats) -> bool:
    """Whether a readout is clearly above its starting point: at least two seeds each, and the difference
    of the means larger than either spread over seeds (one seed cannot tell a gain from subset noise)."""
    (mean, std, n), (base_mean, base_std, base_n) = pretrained, start
    return min(n, base_n) >= 2 and mean - base_mean > max(std, base_std)


def readout_verdict(report: Report, mode: str, metric: str = "macro_f1") -> str:
    """The networks whose readout is not clearly above their starting point, by name and label fraction:
    the table's verdict said in words, so that a reader does not take a within-noise difference for a gain."""
    stats = _readout_stats(report, mode, metric)
    unclear = []
    for method in (m for m in report.cfg.methods if is_self_supervised(m)):
        for arch in report.cfg.archs:
            for init in (i.name for i in report.cfg.inits):
                fractions = [f for f in report.cfg.label_fractions if (method, arch, init, f) in stats
                             and not clear_gain(stats[(method, arch, init, f)],
                                                stats.get((STARTING_POINT, arch, init, f), NOT_RUN))]
                if fractions:
                    unclear.append(f"{method_name(method)} {report.network(arch)} from {init} at "
                                   + ", ".join(_fraction(f) for f in fractions))
    if not unclear:
        return "Every pretrained network is clearly above its starting point (by more than either spread over seeds)."
    return ("**Not clearly above the starting point** (difference of the means not larger than the spread over "
            "seeds, or fewer than two seeds): " + "; ".join(unclear) + ".")


def _section_readouts(report: Report) -> str:
    if not report.readouts:
        return "## What pretraining added\n\nNot run (no readouts in this experiment: `readouts: []`)."
    text = ["## What pretraining added",
            "Each pretrained network read out on frozen features, against the same network at its starting point "
            "(its initialisation, before any pretraining), with the same labelled images. Test-split macro-F1, "
            "mean ± std over "
            f"seeds {report.cfg.seeds}; in brackets the difference from the starting point. A method whose "
            "difference is not clearly positive did not learn features this readout can use."]
    for mode in report.cfg.readouts:
        name = READOUT_NAMES[mode].format(k=report.cfg.finetune.knn_k)
        text += [f"### {name[0].upper()}{name[1:]}", readout_table(report, mode), readout_verdict(report, mode)]
    return "\n\n".join(text)


SECTIONS = (_section_overview, _section_readouts, _section_reading_guide, _section_results, _section_fraction_curves,
            _section_pretraining_curves, _section_time, _section_robustness, _section_confusion,
            _section_explanations, _section_reproduce)

_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:4px 8px}
th{background:#f3f3f3}img{max-width:100%}pre{background:#f6f6f6;padding:0.8em;overflow-x:auto}"""


def _html(md_text: str, report_dir: Path) -> str:
    """The Markdown rendered to one HTML page whose figures are embedded as base64 PNGs."""
    body = markdown.markdown(md_text, extensions=["tables", "fenced_code"])

    def embed(match: re.Match[str]) -> str:
        data = base64.b64encode((report_dir / match.group(1)).read_bytes()).decode()
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="(figures/[^"]+\.png)"', embed, body)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>CASS experiment report</title>'
            f"<style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n")


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report/report.md`` (figures beside it) and ``report/report.html`` (self-contained)."""
    report = Report(Path(run_dir))
    if not report.rows:
        raise ConfigError(f"{run_dir}: no finished cell in {RESULTS_JSON} yet; run `cass experiment` first")
    md_text = "\n\n".join(section(report) for section in SECTIONS) + "\n"
    report_dir = report.figures.parent
    md_path, html_path = report_dir / "report.md", report_dir / "report.html"
    atomic_write_text(md_path, md_text)
    atomic_write_text(html_path, _html(md_text, report_dir))
    return md_path, html_path
