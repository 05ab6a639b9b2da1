"""Resolved configs: a recipe (YAML file or defaults) plus ``--set`` overrides, with the chosen
method's published values filled into every ``null`` field, then every field checked.

One order of overrides for every command, lowest first: the recipe file, the published defaults
the method fills (``null`` fields only), the command's own flags (``--data``, ``--val``,
``--checkpoint``, ``--out``), ``--set``. The file is read once (:func:`load_config`).

This is where configs meet the registry: :mod:`siamae.config` knows the fields, each method knows
its recipe (``published_defaults``) and its own checks (``check_config``), and
:meth:`siamae.methods.base.Method.resolve_config` applies both; here the method is the one the
config names. Code below the registry (a downstream task reading its own runs back) calls
``resolve_config`` of its method directly.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from siamae.config import (
    Config,
    apply_overrides,
    load_yaml,
    note_upgrade,
    sectioned_config,
    upgrade_layout,
    upgrade_overrides,
    upgraded,
)
from siamae.options import OverrideText, option_error
from siamae.registry import METHODS


def _check_method(method: Any) -> None:
    if method not in METHODS:
        close = difflib.get_close_matches(str(method), list(METHODS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise option_error(
            "method", f"unknown method {method!r}{hint}; choose one of {', '.join(METHODS)}"
        )


def build_config(data: dict[str, Any]) -> Config:
    """A config (not yet resolved) from a raw mapping of the current layout: the common
    sections, plus the sections its method declares. Sections of another method are dropped
    (a recipe may keep them for ``--set method=...``); any other name is refused."""
    method = data.get("method", Config.method)
    _check_method(method)
    others = {name for kind in METHODS.values() for name in kind.config_sections}
    return sectioned_config(data, METHODS[method].config_sections, ignored=others)


def resolve(cfg: Config) -> Config:
    """Fill ``null`` fields with the method's published values and check every value."""
    _check_method(cfg.method)
    return METHODS[cfg.method].resolve_config(cfg)


#: A command's own flags as ``key=value`` overrides, chosen from the recipe as ``--set`` leaves
#: it (a raw mapping: the method it names decides which fields the flags stand for).
FlagLayer = Callable[[dict[str, Any]], list[str]]


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] | None = None,
    flags: Sequence[str] | FlagLayer = (),
) -> Config:
    """Read a YAML file (or the defaults) once, apply the command's ``flags`` and then the
    ``--set`` ``overrides`` over it, fill the method's published values and check every field.

    ``--set`` wins over a flag naming the same field, and both over the file and the method's
    defaults. ``flags`` may be a function of the recipe with ``--set`` applied (a raw mapping),
    for flags whose fields depend on the method chosen (``siamae finetune``'s task,
    ``pretrain --data`` reading a synthetic recipe's data as images or videos).

    >>> import siamae
    >>> cfg = siamae.load_config(None, ["method=mae", "data.source=synthetic"])
    >>> cfg.mae.mask_ratio, cfg.data.interpolation
    (0.75, 'bicubic')
    """
    recipe = load_yaml(path) if path is not None else {}
    sets = list(overrides or [])
    method = recipe_value(apply_overrides(copy.deepcopy(recipe), sets), "method")
    note_upgrade(f"config file {str(path)!r}", upgrade_layout(recipe, method))
    sets, renamed = upgrade_overrides(sets, method)
    note_upgrade("--set", renamed)
    if callable(flags):
        flags = flags(apply_overrides(copy.deepcopy(recipe), sets))
    data = apply_overrides(recipe, list(flags))
    return resolve(build_config(apply_overrides(data, sets)))


def recipe_value(recipe: dict[str, Any], key: str) -> Any:
    """A field of a raw recipe (``data.source``) as ``--set`` left it, or the config's default
    where the recipe has none; None where a section along the way is not a mapping (the
    resolution then says what is wrong)."""
    *sections, name = key.split(".")
    node: Any = recipe
    default: Any = Config()
    for section in sections:
        node = node.get(section, {}) if isinstance(node, dict) else None
        default = getattr(default, section, None)
    if not isinstance(node, dict):
        return None
    if name not in node:
        return getattr(default, name, None)
    value = node[name]
    return value.value if isinstance(value, OverrideText) else value


def config_from_dict(data: dict[str, Any], where: str = "saved config") -> Config:
    """A resolved config from a plain dict (e.g. one saved in a checkpoint, of any age)."""
    return resolve(build_config(upgraded(data, where)))
