"""``siamae eval segment``: the frozen linear segmentation probe, or the scores of a fine-tuned
segmentation model, on a data set in its published layout."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from siamae.arguments import (
    CHECKPOINT_HELP,
    add_device_option,
    add_encoder_source,
    add_output_folder_option,
    add_threads_option,
    apply_threads_option,
    encoder_from_args,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    resolve_device,
)
from siamae.data.segmentation import LAYOUTS, SegmentationSet, open_segmentation
from siamae.errors import SiamaeError
from siamae.eval.segmentation.probe import ProbeConfig, train_linear_probe
from siamae.finetune.segmentation import SegmentationFineTune
from siamae.finetune.segmentation_checkpoints import (
    is_segmentation_checkpoint,
    load_segmentation_export,
    load_segmentation_model,
)
from siamae.models.vit import Encoder
from siamae.segmentation_scores import InferenceConfig, evaluate_segmentation
from siamae.sizes import size_problem

MULTI_SCALE_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "segment",
        help="semantic segmentation: frozen linear probe (mIoU), or a fine-tuned model's mIoU",
        description=(
            "Linear probe (DINOv2 protocol): frozen encoder, patch tokens of the last block (or "
            "the last 4, --layers 4), BatchNorm + 1x1 conv, logits upsampled bilinearly to the "
            "label size, cross-entropy ignoring void pixels; AdamW + poly schedule on random "
            "crops. Then mIoU/mAcc/aAcc on the whole validation split (sliding window). Given a "
            "'siamae finetune' segmentation run or its export, scores that model instead. OUT "
            "gets summary.json, pred/<stem>.png (the data set's label values) and pictures.png."
        ),
    )
    add_encoder_source(
        p,
        CHECKPOINT_HELP + "; or a segmentation fine-tuning run / its export (then no probe is "
        "trained)",
    )
    p.add_argument("--data", required=True, help="ADE20K, Pascal VOC or images/+masks/ folder")
    add_output_folder_option(p, "probe.pt, summary.json, pred/", required=True)
    p.add_argument(
        "--layout", choices=LAYOUTS, default="auto", help="data layout (default: detected)"
    )
    p.add_argument("--num-classes", type=positive_int, help="class count of an images/+masks/ set")
    p.add_argument("--train-split", default="train", help="training split (default train)")
    p.add_argument("--val-split", default="val", help="validation split (default val)")
    p.add_argument(
        "--layers",
        type=int,
        choices=(1, 4),
        default=1,
        help="last block (1) or last 4 concatenated",
    )
    p.add_argument(
        "--multi-scale",
        action="store_true",
        help=f"test at ratios {MULTI_SCALE_RATIOS} with flips, softmax averaged",
    )
    p.add_argument(
        "--iters", type=positive_int, default=40000, help="probe iterations (default 40000)"
    )
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument(
        "--lr", type=positive_float, default=1e-3, help="AdamW learning rate (default 1e-3)"
    )
    p.add_argument("--weight-decay", type=non_negative_float, default=1e-4)
    p.add_argument("--warmup-iters", type=non_negative_int, default=1500)
    p.add_argument(
        "--crop", type=positive_int, default=512, help="training crop and sliding window (pixels)"
    )
    p.add_argument(
        "--stride", type=positive_int, default=341, help="sliding-window stride (pixels)"
    )
    p.add_argument(
        "--scale",
        type=positive_int,
        nargs=2,
        default=(2048, 512),
        metavar=("LONG", "SHORT"),
        help="keep-ratio resize bounds (default 2048 512, ADE20K's)",
    )
    p.add_argument("--whole", action="store_true", help="whole-image inference, no sliding window")
    p.add_argument(
        "--no-photometric", action="store_true", help="no photometric distortion of training crops"
    )
    p.add_argument(
        "--pictures", type=non_negative_int, default=4, help="images in pictures.png (0: none)"
    )
    p.add_argument("--num-workers", type=non_negative_int, default=2)
    add_device_option(p)
    p.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of --random-init and of the probe"
    )
    p.add_argument("--no-resume", action="store_true", help="ignore OUT/probe.pt")
    p.add_argument("--no-progress", action="store_true")
    add_threads_option(p)
    p.set_defaults(func=_run)


def _check(args: argparse.Namespace) -> None:
    for name in ("iters", "batch_size", "crop", "stride", "warmup_iters"):
        value = getattr(args, name)
        if value < (0 if name == "warmup_iters" else 1):
            raise SiamaeError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.lr <= 0:
        raise SiamaeError(f"--lr must be positive, got {args.lr}")
    if min(args.scale) <= 0:
        raise SiamaeError(f"--scale must be two positive sizes, got {list(args.scale)}")


def check_crop(crop: int, patch_size: int) -> None:
    """``--crop`` (the training crop and the sliding window) in whole patches of the encoder,
    checked before any work: the position grid and the window are cut into patches."""
    problem = size_problem(crop, crop, patch_size)
    if problem is None:
        return
    if crop % patch_size:
        whole = max(patch_size, crop // patch_size * patch_size)
        problem = (
            f"the crop must be a multiple of the encoder's patch size {patch_size}, e.g. "
            f"--crop {whole}"
        )
    raise SiamaeError(f"--crop {crop}: {problem}")


def _run(args: argparse.Namespace) -> int:
    apply_threads_option(args)
    _check(args)
    device = resolve_device(args.device)
    inference = InferenceConfig(
        scale=tuple(args.scale),
        mode="whole" if args.whole else "slide",
        crop=args.crop,
        stride=args.stride,
        ratios=MULTI_SCALE_RATIOS if args.multi_scale else (1.0,),
        flip=args.multi_scale,
    )
    val_set = open_segmentation(args.data, args.val_split, args.layout, args.num_classes)
    fine_tuned = _fine_tuned_model(args.checkpoint)
    if fine_tuned is not None:
        summary = _score_fine_tuned(args, fine_tuned, val_set, device, inference)
    else:
        summary = _train_probe(args, val_set, device, inference)
    print(
        f"{summary['protocol']}: mIoU {summary['mIoU']:.2f}  mAcc {summary['mAcc']:.2f}  "
        f"aAcc {summary['aAcc']:.2f} on {summary['num_images']} images, "
        f"{summary['num_classes']} classes"
    )
    for split, prefix in (("validation", ""), ("training", "train_")):
        unreadable = summary.get(f"{prefix}skipped", [])
        unpaired = summary.get(f"{prefix}unpaired", [])
        if unreadable or unpaired:
            print(
                f"{split} split: skipped {len(unreadable)} unreadable and {len(unpaired)} "
                f"unpaired files (listed in summary.json, {prefix}skipped and {prefix}unpaired)"
            )
    print(f"results in {Path(args.out) / 'summary.json'}")
    return 0


def _fine_tuned_model(checkpoint: str | None) -> SegmentationFineTune | None:
    """The segmentation model of a fine-tuning run or its export; None for an encoder."""
    if checkpoint and is_segmentation_checkpoint(checkpoint):
        return load_segmentation_model(checkpoint)[0]
    if checkpoint and Path(checkpoint).suffix == ".safetensors" and _is_seg_export(checkpoint):
        return load_segmentation_export(checkpoint)
    return None


def _score_fine_tuned(
    args: argparse.Namespace,
    fine_tuned: SegmentationFineTune,
    val_set: SegmentationSet,
    device: torch.device,
    inference: InferenceConfig,
) -> dict[str, Any]:
    if fine_tuned.num_classes != val_set.num_classes:
        raise SiamaeError(
            f"--checkpoint {args.checkpoint!r} predicts {fine_tuned.num_classes} classes, "
            f"--data has {val_set.num_classes}"
        )
    check_crop(args.crop, fine_tuned.encoder.patch_size)
    model = fine_tuned.to(device)
    print(f"scoring the fine-tuned segmentation model {args.checkpoint}")
    return evaluate_segmentation(
        model.segment,
        val_set,
        device,
        inference,
        model.encoder.patch_size,
        out_dir=args.out,
        pictures=args.pictures,
        title="UperNet",
        extra={"protocol": "UperNet fine-tuning", "checkpoint": args.checkpoint},
        progress=not args.no_progress,
    )


def _train_probe(
    args: argparse.Namespace,
    val_set: SegmentationSet,
    device: torch.device,
    inference: InferenceConfig,
) -> dict[str, Any]:
    def check_layers(encoder: Encoder) -> None:
        if args.layers > encoder.depth:
            raise SiamaeError(f"--layers {args.layers}: the encoder has {encoder.depth} blocks")
        check_crop(args.crop, encoder.patch_size)

    encoder, source = encoder_from_args(args, check=check_layers)
    train_set = open_segmentation(args.data, args.train_split, args.layout, args.num_classes)
    cfg = ProbeConfig(
        layers=args.layers,
        iters=args.iters,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_iters=args.warmup_iters,
        crop=args.crop,
        scale=tuple(args.scale),
        photometric=not args.no_photometric,
        seed=args.seed,
        num_workers=args.num_workers,
    )
    return train_linear_probe(
        encoder,
        train_set,
        val_set,
        args.out,
        cfg,
        inference,
        device,
        resume=not args.no_resume,
        progress=not args.no_progress,
        source=source,
        pictures=args.pictures,
    )


def _is_seg_export(path: str) -> bool:
    side = Path(path).with_suffix(".json")
    try:
        return json.loads(side.read_text()).get("format") == "siamae-export-segmentation-v1"
    except (OSError, ValueError, AttributeError):
        return False
