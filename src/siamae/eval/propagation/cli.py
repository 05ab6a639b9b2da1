"""``siamae eval davis|jhmdb|vip``: label propagation with a frozen encoder."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from siamae.arguments import (
    add_device_option,
    add_encoder_source,
    add_output_folder_option,
    add_threads_option,
    apply_threads_option,
    encoder_from_args,
    non_negative_int,
    positive_int,
    resolve_device,
)
from siamae.errors import SiamaeError
from siamae.eval.propagation import davis, jhmdb, vip
from siamae.eval.propagation.engine import PropagationParams, check_resize_rule, protocol
from siamae.eval.propagation.score_command import run_score_only
from siamae.models.vit import Encoder


def _encoder(args: argparse.Namespace) -> Encoder:
    apply_threads_option(args)
    if not (args.checkpoint or args.random_init):
        raise SiamaeError(
            "one of --checkpoint or --random-init is required (or --score-only PRED_DIR to "
            "score a folder of predictions)"
        )
    return encoder_from_args(args)[0]


def _params(args: argparse.Namespace, benchmark: str) -> PropagationParams:
    params = protocol(args.protocol, benchmark, args.set or [])
    print(params.describe())
    return params


def _out(args: argparse.Namespace, benchmark: str) -> Path:
    return Path(args.out or f"runs/eval/{benchmark}-{args.protocol}")


def _propagate(
    args: argparse.Namespace, benchmark: str, evaluate: Callable[..., Any], **options: Any
) -> tuple[Any, Path]:
    """The benchmark's ``evaluate`` on the encoder, data and protocol the options name: its
    result, and the output folder."""
    encoder = _encoder(args)
    params = _params(args, benchmark)
    check_resize_rule(params.resize, encoder.patch_size)
    out = _out(args, benchmark)
    result = evaluate(
        encoder,
        args.data_root,
        out,
        params,
        **options,
        device=resolve_device(args.device),
        progress=not args.no_progress,
    )
    return result, out


def _davis(args: argparse.Namespace) -> int:
    if args.score_only:
        return run_score_only(args, "davis")
    result, out = _propagate(
        args,
        "davis",
        davis.evaluate_davis,
        sequences=[s for s in (args.sequences or "").split(",") if s] or None,
        split=args.split,
        score_at=args.score_at,
        void=args.void,
        overlays=[s for s in (args.overlay or "").split(",") if s],
        overlay_kind=args.overlay_format,
        max_frames=args.max_frames,
    )
    print(davis.format_summary(result.summary))
    print(f"  predictions, per_sequence.csv, summary.json in {out}")
    return 0


def _jhmdb(args: argparse.Namespace) -> int:
    if args.score_only:
        return run_score_only(args, "jhmdb")
    summary, out = _propagate(
        args, "jhmdb", jhmdb.evaluate_jhmdb, split=args.split, max_clips=args.max_clips
    )
    print(jhmdb.format_summary(summary))
    print(f"  summary.json in {out}")
    return 0


def _vip(args: argparse.Namespace) -> int:
    if args.score_only:
        return run_score_only(args, "vip")
    summary, out = _propagate(
        args,
        "vip",
        vip.evaluate_vip,
        split=args.split,
        max_videos=args.max_videos,
        max_frames=args.max_frames,
    )
    print(vip.format_summary(summary))
    print(f"  predictions and summary.json in {out}")
    return 0


def _common(p: argparse.ArgumentParser, score_only: str | None = None) -> None:
    """The options every propagation command has; ``score_only``: the help of its
    ``--score-only PRED_DIR`` (then no encoder is required)."""
    add_encoder_source(p, required=score_only is None)
    if score_only is not None:
        p.add_argument("--score-only", metavar="PRED_DIR", help=score_only)
    p.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of --random-init (default 0)"
    )
    add_threads_option(p)
    p.add_argument("--data-root", required=True, help="the benchmark's folder (official layout)")
    p.add_argument(
        "--protocol",
        choices=("cropmae", "dino"),
        default="cropmae",
        help="parameter preset: cropmae (default; CropMAE/SiamMAE/CRW) or dino",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a protocol parameter, e.g. --set topk=5 --set resize=240x432 "
        "(keys: resize, temperature, topk, radius, queue, neighbourhood, restrict_first, "
        "pad_queue, label_downsample, norm_mask, batch_size, chunk)",
    )
    add_output_folder_option(
        p, "predictions and scores", default="runs/eval/<benchmark>-<protocol>"
    )
    add_device_option(p, default="cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``davis``, ``jhmdb`` and ``vip`` to the ``siamae eval`` group."""
    p = subparsers.add_parser(
        "davis", help="DAVIS J&F by label propagation (semi-supervised, davis2017-evaluation)"
    )
    _common(
        p,
        score_only="score a folder of predicted PNGs (<dir>/<seq>/%%05d.png) against the "
        "--data-root annotations, no encoder: summary.json and per_sequence.csv go to --out "
        "(default: PRED_DIR)",
    )
    p.add_argument(
        "--split",
        help="split: a file, '2017/val', '2016/val' or 'val' (default: ImageSets/2017/val.txt, "
        "else 2016)",
    )
    p.add_argument("--sequences", help="comma-separated sequence names (instead of a split)")
    p.add_argument(
        "--score-at",
        choices=("resized", "native"),
        default=None,
        help="resized: frames and annotations resized to the protocol size, as the published "
        "CropMAE figures (default for fixed-size protocols); native: the annotations' own size",
    )
    p.add_argument(
        "--void",
        choices=("background", "ignore"),
        default="background",
        help="void (255) pixels: background, as the official evaluation reads them (default), "
        "or ignored in J and F",
    )
    p.add_argument(
        "--overlay", help="comma-separated sequences (or 'all') to picture in <out>/overlays/"
    )
    p.add_argument("--overlay-format", choices=("png", "gif"), default="png")
    p.add_argument(
        "--max-frames",
        type=int,  # 3 or more, checked by davis with its own message
        help="only the first N frames of each sequence, counting the annotated first frame "
        "(N >= 3: frame 0 is given, frames 1..N-1 are propagated, all but the last scored, as "
        "in the official evaluation); a quick check, not the protocol (default: every frame)",
    )
    p.set_defaults(func=_davis)

    p = subparsers.add_parser("jhmdb", help="JHMDB keypoint propagation, PCK@0.1 and @0.2")
    _common(
        p,
        score_only="score a folder of predicted joints (<dir>/<action>__<clip>_joints.npy, as "
        "this command writes them) against the --data-root joint_positions.mat, no encoder: "
        "summary.json and per_clip.csv go to --out (default: PRED_DIR)",
    )
    p.add_argument("--split", help="file of clips (action/clip, or CRW's vallist format)")
    p.add_argument("--max-clips", type=positive_int, help="only the first N clips (a quick check)")
    p.set_defaults(func=_jhmdb)

    p = subparsers.add_parser("vip", help="VIP part propagation, mIoU over 20 classes")
    _common(
        p,
        score_only="score a folder of predicted class-id PNGs (<dir>/<video>/<frame>.png) "
        "against the --data-root annotations, no encoder: summary.json goes to --out "
        "(default: PRED_DIR)",
    )
    p.add_argument("--split", help="file of video names")
    p.add_argument(
        "--max-videos", type=positive_int, help="only the first N videos (a quick check)"
    )
    p.add_argument("--max-frames", type=positive_int, help="only the first N frames of each video")
    p.set_defaults(func=_vip)
