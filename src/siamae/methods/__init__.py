"""Pre-training methods. ``METHODS`` is the whole registry: name -> class."""

from siamae.methods.base import Method, MethodOutput, Reconstruction
from siamae.methods.cropmae import CropMAE, SiamMAE
from siamae.methods.finetune import FineTune
from siamae.methods.mae import MAE
from siamae.methods.mixedae import MixedAE
from siamae.methods.segmentation import SegmentationFineTune
from siamae.methods.siameseim import SiameseIM

METHODS: dict[str, type[Method]] = {
    "cropmae": CropMAE,
    "siammae": SiamMAE,
    "mae": MAE,
    "mixedae": MixedAE,
    "finetune": FineTune,
    "siameseim": SiameseIM,
    "segmentation": SegmentationFineTune,
}


def build_method(cfg) -> Method:  # noqa: ANN001 - Config, imported lazily by callers
    """The method named by ``cfg.method``, built from a resolved config."""
    return METHODS[cfg.method].from_config(cfg)


__all__ = [
    "METHODS",
    "MAE",
    "CropMAE",
    "FineTune",
    "Method",
    "MethodOutput",
    "MixedAE",
    "Reconstruction",
    "SegmentationFineTune",
    "SiamMAE",
    "SiameseIM",
    "build_method",
]
