"""One optimiser step of a prepared method, shared by the pretraining loop and ``cass bench``, and the
progress bar's loss read without waiting for the device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from lightning.fabric import Fabric

from cass.config import PretrainConfig
from cass.methods.base import PretrainMethod, Progress, StepOutput


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
