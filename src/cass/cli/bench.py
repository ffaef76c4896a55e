"""``cass bench``: images per second, step time and peak memory of CASS and DINO pretraining steps.

A thin layer over :func:`cass.training.bench.bench`; registered in :mod:`cass.cli.main`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

Opt = typer.Option


def bench(
    method: Annotated[list[str] | None, Opt(help="Registered method to time (repeat; default: every method).")] = None,
    batch_size: Annotated[list[int] | None, Opt(help="Global batch size (repeat; default 16 and 64).")] = None,
    mode: Annotated[list[str] | None, Opt(help="model-only, end-to-end (repeat; default both).")] = None,
    cnn: Annotated[str, Opt(help="timm CNN of CASS (and of DINO with --arch cnn).")] = "resnet50",
    vit: Annotated[str, Opt(help="timm Transformer of CASS (and of DINO with --arch vit).")] = "vit_base_patch16_224",
    arch: Annotated[str, Opt(help="DINO's backbone: vit or cnn.")] = "vit",
    img_size: Annotated[int, Opt(help="Input size in pixels.")] = 224,
    data: Annotated[str | None, Opt(help="Images for the end-to-end rows (default: the shipped sample).")] = None,
    data_path: Annotated[str, Opt(help="auto, cache or pil: how end-to-end rows load images.")] = "auto",
    cache_dir: Annotated[str | None, Opt(help="Folder of decoded-image caches (default ~/.cache/cass).")] = None,
    num_workers: Annotated[int, Opt(help="Data-loading worker processes.")] = 4,
    steps: Annotated[int, Opt(help="Timed steps per row.")] = 20,
    warmup: Annotated[int, Opt(help="Untimed steps first (compilation, caches, workers).")] = 5,
    accelerator: Annotated[str, Opt(help="auto, cpu or gpu.")] = "auto",
    precision: Annotated[str, Opt(help="auto (bf16 on GPU, fp32 on CPU) or a Lightning precision.")] = "auto",
    channels_last: Annotated[bool, Opt("--channels-last/--no-channels-last", help="Channels-last on CUDA.")] = True,
    compile: Annotated[bool, Opt("--compile/--no-compile", help="torch.compile the networks.")] = False,
    cuda_graphs: Annotated[bool, Opt("--cuda-graphs/--no-cuda-graphs", help="CUDA graphs (CUDA only).")] = False,
    paper: Annotated[bool, Opt("--paper/--no-paper", help=(
        "Add the paper's configuration (resnet50 + vit_base_patch16_384, 384 px, fp32, eager, batch 16) as a "
        "reference row; slow on a CPU."))] = True,
    config: Annotated[Path | None, Opt("--config", help="YAML pretraining config for the rest (e.g. DINO).")] = None,
    as_json: Annotated[bool, Opt("--json", help="Print the rows as JSON.")] = False,
) -> None:
    """Time pretraining steps of CASS and DINO: img/s, step time and peak memory, model-only and end-to-end."""
    from cass.config import PretrainConfig, load_yaml, merge
    from cass.training.bench import MODES, format_table
    from cass.training.bench import bench as run_bench

    base = load_yaml(PretrainConfig, config) if config else PretrainConfig()
    options = {
        "cnn": cnn, "vit": vit, "arch": arch, "img_size": img_size, "data.data": data, "data.path": data_path,
        "data.cache_dir": cache_dir, "data.num_workers": num_workers, "accelerator": accelerator,
        "precision": precision, "channels_last": channels_last, "compile": compile, "cuda_graphs": cuda_graphs,
    }
    base = merge(base, {key: value for key, value in options.items() if value is not None})
    rows = run_bench(
        base, methods=method, batch_sizes=batch_size or (16, 64), modes=mode or MODES,
        steps=steps, warmup=warmup, paper_reference=paper,
    )
    typer.echo(json.dumps([row.as_dict() for row in rows], indent=1) if as_json else format_table(rows))
