"""``siamae eval davis|vip|jhmdb --score-only PRED_DIR``: the command, without torch.

The ``siamae`` command imports torch (and timm) to build its parser, a few seconds that would
be most of a scoring run. So its entry point first offers the command line to
:func:`score_without_torch`: when it is ``eval <benchmark> --score-only ...`` naming only the
scoring options (no abbreviation, no ``-h``), it is parsed and run here; any other command line
(or any doubt) goes to the full parser, which runs the same :func:`run_score_only`.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from siamae.cores import usable_cores
from siamae.errors import SiamaeError
from siamae.eval.propagation import scoring
from siamae.paths import check_writable, run_reporting_errors

BENCHMARKS = ("davis", "vip", "jhmdb")

# glibc's mallopt parameters (malloc.h) and the values a scoring process runs with.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_KEEP_FREED_MEMORY = {
    _M_MMAP_THRESHOLD: 32 << 20,
    _M_TRIM_THRESHOLD: 256 << 20,
    _M_TOP_PAD: 64 << 20,
}


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse (where the C library is glibc; else nothing).

    Scoring a frame allocates and frees a few arrays of a frame's size; by default glibc maps
    each from the kernel and gives it back when freed, so every frame faults its pages in again:
    on the 12 shared DAVIS sequences about 350,000 page faults and a second of system time, a
    fifth of the run (docs/propagation.md). Kept, the process stays within about 100 MiB.
    Called only by the command (the process is then ours), never by the library functions.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process runs on
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return all(mallopt(param, value) == 1 for param, value in _KEEP_FREED_MEMORY.items())


def scoring_threads(requested: int | None) -> int:
    """``--threads`` (1 or more), else ``OMP_NUM_THREADS`` when set, else the usable cores; the
    line saying which is printed."""
    if requested is not None and requested < 1:
        raise SiamaeError(f"--threads must be 1 or more, got {requested}")
    env = os.environ.get("OMP_NUM_THREADS", "")
    cores = usable_cores()
    if requested is not None:
        threads, source = requested, "set by --threads"
    elif env.isdigit() and int(env) > 0:
        threads, source = int(env), "set by OMP_NUM_THREADS"
    else:
        threads, source = cores, "the usable cores"
    plural = "s" if threads != 1 else ""
    print(f"threads: {threads} scoring thread{plural} ({source}; {cores} usable cores)")
    return threads


def run_score_only(args: argparse.Namespace, benchmark: str) -> int:
    """Score ``args.score_only`` against ``args.data_root``'s annotations; print the figures and
    where they were written (``--out``, else the predictions folder)."""
    threads = scoring_threads(args.threads)
    keep_freed_memory()
    out = Path(args.out) if args.out else Path(args.score_only)
    progress = not args.no_progress
    if benchmark == "davis":
        summary = scoring.score_davis_folder(
            args.data_root,
            args.score_only,
            out,
            sequences=[s for s in (args.sequences or "").split(",") if s] or None,
            split=args.split,
            void=args.void,
            threads=threads,
            progress=progress,
        ).summary
        skipped = f"; skipped (no complete folder): {', '.join(summary['skipped'])}"
        print(
            f"DAVIS J&F-Mean {summary['J&F-Mean']:.4f} (J {summary['J-Mean']:.4f}, "
            f"F {summary['F-Mean']:.4f}) over {summary['objects']} objects in "
            f"{len(summary['sequences'])} sequences{skipped if summary['skipped'] else ''}"
        )
        print(f"  per_sequence.csv, summary.json in {out}")
    elif benchmark == "vip":
        summary = scoring.score_vip_folder(
            args.data_root, args.score_only, out, args.split, threads, progress
        )
        print(f"VIP mIoU {summary['mIoU']:.4f} over {summary['videos']} videos")
        print(f"  summary.json in {out}")
    else:
        summary = scoring.score_jhmdb_folder(
            args.data_root, args.score_only, out, args.split, threads, progress
        )
        skipped = f"; skipped (no prediction): {len(summary['skipped'])} clips"
        print(
            f"JHMDB PCK@0.1 {summary['PCK@0.1']:.2f}, PCK@0.2 {summary['PCK@0.2']:.2f} over "
            f"{summary['clips']} clips{skipped if summary['skipped'] else ''}"
        )
        print(f"  per_clip.csv, summary.json in {out}")
    return 0


class _NotScoringOnly(Exception):
    """The command line is not one :func:`score_without_torch` answers."""


class _ScoringParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _NotScoringOnly(message)


def _scoring_parser(benchmark: str) -> _ScoringParser:
    """The scoring options of ``siamae eval <benchmark>`` and nothing else (the full parser
    defines and documents them)."""
    p = _ScoringParser(prog=f"siamae eval {benchmark}", add_help=False, allow_abbrev=False)
    p.add_argument("--score-only", required=True)
    p.add_argument("--data-root", required=True)
    p.add_argument("--out")
    p.add_argument("--threads", type=int)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--split")
    if benchmark == "davis":
        p.add_argument("--sequences")
        p.add_argument("--void", choices=("background", "ignore"), default="background")
    return p


def score_without_torch(argv: Sequence[str]) -> int | None:
    """The exit code of ``eval <benchmark> --score-only ...`` when it names only scoring options,
    run without importing torch; None for any other command line (the full CLI answers it).
    Errors as the full CLI gives them: one line, exit code 2."""
    argv = list(argv)
    if len(argv) < 2 or argv[0] != "eval" or argv[1] not in BENCHMARKS:
        return None
    if not any(a == "--score-only" or a.startswith("--score-only=") for a in argv[2:]):
        return None
    try:
        args = _scoring_parser(argv[1]).parse_args(argv[2:])
    except _NotScoringOnly:
        return None

    def command() -> int:
        if args.out:
            check_writable(args.out, "--out")
        return run_score_only(args, argv[1])

    return run_reporting_errors(command)
