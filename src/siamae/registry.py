"""Everything the engine can train, by the name a config's ``method`` field gives it.

The pre-training objectives (``siamae.methods``) and the downstream tasks (``siamae.finetune``)
are one kind of thing to the engine: a :class:`~siamae.methods.base.Method`. A new one is one file
in its room plus one line here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from siamae.finetune.classification import FineTune
from siamae.finetune.segmentation import SegmentationFineTune
from siamae.methods import MAE, CropMAE, Method, MixedAE, SiameseIM, SiamMAE

if TYPE_CHECKING:
    from siamae.config import Config

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
