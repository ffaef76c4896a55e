"""The pretraining loop: epochs of :class:`~cass.training.step.Stepper` steps, learning diagnostics,
metrics, and checkpoints that make every run resumable exactly.

Speed (SPEC §4): on CUDA the networks are channels-last with fused optimisers and bf16 autocast, and
nothing in the step waits for the device; ``compile`` and ``cuda_graphs`` add ``torch.compile`` and
CUDA-graph replay.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from torch.optim.swa_utils import update_bn
from tqdm.auto import tqdm

from cass.config import ConfigError, PretrainConfig, load_yaml, merge, save_yaml
from cass.evaluation.diagnostics import DIAGNOSTIC_SUFFIXES, CollapseMonitor
from cass.evaluation.online import OnlineChecks
from cass.methods.base import PretrainMethod, Progress
from cass.methods.registry import create_method
from cass.training.fabric import (
    compile_networks,
    make_fabric,
    peak_memory_mb,
    prepare_model,
)
from cass.training.failures import check_finite_loss
from cass.training.pretrain_data import TrainData, build_train_data
from cass.training.step import LossDisplay, Stepper
from cass.training.swa import SWA
from cass.utils.atomic import atomic_write_text
from cass.utils.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    save_weights,
)
from cass.utils.rng import rng_state, set_rng_state
from cass.utils.rundir import CHECKPOINT, CONFIG, METRICS, START, MetricsFile, numeric_rows, snapshot_dir
from cass.utils.version import VERSION

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything besides weights that a resumed run needs."""

    epoch: int = 0
    step: int = 0


def load_run_config(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> PretrainConfig:
    """The saved config of a run, with overrides (e.g. more epochs) applied; for ``--resume``."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no {CONFIG} there (is it a cass run directory?)")
    cfg = merge(load_yaml(PretrainConfig, path), overrides or {})
    cfg.out = str(run_dir)
    return cfg


def pretrain(cfg: PretrainConfig, resume: bool = False) -> Path:
    """Self-supervised pretraining; returns the run directory.

    The run directory holds ``config.yaml`` (resolved), ``checkpoint.safetensors`` (full state, written
    after every epoch), ``<role>.safetensors`` (plain timm weights of each exported network), ``sources.json``
    (each source's images and fingerprint), ``held_out.csv`` (the images carved from train, never seen),
    ``metrics.csv`` (loss, lr, collapse diagnostics, backbone checks, time, img/s, peak memory per epoch),
    ``start.csv`` (the backbone checks before the first step) and ``tensorboard/``. With ``resume=True`` it
    continues from the checkpoint in ``cfg.out``.
    """
    run_dir = Path(cfg.out)
    checkpoint_path = run_dir / CHECKPOINT
    if not resume and checkpoint_path.exists():
        raise ConfigError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out")
    if resume and not checkpoint_path.exists():
        # Killed before its first epoch ended: nothing to restore, so the saved config starts over.
        log.warning("--resume %s: no %s yet (the first epoch never finished); starting from epoch 1",
                    run_dir, CHECKPOINT)
        resume = False
    run_dir.mkdir(parents=True, exist_ok=True)

    if cfg.on_nonfinite_loss not in ("stop", "skip"):
        raise ConfigError(f"on_nonfinite_loss must be stop or skip, got {cfg.on_nonfinite_loss!r}")
    if beyond := [e for e in cfg.keep_epochs if e > cfg.epochs]:
        raise ConfigError(f"--keep-epochs {beyond}: beyond the run's {cfg.epochs} epochs (--epochs)")
    fabric = make_fabric(run_dir, cfg.accelerator, cfg.precision, cfg.devices, cfg.num_nodes)
    fabric.seed_everything(cfg.seed, verbose=False)
    method = create_method(cfg)
    data = build_train_data(cfg, method, fabric)
    fabric.print(data.describe(cfg.balance_sources))
    if fabric.is_global_zero:
        data.save(run_dir, cfg.balance_sources)  # its sources, and what it never sees: test and selection images
    sampler = data.loader.sampler
    steps_per_epoch = len(data.loader)

    model = prepare_model(cfg, method, fabric)
    optimizers, schedulers = method.configure_optimizers(steps_per_epoch * cfg.epochs)
    swa = SWA(method.networks(), int(cfg.swa_start * cfg.epochs)) if cfg.swa else None
    compile_networks(cfg, method)

    state = TrainState()
    if resume:
        state = _restore(checkpoint_path, cfg, method, optimizers, schedulers, swa)
        fabric.print(f"resumed {run_dir} at epoch {state.epoch}/{cfg.epochs}")
    if fabric.is_global_zero:
        save_yaml(cfg, run_dir / CONFIG)

    step = Stepper.for_config(cfg, fabric, model, method, optimizers, schedulers)
    # Not fabric.setup_dataloaders: its wrapper calls sampler.set_epoch with its own counter, which
    # restarts at 0 after a resume and would replay the first epoch's order.
    metrics = MetricsFile(run_dir / METRICS, state.epoch) if fabric.is_global_zero else None
    start_row = MetricsFile(run_dir / START, 0 if resume else -1) if fabric.is_global_zero else None
    checks = _online_checks(cfg, data, method) if fabric.is_global_zero else None
    if checks is not None and not resume:
        start_row.append(_start_row(fabric, cfg, checks, method))
    monitor = CollapseMonitor(cfg.diagnostics_samples)
    show_loss = LossDisplay(fabric.device)

    for epoch in range(state.epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        data.dataset.set_epoch(epoch)
        if fabric.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(fabric.device)
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=fabric.device)
        stat_sums: dict[str, torch.Tensor] = {}
        skipped = 0
        bar = tqdm(data.loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not fabric.is_global_zero,
                   leave=False, file=sys.stdout, dynamic_ncols=True)
        for i, (views, _targets, _index) in enumerate(bar):
            progress = Progress(epoch=epoch, step=state.step, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs)
            out = step(data.augment(fabric.to_device(views)), progress)
            if out is None:
                skipped += 1
                continue
            state.step += 1
            loss_sum += out.loss.detach()
            for key, value in out.stats.items():
                stat_sums[key] = stat_sums.get(key, 0) + value.detach().float()
            monitor.update(out.outputs, out.features)
            if (i + 1) % 10 == 0 or i + 1 == steps_per_epoch:
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=show_loss(out.loss), img_s=f"{(i + 1) * cfg.batch_size / elapsed:.1f}")
        bar.close()
        epoch_time = time.perf_counter() - start
        done = steps_per_epoch - skipped
        mean_loss = float(fabric.all_reduce(loss_sum / max(done, 1), reduce_op="mean")) if done else math.nan
        check_finite_loss(mean_loss, epoch + 1, run_dir / CHECKPOINT, state.epoch,
                          advice="lower --lr or check the data (or set on_nonfinite_loss: skip to drop such steps)",
                          resume=f"--resume {run_dir}")
        state.epoch = epoch + 1
        if swa is not None:
            swa.update(method.networks(), state.epoch)
        row = {
            "epoch": state.epoch,
            "step": state.step,
            "loss": mean_loss,
            "skipped_steps": skipped,
            "lr": schedulers[0].get_last_lr()[0],
            **monitor.compute(),
            **{key: float(fabric.all_reduce(total / max(done, 1), reduce_op="mean")) for key, total in stat_sums.items()},
            "epoch_time_s": epoch_time,
            "images_per_s": steps_per_epoch * cfg.batch_size / epoch_time,
            "device_time_s": epoch_time * fabric.world_size,
            "peak_memory_mb": peak_memory_mb(fabric.device),
        }
        warnings = []
        if checks is not None:  # process 0 only: the others wait at the barrier below
            row.update(_measure(fabric, cfg, checks, method, state.epoch))
            history = numeric_rows(start_row.rows + metrics.rows) + [row]
            warnings = type(method).learning_warnings(history, cfg)
        fabric.log_dict({k: v for k, v in row.items() if k != "epoch"}, step=state.epoch)
        _report_epoch(fabric, row, cfg, warnings, list(stat_sums))
        if state.epoch == cfg.epochs and swa is not None:
            for averaged in swa.models.values():
                update_bn((data.augment(fabric.to_device(views)) for views, _, _ in data.loader), averaged)
        if fabric.is_global_zero:
            metrics.append(row)
            _save(run_dir, cfg, method, optimizers, schedulers, swa, state)
        fabric.barrier()
    return run_dir


def _online_checks(cfg: PretrainConfig, data: TrainData, method: PretrainMethod) -> OnlineChecks:
    """The run's fixed images: ``diagnostics_samples`` train images (the k-NN bank) and, with labels, up to
    :data:`~cass.evaluation.online.SELECTION_IMAGES` selection images, both chosen by the run's seed. With
    several sources, the first source's: a k-NN needs one set of classes."""
    return OnlineChecks.sample(data.roles.train, data.roles.selection, cfg.diagnostics_samples, method.img_size,
                               cfg.seed, cfg.batch_size, cfg.data.skip_bad_images)


def _measure(fabric: Fabric, cfg: PretrainConfig, checks: OnlineChecks, method: PretrainMethod,
             epoch: int) -> dict[str, float]:
    """The backbone checks of the exported networks after ``epoch`` epochs (0: the start), under the run's
    precision; the k-NN at the start, every ``knn_every`` epochs and at the last epoch.

    With SWA these are the trained networks, not their running average (whose BatchNorm statistics are only
    recomputed at the end).
    """
    knn = cfg.knn_every > 0 and (epoch % cfg.knn_every == 0 or epoch == cfg.epochs)
    with fabric.autocast():
        return checks.measure(method.networks(), fabric.device, knn)


def _start_row(fabric: Fabric, cfg: PretrainConfig, checks: OnlineChecks, method: PretrainMethod) -> dict[str, Any]:
    """Epoch 0 of the backbone and k-NN curves: the networks as initialised, before any step."""
    row = {"epoch": 0, **_measure(fabric, cfg, checks, method, 0)}
    fabric.log_dict({k: v for k, v in row.items() if k != "epoch"}, step=0)
    fabric.print("  ".join([f"epoch 0/{cfg.epochs} (start)", *_diagnostics_text(row, [])]))
    return row


def _diagnostics_text(row: dict[str, Any], stats: list[str]) -> list[str]:
    """``key value`` for every learning diagnostic of a row and the method's own statistics ``stats``."""
    return [f"{key} {value:.3f}" for key, value in row.items() if key.endswith(DIAGNOSTIC_SUFFIXES) or key in stats]


def _report_epoch(fabric: Fabric, row: dict[str, Any], cfg: PretrainConfig, warnings: list[str],
                  stats: list[str]) -> None:
    """One console line per epoch with the learning diagnostics, then the method's warnings."""
    parts = [f"epoch {row['epoch']}/{cfg.epochs}", f"loss {row['loss']:.4f}", f"lr {row['lr']:.2e}"]
    parts += _diagnostics_text(row, stats)
    parts.append(f"{row['images_per_s']:.1f} img/s")
    fabric.print("  ".join(parts))
    for warning in warnings:
        log.warning(warning)
        fabric.print(f"WARNING: {warning}")


def _save(
    run_dir: Path,
    cfg: PretrainConfig,
    method: PretrainMethod,
    optimizers: list[torch.optim.Optimizer],
    schedulers: list[Any],
    swa: SWA | None,
    state: TrainState,
) -> None:
    """The plain per-network weights (SWA-averaged once SWA ran), then the full checkpoint.

    The checkpoint is the commit point: a run killed before it is written redoes the epoch and
    rewrites the same weights; written last, it never describes weights that are not yet on disk.
    """
    info = {"cass_version": VERSION, "config": (run_dir / CONFIG).read_text(), "method": cfg.method}
    full = {
        "method": method.state_dict(),
        "extra": method.extra_state(),
        "optimizers": [opt.state_dict() for opt in optimizers],
        "schedulers": [sched.state_dict() for sched in schedulers],
        "swa": swa.state_dict() if swa else None,
        "train": {"epoch": state.epoch, "step": state.step},
        "rng": rng_state(),
    }
    use_swa = swa is not None and state.epoch > swa.start_epoch
    kept = [run_dir, *([snapshot_dir(run_dir, state.epoch)] if state.epoch in cfg.keep_epochs else [])]
    for folder in kept[1:]:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / CONFIG, info["config"])
    for role, net in method.networks().items():
        weights = swa.models[role].module if use_swa else net
        for folder in kept:
            save_weights(
                folder / f"{role}.safetensors",
                weights.model.state_dict(),
                {**info, **net.shape_info(), "role": role, "timm_name": net.name, "epoch": str(state.epoch),
                 "swa": str(use_swa)},
            )
    save_checkpoint(run_dir / CHECKPOINT, full, info)


def _match_parameter_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give restored state tensors their parameter's strides (channels-last weights on CUDA).

    Checkpoints hold contiguous tensors, while fused and foreach optimiser kernels walk a parameter and
    its state as the same flat memory.
    """
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _restore(
    path: Path,
    cfg: PretrainConfig,
    method: PretrainMethod,
    optimizers: list[torch.optim.Optimizer],
    schedulers: list[Any],
    swa: SWA | None,
) -> TrainState:
    saved, info = load_checkpoint(path)
    if info.get("method") != cfg.method:
        raise CheckpointError(f"{path} was written by method {info.get('method')!r}, not {cfg.method!r}")
    method.load_state_dict(saved["method"])
    method.load_extra_state(saved["extra"])
    for opt, opt_state in zip(optimizers, saved["optimizers"], strict=True):
        opt.load_state_dict(opt_state)
        _match_parameter_layout(opt)
    for sched, sched_state in zip(schedulers, saved["schedulers"], strict=True):
        sched.load_state_dict(sched_state)
    if swa is not None and saved["swa"] is not None:
        swa.load_state_dict(saved["swa"])
    set_rng_state(saved["rng"])
    train = saved["train"]
    if train["epoch"] >= cfg.epochs:
        log.warning("%s already finished %d of %d epochs; nothing to do", path, train["epoch"], cfg.epochs)
    return TrainState(epoch=train["epoch"], step=train["step"])
