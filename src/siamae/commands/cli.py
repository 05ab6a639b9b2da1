"""The ``siamae`` command. Thin: it parses arguments and calls the library.

Its entry point is :mod:`siamae.commands.entry`, which sets the OpenMP environment before this module (and
with it torch) is imported.

Bad input (a missing path, a bad config field, a checkpoint that does not fit) prints one line
naming the problem and what to do, and exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from collections.abc import Sequence
from typing import Any

import torch

from siamae import __version__
from siamae.arguments import (
    OneLineErrorParser,
    add_device_option,
    non_negative_int,
    positive_int,
)
from siamae.commands import compare, export_command, submit
from siamae.commands.demo import run_demo
from siamae.commands.viz import visualize_checkpoint
from siamae.config import Config
from siamae.data import shard_writer, video_prepare
from siamae.engine.trainer import train
from siamae.eval import homology
from siamae.eval.attention import run_command
from siamae.eval.probes import cli as probe_cli
from siamae.eval.probes.monitor import build_monitor
from siamae.eval.propagation import cli as propagation_cli
from siamae.eval.segmentation import cli as segmentation_cli
from siamae.finetune import segmentation
from siamae.finetune.command import command_overrides
from siamae.paths import check_writable, run_reporting_errors
from siamae.recipes import load_config, recipe_value
from siamae.registry import METHODS


def _pretrain_config(args: argparse.Namespace) -> Config:
    def flags(recipe: dict[str, Any]) -> list[str]:
        layer = [] if args.out is None else [f"run.out_dir={args.out}"]
        if args.data is None:
            return layer
        layer.append(f"data.path={args.data}")
        method = METHODS.get(str(recipe_value(recipe, "method")))
        if recipe_value(recipe, "data.source") == "synthetic" and method is not None:
            # --data names real data: read it as images (or videos for frame-pair methods).
            layer.append(f"data.source={'videos' if method.view_kind == 'frames' else 'images'}")
        return layer

    return load_config(args.config, args.set, flags=flags)


def _pretrain(args: argparse.Namespace) -> int:
    cfg = _pretrain_config(args)
    resume: str | bool = args.resume if args.resume else ("auto" if not args.no_resume else False)
    summary = train(cfg, resume=resume, monitor=build_monitor)
    if summary.get("world_size", 1) == 1 or _is_rank0():
        _print_summary(summary)
    return exit_code(summary)


# A run stopped by a signal saved its checkpoint, but it did not finish: scripts must not read
# it as done. The shell's convention: 128 + the signal number.
# SIGUSR2: a cluster's warning before a time limit or a preemption (140 on Linux; siamae submit
# requeues the job on it).
INTERRUPTED_EXIT_CODES = {
    "SIGINT": 130,
    "SIGTERM": 143,
    **({"SIGUSR2": 128 + signal.SIGUSR2} if hasattr(signal, "SIGUSR2") else {}),  # POSIX only
}


def exit_code(summary: dict) -> int:
    """0 for a finished run, 130 / 143 / 140 for a run stopped (and saved) by SIGINT / SIGTERM /
    SIGUSR2."""
    return INTERRUPTED_EXIT_CODES.get(summary.get("interrupted") or "", 0)


def _is_rank0() -> bool:
    # Under plain srun RANK is set only once the run joins its group: SLURM_PROCID says it first.
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def _print_summary(summary: dict) -> None:
    if summary["interrupted"]:
        print(
            f"interrupted ({summary['interrupted']}) at step {summary['step']}/{summary['total_steps']}; "
            f"checkpoint saved to {summary['checkpoint']}. Run the same command again to resume."
        )
        return
    loss = summary["final_loss"]
    print(
        f"done: {summary['method']}, {summary['step']} steps, final loss {loss:.4f}"
        if loss is not None
        else "done"
    )
    print(f"  run folder:     {summary['run_dir']}")
    print(f"  checkpoint:     {summary['checkpoint']}")
    for key in ("reconstruction", "loss_curve"):
        if key in summary:
            print(f"  {key.replace('_', ' '):15s} {summary[key]}")
    if summary.get("skipped"):
        print(
            f"  skipped {summary['skipped']} unreadable files (listed in {summary['run_dir']}/skipped_files.txt)"
        )


def _finetune_config(args: argparse.Namespace) -> Config:
    def flags(recipe: dict[str, Any]) -> list[str]:
        # The task is the method the recipe names once --set is applied: its flags name its
        # own fields (segmentation.val, not finetune.val).
        if recipe_value(recipe, "method") == segmentation.METHOD_NAME:
            return segmentation.command_overrides(args.data, args.val, args.checkpoint, args.out)
        return command_overrides(args.data, args.val, args.checkpoint, args.out)

    return load_config(args.config, args.set, flags=flags)


def _finetune(args: argparse.Namespace) -> int:
    cfg = _finetune_config(args)
    rank0 = _is_rank0()
    if cfg.method != segmentation.METHOD_NAME and cfg.finetune.val is None and rank0:
        print(
            "siamae: note: no validation folder (no --val, and --data holds no val/, "
            "validation/ or test/ split): training without any evaluation; pass --val DIR "
            "for top-1",
            file=sys.stderr,
        )
    resume: str | bool = args.resume if args.resume else ("auto" if not args.no_resume else False)
    summary = train(cfg, resume=resume, monitor=build_monitor)
    if summary.get("world_size", 1) > 1 and not rank0:
        return exit_code(summary)
    _print_summary(summary)
    if summary["interrupted"]:  # a stopped run's figures are not the run's result
        return exit_code(summary)
    for key, value in summary.get("eval", {}).items():
        print(f"  {key + ':':15s} {value:.4f}")
    if summary.get("skipped_at_start") and cfg.method == segmentation.METHOD_NAME:
        print(
            f"  training split: {summary['skipped_at_start']} unpaired files skipped (an image "
            f"without its mask, or a listed name that is missing; listed in "
            f"{summary['run_dir']}/skipped_files.txt)"
        )
    elif summary.get("skipped_at_start"):
        print(
            f"  validation:     {summary['skipped_at_start']} unreadable images skipped (listed "
            f"in {summary['run_dir']}/skipped_files.txt); top-1 is over the others"
        )
    if summary.get("eval"):
        print(f"  best checkpoint: {summary['run_dir']}/checkpoints/best.pt")
    if cfg.method == segmentation.METHOD_NAME and summary.get("eval"):
        print(f"  results:        {summary['run_dir']}/{segmentation.RESULTS_DIR}/summary.json")
    return exit_code(summary)


def _visualize(args: argparse.Namespace) -> int:
    if args.what == "attention":
        return run_command(args)

    path = visualize_checkpoint(
        args.checkpoint, args.out, data=args.data, count=args.count, seed=args.seed
    )
    print(f"reconstructions written to {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    run_demo(out_dir=args.out, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="siamae",
        description="Pre-train ViTs with CropMAE, SiamMAE, SiameseIM, MixedAE or MAE, fine-tune "
        "them, and evaluate frozen encoders.",
    )
    parser.add_argument("--version", action="version", version=f"siamae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_demo(sub)
    _add_pretrain(sub)
    _add_finetune(sub)
    _add_visualize(sub)
    _add_eval(sub)
    # top-level commands register here
    export_command.register(sub)
    compare.register(sub)
    video_prepare.register(shard_writer.register(sub))
    # The job's tasks run this module's main: handed in, so submit does not import it back.
    configs = {"pretrain": _pretrain_config, "finetune": _finetune_config}
    submit.register(sub, parser, configs, run_command=main)
    return parser


def _add_demo(sub: argparse._SubParsersAction) -> None:
    """``siamae demo``."""
    p = sub.add_parser(
        "demo", help="pre-train a tiny CropMAE on built-in data (a few minutes on a CPU)"
    )
    p.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument(
        "--quick", action="store_true", help="a few steps only: checks the whole path in seconds"
    )
    p.set_defaults(func=_demo)


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    """``siamae pretrain``."""
    p = sub.add_parser("pretrain", help="pre-train an encoder from a config file")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a field, e.g. --set optim.base_lr=1e-3 (repeatable)",
    )
    p.add_argument("--data", help="data path (image folder, list file, videos); sets data.path")
    p.add_argument("--out", help="run folder; sets run.out_dir")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--resume",
        metavar="CHECKPOINT",
        help="resume from this checkpoint (default: the run folder's last.pt, if any)",
    )
    group.add_argument(
        "--no-resume",
        action="store_true",
        help="start from scratch even if the run folder has a checkpoint",
    )
    p.set_defaults(func=_pretrain)


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    """``siamae finetune``."""
    p = sub.add_parser(
        "finetune",
        help="fine-tune an encoder on a labelled ImageFolder (MAE/BEiT protocol), top-1 each "
        "epoch; or, with a segmentation config (method: segmentation), UperNet on a segmentation "
        "data set, mIoU",
    )
    p.add_argument("--config", required=True, help="YAML config (configs/finetune_*.yaml)")
    p.add_argument(
        "--checkpoint",
        help="pre-trained encoder: training checkpoint, run folder, export or timm/MAE state dict "
        "('none': random init); sets finetune.checkpoint",
    )
    p.add_argument(
        "--data",
        help="ImageFolder DIR/<class>/<image>, or DIR holding train/ (or training/) and val/ "
        "(or validation/, valid/, test/); segmentation: an ADE20K, VOC or images/+masks/ folder",
    )
    p.add_argument(
        "--val",
        help="validation ImageFolder (default: DIR's val/, validation/, valid/ or test/; none: "
        "no evaluation, said at the start); segmentation: another data set folder (default: "
        "DIR's val split)",
    )
    p.add_argument("--out", help="run folder; sets run.out_dir")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a field (repeatable)"
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", metavar="CHECKPOINT", help="resume from this checkpoint")
    group.add_argument("--no-resume", action="store_true", help="start from scratch")
    p.set_defaults(func=_finetune)


def _add_visualize(sub: argparse._SubParsersAction) -> None:
    """``siamae visualize``."""
    p = sub.add_parser(
        "visualize",
        help="pictures from a checkpoint: reconstructions (default) or attention maps",
        description="siamae visualize --checkpoint RUN: reconstructions of a training run. "
        "siamae visualize attention --checkpoint ANY --images A.jpg B.jpg: the last block's "
        "CLS attention per head over each image, with the mask keeping --keep of its mass.",
    )
    p.add_argument(
        "what",
        nargs="?",
        choices=("reconstruction", "attention"),
        default="reconstruction",
        help="reconstruction (default) or attention",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="training checkpoint (.pt) or run folder; attention: any encoder load_encoder reads",
    )
    p.add_argument("--images", nargs="+", help="attention: the image files")
    p.add_argument(
        "--keep", type=float, default=0.6, help="attention: share of the mass the mask keeps"
    )
    p.add_argument(
        "--resize", type=positive_int, help="attention: resize the short side first (pixels)"
    )
    add_device_option(p, note="attention: ")
    p.add_argument("--data", help="data path (default: the checkpoint's own data config)")
    p.add_argument(
        "--out",
        help="PNG file (default: <run folder>/reconstruction_step<N>.png); attention: the "
        "folder for one PNG per image (default: attention_maps)",
    )
    p.add_argument("--count", type=positive_int, default=4, help="how many samples (rows)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="which crops and masks to draw")
    p.set_defaults(func=_visualize)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    """``siamae eval BENCHMARK``: each evaluation room registers its commands."""
    eval_parser = sub.add_parser("eval", help="evaluate a frozen encoder")
    eval_sub = eval_parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    # eval commands register here
    probe_cli.register(eval_sub)
    propagation_cli.register(eval_sub)
    homology.register(eval_sub)
    segmentation_cli.register(eval_sub)


# What the allocators say when memory runs out: torch's CPU allocator (Linux, Windows), CUDA's.
_OUT_OF_MEMORY_MESSAGES = ("can't allocate memory", "not enough memory", "out of memory")
# The size asked for, as torch ("tried to allocate 1099511627776 bytes", "Tried to allocate
# 20.00 GiB") and numpy ("Unable to allocate 7.45 GiB for an array") write it.
_ASKED_FOR = re.compile(r"(?i)(?:tried to|unable to) allocate ([\d.]+) ?(bytes|[KMGTP]i?B)")
_UNITS = {"bytes": 1, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "PIB": 2**50}
_UNITS |= {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15}
# The options that set a command's memory, by the argparse attribute that holds them.
_MEMORY_OPTIONS = {
    "batch_size": "--batch-size",
    "img_size": "--img-size",
    "resize": "--resize",
    "crop": "--crop",
}
# The commands that train: their options are config fields, and their checkpoint stays.
_TRAINING_COMMANDS = ("pretrain", "finetune", "demo")


def is_out_of_memory(err: BaseException) -> bool:
    """An allocation that failed: MemoryError, torch's OutOfMemoryError (CUDA, MPS, XPU) or the
    RuntimeError torch's CPU allocator raises."""
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(m in text for m in _OUT_OF_MEMORY_MESSAGES)


def _asked_for(err: BaseException) -> str:
    found = _ASKED_FOR.search(str(err))
    if found is None:
        return "more memory than there is"
    size = float(found.group(1)) * _UNITS.get(found.group(2).upper().replace("BYTES", "bytes"), 1)
    return f"{size / 2**30:.2f} GiB" if size >= 2**20 else f"{size:.0f} bytes"


def out_of_memory_line(err: BaseException, args: argparse.Namespace) -> str:
    """One line for an allocation that failed anywhere in a command: the memory asked for and
    the options that set it."""
    if args.command in _TRAINING_COMMANDS:
        options = "data.batch_size or model.img_size (--set; a higher optim.accum_steps keeps "
        options += "the effective batch); the run's last checkpoint is kept"
    else:
        named = [flag for attr, flag in _MEMORY_OPTIONS.items() if hasattr(args, attr)]
        options = " or ".join(named) if named else "the size of the input"
    device = "GPU" if isinstance(err, torch.OutOfMemoryError) and "cuda" in str(err).lower() else ""
    where = f"{device} memory" if device else "memory"
    return f"out of {where}: the command asked for {_asked_for(err)}; lower {options}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def command() -> int:
        # Every command with an output path checks it before any work.
        for attr, option in (("out", "--out"), ("out_dir", "--out-dir")):
            if getattr(args, attr, None):
                check_writable(getattr(args, attr), option)
        return int(args.func(args) or 0)

    try:
        return run_reporting_errors(command)
    except (MemoryError, RuntimeError) as err:
        # Out of memory anywhere in a command, caught once here: one line, not an allocator's
        # traceback. A training run's checkpoint is written atomically and only after a whole
        # step, so its last good one stays.
        if not is_out_of_memory(err):
            raise
        print(f"siamae: error: {out_of_memory_line(err, args)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
