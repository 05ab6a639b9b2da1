"""``siamae export``: an encoder (or fine-tuned model) as a timm ``.safetensors`` file with a JSON
sidecar (``--out``), or as a folder in the Hugging Face Hub layout (``--hub-dir``)."""

from __future__ import annotations

import argparse
import json

from siamae.export import export_encoder
from siamae.hub import export_hub


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the top-level ``export`` command."""
    p = subparsers.add_parser(
        "export",
        help="write the encoder as timm-loadable .safetensors (+ a JSON sidecar) or a Hub folder",
        description=(
            "Export the encoder of a checkpoint with timm key names. --out FILE.safetensors: it "
            "loads strictly with timm.create_model(NAME, pretrained=True, "
            "pretrained_cfg_overlay=dict(file=FILE)); a zero placeholder classifier is included "
            "when NAME's timm config has one; FILE.json beside it records the method, recipe, "
            "step, shapes and mean/std. --hub-dir DIR: config.json, model.safetensors and a "
            "README.md model card, the Hugging Face Hub layout: "
            'timm.create_model("local-dir:DIR", pretrained=True) loads it; after '
            "'hf upload ORG/NAME DIR .' (huggingface-cli upload before huggingface_hub 1.0), "
            'timm.create_model("hf-hub:ORG/NAME", pretrained=True) does, for anyone.'
        ),
    )
    p.add_argument(
        "--checkpoint", required=True, help="training checkpoint, run folder or state dict"
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="output FILE.safetensors (+ FILE.json)")
    where.add_argument(
        "--hub-dir",
        help="output folder in the Hugging Face Hub layout (new, empty, or an earlier hub export)",
    )
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
        help="segmentation fine-tuning checkpoints: export the encoder alone (timm ViT); "
        "--hub-dir always does",
    )
    p.add_argument(
        "--eval",
        action="append",
        default=[],
        metavar="DIR",
        help="--hub-dir: an evaluation folder (its summary.json) whose figures the model card "
        "shows, beside those under the run's eval/ folder; repeat for more",
    )
    p.add_argument("--name", default=None, help="--hub-dir: the model's name in the card")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    if args.hub_dir is not None:
        folder = export_hub(
            args.checkpoint, args.hub_dir, args.timm_name, args.ema, args.eval, args.name
        )
        print(f"wrote {folder}/config.json, model.safetensors, README.md")
        print(f'load with: timm.create_model("local-dir:{folder}", pretrained=True)')
        print(f"share with: hf upload ORG/NAME {folder} .")
        return 0
    weights, sidecar = export_encoder(
        args.checkpoint, args.out, args.timm_name, args.ema, args.encoder_only
    )
    info = json.loads(sidecar.read_text())
    # the keyword arguments as timm takes them (img_size=32), not a Python dict
    kwargs = "".join(f", {key}={value!r}" for key, value in (info["timm_kwargs"] or {}).items())
    print(f"wrote {weights} ({info['timm_name']}{kwargs})")
    print(f"wrote {sidecar}")
    print(f"load with: {info['timm_usage']}")
    return 0
