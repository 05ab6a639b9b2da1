"""Resolved configs: a recipe (YAML file or defaults) plus ``--set`` overrides, with the chosen
method's published values filled into every ``null`` field, then every field checked.

This is where configs meet the registry: :mod:`siamae.config` knows the fields, each method knows
its recipe (``published_defaults``) and its own checks (``check_config``), and
:meth:`siamae.methods.base.Method.resolve_config` applies both; here the method is the one the
config names. Code below the registry (a downstream task reading its own runs back) calls
``resolve_config`` of its method directly.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from siamae.config import Config, apply_overrides, from_dict, load_yaml
from siamae.errors import ConfigError
from siamae.registry import METHODS


def resolve(cfg: Config) -> Config:
    """Fill ``null`` fields with the method's published values and check every value."""
    if cfg.method not in METHODS:
        close = difflib.get_close_matches(cfg.method, list(METHODS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"config field 'method': unknown method {cfg.method!r}{hint}; "
            f"choose one of {', '.join(METHODS)}"
        )
    return METHODS[cfg.method].resolve_config(cfg)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or the defaults), apply ``--set`` overrides, check and resolve it."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return resolve(from_dict(Config, data))


def config_from_dict(data: dict[str, Any]) -> Config:
    """A resolved config from a plain dict (e.g. one saved in a checkpoint)."""
    return resolve(from_dict(Config, data))
