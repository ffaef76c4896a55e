"""``cass bench``: images per second, step time and peak memory of CASS and DINO pretraining steps.

A thin layer over :func:`cass.training.bench.bench`; registered in :mod:`cass.cli.main`. Its pretraining
options are generated from :class:`~cass.config.PretrainConfig` and default to "not given", so values
from ``--config`` win over the bench's own starting point (:data:`BENCH_BASE`) and lose only to typed options.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from cass.cli.options import config_command
from cass.config import PretrainConfig, load_yaml, merge

Opt = typer.Option

BENCH_BASE = merge(PretrainConfig(), {"vit": "vit_base_patch16_224", "img_size": 224})
"""What the bench times without ``--config``: the paper's networks with the 224-px ViT-B/16."""


@config_command(PretrainConfig, defaults=BENCH_BASE, exclude=("method", "batch_size"))
def bench(
    overrides: dict[str, Any],
    method: Annotated[list[str] | None, Opt(help="Registered method to time (repeat; default: every method).")] = None,
    batch_size: Annotated[list[int] | None, Opt(help="Global batch size (repeat; default 16 and 64).")] = None,
    mode: Annotated[list[str] | None, Opt(help="model-only, end-to-end (repeat; default both).")] = None,
    steps: Annotated[int, Opt(help="Timed steps per row.", min=1)] = 20,
    warmup: Annotated[int, Opt(help="Untimed steps first (compilation, caches, workers).", min=0)] = 5,
    paper: Annotated[bool | None, Opt("--paper/--no-paper", show_default=False, help=(
        "Add the paper's configuration (resnet50 + vit_base_patch16_384, 384 px, fp32, eager, batch 16) as a "
        "reference row. Default: on when CUDA is available, off otherwise (it takes many minutes on a CPU)."))] = None,
    config: Annotated[Path | None, Opt("--config", help="YAML pretraining config for the rest (e.g. DINO).")] = None,
    as_json: Annotated[bool, Opt("--json", help="Print the rows as JSON.")] = False,
) -> None:
    """Time pretraining steps of CASS and DINO: img/s, step time and peak memory, model-only and end-to-end."""
    from cass.training.bench import MODES, format_table
    from cass.training.bench import bench as run_bench

    if paper is None:
        import torch

        paper = torch.cuda.is_available()
    base = merge(load_yaml(PretrainConfig, config) if config else BENCH_BASE, overrides)
    rows = run_bench(
        base, methods=method, batch_sizes=batch_size or (16, 64), modes=mode or MODES,
        steps=steps, warmup=warmup, paper_reference=paper,
    )
    typer.echo(json.dumps([row.as_dict() for row in rows], indent=1) if as_json else format_table(rows))
