"""Command-line options generated from a config dataclass's fields, and the values read back.

Each field declares its option in its metadata (:func:`autoprune.search.config._cli`: help,
choices, name, aliases); the field's type says how the option is typed and read, by one rule
per type in :data:`RULES`. So help, choices and defaults live in one place, the dataclass, and
a new field without an option fails here, when the CLI is built.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from ..errors import AutopruneError
from ..train import TrainConfig


@dataclass(frozen=True)
class Rule:
    """How a field of one type appears on the command line: the option's type, the default it
    shows (from the field's default), and the field's value from the option's."""

    type: Any
    shown: Callable[[Any], Any] = lambda default: default
    value: Callable[[Any, Any], Any] = lambda given, default: given


def _names(given: str, default: Any) -> tuple[str, ...]:
    return tuple(s.strip() for s in given.split(",") if s.strip())


RULES: dict[Any, Rule] = {
    bool: Rule(bool),
    int: Rule(int),
    float: Rule(float),
    str: Rule(str),
    str | None: Rule(str | None),
    # 0 stands for None: a number option cannot be left unset once it has a default
    float | None: Rule(float, lambda d: d or 0.0, lambda given, default: given or None),
    tuple[str, ...]: Rule(str, ",".join, _names),
    # None: the default that follows the target, which the field's help names
    tuple[str, ...] | None: Rule(
        str | None, value=lambda given, default: None if given is None else _names(given, default)
    ),
    tuple[float, ...]: Rule(
        str, lambda d: ",".join(map(str, d)), lambda g, d: tuple(map(float, _names(g, d)))
    ),
    dict[str, Any]: Rule(str, json.dumps, lambda given, default: json.loads(given)),
    # a training config's option is its learning rate
    TrainConfig: Rule(
        float, lambda d: d.lr, lambda given, default: dataclasses.replace(default, lr=given)
    ),
}


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _option(f: dataclasses.Field[Any], kind: Any) -> tuple[Rule, Any]:
    meta = f.metadata
    if "help" not in meta:
        raise AutopruneError(
            f"config field {f.name!r} has no command-line option: declare it with "
            "metadata=_cli(help, ...) (autoprune.search.config)"
        )
    rule = RULES.get(kind)
    if rule is None:
        raise AutopruneError(f"config field {f.name!r}: no command-line rule for type {kind}")
    name = meta["option"] or "--" + f.name.replace("_", "-")
    if kind is bool:
        name = f"{name}/--no-{name[2:]}"
    help = meta["help"]
    if meta["choices"] is not None:
        many = any(typing.get_origin(k) is tuple for k in (kind, *typing.get_args(kind)))
        names = ", ".join(meta["choices"].names())
        help = f"{'Any of' if many else 'One of'}: {names}. {help}".strip()
    return rule, Annotated[rule.type, typer.Option(name, *meta["aliases"], help=help)]


def config_parameters(cls: type) -> list[inspect.Parameter]:
    """One keyword parameter per field of ``cls``, typed and annotated for typer."""
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        rule, annotation = _option(f, hints[f.name])
        default = rule.shown(_default(f))
        params.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
            )
        )
    return params


def config_values(cls: type, given: Mapping[str, Any]) -> dict[str, Any]:
    """The fields' values from the options' (``given``, by field name)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        rule, _ = _option(f, hints[f.name])
        values[f.name] = rule.value(given[f.name], _default(f))
    return values


def with_config_options(cls: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command function (whose ``**config`` takes the options) one option per field of
    ``cls`` beside its own parameters; it is called with ``config=`` the fields' values."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = inspect.signature(command, eval_str=True).parameters.values()
        names = {f.name for f in dataclasses.fields(cls)}

        def run(**kwargs: Any) -> Any:
            options = {k: kwargs.pop(k) for k in names}
            return command(**kwargs, config=config_values(cls, options))

        params = [p for p in own if p.name != "config"] + config_parameters(cls)
        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        run.__doc__, run.__name__ = command.__doc__, command.__name__
        return run

    return decorate
