"""Every numeric option has a range, checked wherever a config is read (YAML, command line, ``from_dict``);
command-line options are generated from the config dataclasses; ``data.num_workers`` None is resolved."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cass.cli.main import app
from cass.cli.options import config_options, field_docs
from cass.config import (
    ConfigError,
    DataConfig,
    FinetuneConfig,
    PretrainConfig,
    from_dict,
    load_yaml,
    merge,
    save_yaml,
)
from cass.data import loaders
from cass.data.loaders import default_workers, resolve_workers

ROOTS = (PretrainConfig, FinetuneConfig)
BOUNDS = ("ge", "gt", "le", "lt")


def _numeric(tp: Any) -> bool:
    """int or float, optional or not, or a tuple/list of them (bool is not numeric)."""
    args = [a for a in typing.get_args(tp) if a is not type(None) and a is not Ellipsis]
    if tp in (int, float):
        return True
    return bool(args) and all(_numeric(a) for a in args)


def numeric_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, type) of every numeric field of ``cls``, nested sections included."""
    found = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            found += numeric_fields(tp, f"{prefix}{f.name}.")
        elif _numeric(tp):
            found.append((f"{prefix}{f.name}", f, tp))
    return found


CASES = [(root, key, f, tp) for root in ROOTS for key, f, tp in numeric_fields(root)]


def _without_none(tp: Any) -> Any:
    """``X`` for ``X | None``, else ``tp``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if type(None) in typing.get_args(tp) and len(args) == 1 else tp


def _bad_values(f: dataclasses.Field, tp: Any) -> list[Any]:
    """Values just outside each bound of ``f`` (of its element type for tuples)."""
    tp = _without_none(tp)
    scalar = next((a for a in (typing.get_args(tp) or (tp,)) if a in (int, float)), int)
    step = 1 if scalar is int else 0.5
    m = f.metadata
    bad = []
    if "ge" in m:
        bad.append(m["ge"] - step)
    if "gt" in m:
        bad.append(m["gt"])
    if "le" in m:
        bad.append(m["le"] + step)
    if "lt" in m:
        bad.append(m["lt"])
    if typing.get_origin(tp) in (tuple, list):
        return [[value] * len(typing.get_args(tp)) for value in bad]
    return bad


def _nested(key: str, value: Any) -> dict[str, Any]:
    *parents, leaf = key.split(".")
    values: dict[str, Any] = {leaf: value}
    for part in reversed(parents):
        values = {part: values}
    return values


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _flag(root: type, key: str) -> str:
    option = next(o for o in config_options(root) if o.key == key)
    return option.flags.split("/")[0]


@pytest.mark.parametrize(("root", "key", "f", "tp"), CASES, ids=[f"{r.__name__}.{k}" for r, k, _, _ in CASES])
def test_every_numeric_option_has_a_range_that_is_enforced(root, key, f, tp):
    assert any(b in f.metadata for b in BOUNDS), (
        f"{root.__name__}.{key} has no range: give it metadata ge/gt/le/lt (cass.config.opt)")
    default = _get(root(), key)
    value = list(default) if isinstance(default, tuple) else default
    assert _get(from_dict(root, _nested(key, value)), key) == default  # the default is accepted
    flag = _flag(root, key)
    for bad in _bad_values(f, tp):
        with pytest.raises(ConfigError) as err:
            from_dict(root, _nested(key, bad), where="run.yaml")
        message = str(err.value)
        assert f"run.yaml.{key} ({flag}): must be " in message, message
        with pytest.raises(ConfigError, match=f"\\({flag}\\)"):
            merge(root(), {key: bad})


def test_defaults_of_every_config_pass_the_checks(tmp_path):
    for root in ROOTS:
        save_yaml(root(), tmp_path / "c.yaml")
        assert load_yaml(root, tmp_path / "c.yaml") == root()


def test_nan_and_infinity_are_refused():
    with pytest.raises(ConfigError, match=r"lr \(--lr\): must be > 0, got nan"):
        from_dict(PretrainConfig, {"lr": float("nan")})
    with pytest.raises(ConfigError, match="label_fraction"):
        from_dict(FinetuneConfig, {"label_fraction": float("inf")})


# --- YAML errors ------------------------------------------------------------------------------

def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_unknown_option_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.yaml: unknown option\(s\) batchsize; known: .*batch_size"):
        load_yaml(PretrainConfig, _yaml(tmp_path, "batchsize: 8\n"))
    with pytest.raises(ConfigError, match=r"run\.yaml\.data: unknown option\(s\) workers"):
        load_yaml(PretrainConfig, _yaml(tmp_path, "data:\n  workers: 0\n"))


def test_yaml_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.yaml\.batch_size: expected int, got 'many'"):
        load_yaml(PretrainConfig, _yaml(tmp_path, "batch_size: many\n"))
    with pytest.raises(ConfigError, match=r"run\.yaml\.data\.num_workers: expected int, got 1\.5"):
        load_yaml(FinetuneConfig, _yaml(tmp_path, "data:\n  num_workers: 1.5\n"))


def test_yaml_out_of_range_names_file_option_and_range(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.yaml\.dino\.center_momentum \(--dino-center-momentum\): "
                                          r"must be in \[0, 1\), got 1\.0"):
        load_yaml(PretrainConfig, _yaml(tmp_path, "dino:\n  center_momentum: 1\n"))


# --- the command line -------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "flag", "rule"), [
    (["pretrain", "--batch-size", "-3"], "--batch-size", "must be >= 1, got -3"),
    (["pretrain", "--lr", "-1"], "--lr", "must be > 0, got -1.0"),
    (["pretrain", "--epochs", "0"], "--epochs", "must be >= 1, got 0"),
    (["pretrain", "--num-workers", "-1"], "--num-workers", "must be >= 0, got -1"),
    (["finetune", "--label-fraction", "1.5"], "--label-fraction", "must be in (0, 1], got 1.5"),
    (["finetune", "--knn-k", "0"], "--knn-k", "must be >= 1, got 0"),
    (["bench", "--img-size", "0"], "--img-size", "must be >= 1, got 0"),
])
def test_cli_out_of_range_is_one_line_naming_the_option(argv, flag, rule):
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert f"({flag}): {rule}" in lines[0]
    assert "Traceback" not in result.output


def test_cli_keeps_the_flag_names_users_rely_on():
    pretrain = {o.flags for o in config_options(PretrainConfig)}
    finetune = {o.flags for o in config_options(FinetuneConfig)}
    shared = {"--data", "--val-data", "--num-workers", "--skip-bad-images/--stop-on-bad-images", "--data-path",
              "--cache-dir", "--out", "--batch-size", "--epochs", "--lr", "--img-size", "--seed", "--accelerator",
              "--cnn", "--vit", "--arch"}
    assert shared <= pretrain and shared <= finetune
    assert {"--swa/--no-swa", "--channels-last/--no-channels-last", "--compile/--no-compile",
            "--cuda-graphs/--no-cuda-graphs", "--init", "--cnn-weights", "--vit-weights", "--devices",
            "--num-nodes", "--method", "--precision", "--dino-out-dim", "--cass-embed-dim"} <= pretrain
    assert {"--from", "--mode", "--label-fraction", "--patience", "--knn-k", "--loss", "--class-weights",
            "--weights"} <= finetune
    for options in (config_options(PretrainConfig), config_options(FinetuneConfig)):
        names = [name for o in options for name in o.flags.split("/")]
        assert len(names) == len(set(names)), "two options share a flag"


def test_help_is_the_field_docstring_and_default():
    docs = field_docs(PretrainConfig)
    assert docs["batch_size"] == "Global batch size (split over all processes)."
    option = next(o for o in config_options(PretrainConfig) if o.key == "batch_size")
    assert option.help == "Global batch size (split over all processes). Default: 16. Allowed: >= 1."
    result = CliRunner().invoke(app, ["finetune", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0 and "--from" in result.output and "Early stopping" in result.output


@pytest.fixture
def captured(monkeypatch):
    """Replace the training functions the commands call; record what they receive."""
    import cass.training.bench as bench_module
    import cass.training.finetune as finetune_module
    import cass.training.pretrain as pretrain_module

    calls: dict[str, Any] = {}
    monkeypatch.setattr(pretrain_module, "pretrain", lambda cfg, resume=False: calls.setdefault("pretrain", cfg))
    monkeypatch.setattr(finetune_module, "finetune", lambda cfg, resume=False: calls.setdefault("finetune", cfg))

    def fake_bench(base, **kwargs):
        calls["bench"] = (base, kwargs)
        return []

    monkeypatch.setattr(bench_module, "bench", fake_bench)
    return calls


def test_config_file_values_are_not_overridden_by_defaults(tmp_path, captured):
    config = _yaml(tmp_path, "data:\n  num_workers: 3\n  path: pil\nimg_size: 96\ncnn: resnet18\nepochs: 7\n")
    result = CliRunner().invoke(app, ["pretrain", "--config", str(config), "--epochs", "2",
                                      "--dino-teacher-temp", "0.05", "--no-channels-last"])
    assert result.exit_code == 0, result.output
    cfg = captured["pretrain"]
    assert (cfg.data.num_workers, cfg.data.path, cfg.img_size, cfg.cnn) == (3, "pil", 96, "resnet18")
    assert (cfg.epochs, cfg.dino.teacher_temp, cfg.channels_last) == (2, 0.05, False)

    result = CliRunner().invoke(app, ["finetune", "--config", str(_yaml(tmp_path, "data:\n  num_workers: 3\n")),
                                      "--from", "imagenet", "--skip-bad-images"])
    assert result.exit_code == 0, result.output
    cfg = captured["finetune"]
    assert (cfg.data.num_workers, cfg.source, cfg.data.skip_bad_images) == (3, "imagenet", True)


def test_bench_takes_config_values_and_runs_the_paper_row_only_with_cuda(tmp_path, captured):
    import torch

    config = _yaml(tmp_path, "data:\n  num_workers: 1\nimg_size: 64\ncnn: resnet18\n")
    result = CliRunner().invoke(app, ["bench", "--config", str(config), "--vit", "vit_tiny_patch16_224",
                                      "--batch-size", "8", "--json"])
    assert result.exit_code == 0, result.output
    base, kwargs = captured["bench"]
    assert (base.data.num_workers, base.img_size, base.cnn, base.vit) == (1, 64, "resnet18", "vit_tiny_patch16_224")
    assert kwargs["batch_sizes"] == [8] and kwargs["paper_reference"] == torch.cuda.is_available()
    assert json.loads(result.output) == []

    result = CliRunner().invoke(app, ["bench", "--paper", "--json"])
    assert result.exit_code == 0, result.output
    base, kwargs = captured["bench"]
    assert kwargs["paper_reference"] is True
    assert (base.vit, base.img_size, base.data.num_workers) == ("vit_base_patch16_224", 224, None)


# --- automatic worker count -------------------------------------------------------------------

@pytest.mark.parametrize(("cores", "expected"), [(1, 0), (2, 1), (3, 2), (8, 4), (64, 4)])
def test_default_workers(monkeypatch, cores, expected):
    monkeypatch.setattr(loaders.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert default_workers("cache") == 0
    assert default_workers("pil") == expected
    assert resolve_workers(None, "pil") == expected
    assert resolve_workers(None, "cache") == 0
    assert resolve_workers(3, "cache") == 3 and resolve_workers(0, "pil") == 0  # explicit values are honoured


def test_default_workers_refuses_an_unknown_path():
    with pytest.raises(ValueError, match="cache, pil"):
        default_workers("auto")


def test_num_workers_defaults_to_automatic():
    assert DataConfig().num_workers is None
    assert from_dict(DataConfig, {"num_workers": None}).num_workers is None
    assert from_dict(DataConfig, {"num_workers": 0}).num_workers == 0
