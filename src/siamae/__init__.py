"""siamae: Siamese and masked autoencoder pre-training for Vision Transformers, and evaluation."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from siamae.loading import load_encoder, random_encoder
    from siamae.models.vit import Encoder

__version__ = "0.1.0"

__all__ = ["Encoder", "__version__", "load_encoder", "random_encoder"]

# Imported on first use, not with the package: the ``siamae`` command must set the OpenMP
# environment (siamae.commands.entry) before anything imports torch, and every siamae module imports this
# package first.
_LAZY = {
    "Encoder": "siamae.models.vit",
    "load_encoder": "siamae.loading",
    "random_encoder": "siamae.loading",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'siamae' has no attribute {name!r}")
