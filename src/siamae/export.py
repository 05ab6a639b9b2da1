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

import argparse
import json
import re
from pathlib import Path
from typing import Any

import torch

from siamae.errors import SiamaeError
from siamae.eval.features import IMAGENET_MEAN, IMAGENET_STD
from siamae.loading import load_encoder
from siamae.models.vit import VIT_SIZES, Encoder, timm_name

EXPORT_FORMAT = "siamae-export-v1"


def default_timm_name(encoder: Encoder) -> str:
    """timm's name for the encoder's shape: ``<arch>_patch<p>_<img>`` if timm has it, else 224."""
    import timm

    for img in (encoder.img_size, 224):
        name = timm_name(encoder.arch, encoder.patch_size, img)
        if timm.is_model(name):
            return name
    # No registered name with this patch size: the 224 name of patch 16 with kwargs.
    return timm_name(encoder.arch, 16, 224)


def _name_shape(name: str) -> dict[str, int]:
    """img_size and patch_size a timm ViT name is built with (from its default config)."""
    import timm

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
    import timm

    if timm.is_model(name) and timm.models.is_model_in_modules(name, [VIT_MODULE]):
        return
    close = timm.list_models(name.split("_patch")[0] + "*", module=VIT_MODULE)[:6]
    what = "is not a timm model" if not timm.is_model(name) else "is not a timm ViT"
    raise SiamaeError(
        f"--timm-name {name!r} {what}; the export supports timm's VisionTransformer models "
        f"(timm.models.{VIT_MODULE}) of the encoder's shape, e.g. "
        f"{', '.join(close) or 'vit_tiny_patch16_224, vit_small_patch16_224, vit_base_patch16_224'}"
    )


def _check_against_timm(
    state: dict[str, torch.Tensor], name: str, kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Build the timm model (no weights) and check every encoder tensor's name and shape."""
    import timm

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


def export_encoder(
    checkpoint: str | Path,
    out: str | Path,
    timm_name: str | None = None,
    ema: bool = False,
    encoder_only: bool = False,
) -> tuple[Path, Path]:
    """Write the encoder of ``checkpoint`` as timm-loadable safetensors plus a JSON sidecar.

    A ``siamae finetune`` checkpoint exports as the whole classifier (encoder, fc_norm and the
    trained head; ``ema``: its EMA weights), see :func:`siamae.methods.finetune.export_classifier`;
    a segmentation fine-tuning checkpoint as the whole model (encoder + neck + heads), see
    :func:`siamae.methods.segmentation.export_segmentation`; ``encoder_only``: its encoder
    alone, as from any pre-training checkpoint.

    Args:
        checkpoint: anything :func:`siamae.load_encoder` reads (training checkpoint, run folder,
            exported file, timm/DINO/MAE state dict).
        out: the ``.safetensors`` path; the sidecar is the same path with ``.json``.
        timm_name: the timm model name; default: the name of the encoder's arch and patch size.
    Returns:
        (safetensors path, sidecar path).
    """
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise SiamaeError(f"--out {str(out)!r}: the export is a .safetensors file; name it so")
    from siamae.methods.finetune import export_classifier, is_finetune_checkpoint
    from siamae.methods.segmentation import export_segmentation, is_segmentation_checkpoint

    if is_finetune_checkpoint(checkpoint):
        return export_classifier(checkpoint, out, timm_name, ema=ema)
    if is_segmentation_checkpoint(checkpoint) and not encoder_only:
        return export_segmentation(checkpoint, out)
    if ema:
        raise SiamaeError("--ema applies to fine-tuning checkpoints (siamae finetune) only")
    encoder = load_encoder(checkpoint)
    report = encoder.load_report  # type: ignore[attr-defined]
    name = timm_name or default_timm_name(encoder)
    kwargs = timm_kwargs(encoder, name)
    state = {k: v.detach().contiguous().clone() for k, v in encoder.vit.state_dict().items()}
    info = _check_against_timm(state, name, kwargs)
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(state, str(tmp), metadata={"format": EXPORT_FORMAT, "timm_name": name})
    tmp.replace(out)
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(sidecar, indent=2, default=str) + "\n")
    return out, json_path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the top-level ``export`` command."""
    p = subparsers.add_parser(
        "export",
        help="write the encoder as timm-loadable .safetensors (+ a JSON sidecar)",
        description=(
            "Export the encoder of a checkpoint with timm key names. The file loads strictly "
            "with timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=FILE)); "
            "a zero placeholder classifier is included when NAME's timm config has one. "
            "FILE.json beside it records the method, recipe, step, shapes and mean/std."
        ),
    )
    p.add_argument(
        "--checkpoint", required=True, help="training checkpoint, run folder or state dict"
    )
    p.add_argument("--out", required=True, help="output FILE.safetensors")
    p.add_argument(
        "--timm-name",
        default=None,
        help="timm model name (default: from arch and patch size, e.g. vit_small_patch16_224)",
    )
    p.add_argument(
        "--ema", action="store_true", help="fine-tuning checkpoints: export the EMA weights"
    )
    p.add_argument(
        "--encoder-only",
        action="store_true",
        help="segmentation fine-tuning checkpoints: export the encoder alone (timm ViT)",
    )
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    weights, sidecar = export_encoder(
        args.checkpoint, args.out, args.timm_name, args.ema, args.encoder_only
    )
    info = json.loads(sidecar.read_text())
    print(
        f"wrote {weights} ({info['timm_name']}{', ' + str(info['timm_kwargs']) if info['timm_kwargs'] else ''})"
    )
    print(f"wrote {sidecar}")
    print(f"load with: {info['timm_usage']}")
    return 0
