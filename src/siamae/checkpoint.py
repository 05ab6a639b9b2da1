"""Checkpoints: plain dicts of tensors and plain data, written atomically.

A checkpoint loads with ``torch.load(path, weights_only=True)``: nothing in it is pickled code,
the config is stored as a plain dict. Writes go to a temporary file in the same folder that is
flushed, fsync-ed and renamed over the target, so a crash mid-write never leaves a torn file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from siamae.errors import CheckpointError

TRAIN_FORMAT = "siamae-train-v1"


def save_atomic(obj: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; a checkpoint gets the permissions of any file the user
        # writes (0666 less the umask), so collaborators can read a shared run folder.
        os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
        raise CheckpointError(
            f"checkpoint {str(path)!r} could not be loaded safely ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            "it may be truncated, or pickle objects other than tensors"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a dict of weights"
        )
    return obj
