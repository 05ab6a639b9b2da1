"""Command-line options that several commands share, each written once, with what reads them.

- the encoder source: ``--checkpoint`` or ``--random-init`` (one of them), with
  ``--pos-resample`` (:func:`add_encoder_source`, read by :func:`encoder_from_args`);
- ``--device`` (:func:`add_device_option`, read by :func:`resolve_device`);
- ``--out``: a JSON file of the result (:func:`add_result_file_option`,
  :func:`write_result_file`) or a folder of outputs (:func:`add_output_folder_option`);
- ``--threads`` (:func:`add_threads_option`, :func:`apply_threads_option`);
- the ``type=`` of every numeric option that has a lower bound: :func:`positive_int`,
  :func:`non_negative_int`, :func:`positive_float`, :func:`non_negative_float`.

Every ``siamae`` parser is a :class:`OneLineErrorParser`: a bad option is one line, exit 2.

Every evaluation command (probes, propagation, segmentation, homology) takes them from here; a
new command does too. ``tests/test_arguments.py`` checks that each command shows them alike.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch

from siamae.errors import SiamaeError
from siamae.loading import describe_encoder, load_encoder, random_encoder
from siamae.models.vit import Encoder
from siamae.threads import apply_thread_policy

CHECKPOINT_HELP = (
    "encoder: training checkpoint, run folder, exported .safetensors, or a timm/DINO/MAE/"
    "CropMAE state dict ('model', 'state_dict', 'teacher' keys; 'module.', 'backbone.' prefixes)"
)
RANDOM_INIT_HELP = (
    "an untrained encoder, the baseline every table needs, e.g. vit_small_patch16 or "
    "vit_tiny_patch8_32 (seeded by --seed)"
)
DEVICE_CHOICES = "auto (cuda if there is one, else cpu), cpu, cuda or cuda:N"


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, ``siamae: error: ...``, exit 2, as every
    other bad input is (argparse prints the whole usage first). Its subcommands' parsers are of
    this class too: ``add_subparsers`` makes them of the parent's class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"siamae: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _bounded(kind: type[int] | type[float], low: float, inclusive: bool) -> Callable[[str], Any]:
    """An argparse ``type=``: ``kind`` of the text, refused below ``low`` (or at it, unless
    ``inclusive``)."""
    noun = "an integer" if kind is int else "a number"
    expected = f"{noun}, {low:g} or more" if inclusive else f"{noun} above {low:g}"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low or (value == low and not inclusive) or value != value:  # NaN too
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    parse.__name__ = f"{'non_negative' if inclusive else 'positive'}_{kind.__name__}"
    return parse


positive_int = _bounded(int, 0, inclusive=False)
non_negative_int = _bounded(int, 0, inclusive=True)
positive_float = _bounded(float, 0.0, inclusive=False)
non_negative_float = _bounded(float, 0.0, inclusive=True)


def add_encoder_source(
    p: argparse.ArgumentParser, checkpoint_help: str = CHECKPOINT_HELP, required: bool = True
) -> None:
    """``--checkpoint`` or ``--random-init`` (exactly one) and ``--pos-resample``.

    ``checkpoint_help``: :data:`CHECKPOINT_HELP`, or it followed by what else this command's
    ``--checkpoint`` accepts. :func:`encoder_from_args` reads them (and the command's ``--seed``).
    ``required=False``: the command checks itself that one is given when it needs an encoder
    (``siamae eval davis --score-only`` needs none).
    """
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--checkpoint", help=checkpoint_help)
    src.add_argument("--random-init", metavar="MODEL", help=RANDOM_INIT_HELP)
    add_pos_resample_option(p)


def encoder_from_args(
    args: argparse.Namespace, check: Callable[[Encoder], None] | None = None
) -> tuple[Encoder, str]:
    """The encoder :func:`add_encoder_source`'s options name, and its source as recorded in the
    results (the checkpoint's path, or ``random:<MODEL>:seed<N>``). ``check`` may refuse the
    encoder before the line describing it is printed."""
    if args.checkpoint:
        encoder = load_encoder(args.checkpoint)  # names a missing or unfit file itself
        source = args.checkpoint
    else:
        encoder = random_encoder(args.random_init, seed=args.seed)
        source = f"random:{args.random_init}:seed{args.seed}"
    encoder.pos_resample = args.pos_resample
    if check is not None:
        check(encoder)
    print(describe_encoder(encoder))
    return encoder, source


def add_pos_resample_option(p: argparse.ArgumentParser) -> None:
    """``--pos-resample``, shared by every evaluation command (probes and propagation)."""
    p.add_argument(
        "--pos-resample",
        choices=("dino", "timm"),
        default="dino",
        help="position grid at sizes other than the trained one: dino (default, as the "
        "published evaluations: bicubic, scale factor (h + 0.1) / h0, no antialias) or timm "
        "(timm's antialiased resample_abs_pos_embed)",
    )


def add_device_option(p: argparse.ArgumentParser, default: str = "auto", note: str = "") -> None:
    """``--device``; ``note`` starts the help where the option serves only part of a command."""
    p.add_argument("--device", default=default, help=f"{note}{DEVICE_CHOICES} (default: {default})")


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available, else cpu; a CUDA device that is not there is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SiamaeError(
            f"device {name!r} was asked for but CUDA is not available; use --device cpu"
        )
    return torch.device(name)


def add_result_file_option(p: argparse.ArgumentParser) -> None:
    """``--out FILE``: the result, also as JSON (:func:`write_result_file`)."""
    p.add_argument("--out", help="also write the result as JSON to this file")


def write_result_file(path: str | Path, record: dict[str, Any]) -> Path:
    """``record`` as indented JSON at ``path`` (its folder made if need be)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def add_output_folder_option(
    p: argparse.ArgumentParser,
    holds: str,
    flag: str = "--out",
    default: str | None = None,
    required: bool = False,
) -> None:
    """``--out DIR`` (or ``flag``): the folder of the command's outputs, ``holds`` saying what
    goes there; ``default`` describes the folder used without it (the command computes it)."""
    shown = f" (default: {default})" if default else ""
    p.add_argument(flag, required=required, metavar="DIR", help=f"output folder: {holds}{shown}")


def add_threads_option(p: argparse.ArgumentParser) -> None:
    """``--threads``, shared by every evaluation command (probes and propagation)."""
    p.add_argument(
        "--threads",
        type=int,  # 1 or more: apply_threads_option says so in its own words
        default=None,
        help="torch threads of this process (default: the usable cores, less --num-workers "
        "where the command has it, at least 1; OMP_NUM_THREADS if set)",
    )


def apply_threads_option(args: argparse.Namespace) -> None:
    """Set torch's thread count from ``--threads`` or the policy, and print it."""
    if args.threads is not None and args.threads < 1:
        raise SiamaeError(f"--threads must be 1 or more, got {args.threads}")
    workers = getattr(args, "num_workers", 0)  # propagation reads frames in this process
    print(apply_thread_policy(args.threads, workers, requested_by="--threads").describe())
