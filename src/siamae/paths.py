"""Output paths checked before any work: a run that cannot write its results fails at once; a
command's bad input and unwritable outputs reported on one line."""

from __future__ import annotations

import errno
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from siamae.errors import SiamaeError

WHY = {
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOSPC: "no space left",
    errno.EDQUOT: "disk quota exceeded",
}

# Errors of writing an output that the user can fix (the CLI reports them on one line).
OUTPUT_ERRNOS = frozenset(WHY)


def nearest_folder(path: Path) -> Path:
    """The folder a write to ``path`` lands in first: ``path`` itself if it is a folder, else its
    closest existing parent (the output and the folders above it are created later)."""
    candidate = path if path.is_dir() else path.parent
    while not candidate.exists() and candidate != candidate.parent:
        candidate = candidate.parent
    return candidate


def check_writable(path: str | Path, option: str = "--out") -> None:
    """Raise a SiamaeError naming the folder when nothing can be written under ``path``.

    The check writes (and removes) a nameless temporary file, which sees what a permission test
    cannot: a read-only mount, a full disk, a root-owned folder with root-squash.
    """
    folder = nearest_folder(Path(path).expanduser().absolute())
    if not folder.is_dir():
        raise SiamaeError(
            f"{option} {str(path)!r}: {str(folder)!r} is a file, not a folder; "
            "choose an output path inside a folder"
        )
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        why = WHY.get(err.errno or 0, os.strerror(err.errno) if err.errno else str(err))
        raise SiamaeError(
            f"{option} {str(path)!r}: cannot write in the folder {str(folder)!r} ({why}); "
            "choose an output folder you can write to"
        ) from None


def one_line(err: SiamaeError) -> str:
    """The error's own message, on one line. Raised in a DataLoader worker, it comes back wrapped in the
    worker's traceback ("Caught DataError in DataLoader worker process 0. Original Traceback
    ..."); its last line is the message."""
    message = str(err)
    if "Original Traceback" in message:
        last = message.strip().splitlines()[-1]
        message = last.split(": ", 1)[1] if last.startswith("siamae.errors.") else last
    return " ".join(message.split())  # one line, whatever a message quoted (a file's text, ...)


def run_reporting_errors(command: Callable[[], int]) -> int:
    """Run a command and return its exit code; bad input (a SiamaeError) and an output the user
    can fix (a full disk, a read-only folder) are one line on stderr and exit code 2, an
    interruption 130. Torch-free: the scoring-only commands use it without importing torch."""
    try:
        return command()
    except SiamaeError as err:
        print(f"siamae: error: {one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        # A disk that fills up, or a folder that turns read-only, during a run.
        if err.errno not in OUTPUT_ERRNOS:
            raise
        print(f"siamae: error: {err.strerror}: {err.filename or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("siamae: interrupted", file=sys.stderr)
        return 130
