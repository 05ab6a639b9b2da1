"""Command-line options that several commands share, each written once.

``--pos-resample`` and ``--threads`` are every evaluation command's (probes and propagation);
a new command takes them from here.
"""

from __future__ import annotations

import argparse

from siamae.errors import SiamaeError
from siamae.threads import apply_thread_policy


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


def add_threads_option(p: argparse.ArgumentParser) -> None:
    """``--threads``, shared by every evaluation command (probes and propagation)."""
    p.add_argument(
        "--threads",
        type=int,
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
