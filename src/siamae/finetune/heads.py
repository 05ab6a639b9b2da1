"""Heads on a pre-trained encoder, shared by the downstream tasks: timm's classifier layout."""

from __future__ import annotations

import torch
import torch.nn as nn

from siamae.models.vit import Encoder


def make_classifier(
    encoder: Encoder, num_classes: int, global_pool: bool = True, head_init: float = 2e-5
) -> Encoder:
    """Turn ``encoder`` (in place) into a classifier with timm's avg-pool or CLS head layout.

    Average pooling (``global_pool``): ``norm`` becomes Identity (its pre-trained weights are
    dropped, as MAE does), ``fc_norm`` a fresh LayerNorm. CLS: ``norm`` kept, no ``fc_norm``.
    The head's weights are drawn from the global torch generator (seeded by the engine).
    The position embedding becomes trainable, as in the published fine-tuning code.
    """
    vit = encoder.vit
    dim = encoder.embed_dim
    if global_pool:
        vit.global_pool = "avg"
        vit.norm = nn.Identity()
        vit.fc_norm = nn.LayerNorm(dim, eps=1e-6)
    else:
        vit.global_pool = "token"
        vit.fc_norm = nn.Identity()
    vit.head = nn.Linear(dim, num_classes)
    vit.num_classes = num_classes
    # MAE's call, timm's trunc_normal_(w, std=2e-5): the bounds are +-2 absolute, so at this
    # std the draw is a plain normal one.
    nn.init.trunc_normal_(vit.head.weight, std=head_init)
    nn.init.zeros_(vit.head.bias)
    vit.pos_embed.requires_grad_(True)
    return encoder


def classify(encoder: Encoder, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) normalised -> (B, C) logits (any size a multiple of the patch: the position
    grid is interpolated)."""
    return encoder.vit.forward_head(encoder(images))
