"""siamae: Siamese and masked autoencoder pre-training for Vision Transformers, and evaluation."""

from siamae.loading import load_encoder, random_encoder
from siamae.models.vit import Encoder

__version__ = "0.1.0"

__all__ = ["Encoder", "__version__", "load_encoder", "random_encoder"]
