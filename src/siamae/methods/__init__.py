"""Pre-training objectives. The registry of everything the engine trains is ``siamae.registry``."""

from siamae.methods.base import Method, MethodOutput, Reconstruction
from siamae.methods.cropmae import CropMAE, SiamMAE
from siamae.methods.mae import MAE
from siamae.methods.mixedae import MixedAE
from siamae.methods.siameseim import SiameseIM

__all__ = [
    "MAE",
    "CropMAE",
    "Method",
    "MethodOutput",
    "MixedAE",
    "Reconstruction",
    "SiamMAE",
    "SiameseIM",
]
