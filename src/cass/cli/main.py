"""The ``cass`` command line: each command is a thin layer over a documented Python function.

Options default to ``None`` meaning "not given", so that a value from ``--config FILE.yaml`` is only
overridden by options the user actually typed. The options of ``pretrain``, ``finetune`` and ``bench``
are generated from the config dataclasses (:mod:`cass.cli.options`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from cass.cli.options import config_command
from cass.config import ConfigError, FinetuneConfig, PretrainConfig, load_yaml, merge

app = typer.Typer(
    name="cass",
    help="Cross-Architectural Self-Supervision (CASS) for medical images: pretrain, fine-tune, compare, report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

F = TypeVar("F", bound=Callable[..., Any])


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by the input or the options: shown as one clear line, not a traceback."""
    from cass.data.images import BadImageError
    from cass.data.sources import DataError
    from cass.models.factory import WeightsUnavailableError
    from cass.training.failures import NonFiniteLossError
    from cass.utils.atomic import WriteError
    from cass.utils.checkpoint import CheckpointError

    return (ConfigError, BadImageError, DataError, WeightsUnavailableError, CheckpointError, NonFiniteLossError, WriteError)


def friendly_errors(command: F) -> F:
    """Print user errors as ``error: ...`` and exit with status 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            return command(*args, **kwargs)
        except _user_errors() as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: the last finished epoch is saved; rerun with --resume RUN_DIR", err=True)
            raise typer.Exit(130) from None
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            typer.echo(f"error: disk full while writing {err.filename or 'a file'}; the last finished epoch is "
                       "saved: free some space, then rerun (with --resume RUN_DIR for a run)", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def given(**options: Any) -> dict[str, Any]:
    """The options the user typed, as dotted config keys (``None`` means not given)."""
    return {key.replace("__", "."): value for key, value in options.items() if value is not None}


Opt = typer.Option


@app.command()
@friendly_errors
@config_command(PretrainConfig, exclude=("data.data",))
def pretrain(
    overrides: dict[str, Any],
    config: Annotated[Path | None, Opt("--config", help="YAML file with any of these options.")] = None,
    resume: Annotated[Path | None, Opt(help="Continue the run in this directory (other options override its config).")] = None,
    data: Annotated[list[str] | None, Opt(
        "--data", help="Images to pretrain on: a folder, CSV, zip or .npz (default: the config's, else the shipped "
        "sample). Repeat for several sources pretrained on together: each keeps its own selection and test images "
        "out and shares the other data options typed here (its own --val-data and --groups need a YAML config's "
        "more_data list). Given, these are all the sources: they replace the config's.")] = None,
) -> None:
    """Self-supervised pretraining (CASS by default) on unlabeled images, from one source or several."""
    from cass.training.pretrain import load_run_config
    from cass.training.pretrain import pretrain as run_pretrain

    if resume is not None:
        cfg = load_run_config(resume, overrides)
    else:
        cfg = load_yaml(PretrainConfig, config) if config else PretrainConfig()
        cfg = merge(cfg, overrides)
    run_dir = run_pretrain(_typed_sources(cfg, data or [], overrides), resume=resume is not None)
    typer.echo(f"run directory: {run_dir}")


def _typed_sources(cfg: PretrainConfig, paths: list[str], overrides: dict[str, Any]) -> PretrainConfig:
    """``cfg`` with the sources typed as repeated ``--data``: the first is ``data.data``, each further one a
    ``more_data`` section with the first's options but its own files (no ``val_data``, no ``groups``).

    A typed ``--val-data`` or ``--groups`` belongs to one source, so with several it is refused, not guessed.
    """
    if not paths:
        return cfg
    if len(paths) > 1:
        for key, flag in (("data.val_data", "--val-data"), ("data.groups", "--groups")):
            if key in overrides:
                raise ConfigError(f"{flag} names one source's file, but --data was given {len(paths)} times; give "
                                  "each source its own in a YAML config (a data section and a more_data list)")
    first = dataclasses.replace(cfg.data, data=paths[0])
    more = [dataclasses.replace(first, data=path, val_data=None, groups=None) for path in paths[1:]]
    return dataclasses.replace(cfg, data=first, more_data=more)


@app.command()
@friendly_errors
@config_command(FinetuneConfig)
def finetune(
    overrides: dict[str, Any],
    config: Annotated[Path | None, Opt("--config", help="YAML file with any of these options.")] = None,
    resume: Annotated[bool, Opt("--resume", help="Continue an interrupted run in --out.")] = False,
) -> None:
    """Fine-tune (or probe) one network with a fraction of the labels; writes a model directory."""
    from cass.training.finetune import finetune as run_finetune

    cfg = merge(load_yaml(FinetuneConfig, config) if config else FinetuneConfig(), overrides)
    run_finetune(cfg, resume=resume)


@app.command()
@friendly_errors
def evaluate(
    model: Annotated[Path, Opt(help="A cass finetune output directory.")],
    data: Annotated[str, Opt(help="Labelled images (folder per class, CSV, zip, npz).")],
    out: Annotated[Path, Opt(help="Where metrics.json, per_class.csv and confusion_matrix.png go.")],
    split: Annotated[str | None, Opt(help="train, val or test (default: test, else val, else everything).")] = None,
) -> None:
    """Metrics of a fine-tuned model on labelled images."""
    from cass.evaluation.inference import evaluate as run_evaluate

    result = run_evaluate(model, data, out, split)
    keys = ("macro_f1", "micro_f1", "macro_recall", "balanced_accuracy", "auroc")
    typer.echo("  ".join(f"{k} {result[k]:.4f}" for k in keys if result.get(k) is not None))
    typer.echo(f"written to {out}")


@app.command()
@friendly_errors
def predict(
    model: Annotated[Path, Opt(help="A cass finetune output directory.")],
    input: Annotated[str, Opt("--input", help="An image, a folder, a CSV or a zip of images.")],
    out: Annotated[Path, Opt(help="Output CSV: path, pred, one probability column per class.")],
) -> None:
    """Predict classes for new images."""
    from cass.evaluation.inference import predict as run_predict

    typer.echo(f"predictions written to {run_predict(model, input, out)}")


@app.command()
@friendly_errors
def embed(
    model: Annotated[Path, Opt(help="A cass finetune output directory, or a backbone file written by cass export.")],
    input: Annotated[str, Opt("--input", help="An image, a folder, a CSV or a zip of images.")],
    out: Annotated[Path, Opt(help="Output directory for features.npy and files.csv.")],
) -> None:
    """Backbone features of images, for your own analyses."""
    from cass.evaluation.inference import embed as run_embed

    typer.echo(f"features written to {run_embed(model, input, out)}")


@app.command()
@friendly_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="A cass pretrain run directory.")],
    out: Annotated[Path, Opt(help="Where the backbone files and MODEL_CARD.md go.")],
    experiment: Annotated[list[Path] | None, Opt(
        "--experiment", help="An experiment that used the run as an init (repeatable): its shared-backbone "
        "comparisons go on the model card.")] = None,
) -> None:
    """Each network of a pretraining run as plain timm weights (safetensors) with a model card."""
    from cass.reporting.downstream import downstream_section
    from cass.training.export import MODEL_CARD, export_run

    sections = [downstream_section(run_dir, experiment)] if experiment else []
    for path in export_run(run_dir, out, sections):
        typer.echo(f"backbone: {path}")
    typer.echo(f"model card: {out / MODEL_CARD}")


@contextlib.contextmanager
def _resume_hint(command: str) -> Iterator[None]:
    """An interrupted grid keeps its finished cells and checkpoints: say how to continue it."""
    try:
        yield
    except KeyboardInterrupt:
        typer.echo(f"interrupted: finished cells are kept; rerun {command} to continue", err=True)
        raise typer.Exit(130) from None


@app.command()
@friendly_errors
def experiment(
    config: Annotated[Path | None, Opt("--config", help="Experiment YAML (see configs/experiments/).")] = None,
    data: Annotated[str | None, Opt(help="Labelled images with train/ and val/ splits (default: the config's, else the shipped sample).")] = None,
    val_data: Annotated[str | None, Opt(help="Validation images (default: the val/ split of --data).")] = None,
    out: Annotated[str | None, Opt(help="Experiment directory (default: the config's out). Rerun to resume.")] = None,
    num_workers: Annotated[int | None, Opt(help="Data-loading worker processes.")] = None,
    accelerator: Annotated[str | None, Opt(help="auto, cpu or gpu (pretraining and fine-tuning).")] = None,
    readouts_only: Annotated[bool, Opt("--readouts-only", help="Only the pretraining runs and frozen-feature readouts "
                                       "this time; rerun without it to add the fine-tuning cells.")] = False,
) -> None:
    """Run the comparison grid (methods x networks x inits x label fractions x seeds); resumable."""
    from cass.experiment.config import ExperimentConfig
    from cass.experiment.run import run_experiment

    overrides = given(
        data__data=data, data__val_data=val_data, out=out, data__num_workers=num_workers,
        pretrain__accelerator=accelerator, finetune__accelerator=accelerator,
    )
    cfg = merge(load_yaml(ExperimentConfig, config) if config else ExperimentConfig(), overrides)
    with _resume_hint("the same cass experiment command"):
        run_dir = run_experiment(cfg, readouts_only=readouts_only)
    typer.echo(f"results: {run_dir / 'results.csv'}; write the report with: cass report {run_dir}")


@app.command()
@friendly_errors
def report(run_dir: Annotated[Path, typer.Argument(help="A cass experiment directory.")]) -> None:
    """Markdown and self-contained HTML report of an experiment directory."""
    from cass.reporting.report import write_report

    md_path, html_path = write_report(run_dir)
    typer.echo(f"report: {html_path} (Markdown: {md_path})")


@app.command()
@friendly_errors
def demo(out: Annotated[str, Opt(help="Where the demo writes its runs (rerun to resume).")] = "runs/demo") -> None:
    """The whole comparison in minutes on a CPU: every method, small networks, the shipped sample."""
    from cass.experiment.demo import demo_config
    from cass.experiment.run import run_experiment
    from cass.reporting.report import resolved_findings, summary_table, write_report

    with _resume_hint("cass demo"):
        run_dir = run_experiment(demo_config(out))
    _, html_path = write_report(run_dir)
    typer.echo("\nA demonstration, not a benchmark: one seed, short schedules, 240 training images.")
    typer.echo("\nResolved findings: paired differences of test macro-F1 whose 95 % interval (a bootstrap over "
               "test images) excludes 0\n")
    typer.echo(resolved_findings(run_dir))
    for readout, name in (("knn", "k-NN"), ("logistic", "logistic-regression")):
        typer.echo(f"\nWhat pretraining added: {name} readout on frozen features, test macro-F1 (difference from "
                   "the same network at its starting point)\n")
        typer.echo(summary_table(run_dir, readout=readout))
    typer.echo("\nFine-tuned: test macro-F1\n")
    typer.echo(summary_table(run_dir))
    typer.echo(f"\nlearning diagnostics and everything else: {html_path}")


def _register_bench() -> None:
    from cass.cli.bench import bench

    app.command(name="bench")(friendly_errors(bench))


_register_bench()


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
