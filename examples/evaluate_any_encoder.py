"""DAVIS label propagation (J&F) of a model siamae did not make: any timm ViT, by name.

Random weights, or weights from a local file (a ``.safetensors`` file or a ``torch.save``d
state dict holding tensors only: timm's, DINO's ``teacher``, a ``state_dict``/``model`` entry).
Nothing is downloaded. Any other network works the same way: pass ``propagate_davis`` a
function from ImageNet-normalised frames (B, 3, H, W) to patch features (B, D, H/p, W/p).

    python examples/evaluate_any_encoder.py --davis ../shared/data/DAVIS --sequences blackswan \\
        --model vit_small_patch16_224 --weights dino_vits16.pth --out runs/any-encoder
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file

from siamae.errors import SiamaeError
from siamae.evaluators import propagate_davis, timm_patch_features

WRAPPERS = ("state_dict", "model", "teacher", "module")  # where checkpoints keep the weights
PREFIXES = ("module.", "backbone.", "encoder.")  # what training wrappers put before the keys


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file or a tensors-only state dict, wrappers unwrapped."""
    if not path.is_file():
        raise SiamaeError(f"--weights {path}: no such file")
    try:
        state = (
            load_file(path)
            if path.suffix == ".safetensors"
            else torch.load(path, map_location="cpu", weights_only=True)
        )
    except Exception as err:  # a pickle with code, a corrupt file
        raise SiamaeError(
            f"--weights {path}: cannot read it ({type(err).__name__}: {err})"
        ) from None
    for key in WRAPPERS:
        if isinstance(state.get(key), dict):
            state = state[key]
    clean = {}
    for key, value in state.items():
        while key.startswith(PREFIXES):
            key = key.split(".", 1)[1]
        if isinstance(value, torch.Tensor) and not key.startswith("head."):
            clean[key] = value
    return clean


def build_model(name: str, weights: Path | None, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError as err:  # timm: "Unknown model (...)"
        raise SiamaeError(f"--model {name!r}: {err}") from None
    if weights is not None:
        state, own = read_weights(weights), model.state_dict()
        for key, tensor in state.items():
            if key in own and tensor.shape != own[key].shape:
                raise SiamaeError(
                    f"--weights {weights}: '{key}' has shape {tuple(tensor.shape)}, {name} needs "
                    f"{tuple(own[key].shape)}; is it a checkpoint of this architecture?"
                )
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing:
            raise SiamaeError(
                f"--weights {weights}: {len(missing)} tensors of {name} missing, e.g. "
                f"{missing[:3]}; is it a checkpoint of this architecture?"
            )
        if unexpected:
            print(f"ignored {len(unexpected)} tensors that are not {name}'s", file=sys.stderr)
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--davis", required=True, type=Path, help="the DAVIS folder (official layout)")
    p.add_argument("--sequences", help="comma-separated sequences (default: the val split)")
    p.add_argument("--out", type=Path, default=Path("runs/evaluate_any_encoder"))
    p.add_argument("--model", default="vit_tiny_patch16_224", help="a timm ViT name")
    p.add_argument("--weights", type=Path, help="safetensors or state-dict file (default: random)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument(
        "--max-frames",
        type=int,
        default=25,
        help="the first N frames of each sequence (>= 3; a quick check, default 25); 0: every "
        "frame, the protocol",
    )
    p.add_argument("--resize", help="frame size, e.g. 240x432 (default: the protocol's 480x880)")
    p.add_argument("--protocol", choices=("cropmae", "dino"), default="cropmae")
    p.add_argument("--pos-resample", choices=("dino", "timm"), default="dino")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        model = build_model(args.model, args.weights, args.seed)
        summary = propagate_davis(
            timm_patch_features(model, args.pos_resample),
            args.davis,
            args.out,
            sequences=args.sequences,
            protocol=args.protocol,
            overrides={"resize": args.resize} if args.resize else None,
            max_frames=args.max_frames or None,
            device=args.device,
        )
    except SiamaeError as err:
        print(f"evaluate_any_encoder: {err}", file=sys.stderr)
        return 2
    weights = args.weights or f"random init, seed {args.seed}"
    frames = f", first {args.max_frames} frames" if args.max_frames else ""
    print(
        f"{args.model} ({weights}): DAVIS J&F {summary['J&F-Mean']:.4f} "
        f"(J {summary['J-Mean']:.4f}, F {summary['F-Mean']:.4f}) over "
        f"{len(summary['sequences'])} sequences{frames}, {summary['protocol']} protocol"
    )
    print(f"predictions and summary.json in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
