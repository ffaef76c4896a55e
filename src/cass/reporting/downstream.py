"""What a pretraining run's backbone did downstream: the model card's table of the experiments that used it.

An experiment that names a pretraining run as an init (``run: DIR``, or a ``pool`` it pretrained itself)
states "shared backbone" comparisons: the backbone read out and fine-tuned on that experiment's data against
random init, a stand-in and per-dataset pretraining, each a paired difference with its interval and verdict
(:func:`~cass.experiment.comparisons.shared_backbone_comparisons`). ``cass export RUN --experiment EXP``
puts those rows on the card, so whoever takes the backbone away also takes where it helped and where not.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from cass.config import ConfigError, load_yaml
from cass.experiment.comparisons import AGAINST_INIT, COMPARISONS_CSV
from cass.experiment.config import STARTING_POINT, SUPERVISED, ExperimentConfig
from cass.experiment.plan import pool_dir
from cass.experiment.run import EXPERIMENT_YAML
from cass.reporting.report import ARCH_NAMES, MODE_LABELS, method_name
from cass.utils.markdown import markdown_table

METRIC = "macro_f1"


def backbone_inits(cfg: ExperimentConfig, run_dir: Path) -> list[str]:
    """The inits of an experiment whose networks are the pretraining run in ``run_dir``."""
    target = run_dir.resolve()
    return [init.name for init in cfg.inits
            if (init.run is not None and Path(init.run).resolve() == target)
            or (init.pool and pool_dir(cfg, init).resolve() == target)]


def _against(row: dict[str, str]) -> str:
    """What the backbone is compared with, in words: ``the `scratch` starting point``, ``supervised from
    `blood-supervised```, ``CASS-VICReg pretrained on this data from `scratch```."""
    if row["b"] == STARTING_POINT:
        return f"the `{row['b_init']}` starting point"
    if row["b"] == SUPERVISED:
        return f"supervised from `{row['b_init']}`"
    return f"{method_name(row['b'])} pretrained on this data from `{row['b_init']}`"


def downstream_section(run_dir: str | Path, experiments: Sequence[str | Path]) -> str:
    """The card's "Downstream" section: every shared-backbone comparison (macro-F1) of ``experiments`` whose
    init is ``run_dir``'s networks. Refuses an experiment that does not use the run, or that has no
    comparisons yet (``cass report`` writes them from the cells finished so far)."""
    run_dir = Path(run_dir)
    lines = []
    for experiment in map(Path, experiments):
        config = experiment / EXPERIMENT_YAML
        if not config.is_file():
            raise ConfigError(f"--experiment {experiment}: no {EXPERIMENT_YAML} there (is it a cass experiment directory?)")
        cfg = load_yaml(ExperimentConfig, config)
        inits = backbone_inits(cfg, run_dir)
        if not inits:
            raise ConfigError(f"--experiment {experiment}: none of its inits is the run {run_dir} "
                              f"(its inits: {', '.join(i.name for i in cfg.inits)})")
        table = experiment / COMPARISONS_CSV
        if not table.is_file():
            raise ConfigError(f"--experiment {experiment}: no {COMPARISONS_CSV} yet; write it with cass report {experiment}")
        with open(table, newline="") as fh:
            rows = [r for r in csv.DictReader(fh)
                    if r["comparison"] == AGAINST_INIT and r["init"] in inits and r["metric"] == METRIC]
        for r in rows:
            how = MODE_LABELS.get(r["mode"], r["mode"]) + ("" if r["a"] == STARTING_POINT else " (supervised)")
            lines.append([
                f"`{experiment.name}`", ARCH_NAMES.get(r["arch"], r["arch"]), f"{float(r['label_fraction']):.0%}", how,
                f"{float(r['a_mean']):.3f}", _against(r), f"{float(r['b_mean']):.3f}",
                f"{float(r['diff']):+.3f} [{float(r['low']):+.3f}, {float(r['high']):+.3f}]", r["verdict"], r["n_seeds"]])
    if not lines:
        return ("## Downstream\n\nThe experiments given have no finished shared-backbone comparison yet "
                "(their cells are still running).")
    header = ["experiment", "network", "labels", "used as", "this backbone", "against", "other",
              "difference [95 % interval]", "verdict", "seeds"]
    return ("## Downstream\n\nFrom the experiments that used this run as an init: test macro-F1 (mean over seeds) of "
            "the backbone frozen (k-NN, logistic probe) or fine-tuned with labels, against other starting points "
            "on the same data, labelled subsets and test images: the paired difference with its 95 % interval "
            "(bootstrap over test images and seeds) and its verdict (`above`/`below` only when the interval "
            "excludes 0). Each experiment's `report/report.md` has the rest.\n\n" + markdown_table(header, lines))
