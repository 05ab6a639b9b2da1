"""Segmentation fine-tuning runs on disk: whether a checkpoint is one, the model it holds, and
its export (the whole model, encoder + neck + heads, as safetensors with a JSON sidecar) and the
export read back, like :mod:`siamae.finetune.checkpoints` for classification. The model is
rebuilt from its stored recipe, resolved by the task itself
(:meth:`~siamae.methods.base.Method.resolve_config`, what :func:`siamae.recipes.config_from_dict`
does for a config naming it), so this room never imports the registry above it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from siamae.checkpoint import load_checkpoint, training_method, write_export
from siamae.config import Config, sectioned_config, upgraded
from siamae.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from siamae.data.segmentation import SegmentationSet, open_segmentation
from siamae.errors import CheckpointError, SiamaeError
from siamae.finetune.segmentation import METHOD_NAME, SegmentationFineTune
from siamae.models.timm_names import default_timm_name, timm_kwargs
from siamae.models.vit import VIT_SIZES, Encoder


def is_segmentation_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` (a file or run folder) is a segmentation fine-tuning checkpoint."""
    return training_method(path) == METHOD_NAME


def load_segmentation_model(path: str | Path) -> tuple[SegmentationFineTune, dict[str, Any]]:
    """The fine-tuned model of a segmentation run's checkpoint (file or run folder), in eval
    mode, and its info (classes, step, config). Built without reading the training data."""

    p = Path(path)
    if p.is_dir():
        p = p / "checkpoints" / "last.pt"
    obj = load_checkpoint(p)
    if obj.get("method") != METHOD_NAME:
        raise CheckpointError(f"{str(path)!r} is not a segmentation fine-tuning checkpoint")
    cfg = _task_config(obj["config"], str(path))
    state = obj["model"]
    num_classes = int(state["head.decode.classifier.weight"].shape[0])
    names = _class_names(cfg, num_classes)
    m = cfg.model
    with torch.device("meta"):
        encoder = Encoder(m.arch, m.patch_size, m.img_size, **_dims(state, m.arch))
    encoder = encoder.to_empty(device="cpu")
    model = SegmentationFineTune(encoder, _class_list(names), cfg)
    model.load_state_dict(state)
    return model.eval(), {"step": obj.get("step"), "config": obj["config"], "classes": names}


def _class_list(names: list[str]) -> SegmentationSet:
    """A data-less stand-in for the training set: what the model needs of it is its classes."""
    return SegmentationSet("plain", Path("."), "", [], list(names))


def _class_names(cfg: Config, num_classes: int) -> list[str]:
    """The training set's class names when it is still there, else class_0, class_1, ..."""
    s = cfg.segmentation
    try:
        names = open_segmentation(cfg.data.path, s.train_split, s.layout, s.num_classes).class_names
    except Exception:  # noqa: BLE001 - the data may be gone; the names are a convenience
        names = []
    return names if len(names) == num_classes else [f"class_{i}" for i in range(num_classes)]


def _dims(state: dict[str, torch.Tensor], arch: str) -> dict[str, int]:

    depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("encoder.vit.blocks."))
    return {"depth": depth} if depth != VIT_SIZES[arch].depth else {}


def export_segmentation(checkpoint: str | Path, out: str | Path) -> tuple[Path, Path]:
    """Write a fine-tuned segmentation model (encoder + neck + heads) as ``.safetensors`` with
    a JSON sidecar. Keys: ``backbone.<timm ViT name>`` (the encoder, loadable into
    ``timm.create_model(NAME, num_classes=0)`` after stripping ``backbone.``), and
    ``head.neck.*``, ``head.decode.*``, ``head.auxiliary.*`` of
    :class:`siamae.models.upernet.UperNet`."""

    out = Path(out)
    if out.suffix != ".safetensors":
        raise SiamaeError(f"--out {str(out)!r}: the export is a .safetensors file; name it so")
    model, info = load_segmentation_model(checkpoint)
    tensors = {
        f"backbone.{k}": v.detach().contiguous().clone()
        for k, v in model.encoder.vit.state_dict().items()
    }
    tensors.update(
        {f"head.{k}": v.detach().contiguous().clone() for k, v in model.head.state_dict().items()}
    )
    name = default_timm_name(model.encoder)
    cfg = info["config"]
    sidecar = {
        "format": "siamae-export-segmentation-v1",
        "weights": out.name,
        "source": str(checkpoint),
        "method": METHOD_NAME,
        "step": info["step"],
        "recipe": cfg,
        "classes": info["classes"],
        "num_classes": model.num_classes,
        "out_indices": list(model.out_indices),
        "arch": model.encoder.arch,
        "patch_size": model.encoder.patch_size,
        "img_size": model.encoder.img_size,
        "timm_name": name,
        "timm_kwargs": timm_kwargs(model.encoder, name),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "usage": (
            f"siamae.finetune.segmentation_checkpoints.load_segmentation_export({out.name!r}) -> model; "
            "model.segment(images) gives (B, C, H, W) logits"
        ),
        "timm_usage": (
            f"timm.create_model({name!r}, num_classes=0, "
            + "".join(f"{k}={v!r}, " for k, v in timm_kwargs(model.encoder, name).items())
            + f").load_state_dict({{k[9:]: v for k, v in safetensors.torch.load_file("
            f"{out.name!r}).items() if k.startswith('backbone.')}})"
        ),
    }
    return write_export(tensors, out, sidecar)


def load_segmentation_export(path: str | Path) -> SegmentationFineTune:
    """A model written by :func:`export_segmentation`, in eval mode (the sidecar beside it
    supplies the recipe)."""

    p = Path(path)
    sidecar = p.with_suffix(".json")
    if not p.is_file() or not sidecar.is_file():
        raise CheckpointError(f"{str(path)!r}: expected FILE.safetensors with FILE.json beside it")
    try:
        info = json.loads(sidecar.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(
            f"{str(sidecar)!r}, the sidecar of {str(path)!r}, is not readable JSON ({err}); "
            "export the model again with siamae export"
        ) from None
    if not isinstance(info, dict) or info.get("format") != "siamae-export-segmentation-v1":
        raise CheckpointError(f"{str(path)!r} is not a segmentation export")

    cfg = _task_config(info["recipe"], str(path))
    tensors = load_checkpoint(p)["state_dict"]  # a bad file: one line, not a traceback
    m = cfg.model
    backbone = {k[len("backbone.") :]: v for k, v in tensors.items() if k.startswith("backbone.")}
    depth = 1 + max(int(k.split(".")[1]) for k in backbone if k.startswith("blocks."))

    with torch.device("meta"):
        encoder = Encoder(
            m.arch,
            m.patch_size,
            m.img_size,
            **({"depth": depth} if depth != VIT_SIZES[m.arch].depth else {}),
        )
    encoder = encoder.to_empty(device="cpu")
    names = info.get("classes") or [f"class_{i}" for i in range(info["num_classes"])]
    model = SegmentationFineTune(encoder, _class_list(names), cfg)
    model.encoder.vit.load_state_dict(backbone, strict=True)
    model.head.load_state_dict(
        {k[len("head.") :]: v for k, v in tensors.items() if k.startswith("head.")}, strict=True
    )
    return model.eval()


def _task_config(saved: dict[str, Any], where: str) -> Config:
    """The resolved config of a saved segmentation run (of any age), its weights taken from the
    file rather than the encoder it started from, its validation from the caller."""
    data = upgraded(saved, where)
    data["segmentation"] = {**data.get("segmentation", {}), "checkpoint": None, "val": None}
    own = SegmentationFineTune.config_sections
    return SegmentationFineTune.resolve_config(sectioned_config(data, own))
