"""``siamae eval segment``: the frozen linear segmentation probe, or the scores of a fine-tuned
segmentation model, on a data set in its published layout."""

from __future__ import annotations

import argparse
import json
import math
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
from siamae.eval.segmentation.features import batches_per_epoch
from siamae.eval.segmentation.grid import (
    SEG_GRID_LAYERS,
    SEG_GRID_LRS,
    seg_grid_specs,
    train_probe_grid,
)
from siamae.eval.segmentation.probe import (
    CACHED_VIEWS,
    DEFAULT_COPIES,
    PROTOCOLS,
    ProbeConfig,
    cached_views,
    train_linear_probe,
)
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
DINOV2_ITERS = 40000
# DINOv2's 1,500 warm-up iterations of 40,000: the same share of a run of another length.
WARMUP_SHARE = 1500 / 40000
# DINOv2's 40k iterations at batch 16 over ADE20K's 20,210 training images: about 32 epochs.
CACHED_EPOCHS = 32


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
    _add_length_options(p)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument(
        "--lr", type=positive_float, default=1e-3, help="AdamW learning rate (default 1e-3)"
    )
    p.add_argument("--weight-decay", type=non_negative_float, default=1e-4)
    p.add_argument(
        "--warmup-iters",
        type=non_negative_int,
        default=None,
        help="default: 1500 of 40000, the same share of another length",
    )
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


def _add_grid_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--grid",
        action="store_true",
        help="train a grid of heads in one pass over the cached features (--protocol cached): "
        "every --grid-lrs x --grid-layers, the same batches, AdamW and schedule; summary.json "
        "lists every head's mIoU and names the best (no pred/ PNGs or pictures)",
    )
    p.add_argument(
        "--grid-lrs",
        type=positive_float,
        nargs="+",
        default=None,
        metavar="LR",
        help="AdamW rates of the grid (default " + " ".join(f"{lr:g}" for lr in SEG_GRID_LRS) + ")",
    )
    p.add_argument(
        "--grid-layers",
        type=int,
        nargs="+",
        choices=SEG_GRID_LAYERS,
        default=None,
        help="heads on the last block and/or the last 4 (default: --layers)",
    )


def _add_length_options(p: argparse.ArgumentParser) -> None:
    """The protocol (cached or dinov2), how long the probe trains, and the grid of heads."""
    _add_grid_options(p)
    p.add_argument(
        "--protocol",
        choices=tuple(PROTOCOLS),
        default=None,
        help="cached: "
        + PROTOCOLS["cached"]
        + " (the default on a CPU); dinov2: "
        + PROTOCOLS["dinov2"]
        + " (the default on a GPU)",
    )
    p.add_argument(
        "--iters",
        type=positive_int,
        default=None,
        help=f"probe iterations (default: {DINOV2_ITERS} with --protocol dinov2, --epochs "
        "epochs with --protocol cached)",
    )
    p.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help="train this many passes over the training images (with --cached-views windows: "
        "over all the cached views) instead of --iters (default with --protocol cached: "
        f"{CACHED_EPOCHS}, DINOv2's 40k iterations x 16 over ADE20K)",
    )
    p.add_argument(
        "--copies",
        type=positive_int,
        default=None,
        help="--protocol cached: views cached per training image: augmented crops (default "
        f"{DEFAULT_COPIES['crops']}), or with --cached-views windows the windows of the image plus "
        f"COPIES - 1 augmented crops (default {DEFAULT_COPIES['windows']}: the windows alone)",
    )
    p.add_argument(
        "--cached-views",
        choices=tuple(CACHED_VIEWS),
        default=None,
        help="--protocol cached: crops (the default): "
        + CACHED_VIEWS["crops"]
        + " (as many copies as epochs is the dinov2 protocol's run); windows: "
        + CACHED_VIEWS["windows"],
    )
    p.add_argument(
        "--feature-cache",
        metavar="DIR",
        default=None,
        help="--protocol cached: where the features are kept (default OUT/features); another "
        "probe of the same encoder and data with this DIR reuses them",
    )


def _check(args: argparse.Namespace) -> None:
    for name in ("iters", "epochs", "copies", "batch_size", "crop", "stride", "warmup_iters"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup_iters" else 1):
            raise SiamaeError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.iters is not None and args.epochs is not None:
        raise SiamaeError("--iters and --epochs both set the probe's length; give one of them")
    if args.lr <= 0:
        raise SiamaeError(f"--lr must be positive, got {args.lr}")
    if min(args.scale) <= 0:
        raise SiamaeError(f"--scale must be two positive sizes, got {list(args.scale)}")
    _check_grid(args)


def _check_grid(args: argparse.Namespace) -> None:
    """--grid's options, checked before any work."""
    given = [f"--grid-{n}" for n in ("lrs", "layers") if getattr(args, f"grid_{n}") is not None]
    if not args.grid:
        if given:
            raise SiamaeError(f"{given[0]} sets the grid of heads; add --grid or drop it")
        return
    if args.protocol == "dinov2":
        raise SiamaeError("--grid trains its heads on cached features; use --protocol cached")
    if any(not math.isfinite(lr) for lr in args.grid_lrs or ()):
        raise SiamaeError(f"--grid-lrs must be finite, got {args.grid_lrs}")


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
    _check(args)
    device = resolve_device(args.device)
    if not _names_fine_tuned(args.checkpoint):
        args.protocol = _resolve_protocol(args, device)  # said first
    apply_threads_option(args)
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
    if fine_tuned is not None and args.grid:
        raise SiamaeError(
            f"--grid trains probes of an encoder; --checkpoint {args.checkpoint!r} is a "
            "fine-tuned segmentation model (drop --grid to score it)"
        )
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


def _names_fine_tuned(checkpoint: str | None) -> bool:
    """Whether --checkpoint is a segmentation fine-tuning run or its export (no probe)."""
    if not checkpoint:
        return False
    if Path(checkpoint).suffix == ".safetensors":
        return _is_seg_export(checkpoint)
    return is_segmentation_checkpoint(checkpoint)


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
    layers = max(_grid_layers(args)) if args.grid else args.layers

    def check_layers(encoder: Encoder) -> None:
        if layers > encoder.depth:
            flag = "--grid-layers" if args.grid else "--layers"
            raise SiamaeError(f"{flag} {layers}: the encoder has {encoder.depth} blocks")
        check_crop(args.crop, encoder.patch_size)

    protocol = args.protocol
    encoder, source = encoder_from_args(args, check=check_layers)
    train_set = open_segmentation(args.data, args.train_split, args.layout, args.num_classes)
    views = args.cached_views or ProbeConfig.cached_views
    cfg = ProbeConfig(
        layers=layers,
        iters=1,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        crop=args.crop,
        scale=tuple(args.scale),
        photometric=not args.no_photometric,
        seed=args.seed,
        num_workers=args.num_workers,
        protocol=protocol,
        copies=args.copies or DEFAULT_COPIES[views],
        cached_views=views,
    )
    cfg.iters = _probe_iters(args, cfg, train_set)
    cfg.warmup_iters = (
        args.warmup_iters if args.warmup_iters is not None else int(round(cfg.iters * WARMUP_SHARE))
    )
    if args.grid:
        return _train_grid(args, encoder, source, train_set, val_set, cfg, device, inference)
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
        feature_cache=args.feature_cache,
    )


def _grid_layers(args: argparse.Namespace) -> tuple[int, ...]:
    return tuple(dict.fromkeys(args.grid_layers or (args.layers,)))


def _train_grid(
    args: argparse.Namespace,
    encoder: Encoder,
    source: str,
    train_set: SegmentationSet,
    val_set: SegmentationSet,
    cfg: ProbeConfig,
    device: torch.device,
    inference: InferenceConfig,
) -> dict[str, Any]:
    specs = seg_grid_specs(tuple(dict.fromkeys(args.grid_lrs or SEG_GRID_LRS)), _grid_layers(args))
    summary = train_probe_grid(
        encoder,
        train_set,
        val_set,
        args.out,
        cfg,
        specs,
        inference,
        device,
        resume=not args.no_resume,
        progress=not args.no_progress,
        source=source,
        feature_cache=args.feature_cache,
    )
    best = summary["best_head"]
    print(f"{len(specs)} heads trained together: best {best['name']}, mIoU {best['mIoU']:.2f}")
    return summary


def _resolve_protocol(args: argparse.Namespace, device: torch.device) -> str:
    """--protocol, or the device's default (cached on a CPU, dinov2 on a GPU), said on the
    first line of the output."""
    gpu = device.type == "cuda"
    protocol = args.protocol or ("dinov2" if gpu and not args.grid else "cached")
    cached_only = {
        "--copies": args.copies is not None,
        "--feature-cache": args.feature_cache is not None,
        "--cached-views": args.cached_views is not None,
    }
    if protocol == "dinov2" and any(cached_only.values()):
        flag = next(name for name, given in cached_only.items() if given)
        raise SiamaeError(f"{flag} is for --protocol cached; drop it or pass --protocol cached")
    chosen = "as asked" if args.protocol else f"the default on {'a GPU' if gpu else 'a CPU'}"
    if args.grid and not args.protocol and gpu:
        chosen = "--grid's"
    other = "cached" if protocol == "dinov2" else "dinov2"
    print(
        f"segmentation probe, protocol {protocol} ({chosen}): {PROTOCOLS[protocol]}; "
        f"--protocol {other} for the other way"
    )
    return protocol


def _probe_iters(args: argparse.Namespace, cfg: ProbeConfig, train_set: SegmentationSet) -> int:
    """--iters, or --epochs (default: DINOv2's 40k iterations, or CACHED_EPOCHS when cached)
    passes over the training set: its images (dinov2), or the views cached (cached)."""
    if args.iters is not None:
        return args.iters
    if cfg.protocol == "dinov2" and args.epochs is None:
        return DINOV2_ITERS
    epochs = args.epochs or CACHED_EPOCHS
    if cfg.protocol == "dinov2" or cfg.cached_views == "crops":  # an epoch: a crop of each image
        return epochs * max(1, len(train_set) // cfg.batch_size)
    views = len(cached_views(train_set, cfg))
    return epochs * batches_per_epoch(views, cfg.batch_size)


def _is_seg_export(path: str) -> bool:
    side = Path(path).with_suffix(".json")
    try:
        return json.loads(side.read_text()).get("format") == "siamae-export-segmentation-v1"
    except (OSError, ValueError, AttributeError):
        return False
