"""siamae: Siamese and masked autoencoder pre-training for Vision Transformers, and evaluation.

The public API is what ``siamae.__all__`` lists (``docs/api.md``: one line each; the
CHANGELOG's version policy says what may change): methods built from plain arguments
(:func:`create_method`), their views as transforms (:func:`create_views`, :func:`collate`), the
building blocks (encoder, decoders, masking, position embeddings, the losses of
:mod:`siamae.models.losses`), the engine (:func:`train`, :func:`register_method`), the
encoders read back (:func:`load_encoder`) and exported for the Hugging Face Hub
(:func:`export_hub`), and the evaluators on any model (:func:`propagate_davis`, :func:`knn_probe`,
...: :mod:`siamae.evaluators`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from siamae.api import (
        TensorSpec,
        ViewDataset,
        Views,
        batch_spec,
        collate,
        create_config,
        create_method,
        create_views,
        open_image,
        shuffle_generator,
        train,
    )
    from siamae.config import Config
    from siamae.evaluators import (
        ProbeFeatures,
        TimmPatchFeatures,
        fewshot_probe,
        knn_probe,
        linear_probe,
        probe_features,
        propagate_davis,
        propagate_jhmdb,
        propagate_vip,
        score_segmentation,
        synthetic_davis,
        timm_patch_features,
    )
    from siamae.hub import export_hub
    from siamae.loading import load_encoder, random_encoder
    from siamae.methods.base import Method, MethodOutput
    from siamae.methods.cropmae import CropMAE, SiamMAE
    from siamae.methods.mae import MAE
    from siamae.methods.mixedae import MixedAE
    from siamae.methods.siameseim import SiameseIM
    from siamae.models.decoder import CrossSelfDecoder, MAEDecoder
    from siamae.models.losses import (
        homologous_contrastive_loss,
        homologous_mass_loss,
        masked_mse,
        norm_pix_mse,
        pixel_targets,
        unigrad_loss,
    )
    from siamae.models.masking import patchify, random_masking, unpatchify
    from siamae.models.pos_embed import resample_position_table, sincos_2d
    from siamae.models.vit import Encoder
    from siamae.recipes import load_config
    from siamae.registry import register_method

__version__ = "0.2.0"

# Imported on first use, not with the package: the ``siamae`` command must set the OpenMP
# environment (siamae.commands.entry) before anything imports torch, and every siamae module
# imports this package first. Name -> the module that defines it.
_LAZY = {
    # methods from plain arguments, their views, the engine
    "create_method": "siamae.api",
    "create_config": "siamae.api",
    "create_views": "siamae.api",
    "Views": "siamae.api",
    "ViewDataset": "siamae.api",
    "collate": "siamae.api",
    "batch_spec": "siamae.api",
    "TensorSpec": "siamae.api",
    "open_image": "siamae.api",
    "shuffle_generator": "siamae.api",
    "train": "siamae.api",
    "register_method": "siamae.registry",
    "load_config": "siamae.recipes",
    "Config": "siamae.config",
    # the methods
    "Method": "siamae.methods.base",
    "MethodOutput": "siamae.methods.base",
    "CropMAE": "siamae.methods.cropmae",
    "SiamMAE": "siamae.methods.cropmae",
    "MAE": "siamae.methods.mae",
    "SiameseIM": "siamae.methods.siameseim",
    "MixedAE": "siamae.methods.mixedae",
    # building blocks
    "Encoder": "siamae.models.vit",
    "MAEDecoder": "siamae.models.decoder",
    "CrossSelfDecoder": "siamae.models.decoder",
    "random_masking": "siamae.models.masking",
    "patchify": "siamae.models.masking",
    "unpatchify": "siamae.models.masking",
    "sincos_2d": "siamae.models.pos_embed",
    "resample_position_table": "siamae.models.pos_embed",
    "norm_pix_mse": "siamae.models.losses",
    "pixel_targets": "siamae.models.losses",
    "masked_mse": "siamae.models.losses",
    "unigrad_loss": "siamae.models.losses",
    "homologous_mass_loss": "siamae.models.losses",
    "homologous_contrastive_loss": "siamae.models.losses",
    # encoders read back, and exported for the Hugging Face Hub
    "load_encoder": "siamae.loading",
    "random_encoder": "siamae.loading",
    "export_hub": "siamae.hub",
    # the evaluators, on any model
    "ProbeFeatures": "siamae.evaluators",
    "TimmPatchFeatures": "siamae.evaluators",
    "fewshot_probe": "siamae.evaluators",
    "knn_probe": "siamae.evaluators",
    "linear_probe": "siamae.evaluators",
    "probe_features": "siamae.evaluators",
    "propagate_davis": "siamae.evaluators",
    "propagate_jhmdb": "siamae.evaluators",
    "propagate_vip": "siamae.evaluators",
    "score_segmentation": "siamae.evaluators",
    "synthetic_davis": "siamae.evaluators",
    "timm_patch_features": "siamae.evaluators",
}

__all__ = [
    "__version__",
    "Config",
    "CropMAE",
    "CrossSelfDecoder",
    "Encoder",
    "MAE",
    "MAEDecoder",
    "Method",
    "MethodOutput",
    "MixedAE",
    "ProbeFeatures",
    "SiamMAE",
    "SiameseIM",
    "TensorSpec",
    "TimmPatchFeatures",
    "ViewDataset",
    "Views",
    "batch_spec",
    "collate",
    "create_config",
    "create_method",
    "create_views",
    "export_hub",
    "fewshot_probe",
    "homologous_contrastive_loss",
    "homologous_mass_loss",
    "knn_probe",
    "linear_probe",
    "load_config",
    "load_encoder",
    "masked_mse",
    "norm_pix_mse",
    "open_image",
    "patchify",
    "pixel_targets",
    "probe_features",
    "propagate_davis",
    "propagate_jhmdb",
    "propagate_vip",
    "random_encoder",
    "random_masking",
    "register_method",
    "resample_position_table",
    "score_segmentation",
    "shuffle_generator",
    "sincos_2d",
    "synthetic_davis",
    "timm_patch_features",
    "train",
    "unigrad_loss",
    "unpatchify",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'siamae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
