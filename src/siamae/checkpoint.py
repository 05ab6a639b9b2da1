"""Checkpoints: plain dicts of tensors and plain data, written atomically.

A checkpoint loads with ``torch.load(path, weights_only=True)``: nothing in it is pickled code,
the config is stored as a plain dict. Writes go to a temporary file in the same folder that is
flushed, fsync-ed and renamed over the target, so a crash mid-write never leaves a torn file.
A full disk (or quota) while writing raises :class:`NoSpaceLeft`, a user error, after removing
the partial file: the previous checkpoint, untouched, still loads and resumes.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from siamae.errors import CheckpointError

TRAIN_FORMAT = "siamae-train-v1"


class NoSpaceLeft(CheckpointError):
    """The file system filled up (or a quota was reached) while a checkpoint was written."""


DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


class _RecordingWriter:
    """A binary file that remembers the OSError a write raised.

    ``torch.save`` turns an error of the file's ``write`` into a RuntimeError whose text is
    its C++ stream writer's; the recorded OSError says what happened (e.g. ENOSPC).
    """

    def __init__(self, file: Any) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as err:
            self.error = err
            raise


def write_export(
    tensors: dict[str, torch.Tensor], out: Path, sidecar: dict[str, Any]
) -> tuple[Path, Path]:
    """An export: ``tensors`` to ``out`` (.safetensors, written to a temporary name and renamed,
    with the sidecar's ``format`` and ``timm_name`` as metadata), then ``sidecar`` as JSON
    beside it (``out`` with .json). Returns both paths."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    metadata = {"format": sidecar["format"], "timm_name": sidecar["timm_name"]}
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(out)
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(sidecar, indent=2, default=str) + "\n")
    return out, json_path


def save_atomic(obj: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically (temp file + fsync + rename).

    Raises:
        NoSpaceLeft: the disk or quota filled up; the partial file is removed and ``path``, if
            it existed, is as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    writer: _RecordingWriter | None = None
    try:
        # mkstemp makes the file 0600; a checkpoint gets the permissions of any file the user
        # writes (0666 less the umask), so collaborators can read a shared run folder.
        os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as f:
            writer = _RecordingWriter(f)
            torch.save(obj, writer)
            writer.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = writer.error if writer is not None and writer.error is not None else err
        if isinstance(cause, OSError) and cause.errno in DISK_FULL_ERRNOS:
            if path.exists():
                # The new file is written beside the old one before it replaces it.
                size = path.stat().st_size / 2**20
                previous = (
                    "the previous checkpoint is intact (the partial file was removed). Free "
                    f"room for a second copy (~{size:.0f} MiB) and run the same command again"
                )
            else:
                previous = (
                    "no earlier checkpoint was there to keep (the partial file was removed). "
                    "Free some space and run the same command again"
                )
            raise NoSpaceLeft(
                f"no space left on the file system of {str(path.parent)!r} while saving "
                f"{path.name}; {previous}"
            ) from None
        raise
    return path


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


SAFE_FILES_HINT = (
    "pass a siamae checkpoint or export (.pt, .safetensors), or a plain state_dict saved with "
    "tensors only (torch.save(model.state_dict(), path))"
)


def unsafe_load_error(path: str | Path, err: Exception) -> CheckpointError:
    """The one-line error for a file ``torch.load(weights_only=True)`` refused or could not read.

    torch's own message runs over several lines and ends in advice to turn the safety off; this
    one names the pickled object it stopped at, if any, and what to pass instead.
    """
    if isinstance(err, pickle.UnpicklingError):
        # torch names the refused object as "GLOBAL module.name" (os.system, a class, ...)
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        return CheckpointError(
            f"checkpoint {str(path)!r} could not be loaded safely: it holds code or objects"
            f"{what} that siamae will not load; {SAFE_FILES_HINT}"
        )
    first = " ".join(str(err).split()).split(". ")[0][:160]  # torch's first sentence
    return CheckpointError(
        f"checkpoint {str(path)!r} could not be loaded safely: it is not a readable PyTorch file "
        f"({type(err).__name__}: {first}); it may be truncated or of another format; "
        f"{SAFE_FILES_HINT}"
    )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``) or raise a CheckpointError that says why."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not exist; pass the path of a .pt or .safetensors file"
        )
    if path.is_dir():
        candidate = path / "checkpoints" / "last.pt"
        if candidate.is_file():
            path = candidate
        else:
            raise CheckpointError(
                f"{str(path)!r} is a folder with no checkpoints/last.pt; pass a checkpoint file"
            )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return {"state_dict": load_file(str(path), device=str(map_location))}
        except Exception as err:  # safetensors raises several types for a bad file
            raise CheckpointError(
                f"checkpoint {str(path)!r} is not a readable safetensors file ({err})"
            ) from None
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise unsafe_load_error(path, err) from None
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a dict of weights"
        )
    return obj


def training_method(path: str | Path) -> str | None:
    """The ``method`` of the training checkpoint at ``path`` (a ``.pt`` file or a run folder, whose
    ``checkpoints/last.pt`` is read); None where there is none or it is not a training checkpoint.
    The downstream tasks recognise their own runs by it."""
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoints" / "last.pt"
    if p.suffix != ".pt" or not p.is_file():
        return None
    try:
        obj = load_checkpoint(p)
    except CheckpointError:
        return None
    return obj.get("method") if obj.get("format") == TRAIN_FORMAT else None
