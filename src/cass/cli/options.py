"""Command-line options generated from the config dataclasses, so the CLI, YAML and Python API cannot drift.

Every scalar field of a config (``str``, ``int``, ``float``, ``bool``, ``X | None`` and fixed-length tuples of
those) and every list of ``str``, ``int`` or ``float`` (a grid: the option is repeated, ``--knn-ks 1 --knn-ks 5``),
nested sections included, becomes an option:

* flag: the field's ``flag`` metadata, else ``--field-name`` at the top level and ``--section-field-name``
  in a nested section (:func:`cass.config.option_flag`); a boolean is ``--x/--no-x``;
* help: the field's attribute docstring (the string right after it in the class body), its default
  and its allowed range;
* default: ``None``, meaning "not given", so that values from ``--config FILE.yaml`` (or a resumed
  run's config) are only overridden by options the user typed.

:func:`config_command` turns ``command(overrides, **own_options)`` into a typer command with all of
them; ``overrides`` holds the typed values as dotted keys (``{"data.num_workers": 0, "epochs": 3}``) for
:func:`cass.config.merge`.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import re
import textwrap
import types
import typing
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from cass.config import describe_range, option_flag

SCALARS = (str, int, float, bool)


@dataclass(frozen=True)
class ConfigOption:
    """One generated option."""

    key: str
    """Dotted config key (``data.num_workers``)."""
    param: str
    """Python parameter name of the command (``data__num_workers``)."""
    flags: str
    """``--num-workers``; ``--swa/--no-swa`` for a boolean."""
    type: Any
    """The value type, without ``None``."""
    help: str
    panel: str | None
    """Help panel: None for top-level fields, else the section's."""


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: the string literal right after each field in the class body."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = next(node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)).body
    docs = {}
    for node, after in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = after.value.value
    return docs


def _plain_text(doc: str) -> str:
    """A docstring as one line of help: reST roles and literals unwrapped."""
    doc = re.sub(r":\w+:`~?([^`]+)`", r"\1", doc).replace("``", "")
    return " ".join(doc.split())


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return " ".join(map(_show, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _value_type(tp: Any) -> Any:
    """The option type of a field type, or None when the field cannot be an option (mappings, nested lists)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return _value_type(rest[0]) if len(rest) == 1 else None
    if origin is tuple and args and Ellipsis not in args and all(a in SCALARS for a in args):
        return tp
    if origin is list and args[0] in (str, int, float):  # a repeated option
        return tp
    return tp if tp in SCALARS else None


def config_options(cls: type, defaults: Any = None, exclude: Collection[str] = ()) -> list[ConfigOption]:
    """The options of config class ``cls``; ``defaults`` (an instance) supplies the defaults shown in help.

    ``exclude`` lists dotted keys the command declares itself (or does not offer).
    """
    return _options(cls, defaults if defaults is not None else cls(), set(exclude), "")


def _options(cls: type, defaults: Any, exclude: set[str], section: str) -> list[ConfigOption]:
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    options = []
    for f in dataclasses.fields(cls):
        key = f"{section}.{f.name}" if section else f.name
        if key in exclude:
            continue
        default = getattr(defaults, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            options += _options(hints[f.name], default, exclude, key)
            continue
        tp = _value_type(hints[f.name])
        if tp is None:
            continue
        flags = option_flag(f, section.replace(".", "_"))
        if tp is bool and "/" not in flags:
            flags = f"{flags}/--no-{flags[2:]}"
        bounds = {k: f.metadata[k] for k in ("ge", "gt", "le", "lt") if k in f.metadata}
        text = _plain_text(docs.get(f.name, ""))
        text += f"{' ' if text else ''}Default: {_show(default)}."
        if typing.get_origin(tp) is list:
            text += f" Repeat {flags} for several values."
        if bounds:
            text += f" Allowed: {describe_range(bounds)}."
        panel = f"{section.replace('.', ' ').replace('_', '-')} options" if section else None
        options.append(ConfigOption(key, key.replace(".", "__"), flags, tp, text, panel))
    return options


def config_command(
    cls: type, defaults: Any = None, exclude: Collection[str] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give ``command(overrides, **own)`` every option of config ``cls`` (see the module docstring).

    The command's first parameter receives the typed options as dotted keys; its other parameters
    (``--config``, ``--resume`` ...) stay its own and come first in ``--help``.
    """
    options = config_options(cls, defaults, exclude)

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(command, include_extras=True)
        own = list(inspect.signature(command).parameters.values())[1:]
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in own]
        clash = {p.name for p in own} & {o.param for o in options}
        if clash:
            raise TypeError(f"{command.__name__}: parameters {sorted(clash)} clash with options of {cls.__name__}")
        generated = [
            inspect.Parameter(
                o.param, inspect.Parameter.KEYWORD_ONLY, default=None,
                annotation=Annotated[o.type | None, typer.Option(  # type: ignore[operator]
                    o.flags, help=o.help, rich_help_panel=o.panel, show_default=False)],
            )
            for o in options
        ]
        by_param = {o.param: o.key for o in options}

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            overrides = {by_param[name]: kwargs.pop(name) for name in list(kwargs) if name in by_param}
            return command({k: v for k, v in overrides.items() if v is not None}, *args, **kwargs)

        del wrapper.__wrapped__  # typer must see the generated signature, not the command's
        parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + generated
        wrapper.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        wrapper.config_options = options  # type: ignore[attr-defined]
        return wrapper

    return decorate
