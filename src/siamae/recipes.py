"""Resolved configs: a recipe (YAML file or defaults) plus ``--set`` overrides, with the chosen
method's published values filled into every ``null`` field, then every field checked.

This is where configs meet methods: :mod:`siamae.config` knows the fields, each method knows its
recipe (``published_defaults``) and its own checks (``check_config``).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from siamae.config import Config, apply_overrides, check_fields, from_dict, load_yaml
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
    method = METHODS[cfg.method]
    defaults = method.published_defaults(cfg)
    if cfg.mask_ratio is None:
        cfg.mask_ratio = defaults["mask_ratio"]
    for name, value in defaults.get("decoder", {}).items():
        if getattr(cfg.decoder, name) is None:
            setattr(cfg.decoder, name, value)
    if cfg.data.global_scale is None:
        cfg.data.global_scale = tuple(defaults["global_scale"])
    if cfg.data.interpolation is None:
        cfg.data.interpolation = defaults.get("interpolation", "bilinear")
    check_fields(cfg)
    method.check_config(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or the defaults), apply ``--set`` overrides, check and resolve it."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return resolve(from_dict(Config, data))


def config_from_dict(data: dict[str, Any]) -> Config:
    """A resolved config from a plain dict (e.g. one saved in a checkpoint)."""
    return resolve(from_dict(Config, data))
