"""A ``siamae finetune`` checkpoint read back: the classifier's timm state dict, and its export.

:func:`export_classifier` writes it as timm-named ``.safetensors`` + a JSON sidecar;
``siamae export`` calls it for fine-tuning checkpoints (:func:`is_finetune_checkpoint`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch

from siamae.checkpoint import TRAIN_FORMAT, load_checkpoint, training_method, write_export
from siamae.data.labelled import folder_classes
from siamae.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from siamae.data.shards import classes_file, is_shard_spec, shard_classes
from siamae.errors import CheckpointError, SiamaeError
from siamae.finetune.classification import METHOD_NAME
from siamae.models.timm_names import check_vit_name, default_timm_name, timm_kwargs
from siamae.models.vit import VIT_SIZES, Encoder


def load_classifier(path: str | Path, ema: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """The fine-tuned classifier of a ``siamae finetune`` checkpoint (file or run folder):
    (timm-named state dict with ``fc_norm``/``head``, info: num_classes, global_pool, classes,
    arch, patch_size, img_size, step). ``ema``: the EMA weights instead (the run must keep them)."""

    p = Path(path)
    if p.is_dir():
        p = p / "checkpoints" / "last.pt"
    obj = load_checkpoint(p)
    if obj.get("format") != TRAIN_FORMAT or obj.get("method") != METHOD_NAME:
        raise CheckpointError(
            f"{str(path)!r} is not a 'siamae finetune' checkpoint; pass a fine-tuning run's "
            "checkpoint or run folder"
        )
    prefix = "ema.module.vit." if ema else "encoder.vit."
    state = {k[len(prefix) :]: v for k, v in obj["model"].items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(
            f"{str(path)!r} holds no EMA weights (the run had finetune.ema=false); drop --ema"
        )
    cfg = obj["config"]
    info = {
        "num_classes": int(state["head.weight"].shape[0]),
        "global_pool": "avg" if "fc_norm.weight" in state else "token",
        "arch": cfg["model"]["arch"],
        "patch_size": int(cfg["model"]["patch_size"]),
        "img_size": int(cfg["model"]["img_size"]),
        "step": obj.get("step"),
        "epoch": obj.get("epoch"),
        "config": cfg,
        "ema": ema,
    }
    return state, info


def is_finetune_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` (a file or run folder) is a ``siamae finetune`` training checkpoint."""
    return training_method(path) == METHOD_NAME


def export_classifier(
    checkpoint: str | Path, out: str | Path, timm_name: str | None = None, ema: bool = False
) -> tuple[Path, Path]:
    """Write a fine-tuned classifier (encoder + fc_norm + head) as timm-named ``.safetensors``
    and a JSON sidecar. It loads strictly, head included, with::

        timm.create_model(NAME, num_classes=C, global_pool="avg", **kwargs).load_state_dict(
            safetensors.torch.load_file(FILE))

    or ``timm.create_model(NAME, pretrained=True, num_classes=C, global_pool="avg",
    pretrained_cfg_overlay=dict(file=FILE, num_classes=C))`` (timm keeps a pretrained head
    only when the overlay's class count is the model's).
    """

    out = Path(out)
    if out.suffix != ".safetensors":
        raise SiamaeError(f"--out {str(out)!r}: the export is a .safetensors file; name it so")
    state, info = load_classifier(checkpoint, ema=ema)
    name, kwargs = _fitting_timm_model(state, info, timm_name)
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    sidecar = _sidecar(checkpoint, out, info, name, kwargs, ema)
    return write_export(tensors, out, sidecar)


def _fitting_timm_model(
    state: dict[str, torch.Tensor], info: dict[str, Any], timm_name: str | None
) -> tuple[str, dict[str, Any]]:
    """The timm model name and keyword arguments the classifier's state dict loads into
    strictly; a SiamaeError when it does not fit."""
    dims = {
        "depth": 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks.")),
        "embed_dim": int(state["cls_token"].shape[-1]),
    }
    size = VIT_SIZES[info["arch"]]
    overrides = {k: v for k, v in dims.items() if v != getattr(size, k)}
    with torch.device("meta"):
        shape = Encoder(info["arch"], info["patch_size"], info["img_size"], **overrides)
    name = timm_name or default_timm_name(shape)
    check_vit_name(name)
    kwargs: dict[str, Any] = {
        **timm_kwargs(shape, name),
        "num_classes": info["num_classes"],
        "global_pool": info["global_pool"],
    }
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **kwargs)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and expected[k].shape != state[k].shape]
    if missing or extra or wrong:
        raise SiamaeError(
            f"the classifier does not fit timm's {name!r} (missing {missing[:3]}, extra "
            f"{extra[:3]}, shapes differ {wrong[:3]}); pass --timm-name with the same width, "
            "depth and patch size"
        )
    return name, kwargs


def _sidecar(
    checkpoint: str | Path,
    out: Path,
    info: dict[str, Any],
    name: str,
    kwargs: dict[str, Any],
    ema: bool,
) -> dict[str, Any]:
    """The JSON written beside the weights: where they come from and how timm loads them."""
    train_dir = info["config"].get("data", {}).get("path")
    classes = None
    if train_dir and Path(train_dir).is_dir():
        classes = folder_classes(train_dir)  # index -> class name, as the head was trained
    elif train_dir and is_shard_spec(train_dir) and classes_file(train_dir).is_file():
        classes = shard_classes(train_dir)
    usage_kwargs = "".join(f"{k}={v!r}, " for k, v in kwargs.items())
    return {
        "format": "siamae-export-classifier-v1",
        "weights": out.name,
        "source": str(checkpoint),
        "method": METHOD_NAME,
        "ema": ema,
        "step": info["step"],
        "epoch": info["epoch"],
        "recipe": info["config"],
        "classes": classes,
        "arch": info["arch"],
        "patch_size": info["patch_size"],
        "img_size": info["img_size"],
        "num_classes": info["num_classes"],
        "global_pool": info["global_pool"],
        "timm_name": name,
        "timm_kwargs": kwargs,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "timm_usage": (
            f"timm.create_model({name!r}, pretrained=True, {usage_kwargs}"
            f"pretrained_cfg_overlay=dict(file={out.name!r}, num_classes={info['num_classes']}, "
            f"mean={tuple(IMAGENET_MEAN)}, std={tuple(IMAGENET_STD)}))"
        ),
    }
