"""Fine-tuning and probing with a fraction of the labels (SPEC §1 downstream, §2).

Four modes share data, subsets and metrics: ``full`` (the paper's protocol: a new linear head, the
whole network trained with Adam 3e-4 and cosine decay to 1e-6, early stopping on the selection split's
macro-F1, best model kept), ``linear`` (only the head is trained, the backbone frozen), and the two
readouts of frozen features (:mod:`cass.evaluation.readouts`), whose one setting is chosen on the
selection split: ``knn`` (cosine k-NN, k) and ``logistic`` (L2 logistic regression, C).
``source=scratch`` is the supervised baseline.

A finished run directory is a *model directory*: ``model.safetensors`` (timm weights whose metadata
name the network, classes and input size), ``metrics.json``, ``test_predictions.csv.gz`` (per test image:
target, prediction, probabilities; kept in every mode), ``history.csv``, ``subset.csv`` (the labelled
files used) and ``config.yaml``; its resume state is deleted once it finishes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.optim import param_groups_layer_decay
from torch.optim import Adam
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cass.config import (
    ConfigError,
    FinetuneConfig,
    PretrainConfig,
    load_yaml,
    save_yaml,
)
from cass.data.cache import readable_images
from cass.data.dataset import ImageSet
from cass.data.loaders import image_loader
from cass.data.sources import DataError
from cass.data.splits import three_roles
from cass.data.subsets import label_fraction_indices, save_subset
from cass.data.transforms import cass_augmentation, eval_transform
from cass.evaluation.features import FeatureStore, extract_features
from cass.evaluation.losses import class_weights, create_loss
from cass.evaluation.metrics import ClassificationMetrics, constant_prediction_macro_f1, recording_predictions
from cass.evaluation.predictions import save_predictions
from cass.evaluation.readouts import (
    READOUT_FILES,
    Readout,
    choose_on_selection,
    knn_candidates,
    logistic_candidates,
    readout_scores,
)
from cass.methods.registry import method_class
from cass.models.backbone import backbone_info
from cass.models.factory import Network, create_network, shape_options
from cass.models.weights import load_state_dict_file
from cass.training.fabric import make_fabric
from cass.training.failures import check_finite_loss
from cass.utils.atomic import atomic_write_text
from cass.utils.checkpoint import load_checkpoint, save_checkpoint, save_weights
from cass.utils.rng import rng_state, set_rng_state
from cass.utils.rundir import (
    CHECKPOINT,
    CONFIG,
    HISTORY,
    MODEL,
    PREDICTIONS,
    SCORES,
    MetricsFile,
)
from cass.utils.schedules import cosine_lambda, step_decay_lambda
from cass.utils.version import VERSION

STATE = CHECKPOINT


MODES = ("full", "linear", "knn", "logistic")


@dataclass
class Backbone:
    """Which timm network to build, from what, at which size."""

    name: str
    init: str
    weights: str | None
    img_size: int | None
    role: str
    cnn_stem: str = "timm"
    vit_patch_size: int | None = None


SCHEDULES = ("cosine", "step")
SELECT_METRICS = ("macro_f1", "auroc", "accuracy")
AUGMENTATIONS = {"paper": cass_augmentation, "none": eval_transform}
"""Training-time transforms by name: the paper's single CASS view, or resize only (MedMNIST v2's recipe)."""


def check_recipe(cfg: FinetuneConfig) -> None:
    """Refuse an unknown schedule, selection metric or augmentation by its option, before any data is read."""
    for flag, value, allowed in (("--schedule", cfg.schedule, SCHEDULES),
                                 ("--select-metric", cfg.select_metric, SELECT_METRICS),
                                 ("--augment", cfg.augment, tuple(AUGMENTATIONS))):
        if value not in allowed:
            raise ConfigError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")


def check_source(cfg: FinetuneConfig) -> None:
    """Refuse a ``--from`` that names nothing, before any data is read."""
    if cfg.source not in ("scratch", "imagenet") and not Path(cfg.source).exists():
        raise ConfigError(f"--from {cfg.source}: no such pretraining run directory or weights file "
                          "(or use --from scratch / --from imagenet)")


def resolve_backbone(cfg: FinetuneConfig) -> Backbone:
    """Read a pretraining run's config (or an exported backbone's metadata) so the right network of the right
    method is fine-tuned.

    ``cfg.arch`` None means the run's network when it trained only one (its method says so), else the CNN.
    """
    if cfg.arch is not None and cfg.arch not in ("cnn", "vit"):
        raise ConfigError(f"--arch must be cnn or vit, got {cfg.arch!r}")
    check_source(cfg)
    source = Path(cfg.source)
    if cfg.source not in ("scratch", "imagenet") and source.is_dir():
        run_cfg = source / CONFIG
        if not run_cfg.is_file():
            raise ConfigError(f"--from {source}: not a pretraining run directory (no {CONFIG})")
        pre = load_yaml(PretrainConfig, run_cfg)
        arch = cfg.arch
        if not method_class(pre.method, option=f"--from {source}: method").trains_both_networks:
            if arch is not None and arch != pre.arch:
                raise ConfigError(f"--from {source} is a {pre.method} run of its {pre.arch} only, not a {arch}; "
                                  f"use --arch {pre.arch} (or leave --arch out)")
            arch = pre.arch
        arch = arch or "cnn"
        name = pre.cnn if arch == "cnn" else pre.vit
        return Backbone(name, str(source), None, cfg.img_size or pre.img_size, arch, pre.cnn_stem, pre.vit_patch_size)
    exported = backbone_info(source) if source.is_file() else None
    if exported is not None:  # written by ``cass export``: it names its network, shape and input size
        if cfg.arch not in (None, exported.arch):
            raise ConfigError(f"--from {source} holds a {exported.arch} backbone ({exported.timm_name}), not a "
                              f"{cfg.arch}; leave --arch out")
        return Backbone(exported.timm_name, str(source), None, cfg.img_size or exported.img_size, exported.arch,
                        exported.cnn_stem, exported.patch_size)
    arch = cfg.arch or "cnn"
    name = cfg.cnn if arch == "cnn" else cfg.vit
    return Backbone(name, cfg.source, cfg.weights, cfg.img_size, arch, cfg.cnn_stem, cfg.vit_patch_size)


def build_classifier(backbone: Backbone, num_classes: int) -> Network:
    """The pretrained network with its head replaced by a fresh linear layer to the classes."""
    net = create_network(backbone.name, init=backbone.init, weights=backbone.weights,
                         num_outputs=num_classes, img_size=backbone.img_size, role=backbone.role,
                         **shape_options(backbone.role, backbone.cnn_stem, backbone.vit_patch_size))
    net.reset_head(num_classes)
    return net


def _require_labels(images: ImageSet | None, what: str) -> None:
    if images is None:
        raise ConfigError(f"fine-tuning needs {what} images: give --data with train/ labels (the missing "
                          "splits are carved from it) or with its own val/ and test/ splits")
    if images.targets is None:
        raise DataError(f"{images.source}: the {what} images have no labels (use one sub-folder per class or a CSV)")


def _model_info(cfg: FinetuneConfig, backbone: Backbone, net: Network, images: ImageSet) -> dict[str, str]:
    return {
        "timm_name": backbone.name,
        "arch": backbone.role,
        "classes": json.dumps(images.classes),
        "multilabel": json.dumps(images.multilabel),
        "img_size": str(net.input_size),
        **net.shape_info(),
        "mode": cfg.mode,
        "cass_version": VERSION,
    }


def finetune(cfg: FinetuneConfig, resume: bool = False, feature_store: FeatureStore | None = None) -> Path:
    """Fine-tune or probe one network on ``cfg.label_fraction`` of the train labels; returns the model dir.

    ``feature_store``: where a readout finds the frozen features a previous readout of the same network
    extracted (an experiment's readout cells share one); it changes the time a readout takes, never its result.
    """
    if cfg.mode not in MODES:
        raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    check_recipe(cfg)
    check_source(cfg)
    out = Path(cfg.out)
    if resume and finished(out):
        (out / STATE).unlink(missing_ok=True)  # a run stopped between its scores and this deletion
        print(f"{out} already holds a finished model (test macro-F1 "
              f"{json.loads((out / SCORES).read_text())['macro_f1']:.4f}); nothing to resume", flush=True)
        return out
    if (out / MODEL).exists() and not resume and not (out / STATE).exists():
        raise ConfigError(f"{out} already holds a fine-tuned model; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    fabric = make_fabric(out, cfg.accelerator, cfg.precision)
    fabric.seed_everything(cfg.seed, verbose=False)

    roles = three_roles(cfg.data)
    _require_labels(roles.train, "train")
    _require_labels(roles.selection, "selection (val)")
    _require_labels(roles.test, "test")
    backbone = resolve_backbone(cfg)
    net = build_classifier(backbone, len(roles.train.classes))
    # Decoded once at the network's input size (the cache pretraining at that size built is reused).
    train, selection, test = (readable_images(cfg.data, images, net.input_size)
                              for images in (roles.train, roles.selection, roles.test))
    chosen = label_fraction_indices(train.targets, cfg.label_fraction, cfg.seed)
    save_subset(out / "subset.csv", train.keys, chosen)
    roles.save_held_out(out)
    labelled = train.subset(chosen)
    save_yaml(cfg, out / CONFIG)
    info = _model_info(cfg, backbone, net, train)
    fabric.print(f"{cfg.mode} {backbone.role} {backbone.name} from {backbone.init}: {len(labelled)} labelled images "
                 f"({cfg.label_fraction:.0%}), {len(selection)} selection (val) images, {len(test)} test images, "
                 f"{net.input_size} px")
    if cfg.mode in READOUT_FITS:
        score, chosen_on = READOUT_FITS[cfg.mode](cfg, fabric, net, labelled, selection, out, info, feature_store)
    else:
        chosen_on = _train(cfg, fabric, net, parameter_groups(cfg, backbone, net), labelled, selection, out, info,
                           resume)
        score = _best_model_scorer(cfg, fabric, net, out, labelled)
    with recording_predictions() as recorder:  # per test image, for the paired intervals of an experiment
        reported = score(test)
    save_predictions(out / PREDICTIONS, test.keys, recorder.only())  # before the scores: they mark it finished
    floor = constant_prediction_macro_f1(selection.targets, len(train.classes), train.multilabel)
    metrics = {**reported, "split": "test", "epoch": chosen_on.get("epoch"), "steps": chosen_on.get("steps"),
               **({"readout": chosen_on.pop("readout")} if "readout" in chosen_on else {}),  # k or C, chosen
               **({"converged": chosen_on.pop("converged")} if "converged" in chosen_on else {}),
               "above_constant_prediction": chosen_on["macro_f1"] > floor + CONSTANT_MARGIN,
               "selection": {**chosen_on, "split": "val", "constant_prediction_macro_f1": floor}}
    atomic_write_text(out / SCORES, json.dumps(metrics, indent=2))
    (out / STATE).unlink(missing_ok=True)  # finished: the model and its scores stay, the resume state goes
    if not cfg.save_model:
        for name in (MODEL, *READOUT_FILES.values()):
            (out / name).unlink(missing_ok=True)
    fabric.print(f"test macro-F1 {metrics['macro_f1']:.4f} (selection macro-F1 {chosen_on['macro_f1']:.4f}, "
                 f"best evaluation {metrics.get('epoch') or '-'}); model directory: {out}")
    return out


CONSTANT_MARGIN = 1e-6
"""Selection macro-F1 a chosen model must exceed the best constant prediction by (rounding, not a test)."""


def finished(out: Path) -> bool:
    """Whether ``out`` holds a finished run: its scores are written only at the very end, after its model."""
    return (out / SCORES).is_file()


MIN_STEPS_PER_PASS = 4
"""A labelled subset smaller than ``batch_size`` x this gets smaller batches, never one step per pass."""


def labelled_batch_size(batch_size: int, labelled: int) -> int:
    """``batch_size``, but at most a quarter of the labelled images (so a pass has several steps) and at
    least 2 (BatchNorm needs two images in a training batch)."""
    return max(2, min(batch_size, labelled // MIN_STEPS_PER_PASS))


def passes_per_evaluation(epochs: int, min_steps: int, steps_per_pass: int) -> int:
    """Passes over the labelled images between two evaluations: 1, or more when ``epochs`` passes would
    give fewer than ``min_steps`` optimiser steps (a 1 % subset must still get enough steps to learn)."""
    return max(1, math.ceil(min_steps / (epochs * steps_per_pass)))


def parameter_groups(cfg: FinetuneConfig, backbone: Backbone, net: Network) -> list[dict[str, Any]]:
    """What the optimiser trains, each group with its learning rate: in ``linear`` mode the head alone (the
    rest frozen); a Transformer that starts from pretrained weights by blocks at layer-decayed rates
    (``vit_layer_decay``, timm's groups); anything else in one group at ``lr``."""
    if cfg.mode == "linear":
        for p in net.parameters():
            p.requires_grad_(False)
        head = list(net.model.get_classifier().parameters())
        for p in head:
            p.requires_grad_(True)
        return [{"params": head, "lr": cfg.lr}]
    if backbone.role == "vit" and backbone.init != "scratch" and cfg.vit_layer_decay < 1:
        groups = param_groups_layer_decay(net.model, weight_decay=0.0, layer_decay=cfg.vit_layer_decay)
        return [{"params": g["params"], "lr": cfg.lr * g["lr_scale"]} for g in groups]
    return [{"params": list(net.parameters()), "lr": cfg.lr}]


def _train(cfg: FinetuneConfig, fabric: Any, net: Network, groups: list[dict[str, Any]], labelled: ImageSet,
           selection: ImageSet, out: Path, info: dict[str, str], resume: bool) -> dict[str, Any]:
    """The training loop of ``full`` and ``linear``: ``cfg.epochs`` evaluations on the selection split at most,
    at least ``cfg.min_steps`` optimiser steps in all, warm-up then the schedule, early stopping after
    ``patience`` evaluations without a better selection ``select_metric`` (macro-F1 by default); the best
    evaluation's weights are kept in ``model.safetensors``. The returned record says whether early stopping
    ended the run (``converged``) or the budget did."""
    batch = labelled_batch_size(cfg.batch_size, len(labelled))
    workers = cfg.data.num_workers  # None: automatic for the data path in use
    train_loader = image_loader(labelled, AUGMENTATIONS[cfg.augment](net.input_size), batch, cfg.seed, True, workers)
    val_loader = image_loader(selection, eval_transform(net.input_size), cfg.batch_size, cfg.seed, False, workers)
    passes = passes_per_evaluation(cfg.epochs, cfg.min_steps, len(train_loader))
    total_steps = cfg.epochs * passes * len(train_loader)
    optimizer = Adam(groups, lr=cfg.lr, fused=True)
    warmup = round(cfg.warmup * total_steps)
    scheduler = LambdaLR(optimizer, cosine_lambda(total_steps, cfg.lr, cfg.min_lr, warmup) if cfg.schedule == "cosine"
                         else step_decay_lambda(total_steps, warmup_steps=warmup))
    weights = class_weights(labelled.targets, len(labelled.classes), cfg.class_weights)
    loss_fn = create_loss(cfg.loss, weights, labelled.multilabel)
    metrics = ClassificationMetrics(labelled.classes, labelled.multilabel)

    progress = {"epoch": 0, "step": 0, "best_score": -1.0, "best_epoch": 0, "stale": 0, "stopped": False}
    best: dict[str, Any] = {}
    saved: dict[str, Any] | None = None
    if resume and (out / STATE).exists():
        saved, _ = load_checkpoint(out / STATE)
        net.load_state_dict(saved["net"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        progress, best = {**progress, **saved["progress"]}, json.loads(saved["best"])
    net, optimizer = fabric.setup(net, optimizer)
    loss_fn, metrics = loss_fn.to(fabric.device), metrics.to(fabric.device)
    history = MetricsFile(out / HISTORY, progress["epoch"])
    if saved is not None and "rng" in saved:  # older fine-tuning checkpoints lack it
        set_rng_state(saved["rng"])  # after everything above drew its numbers: the run continues exactly
    fabric.print(f"batch {batch}, {len(train_loader)} steps per pass, {passes} pass(es) per evaluation, "
                 f"{total_steps} steps at most")

    first = cfg.epochs if progress["stopped"] else progress["epoch"]
    for evaluation in range(first, cfg.epochs):
        net.train()
        if cfg.mode == "linear":
            net.eval()  # frozen BatchNorm statistics too
        start = time.perf_counter()
        train_loss = torch.zeros((), device=fabric.device)
        for epoch in range(evaluation * passes, (evaluation + 1) * passes):
            train_loader.sampler.set_epoch(epoch)
            train_loader.dataset.set_epoch(epoch)
            for images, targets, _ in tqdm(train_loader, desc=f"fine-tune {evaluation + 1}/{cfg.epochs}", leave=False):
                images, targets = fabric.to_device((images, targets))
                optimizer.zero_grad(set_to_none=True)
                _, logits = net(images)
                loss = loss_fn(logits, targets)
                fabric.backward(loss)
                optimizer.step()
                scheduler.step()
                train_loss += loss.detach()
                progress["step"] += 1
        mean_train = float(train_loss) / (passes * len(train_loader))
        # Before this evaluation's model, history or checkpoint is written: the last good one stays on disk.
        check_finite_loss(mean_train, evaluation + 1, out / STATE, progress["epoch"],
                          advice=f"lower --lr (was {cfg.lr:g}) or check the data",
                          resume=f"rerun the same command with --resume (--out {out})")
        val_loss, scores = _validate(net, val_loader, loss_fn, metrics, fabric.device)
        progress["epoch"] = evaluation + 1
        value = scores.get(cfg.select_metric)  # AUROC is None on a selection split with one class
        score = float("-inf") if value is None else value
        improved = score > progress["best_score"] or progress["best_epoch"] == 0
        if improved:
            progress.update(best_score=score, best_epoch=evaluation + 1, stale=0)
            best = {**scores, "epoch": evaluation + 1, "steps": progress["step"], "val_loss": val_loss}
            save_weights(out / MODEL, net.model.state_dict(), info)
        else:
            progress["stale"] += 1
        history.append({"epoch": evaluation + 1, "step": progress["step"], "train_loss": mean_train,
                        "val_loss": val_loss, "lr": max(scheduler.get_last_lr()),  # the head's (layer decay lowers the others)
                        "epoch_time_s": time.perf_counter() - start,
                        **{k: scores[k] for k in ("macro_f1", "micro_f1", "macro_recall", "balanced_accuracy", "auroc")
                           if k in scores}})
        fabric.print(f"evaluation {evaluation + 1}/{cfg.epochs} (step {progress['step']})  train loss {mean_train:.4f}  "
                     f"val loss {val_loss:.4f}  val macro-F1 {scores['macro_f1']:.4f}"
                     + ("" if cfg.select_metric == "macro_f1" else f"  val {cfg.select_metric} {score:.4f}")
                     + ("  (best)" if improved else ""))
        progress["stopped"] = stop = progress["stale"] >= cfg.patience
        save_checkpoint(out / STATE, {"net": net.state_dict(), "optimizer": optimizer.state_dict(),
                                      "scheduler": scheduler.state_dict(), "progress": progress,
                                      "best": json.dumps(best), "rng": rng_state()},
                        {"config": (out / CONFIG).read_text()})
        if stop:
            fabric.print(f"early stop: no better validation {cfg.select_metric} for {cfg.patience} evaluations")
            break
    if not progress["stopped"]:
        fabric.print(f"not converged: validation {cfg.select_metric} was still improving within the last "
                     f"{cfg.patience} of the {cfg.epochs} evaluations (raise --epochs)")
    return {**best, "converged": bool(progress["stopped"])}


def _best_model_scorer(cfg: FinetuneConfig, fabric: Any, net: Network, out: Path,
                       labelled: ImageSet) -> Callable[[ImageSet], dict[str, Any]]:
    """Scores of the kept (best-evaluation) weights on any labelled image set, without augmentation."""
    net.model.load_state_dict(load_state_dict_file(out / MODEL))
    weights = class_weights(labelled.targets, len(labelled.classes), cfg.class_weights)
    loss_fn = create_loss(cfg.loss, weights, labelled.multilabel).to(fabric.device)
    metrics = ClassificationMetrics(labelled.classes, labelled.multilabel).to(fabric.device)

    def score(images: ImageSet) -> dict[str, Any]:
        loader = image_loader(images, eval_transform(net.input_size), cfg.batch_size, cfg.seed, False,
                              cfg.data.num_workers)
        loss, scores = _validate(net.to(fabric.device), loader, loss_fn, metrics, fabric.device)
        return {**scores, "loss": loss}

    return score


@torch.no_grad()
def _validate(net: Any, loader: DataLoader, loss_fn: Any, metrics: ClassificationMetrics,
              device: torch.device) -> tuple[float, dict[str, Any]]:
    """Validation loss averaged over validation images (not over the training loader) and metrics."""
    net.eval()
    total, count = 0.0, 0
    for images, targets, _ in loader:
        images, targets = images.to(device), targets.to(device)
        _, logits = net(images)
        total += float(loss_fn(logits.float(), targets)) * len(targets)
        count += len(targets)
        metrics.update(logits.float(), targets)
    return total / count, metrics.compute()


Scorer = Callable[[ImageSet], dict[str, Any]]


def _knn(cfg: FinetuneConfig, fabric: Any, net: Network, labelled: ImageSet, selection: ImageSet, out: Path,
         info: dict[str, str], store: FeatureStore | None) -> tuple[Scorer, dict[str, Any]]:
    """Cosine k-NN on frozen features, k chosen on the selection split from ``knn_ks`` (or ``knn_k``)."""
    if labelled.multilabel:
        raise ConfigError("--mode knn supports single-label classes only; use --mode logistic for multi-label data")
    ks = cfg.knn_ks if cfg.knn_k is None else [cfg.knn_k]
    if not ks:
        raise ConfigError("--knn-ks (knn_ks) lists no k: give at least one, or a fixed --knn-k")
    return _readout(cfg, fabric, net, labelled, selection, out, info, store, "k",
                    lambda bank: knn_candidates(bank, labelled.targets, ks, len(labelled.classes)))


def _logistic(cfg: FinetuneConfig, fabric: Any, net: Network, labelled: ImageSet, selection: ImageSet, out: Path,
              info: dict[str, str], store: FeatureStore | None) -> tuple[Scorer, dict[str, Any]]:
    """L2 logistic regression on frozen, standardised features (one-vs-rest for multi-label data), C chosen
    on the selection split from ``logistic_cs``."""
    if not cfg.logistic_cs:
        raise ConfigError("--logistic-cs (logistic_cs) lists no C: give at least one")
    return _readout(cfg, fabric, net, labelled, selection, out, info, store, "c",
                    lambda bank: logistic_candidates(bank, labelled.targets, cfg.logistic_cs,
                                                     len(labelled.classes), labelled.multilabel))


READOUT_FITS = {"knn": _knn, "logistic": _logistic}
"""How each frozen-feature readout mode is fitted, by ``mode`` (its saved file: ``READOUT_FILES``)."""


def _readout(cfg: FinetuneConfig, fabric: Any, net: Network, labelled: ImageSet, selection: ImageSet, out: Path,
             info: dict[str, str], store: FeatureStore | None, setting: str,
             candidates: Callable[[np.ndarray], Iterable[tuple[float, Readout]]]) -> tuple[Scorer, dict[str, Any]]:
    """Fit every candidate of the grid on the labelled images' features, keep the best on the selection
    split's (each extracted once), save it beside the network (so the model directory predicts) and return
    what scores an image set with it, with the chosen candidate's selection scores and ``readout`` record."""
    extract = extract_features if store is None else store.features

    def features(images: ImageSet) -> np.ndarray:
        return extract(net, images, net.input_size, cfg.batch_size, fabric.device, cfg.data.num_workers)

    choice = choose_on_selection(candidates(features(labelled)), features(selection), selection.targets,
                                 selection.classes, selection.multilabel)
    save_weights(out / MODEL, net.model.state_dict(), info)
    choice.readout.save(out / READOUT_FILES[cfg.mode])
    fabric.print(f"{cfg.mode} readout: {setting} = {choice.value:g}, chosen on the selection split "
                 f"(macro-F1 {choice.scores['macro_f1']:.4f})")

    def score(images: ImageSet) -> dict[str, Any]:
        return readout_scores(choice.readout, features(images), images.targets, images.classes, images.multilabel)

    return score, {**choice.scores, "readout": choice.record(setting)}
