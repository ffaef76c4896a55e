"""Throughput of pretraining steps, for CASS and DINO side by side (``cass bench``, SPEC §4).

Each row times one method at one batch size in one mode:

* ``model-only``: the training step on random views already on the device: what the networks, the
  loss and the optimisers cost;
* ``end-to-end``: the same step fed by the run's real data path (by default the decoded uint8 cache
  with batched device augmentation, :mod:`cass.data.device_augment`), epochs and all: what training
  costs. Data loading is hidden when this matches model-only.

Both run the engine's own :class:`~cass.training.step.Stepper` with the engine's preparation
(device, layout, fused optimisers, compilation), so a row measures what ``cass pretrain`` does.
The paper's configuration (ResNet-50 + ViT-B/16 at 384 px, fp32, batch 16, eager: no channels-last or
compilation) is the reference row. Timing starts after ``warmup`` steps (compilation, cache building and
worker start-up excluded) and spans ``steps`` steps between two device synchronisations.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass
from typing import Any

import torch
from lightning.fabric import Fabric
from PIL import Image

from cass.config import ConfigError, PretrainConfig, merge
from cass.methods.base import PretrainMethod, Progress
from cass.methods.registry import create_method, method_class, method_names
from cass.training.fabric import (
    compile_networks,
    make_fabric,
    peak_memory_mb,
    prepare_model,
    resolve_precision,
)
from cass.training.pretrain_data import build_train_data
from cass.training.step import Stepper

MODES = ("model-only", "end-to-end")
PAPER = {
    "method": "cass", "cnn": "resnet50", "vit": "vit_base_patch16_384", "img_size": 384, "batch_size": 16,
    "precision": "32-true", "channels_last": False, "compile": False, "cuda_graphs": False,
}
"""The paper's configuration, run as plain eager fp32 code: the reference row."""


@dataclass
class BenchRow:
    """One measurement; ``label`` is ``paper-reference`` for the reference row."""

    method: str
    mode: str
    batch_size: int
    img_per_s: float
    step_ms: float
    peak_memory_mb: float
    """Peak GPU memory allocated during the row on CUDA; elsewhere the process's peak RSS so far."""
    cpu_ms_per_img: float
    """CPU time of this process (all its threads; DataLoader workers not included) per image: on a shared
    CPU, a cost that other processes' load does not inflate as it does wall-clock time."""
    networks: str
    img_size: int
    precision: str
    device: str
    data_path: str
    """``cache`` or ``pil`` for end-to-end rows, ``random`` for model-only ones."""
    label: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def bench(
    base: PretrainConfig,
    methods: Sequence[str] | None = None,
    batch_sizes: Sequence[int] = (16, 64),
    modes: Sequence[str] = MODES,
    steps: int = 20,
    warmup: int = 5,
    paper_reference: bool = True,
) -> list[BenchRow]:
    """Time every (method, batch size, mode) of ``base`` (networks, size, precision, data, fast options).

    ``base.data`` is the end-to-end data (None: the shipped sample); ``methods`` default to every
    registered method; ``paper_reference`` adds the paper's configuration, model-only, first (slow on a CPU).
    """
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ConfigError(f"unknown bench mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    if steps < 1 or warmup < 0:
        raise ConfigError(f"--steps must be at least 1 and --warmup at least 0 (got {steps}, {warmup})")
    rows = []
    if paper_reference:
        rows.append(_row(merge(base, PAPER), "model-only", steps, warmup, "paper-reference"))
    for method, batch_size, mode in itertools.product(methods or method_names(), batch_sizes, modes):
        rows.append(_row(merge(base, {"method": method, "batch_size": batch_size}), mode, steps, warmup))
    return rows


def _row(cfg: PretrainConfig, mode: str, steps: int, warmup: int, label: str = "") -> BenchRow:
    fabric = make_fabric(None, cfg.accelerator, cfg.precision)
    fabric.seed_everything(cfg.seed, verbose=False)
    method = create_method(cfg)
    data = build_train_data(cfg, method, fabric) if mode == "end-to-end" else None
    model = prepare_model(cfg, method, fabric)
    optimizers, schedulers = method.configure_optimizers(warmup + steps)
    compile_networks(cfg, method)
    step = Stepper.for_config(cfg, fabric, model, method, optimizers, schedulers)
    batches = _loaded_batches(data, fabric) if data else _repeated(_random_views(cfg, method, fabric))
    device = fabric.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with closing(batches):
        for i, views in enumerate(itertools.islice(batches, warmup + steps)):
            if i == warmup:
                _synchronize(device)
                start, start_cpu = time.perf_counter(), time.process_time()
            step(views, Progress(epoch=0, step=i, steps_per_epoch=warmup + steps, epochs=1))
        _synchronize(device)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return BenchRow(
        method=type(method).run_name(cfg.arch),
        mode=mode,
        batch_size=cfg.batch_size,
        img_per_s=steps * cfg.batch_size / elapsed,
        step_ms=1000 * elapsed / steps,
        peak_memory_mb=peak_memory_mb(device),
        cpu_ms_per_img=1000 * cpu / (steps * cfg.batch_size),
        networks=_networks(cfg),
        img_size=method.img_size,
        precision=resolve_precision(cfg.precision, cfg.accelerator),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        data_path=data.path if data else "random",
        label=label,
    )


def _networks(cfg: PretrainConfig) -> str:
    return "+".join(getattr(cfg, role) for role in method_class(cfg.method).roles(cfg.arch))


def _random_views(cfg: PretrainConfig, method: PretrainMethod, fabric: Fabric) -> Any:
    """Random images in [0, 1] shaped like the method's views of a batch, on the device."""
    sample = method.train_transform()(Image.new("RGB", (method.img_size, method.img_size)))
    if isinstance(sample, list):
        return [torch.rand(cfg.batch_size, *view.shape, device=fabric.device) for view in sample]
    return torch.rand(cfg.batch_size, *sample.shape, device=fabric.device)


def _repeated(views: Any) -> Iterator[Any]:
    while True:
        yield views


def _loaded_batches(data: Any, fabric: Fabric) -> Iterator[Any]:
    """The training batches, epoch after epoch, as the engine's loop feeds them to the step."""
    for epoch in itertools.count():
        data.loader.sampler.set_epoch(epoch)
        data.dataset.set_epoch(epoch)
        for views, _targets, _index in data.loader:
            yield data.augment(fabric.to_device(views))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_table(rows: Sequence[BenchRow]) -> str:
    """The rows as an aligned text table."""
    header = ("method", "mode", "batch", "img/s", "step ms", "CPU ms/img", "peak MB", "networks", "px", "precision",
              "data", "device")
    lines = [
        (r.method + (f" ({r.label})" if r.label else ""), r.mode, str(r.batch_size), f"{r.img_per_s:.1f}",
         f"{r.step_ms:.1f}", f"{r.cpu_ms_per_img:.1f}", f"{r.peak_memory_mb:.0f}", r.networks, str(r.img_size),
         r.precision, r.data_path, r.device)
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in [header, *lines])
