"""Lightning Fabric set-up shared by pretraining, fine-tuning and ``cass bench``: devices, precision, DDP,
the model's layout and compilation, peak memory.

Fabric (rather than the Trainer) because every method here needs its own loop details (two optimisers
for CASS, an EMA teacher and per-step weight decay for DINO) and because checkpoints must be
safetensors written atomically, not the Trainer's pickled dicts. Fabric still gives devices, precision,
DDP over ``--devices``/``--num-nodes`` (torchrun and SLURM environments are detected) and loggers,
without a home-made launcher.
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import TensorBoardLogger

from cass.config import ConfigError, PretrainConfig
from cass.methods.base import PretrainMethod
from cass.models.factory import Network


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


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory allocated on a CUDA device since its last reset; elsewhere the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
