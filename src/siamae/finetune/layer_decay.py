"""Layer-wise learning-rate decay (BEiT/MAE fine-tuning), shared by the downstream tasks.

timm's groups: block i at ``d^(L + 1 - (i + 1))``, patch and position embedding and CLS at
``d^(L + 1)``, the head (and fc_norm) at 1; no weight decay on 1-D tensors, the position
embedding and CLS (timm's ``no_weight_decay``). Each group's ``lr_scale`` reaches the engine,
which multiplies the scheduled lr by it (:func:`siamae.optim.set_lr`).
"""

from __future__ import annotations

from timm.optim import param_groups_layer_decay

from siamae.models.vit import Encoder


def layer_decay_groups(
    encoder: Encoder, weight_decay: float, layer_decay: float, head_outside: bool = False
) -> list[dict]:
    """timm's layer-decay groups of the encoder's ViT: block i at ``d^(L + 1 - (i + 1))``, patch
    and position embedding and CLS at ``d^(L + 1)``, the head (fc_norm, head) at 1; no weight
    decay on 1-D tensors, the position embedding and CLS (timm's ``no_weight_decay``). Frozen
    tensors are left out. Each group carries ``lr_scale``.

    ``head_outside``: the head is another module (a segmentation head, at scale 1). timm then
    sees no layer above the last block and would put it at 1; every scale is multiplied by
    ``d`` so the blocks get the same scales as with a head inside (BEiT's segmentation rule).
    """
    vit = encoder.vit
    groups = param_groups_layer_decay(
        vit,
        weight_decay=weight_decay,
        no_weight_decay_list=list(vit.no_weight_decay()),
        layer_decay=layer_decay,
    )
    if head_outside:
        for group in groups:
            group["lr_scale"] *= layer_decay
    return groups
