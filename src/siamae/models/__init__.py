"""Encoder, masking and decoders. No training logic lives here."""

from siamae.models.decoder import CrossSelfDecoder, MAEDecoder
from siamae.models.losses import pixel_targets
from siamae.models.masking import patchify, random_masking, unpatchify
from siamae.models.vit import VIT_SIZES, Encoder, build_encoder, timm_name

__all__ = [
    "VIT_SIZES",
    "CrossSelfDecoder",
    "Encoder",
    "MAEDecoder",
    "build_encoder",
    "patchify",
    "pixel_targets",
    "random_masking",
    "timm_name",
    "unpatchify",
]
