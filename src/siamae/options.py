"""One way to read and check options, for every options object of the package.

The pre-training config (:mod:`siamae.config`), the methods' and tasks' checks, the linear
probe's recipe and the propagation parameters all go through here:

- :func:`check` / :func:`option_error`: a bad value is one :class:`ConfigError` line naming the
  field, ``<kind> 'section.field': what is wrong``, where ``kind`` says whose option it is
  (``config field``, ``linear probe option``, ``propagation option``);
- :func:`parse_override`: the one parser of ``--set key=value`` text (YAML values, so
  true/false/yes/no/on/off are booleans, ``1e-3`` is a number, ``null``/``None`` nothing,
  ``[1, 2]`` a list);
- :func:`from_dict` / :func:`replace_from_overrides`: typed conversion of those values to a
  dataclass's fields, rejecting unknown fields with a did-you-mean.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from siamae.errors import ConfigError

CONFIG_FIELD = "config field"

OptionsT = TypeVar("OptionsT")


# -- checks -----------------------------------------------------------------------------------


def option_error(name: str, message: str, kind: str = CONFIG_FIELD) -> ConfigError:
    """The one-line error for a bad option: ``config field 'optim.base_lr': message``."""
    return ConfigError(f"{kind} '{name}': {message}")


def check(ok: bool, name: str, message: str, kind: str = CONFIG_FIELD) -> None:
    """Raise :func:`option_error` unless ``ok``."""
    if not ok:
        raise option_error(name, message, kind)


# -- parsing ----------------------------------------------------------------------------------


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong and where (PyYAML's own message quotes the
    source over several lines, with a caret under the spot)."""
    problem = str(getattr(err, "problem", None) or str(err).splitlines()[0])
    mark = getattr(err, "problem_mark", None)
    if mark is not None:
        problem += f" at line {mark.line + 1}, column {mark.column + 1}"
    if "python/" in problem:  # a !!python tag: code, refused by safe_load
        problem += "; tags that build Python objects are not allowed"
    return " ".join(problem.split())


def parse_value(raw: str) -> Any:
    """A ``--set`` value as a user meant it: read as YAML (booleans, numbers, null, lists), with
    ``1e-3`` a number (YAML wants ``1.0e-3``) and ``None`` null (Python's spelling). Raises
    ``yaml.YAMLError`` on text that is not YAML."""
    value = yaml.safe_load(raw) if raw.strip() else None
    if value == "None":
        return None
    if isinstance(value, str) and any(c in value for c in ".eE"):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """``optim.base_lr=1e-3`` -> (['optim', 'base_lr'], 0.001); dashes in the key are
    underscores (``pad-queue`` is ``pad_queue``)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set section.field=value")
    key, raw = text.split("=", 1)
    key = key.strip().replace("-", "_")
    if not key:
        raise ConfigError(f"--set {text!r}: the key is empty")
    try:
        value = parse_value(raw)
    except yaml.YAMLError as err:
        raise ConfigError(
            f"--set {text!r}: the value is not valid YAML ({yaml_problem(err)})"
        ) from None
    return key.split("."), value


@dataclass(frozen=True)
class OverrideText:
    """A ``--set`` value as read (YAML) and as typed: a string field (a path) keeps the text, so
    ``--out 1e5`` names the folder ``1e5``, not ``100000.0``; a boolean field takes 1 and 0."""

    value: Any
    raw: str


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Write each ``--set key=value`` into the nested mapping ``data`` (typed later, by
    :func:`from_dict`)."""
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: '{k}' is a value, not a section")
        raw = text.split("=", 1)[1].strip()
        scalar = value is not None and not isinstance(value, (str, list, dict))
        node[keys[-1]] = OverrideText(value, raw) if scalar else value
    return data


def type_name(tp: Any) -> str:
    """What a field of type ``tp`` accepts, in words."""
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if origin is tuple:
        return "a list of " + ", ".join(type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, str(tp)
    )


def convert(value: Any, tp: Any, where: str, kind: str = CONFIG_FIELD) -> Any:
    """``value`` as type ``tp`` (a field's annotation), or an :func:`option_error` naming
    ``where``."""
    origin = get_origin(tp)
    if isinstance(value, OverrideText):
        if tp is str:
            return value.raw
        if tp is bool and type(value.value) is int and value.value in (0, 1):
            return bool(value.value)  # --set flag=1 / flag=0
        if origin in (Union, types.UnionType) and str in get_args(tp):
            # Another member type (int, float) takes the value first; a string keeps the text.
            for arg in get_args(tp):
                if arg not in (str, type(None)):
                    try:
                        return convert(value.value, arg, where, kind)
                    except ConfigError:
                        pass
            return value.raw
        value = value.value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg, where, kind)
            except ConfigError:
                pass
        raise option_error(where, f"expected {type_name(tp)}, got {value!r}", kind)
    if origin is Literal:
        check(value in get_args(tp), where, f"expected {type_name(tp)}, got {value!r}", kind)
        return value
    if origin is tuple:
        args = get_args(tp)
        check(
            isinstance(value, (list, tuple)) and len(value) == len(args),
            where,
            f"expected {type_name(tp)}, got {value!r}",
            kind,
        )
        return tuple(
            convert(v, a, f"{where}[{i}]", kind) for i, (v, a) in enumerate(zip(value, args))
        )
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(
                f"config section '{where}': expected a mapping of fields, got {value!r}"
            )
        return from_dict(tp, value, where, kind)  # type: ignore[arg-type]
    return _convert_scalar(value, tp, where, kind)


def _convert_scalar(value: Any, tp: Any, where: str, kind: str) -> Any:
    if tp is bool:
        check(isinstance(value, bool), where, f"expected true or false, got {value!r}", kind)
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
        check(ok, where, f"expected an integer, got {value!r}", kind)
        return value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        check(ok, where, f"expected a number, got {value!r}", kind)
        return float(value)
    if tp is str:
        check(isinstance(value, str), where, f"expected a string, got {value!r}", kind)
        return value
    raise option_error(where, f"unsupported type {tp}", kind)  # pragma: no cover


def convert_fields(
    cls: type,
    data: dict[str, Any],
    where: str = "",
    kind: str = CONFIG_FIELD,
    settable: Collection[str] | None = None,
) -> dict[str, Any]:
    """The mapping ``data`` typed as fields of dataclass ``cls`` (only ``settable`` ones, when
    given), rejecting unknown fields with the closest known name."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if settable is None or f.name in settable]
    typed = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = (
                f"; did you mean '{close[0]}'?" if close else f"; known fields: {', '.join(names)}"
            )
            raise ConfigError(f"unknown {kind} '{path}'{hint}")
        typed[key] = convert(value, hints[key], path, kind)
    return typed


def from_dict(cls: type, data: dict[str, Any], where: str = "", kind: str = CONFIG_FIELD) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown fields and wrong types."""
    return cls(**convert_fields(cls, data, where, kind))


def replace_from_overrides(
    options: OptionsT,
    overrides: Iterable[str],
    kind: str,
    settable: Collection[str] | None = None,
) -> OptionsT:
    """A copy of the flat options dataclass ``options`` with ``--set key=value`` applied,
    parsed and typed as the config's own overrides are."""
    changes = convert_fields(
        type(options), apply_overrides({}, overrides), kind=kind, settable=settable
    )
    return dataclasses.replace(options, **changes)  # type: ignore[type-var]
