"""Everything the engine can train, by the name a config's ``method`` field gives it.

The pre-training objectives (``siamae.methods``) and the downstream tasks (``siamae.finetune``)
are one kind of thing to the engine: a :class:`~siamae.methods.base.Method`. A new one is one file
in its room plus one line here; a user's own method, defined outside siamae, joins with
:func:`register_method` or through the ``siamae.methods`` entry-point group of its package
(``[project.entry-points."siamae.methods"] mymethod = "mypackage.module:MyMethod"``), read
when this module is first imported.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from siamae.finetune.classification import FineTune
from siamae.finetune.segmentation import SegmentationFineTune
from siamae.methods import MAE, CropMAE, Method, MixedAE, SiameseIM, SiamMAE

if TYPE_CHECKING:
    from siamae.config import Config

#: The entry-point group whose entries (name = a Method subclass) join :data:`METHODS`.
ENTRY_POINT_GROUP = "siamae.methods"

METHODS: dict[str, type[Method]] = {
    "cropmae": CropMAE,
    "siammae": SiamMAE,
    "mae": MAE,
    "mixedae": MixedAE,
    "finetune": FineTune,
    "siameseim": SiameseIM,
    "segmentation": SegmentationFineTune,
}


def build_method(cfg: Config) -> Method:
    """The method named by ``cfg.method``, built from a resolved config."""
    return METHODS[cfg.method].from_config(cfg)


def register_method(name: str, cls: type[Method]) -> None:
    """Make ``cls`` (a :class:`~siamae.methods.base.Method` subclass) trainable as ``name``:
    a config's ``method: name`` (``siamae.train``, ``siamae pretrain --set method=name`` in the
    same process) builds it. A built-in name cannot be taken; registering a name again
    replaces the earlier class.

    >>> import siamae
    >>> class MyMAE(siamae.MAE):
    ...     pass  # its own forward, hooks, defaults
    >>> siamae.register_method("my_mae", MyMAE)
    >>> siamae.create_method("my_mae", "vit_tiny_patch16_224", img_size=32).mask_ratio
    0.75
    """
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register_method({name!r}, ...) takes a Method subclass, got {cls!r}")
    if name in _BUILT_IN:
        raise ValueError(f"{name!r} is a built-in method; choose another name")
    METHODS[name] = cls


_BUILT_IN = frozenset(METHODS)


def _load_entry_points() -> None:
    """Register the methods installed packages declare; one that fails to load is reported
    on stderr and left out (siamae's own methods keep working)."""
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            register_method(entry.name, entry.load())
        except Exception as err:  # a broken plugin must not break every siamae command
            print(
                f"siamae: method {entry.name!r} of entry point {entry.value!r} not loaded: "
                f"{type(err).__name__}: {err}",
                file=sys.stderr,
            )


_load_entry_points()
