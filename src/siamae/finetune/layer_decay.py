"""Layer-wise learning-rate decay (BEiT/MAE fine-tuning), shared by the downstream tasks.

timm's groups: block i at ``d^(L + 1 - (i + 1))``, patch and position embedding and CLS at
``d^(L + 1)``, the head (and fc_norm) at 1; no weight decay on 1-D tensors, the position
embedding and CLS (timm's ``no_weight_decay``). Each group's ``lr_scale`` reaches the engine,
which multiplies the scheduled lr by it (:func:`siamae.engine.optim.set_lr`).
"""

from __future__ import annotations

from timm.optim import param_groups_layer_decay

from siamae.models.vit import Encoder


def layer_decay_groups(encoder: Encoder, weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's layer-decay parameter groups of ``encoder``'s ViT (with whatever head it has)."""
    vit = encoder.vit
    return param_groups_layer_decay(
        vit,
        weight_decay=weight_decay,
        no_weight_decay_list=list(vit.no_weight_decay()),
        layer_decay=layer_decay,
    )
