"""The pretraining engine, on Lightning Fabric.

Fabric (rather than the Trainer) because every method here needs its own loop details (two optimisers
for CASS, an EMA teacher and per-step weight-decay for DINO) and because checkpoints must be
safetensors written atomically, not the Trainer's pickled dicts. Fabric still gives us devices,
precision, DDP over ``--devices``/``--num-nodes`` (torchrun and SLURM environments are detected) and
loggers, without a home-made launcher.

Determinism: the order of images depends only on (seed, epoch) and each image's augmentation on
(seed, epoch, index), so a resumed run, a run with more workers and a DDP run with the same global batch
all see the same data.

Speed (SPEC §4): by default the images are decoded once into a memory-mapped uint8 cache and augmented
in batches on the device (:mod:`cass.data.cache`, :mod:`cass.data.device_augment`; ``data.path``);
on CUDA the networks are channels-last with fused optimisers and bf16 autocast, and nothing in the
step waits for the device (the progress bar shows a loss copied without blocking). ``compile`` and
``cuda_graphs`` add ``torch.compile`` and CUDA-graph replay. :class:`Stepper` is the one training step,
shared with ``cass bench``.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import random
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import TensorBoardLogger
from torch.optim.swa_utils import AveragedModel, update_bn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

import cass
from cass.config import ConfigError, PretrainConfig, load_yaml, merge, save_yaml
from cass.data.cache import open_cache, wants_cache
from cass.data.dataset import ImageDataset, ImageSet
from cass.data.device_augment import DeviceAugment, UnsupportedAugmentation
from cass.data.sources import load_splits
from cass.methods.base import PretrainMethod, Progress, StepOutput
from cass.methods.registry import create_method
from cass.models.factory import Network
from cass.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, save_weights
from cass.training.diagnostics import CollapseMonitor, collapse_warnings

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
CONFIG = "config.yaml"
METRICS = "metrics.csv"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainState:
    """Everything besides weights that a resumed run needs."""

    epoch: int = 0
    step: int = 0


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto`` means bf16 autocast on a GPU and fp32 elsewhere."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu else "32-true"


def make_fabric(
    run_dir: Path | None, accelerator: str, precision: str, devices: int = 1, num_nodes: int = 1
) -> Fabric:
    """A launched Fabric (DDP when several processes), logging to TensorBoard in the run directory if any."""
    fabric = Fabric(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy="ddp" if devices * num_nodes > 1 else "auto",
        precision=resolve_precision(precision, accelerator),
        loggers=[TensorBoardLogger(root_dir=str(run_dir), name="tensorboard", version="")] if run_dir else [],
    )
    fabric.launch()
    return fabric


def make_loader(dataset: ImageDataset, cfg: PretrainConfig, fabric: Fabric) -> DataLoader:
    """Shuffled by (seed, epoch) identically for any world size: rank r takes every r-th image."""
    world = fabric.world_size
    if cfg.batch_size % world:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    per_process = cfg.batch_size // world
    if len(dataset) < cfg.batch_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the {len(dataset)} training images")
    sampler = DistributedSampler(
        dataset, num_replicas=world, rank=fabric.global_rank, shuffle=True, seed=cfg.seed, drop_last=True
    )
    return DataLoader(
        dataset,
        batch_size=per_process,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=cfg.data.num_workers > 0,  # no worker start-up per epoch; the epoch is shared memory
    )


def _as_loaded(views: Any) -> Any:
    return views


@dataclass
class TrainData:
    """The training images as batches, and what turns a batch on the device into the method's views."""

    dataset: ImageDataset
    loader: DataLoader
    augment: Callable[[Any], Any]
    """Applied after the batch reaches the device: the batched augmentation of the cache path, else nothing."""
    path: str
    """``cache`` or ``pil``: the data path in use."""


def build_train_data(cfg: PretrainConfig, method: PretrainMethod, fabric: Fabric) -> TrainData:
    """The training split through the data path ``cfg.data.path`` chooses (the same in every process)."""
    splits = load_splits(cfg.data.data, cfg.data.val_data, max_pixels=cfg.data.max_image_pixels)
    augment = _device_augment(cfg, method, splits.train)
    if fabric.broadcast(augment is not None):  # free disk space may differ between nodes; rank 0 decides
        augment = augment or DeviceAugment(method.train_transform(), method.img_size)
        cache = open_cache(
            splits.train, method.img_size, cfg.data.cache_dir, cfg.data.skip_bad_images, cfg.data.num_workers
        )
        dataset = ImageDataset(cache.images, augment.host, seed=cfg.seed)
        return TrainData(dataset, make_loader(dataset, cfg, fabric), augment, "cache")
    train_images = splits.train.check(skip_bad=cfg.data.skip_bad_images)
    dataset = ImageDataset(train_images, method.train_transform(), seed=cfg.seed)
    return TrainData(dataset, make_loader(dataset, cfg, fabric), _as_loaded, "pil")


def _device_augment(cfg: PretrainConfig, method: PretrainMethod, images: ImageSet) -> DeviceAugment | None:
    """The method's augmentation for the cache path, or None for the PIL path (``auto`` logs why)."""
    if not wants_cache(cfg.data, images, method.img_size):
        return None
    try:
        return DeviceAugment(method.train_transform(), method.img_size)
    except UnsupportedAugmentation as err:
        if cfg.data.path == "cache":
            raise ConfigError(f"data.path cache: {err}") from err
        log.info("data.path auto: using the PIL path (%s)", err)
        return None


def prepare_model(cfg: PretrainConfig, method: PretrainMethod, fabric: Fabric) -> Any:
    """The method on its device (DDP-wrapped when several processes), before its optimisers are made.

    Optimisers come after so that they see where the parameters live (fused kernels on CUDA).
    """
    on_cuda = fabric.device.type == "cuda"
    if cfg.cuda_graphs and not on_cuda:
        raise ConfigError(f"cuda_graphs needs a CUDA device; this run is on {fabric.device.type}")
    if fabric.world_size > 1 and on_cuda:
        # Batch statistics over the global batch, as on one device (PyTorch's SyncBatchNorm is GPU-only;
        # on CPU processes BatchNorm sees the per-process batch).
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    if cfg.channels_last and on_cuda:
        method.to(memory_format=torch.channels_last)
    return fabric.setup_module(method)


def compile_networks(cfg: PretrainConfig, method: PretrainMethod) -> None:
    """``torch.compile`` every network in place (state-dict names unchanged), if ``compile``/``cuda_graphs`` ask.

    Runs after SWA has copied the networks: a copy of a compiled module would still call the original.
    """
    if cfg.compile or cfg.cuda_graphs:
        for module in method.modules():
            if isinstance(module, Network):
                module.compile(mode="reduce-overhead" if cfg.cuda_graphs else None)


@dataclass
class Stepper:
    """One optimiser step of a prepared method: what the epoch loop and ``cass bench`` both run.

    Nothing here waits for the device, except the opt-in ``skip_nonfinite`` check.
    """

    fabric: Fabric
    model: Any
    """The Fabric-wrapped method (from :func:`prepare_model`)."""
    method: PretrainMethod
    optimizers: list[Any]
    schedulers: list[Any]
    channels_last: bool = False
    cuda_graphs: bool = False
    skip_nonfinite: bool = False

    @classmethod
    def for_config(cls, cfg: PretrainConfig, fabric: Fabric, model: Any, method: PretrainMethod,
                   optimizers: list[Any], schedulers: list[Any]) -> Stepper:
        """The step of a run: ``optimizers`` are the method's own, set up with Fabric here."""
        wrapped = fabric.setup_optimizers(*optimizers)
        wrapped = list(wrapped) if isinstance(wrapped, (list, tuple)) else [wrapped]
        on_cuda = fabric.device.type == "cuda"
        return cls(fabric, model, method, wrapped, schedulers, channels_last=cfg.channels_last and on_cuda,
                   cuda_graphs=cfg.cuda_graphs, skip_nonfinite=cfg.on_nonfinite_loss == "skip")

    def __call__(self, views: Any, progress: Progress) -> StepOutput | None:
        """Train on one batch of views (on the device); None when a non-finite loss was skipped."""
        if self.channels_last:
            views = _channels_last(views)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = self.model(views, progress)
        if self.skip_nonfinite:  # a host sync per step, only in this opt-in mode; all processes agree
            bad = self.fabric.all_reduce((~torch.isfinite(out.loss.detach())).float(), reduce_op="sum")
            if bad > 0:
                return None
        self.fabric.backward(out.loss)
        self.method.before_optimizer_step(progress)
        for opt in self.optimizers:
            opt.step()
        for sched in self.schedulers:
            sched.step()
        self.method.after_optimizer_step(progress)
        if self.cuda_graphs:  # graph outputs are overwritten by the next replay; the diagnostics keep some
            out = dataclasses.replace(
                out,
                outputs={k: v.clone() for k, v in out.outputs.items()},
                features={k: v.clone() for k, v in out.features.items()},
            )
        return out


def _channels_last(views: Any) -> Any:
    if isinstance(views, (list, tuple)):
        return [_channels_last(v) for v in views]
    return views.contiguous(memory_format=torch.channels_last)


class LossDisplay:
    """The loss for the progress bar, read without waiting for the device.

    On CUDA each refresh starts a non-blocking copy and shows the last copy that has landed (a few
    steps old); elsewhere reading it costs nothing extra.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.text = "..."
        self._pending: tuple[torch.Tensor, torch.cuda.Event] | None = None

    def __call__(self, loss: torch.Tensor) -> str:
        if self.device.type != "cuda":
            return f"{loss.item():.4f}"
        if self._pending is not None and self._pending[1].query():
            self.text = f"{float(self._pending[0]):.4f}"
        host = torch.empty((), dtype=loss.dtype, pin_memory=True)
        host.copy_(loss.detach(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending = (host, event)
        return self.text


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory allocated on a CUDA device since its last reset; elsewhere the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsFile:
    """One CSV row per epoch; a resumed run drops rows past its checkpoint so the file stays true."""

    def __init__(self, path: Path, resume_epoch: int) -> None:
        self.path = path
        rows = self.read(path) if path.exists() else []
        self.rows = [r for r in rows if int(r["epoch"]) <= resume_epoch]

    @staticmethod
    def read(path: Path) -> list[dict[str, str]]:
        with open(path, newline="") as fh:
            return list(csv.DictReader(fh))

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append({k: str(v) for k, v in row.items()})
        fields = list(dict.fromkeys(k for r in self.rows for k in r))
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.path)


class SWA:
    """Stochastic weight averaging of every exported network (off by default, SPEC §1)."""

    def __init__(self, networks: dict[str, torch.nn.Module], start_epoch: int) -> None:
        self.start_epoch = start_epoch
        self.models = {role: AveragedModel(net) for role, net in networks.items()}

    def update(self, networks: dict[str, torch.nn.Module], finished_epoch: int) -> None:
        if finished_epoch > self.start_epoch:
            for role, net in networks.items():
                self.models[role].update_parameters(net)

    def state_dict(self) -> dict[str, Any]:
        return {role: model.state_dict() for role, model in self.models.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for role, model in self.models.items():
            model.load_state_dict(state[role])


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
    after every epoch), ``<role>.safetensors`` (plain timm weights of each exported network),
    ``metrics.csv`` (loss, lr, collapse diagnostics, time, img/s, peak memory per epoch) and
    ``tensorboard/``. With ``resume=True`` it continues from the checkpoint in ``cfg.out``.
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
    fabric = make_fabric(run_dir, cfg.accelerator, cfg.precision, cfg.devices, cfg.num_nodes)
    fabric.seed_everything(cfg.seed, verbose=False)
    method = create_method(cfg)
    if cfg.swa and method.views_per_image > 1:
        raise ConfigError(f"--swa is supported for single-view methods (cass), not {cfg.method}")
    data = build_train_data(cfg, method, fabric)
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
    monitor = CollapseMonitor(cfg.diagnostics_samples)
    show_loss = LossDisplay(fabric.device)

    for epoch in range(state.epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        data.dataset.set_epoch(epoch)
        if fabric.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(fabric.device)
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=fabric.device)
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
            monitor.update(out.outputs, out.features)
            if (i + 1) % 10 == 0 or i + 1 == steps_per_epoch:
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=show_loss(out.loss), img_s=f"{(i + 1) * cfg.batch_size / elapsed:.1f}")
        bar.close()
        epoch_time = time.perf_counter() - start
        done = steps_per_epoch - skipped
        mean_loss = float(fabric.all_reduce(loss_sum / max(done, 1), reduce_op="mean")) if done else math.nan
        if not math.isfinite(mean_loss):
            raise NonFiniteLossError(
                f"loss became {mean_loss} in epoch {epoch + 1}; stopped. {run_dir / CHECKPOINT} still holds the "
                f"last good epoch ({state.epoch}); lower --lr or check the data, then --resume {run_dir} "
                "(or set on_nonfinite_loss: skip to drop such steps)"
            )
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
            "epoch_time_s": epoch_time,
            "images_per_s": steps_per_epoch * cfg.batch_size / epoch_time,
            "device_time_s": epoch_time * fabric.world_size,
            "peak_memory_mb": peak_memory_mb(fabric.device),
        }
        fabric.log_dict({k: v for k, v in row.items() if k != "epoch"}, step=state.epoch)
        _report_epoch(fabric, row, cfg)
        if state.epoch == cfg.epochs and swa is not None:
            for averaged in swa.models.values():
                update_bn((data.augment(fabric.to_device(views)) for views, _, _ in data.loader), averaged)
        if fabric.is_global_zero:
            metrics.append(row)
            _save(run_dir, cfg, method, optimizers, schedulers, swa, state)
        fabric.barrier()
    return run_dir


def _report_epoch(fabric: Fabric, row: dict[str, Any], cfg: PretrainConfig) -> None:
    parts = [f"epoch {row['epoch']}/{cfg.epochs}", f"loss {row['loss']:.4f}", f"lr {row['lr']:.2e}"]
    for key, value in row.items():
        if key.endswith("_output_std") or key.endswith("_effective_rank"):
            parts.append(f"{key} {value:.3f}")
    parts.append(f"{row['images_per_s']:.1f} img/s")
    fabric.print("  ".join(parts))
    for warning in collapse_warnings(row, cfg.collapse_threshold):
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
    info = {"cass_version": cass.__version__, "config": (run_dir / CONFIG).read_text(), "method": cfg.method}
    full = {
        "method": method.state_dict(),
        "extra": method.extra_state(),
        "optimizers": [opt.state_dict() for opt in optimizers],
        "schedulers": [sched.state_dict() for sched in schedulers],
        "swa": swa.state_dict() if swa else None,
        "train": {"epoch": state.epoch, "step": state.step},
        "rng": _rng_state(),
    }
    use_swa = swa is not None and state.epoch > swa.start_epoch
    for role, net in method.networks().items():
        weights = swa.models[role].module if use_swa else net
        save_weights(
            run_dir / f"{role}.safetensors",
            weights.model.state_dict(),
            {**info, "role": role, "timm_name": net.name, "epoch": str(state.epoch), "swa": str(use_swa)},
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
    _set_rng_state(saved["rng"])
    train = saved["train"]
    if train["epoch"] >= cfg.epochs:
        log.warning("%s already finished %d of %d epochs; nothing to do", path, train["epoch"], cfg.epochs)
    return TrainState(epoch=train["epoch"], step=train["step"])
