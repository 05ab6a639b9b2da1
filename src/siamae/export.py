"""Export an encoder to timm: a ``.safetensors`` file with timm key names, and a JSON sidecar.

The file loads with strict key matching through the plain timm call::

    timm.create_model("vit_small_patch16_224", pretrained=True,
                      pretrained_cfg_overlay=dict(file="encoder.safetensors"))

timm builds the model with its pretrained config's classifier (``num_classes=1000`` for most ViT
names) and loads strictly when the class count is unchanged, so a file holding the encoder
alone would fail there with missing ``head.weight``/``head.bias``. The export therefore adds a
zero classifier of exactly the shape that name's pretrained config declares (all logits are 0:
it is a placeholder, not a trained head), and nothing when it declares none. With
``num_classes=0`` timm drops the classifier and every encoder tensor is used; with another class
count it makes a fresh head.

The sidecar ``<file>.json`` holds the method, the training recipe (the resolved config), the
step, the shapes, the timm name and keyword arguments, and the normalisation mean/std the
encoder was trained with (ImageNet's: timm's own config for the name may say otherwise, so the
sidecar also gives a ``pretrained_cfg_overlay`` with the right mean/std).
"""

from __future__ import annotations

from pathlib import Path

import torch

from siamae.checkpoint import training_method, write_export
from siamae.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from siamae.errors import SiamaeError
from siamae.finetune.checkpoints import export_classifier
from siamae.finetune.classification import METHOD_NAME as CLASSIFICATION
from siamae.finetune.segmentation import METHOD_NAME as SEGMENTATION
from siamae.finetune.segmentation_checkpoints import export_segmentation
from siamae.loading import load_encoder
from siamae.models.timm_names import check_against_timm, default_timm_name, timm_kwargs

EXPORT_FORMAT = "siamae-export-v1"


def export_encoder(
    checkpoint: str | Path,
    out: str | Path,
    timm_name: str | None = None,
    ema: bool = False,
    encoder_only: bool = False,
) -> tuple[Path, Path]:
    """Write the encoder of ``checkpoint`` as timm-loadable safetensors plus a JSON sidecar.

    A ``siamae finetune`` checkpoint exports as the whole classifier (encoder, fc_norm and the
    trained head; ``ema``: its EMA weights), see :func:`siamae.finetune.checkpoints.export_classifier`;
    a segmentation fine-tuning checkpoint as the whole model (encoder + neck + heads), see
    :func:`siamae.finetune.segmentation_checkpoints.export_segmentation`; ``encoder_only``: its encoder
    alone, as from any pre-training checkpoint.

    Args:
        checkpoint: anything :func:`siamae.load_encoder` reads (training checkpoint, run folder,
            exported file, timm/DINO/MAE state dict).
        out: the ``.safetensors`` path; the sidecar is the same path with ``.json``.
        timm_name: the timm model name; default: the name of the encoder's arch and patch size.
    Returns:
        (safetensors path, sidecar path).
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise SiamaeError(f"--out {str(out)!r}: the export is a .safetensors file; name it so")

    method = training_method(checkpoint)  # read once: a training checkpoint can be large
    if method == CLASSIFICATION:
        return export_classifier(checkpoint, out, timm_name, ema=ema)
    if method == SEGMENTATION and not encoder_only:
        return export_segmentation(checkpoint, out)
    if ema:
        raise SiamaeError("--ema applies to fine-tuning checkpoints (siamae finetune) only")
    return _export_encoder_alone(checkpoint, out, timm_name)


def _export_encoder_alone(
    checkpoint: str | Path, out: Path, timm_name: str | None
) -> tuple[Path, Path]:
    """The encoder alone (of any checkpoint :func:`siamae.load_encoder` reads), with the
    placeholder head its timm name's pretrained config declares."""

    encoder = load_encoder(checkpoint)
    report = encoder.load_report  # type: ignore[attr-defined]
    name = timm_name or default_timm_name(encoder)
    kwargs = timm_kwargs(encoder, name)
    state = {k: v.detach().contiguous().clone() for k, v in encoder.vit.state_dict().items()}
    info = check_against_timm(state, name, kwargs)
    if info["num_classes"] > 0 and info["classifier"] == "head":
        # Placeholder so the default (num_classes from timm's config) strict load succeeds.
        state["head.weight"] = torch.zeros(info["num_classes"], info["embed_dim"])
        state["head.bias"] = torch.zeros(info["num_classes"])

    sidecar = {
        "format": EXPORT_FORMAT,
        "weights": out.name,
        "source": str(checkpoint),
        "method": report.method,
        "step": report.step,
        "epoch": report.epoch,
        "recipe": report.config,
        "arch": encoder.arch,
        "patch_size": encoder.patch_size,
        "img_size": encoder.img_size,
        "embed_dim": encoder.embed_dim,
        "depth": encoder.depth,
        "num_heads": encoder.num_heads,
        "timm_name": name,
        "timm_kwargs": kwargs,
        "placeholder_head": "head.weight" in state,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "timm_usage": (
            f"timm.create_model({name!r}, pretrained=True, num_classes=0, "
            + "".join(f"{k}={v!r}, " for k, v in kwargs.items())
            + f"pretrained_cfg_overlay=dict(file={out.name!r}, "
            f"mean={tuple(IMAGENET_MEAN)}, std={tuple(IMAGENET_STD)}))"
        ),
    }
    return write_export(state, out, sidecar)
