"""Running (or continuing) an experiment: what ``cass experiment`` does.

Resuming: rerunning the same configuration skips every cell whose ``cell.json`` exists, reuses
every pretraining run whose exported weights record its last epoch (a finished run's resume state is
deleted: its networks, metrics and config are what the cells need), continues an interrupted
pretraining from its last checkpoint (the engine's resume) and an interrupted fine-tuning from its
own. A directory written with a different configuration is refused, never silently reused.

Layout of ``out``: ``experiment.yaml`` (the resolved configuration: ``cass experiment --config`` on it
reruns everything), ``environment.json`` (machine and versions of each session), ``pretrain/<run>/``,
``pool/<init>/`` (the pretraining run of an init's ``pool``), ``features/`` (the readouts' frozen features,
while cells remain), ``finetune/<cell>/`` (a ``cass finetune`` model
directory plus ``cell.json``), ``results.csv`` and
``results.json`` (one row per finished cell), ``pretraining.csv`` (one row per pretraining run) and
``comparisons.csv``/``.json`` (the stated comparisons with their intervals: :mod:`cass.experiment.comparisons`).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from cass.config import (
    ConfigError,
    PretrainConfig,
    load_yaml,
    save_yaml,
    to_dict,
)
from cass.evaluation.features import FeatureStore
from cass.experiment.comparisons import (
    COMPARISONS_CSV,
    budget_curve,
    comparisons,
    write_budget_curve,
    write_comparisons,
)
from cass.experiment.config import ExperimentConfig, validate
from cass.experiment.plan import job_configs, plan, pool_config
from cass.experiment.results import CELL, cell_row, write_results
from cass.methods.registry import method_class
from cass.training.finetune import finetune
from cass.training.pretrain import pretrain
from cass.utils.atomic import atomic_write_text
from cass.utils.checkpoint import CheckpointError, read_info
from cass.utils.rundir import CHECKPOINT, CONFIG
from cass.utils.version import VERSION

EXPERIMENT_YAML = "experiment.yaml"


FEATURES = "features"
"""Scratch folder of the readouts' frozen features (:class:`~cass.evaluation.features.FeatureStore`), deleted
once every cell has finished."""


ENVIRONMENT = "environment.json"


def _refuse_other_config(directory: Path, cfg: Any) -> None:
    """Reusing a directory written by another configuration would mix results of two experiments.

    The saved file is read as a config (options it lacks take their defaults), so a directory written
    before a new option existed still matches when that option keeps its default.
    """
    path = directory / CONFIG
    if not path.is_file():
        return
    saved = load_yaml(type(cfg), path)
    if saved != cfg:
        differences = _differences(to_dict(saved), to_dict(cfg))
        changed = ", ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in differences)
        raise ConfigError(
            f"{path} was written with a different configuration than this experiment's ({changed}); "
            f"choose another out directory, or delete {directory} to redo it"
        )


def _differences(saved: dict[str, Any], planned: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, planned value) for every option that differs."""
    found = []
    for key, value in planned.items():
        if isinstance(value, dict):
            found += _differences(saved[key], value, f"{prefix}{key}.")
        elif saved[key] != value:
            found.append((f"{prefix}{key}", saved[key], value))
    return found


def pretraining_finished(run_dir: Path, roles: Sequence[str], epochs: int) -> bool:
    """True when the weights of every network in ``roles`` record the run's last epoch (they are written after
    the checkpoint)."""
    for role in roles:
        path = run_dir / f"{role}.safetensors"
        try:
            if not path.is_file() or read_info(path).get("epoch") != str(epochs):
                return False
        except CheckpointError:
            return False
    return True


def _pretrain(run_cfg: PretrainConfig, roles: Sequence[str], label: str) -> None:
    """Train (or finish) a run of the experiment unless it is done, then drop its resume state: its optimisers
    and RNG (~4x its weights) are never needed again here (another schedule is another run); its exported
    networks, metrics and config stay."""
    run_dir = Path(run_cfg.out)
    if not pretraining_finished(run_dir, roles, run_cfg.epochs):
        resume = (run_dir / CHECKPOINT).is_file()
        print(f"{label}: {'resuming' if resume else 'starting'} pretraining {run_dir.name}", flush=True)
        pretrain(run_cfg, resume=resume)
    (run_dir / CHECKPOINT).unlink(missing_ok=True)


def run_experiment(cfg: ExperimentConfig, readouts_only: bool = False) -> Path:
    """Run (or continue) the whole grid; returns ``cfg.out``, which holds the results and every run.

    ``readouts_only`` stops after the pretraining runs and the frozen-feature readouts (the cheap cells,
    so a long benchmark can get every dataset's readouts before any dataset's fine-tuning); the directory
    still records the whole grid, so its report counts the fine-tuning cells as not yet finished.
    """
    validate(cfg)
    if readouts_only and not cfg.readouts:
        raise ConfigError("experiment: --readouts-only needs readouts (knn, logistic) to run; this grid has none")
    out = Path(cfg.out)
    cells = plan(cfg)
    jobs = [(cell, *job_configs(cfg, cell)) for cell in cells if not readouts_only or cell.mode in cfg.readouts]
    pools = {init.name: pool_config(cfg, init) for init in cfg.inits if init.pool}
    for step in [*pools.values(), *(step for _, _, run_cfg, ft_cfg in jobs for step in (run_cfg, ft_cfg))]:
        if step is not None:  # before anything is written or trained
            _refuse_other_config(Path(step.out), step)
    save_yaml(cfg, out / EXPERIMENT_YAML)
    sessions = json.loads((out / ENVIRONMENT).read_text()) if (out / ENVIRONMENT).is_file() else []
    atomic_write_text(out / ENVIRONMENT, json.dumps([*sessions, environment()], indent=2))
    this_time = f" ({len(jobs)} this time: readouts only)" if readouts_only else ""
    print(f"experiment {out}: {len(cells)} cells{this_time}, "
          f"{len({run for _, run, _, _ in jobs} - {None}) + len(pools)} pretraining runs", flush=True)
    for name, pool_cfg in pools.items():  # before any cell: every cell of the init starts from its networks
        _pretrain(pool_cfg, method_class(pool_cfg.method).roles(pool_cfg.arch),
                  f"init {name}: pool of {len(pool_cfg.sources())} source(s)")
    features = FeatureStore(out / FEATURES)  # each frozen network's selection and test features, extracted once
    ran = False  # any cell this session
    for number, (cell, run, run_cfg, ft_cfg) in enumerate(jobs, 1):
        label = f"[{number}/{len(cells)}] {cell.describe()}"
        if (Path(ft_cfg.out) / CELL).is_file():
            print(f"{label}: done, skipped", flush=True)
            continue
        ran = True
        if run is not None:
            _pretrain(run_cfg, run.roles, label)
        print(f"{label}: fine-tuning", flush=True)
        start = time.perf_counter()
        finetune(ft_cfg, resume=True, feature_store=features)
        row = cell_row(cfg, cell, run, time.perf_counter() - start)
        atomic_write_text(Path(ft_cfg.out) / CELL, json.dumps(row, indent=2))
        print(f"{label}: test macro-F1 {row['test_macro_f1']:.4f} (selection {row['val_macro_f1']:.4f}; "
              f"{row['finetune_time_s']:.0f} s)", flush=True)
        write_results(cfg, cells)
    shutil.rmtree(out / FEATURES, ignore_errors=True)  # every cell is done: nothing will read them again
    if ran or not (out / COMPARISONS_CSV).is_file():  # a rerun with nothing left to do rewrites nothing
        write_results(cfg, cells)
        write_comparisons(out, comparisons(cfg, out))
        write_budget_curve(out, budget_curve(cfg, out))
    return out


def environment() -> dict[str, Any]:
    """Where the numbers were measured: the report quotes it next to every time, and warns when a
    resumed experiment mixed machines (its times are then not comparable)."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else _cpu_name()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cass": VERSION,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"
