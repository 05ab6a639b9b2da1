"""The timm name and keyword arguments an :class:`Encoder` becomes, checked against timm itself.

Shared by the encoder export (``siamae.export``) and the classifier export
(``siamae.finetune.checkpoints``).
"""

from __future__ import annotations

import re
from typing import Any

import timm
import torch

from siamae.errors import SiamaeError
from siamae.models.vit import VIT_SIZES, Encoder, timm_name


def default_timm_name(encoder: Encoder) -> str:
    """timm's name for the encoder's shape: ``<arch>_patch<p>_<img>`` if timm has it, else 224."""
    for img in (encoder.img_size, 224):
        name = timm_name(encoder.arch, encoder.patch_size, img)
        if timm.is_model(name):
            return name
    # No registered name with this patch size: the 224 name of patch 16 with kwargs.
    return timm_name(encoder.arch, 16, 224)


def _name_shape(name: str) -> dict[str, int]:
    """img_size and patch_size a timm ViT name is built with (from its default config)."""
    cfg = timm.models.get_pretrained_cfg(name)
    out = {"img_size": int(cfg.input_size[-1])} if cfg is not None else {}
    m = re.search(r"patch(\d+)", name)
    if m:
        out["patch_size"] = int(m.group(1))
    return out


def timm_kwargs(encoder: Encoder, name: str) -> dict[str, Any]:
    """Keyword arguments ``timm.create_model(name, ...)`` needs to match the encoder's shapes
    (and its layout: an encoder without a final norm is timm's ``global_pool="avg"`` one)."""
    shape = _name_shape(name)
    kwargs: dict[str, Any] = {}
    if not encoder.final_norm:
        kwargs["global_pool"] = "avg"
    if shape.get("img_size", encoder.img_size) != encoder.img_size:
        kwargs["img_size"] = encoder.img_size
    if shape.get("patch_size", encoder.patch_size) != encoder.patch_size:
        kwargs["patch_size"] = encoder.patch_size
    size = VIT_SIZES.get(encoder.arch)
    if size is None or size.depth != encoder.depth:
        kwargs["depth"] = encoder.depth
    return kwargs


# The encoder is timm's VisionTransformer: names of that module are the ones it can become.
VIT_MODULE = "vision_transformer"


def check_vit_name(name: str) -> None:
    """Refuse a ``--timm-name`` that is not a model of timm's ``vision_transformer`` module."""
    if timm.is_model(name) and timm.models.is_model_in_modules(name, [VIT_MODULE]):
        return
    close = timm.list_models(name.split("_patch")[0] + "*", module=VIT_MODULE)[:6]
    what = "is not a timm model" if not timm.is_model(name) else "is not a timm ViT"
    raise SiamaeError(
        f"--timm-name {name!r} {what}; the export supports timm's VisionTransformer models "
        f"(timm.models.{VIT_MODULE}) of the encoder's shape, e.g. "
        f"{', '.join(close) or 'vit_tiny_patch16_224, vit_small_patch16_224, vit_base_patch16_224'}"
    )


def check_against_timm(
    state: dict[str, torch.Tensor], name: str, kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Build the timm model (no weights) and check every encoder tensor's name and shape."""
    check_vit_name(name)
    with torch.device("meta"):  # shapes only: no memory, no (slow) weight initialisation
        model = timm.create_model(name, pretrained=False, **kwargs)
    expected = model.state_dict()
    head_keys = {k for k in expected if k.startswith("head.")}
    body = {k: v for k, v in expected.items() if k not in head_keys}
    missing = [k for k in body if k not in state]
    extra = [k for k in state if k not in body]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in body.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or extra or wrong:
        detail = "; ".join(
            part
            for part in (
                f"timm has {missing[:3]} the encoder lacks" if missing else "",
                f"the encoder has {extra[:3]} timm lacks" if extra else "",
                f"shapes differ: {wrong[:3]}" if wrong else "",
            )
            if part
        )
        raise SiamaeError(
            f"the encoder does not fit timm's {name!r} ({detail}); pass --timm-name with a "
            "model of the same width, depth and patch size"
        )
    pcfg = model.pretrained_cfg
    return {
        "num_classes": int(pcfg.get("num_classes") or 0),
        "classifier": pcfg.get("classifier"),
        "embed_dim": int(model.embed_dim),
    }
