"""Training checkpoints written and read back: atomic writes, and a resume that continues
exactly where the run stopped (weights, optimizer, gradient scaler, counters and each process's
RNG state; the data's every random choice depends on (seed, epoch, index), so the same batches
follow)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from siamae.checkpoint import TRAIN_FORMAT, load_checkpoint, save_atomic
from siamae.config import Config
from siamae.engine import distributed as D
from siamae.engine.state import Run, TrainState, WatchesTraining
from siamae.errors import CheckpointError
from siamae.methods.base import Method, without_retired
from siamae.recipes import config_from_dict


def find_resume_checkpoint(run_dir: Path, resume: str | Path | bool | None) -> Path | None:
    """``resume``: a path, True/"auto" (run_dir/checkpoints/last.pt if present), or False/None."""
    if resume in (None, False):
        return None
    if resume in (True, "auto"):
        candidate = run_dir / "checkpoints" / "last.pt"
        return candidate if candidate.is_file() else None
    path = Path(resume)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise CheckpointError(
            f"--resume {str(resume)!r}: no checkpoint there; pass a .pt file or a run folder"
        )
    return path


def open_resume_checkpoint(
    cfg: Config, run_dir: Path, resume: str | Path | bool | None
) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint this run resumes from (path and contents), or (None, None); refused
    when it is not a training checkpoint or was made for another method or model."""
    resume_path = find_resume_checkpoint(run_dir, resume)
    checkpoint = load_checkpoint(resume_path) if resume_path else None
    if checkpoint is not None and checkpoint.get("format") != TRAIN_FORMAT:
        raise CheckpointError(
            f"{resume_path}: not a siamae training checkpoint; only those can be resumed"
        )
    if checkpoint is not None:
        saved = config_from_dict(checkpoint["config"])
        if saved.method != cfg.method or saved.model != cfg.model:
            raise CheckpointError(
                f"{resume_path}: it was made for method {saved.method} / {saved.model.arch}, this run is "
                f"{cfg.method} / {cfg.model.arch}; use another run.out_dir or --no-resume"
            )
    return resume_path, checkpoint


def check_weights_fit(
    method: nn.Module, saved: dict[str, torch.Tensor], path: Path | str | None
) -> None:
    """Refuse a resume whose weights do not fit, naming the first tensor that differs (tensors
    the method retired, which an older siamae saved, are not counted)."""
    own = method.state_dict()
    if isinstance(method, Method):
        saved = without_retired(type(method), saved)
    for name, tensor in own.items():
        if name not in saved:
            problem = f"tensor {name!r} {tuple(tensor.shape)} is missing from the checkpoint"
            break
        if tuple(saved[name].shape) != tuple(tensor.shape):
            problem = (
                f"tensor {name!r} has shape {tuple(saved[name].shape)} in the checkpoint and "
                f"{tuple(tensor.shape)} in this run's model"
            )
            break
    else:
        extra = [name for name in saved if name not in own]
        if not extra:
            return
        problem = f"the checkpoint has tensor {extra[0]!r} that this run's model lacks"
    raise CheckpointError(
        f"{path}: its weights do not fit this run's model: {problem}. The config differs from "
        "the one it was made with: use another run.out_dir or --no-resume"
    )


def restore(
    checkpoint: dict[str, Any],
    resume_path: Path | None,
    method: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    info: D.DistInfo,
    device: torch.device,
    current: TrainState,
) -> TrainState:
    """Load a checkpoint's weights, optimizer and scaler state into this run and return its
    counters (``current``: a fresh state, which gives the data this run reads now); this process
    takes back its own RNG state when the world size is the same."""
    try:
        method.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0][:300]
        raise CheckpointError(
            f"{resume_path}: its weights do not fit this run's model ({first}); the config differs "
            "from the one it was made with: use another run.out_dir or --no-resume"
        ) from None
    if checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    state = TrainState(data_items=current.data_items, data_fingerprint=current.data_fingerprint)
    state.step = int(checkpoint["step"])
    state.skipped = int(checkpoint.get("skipped", 0))
    state.skipped_names = set(checkpoint.get("skipped_names", []))
    state.last_checkpoint_step = state.step
    state.best = checkpoint.get("best")
    rng = checkpoint.get("rng", {})
    cpu_states = rng.get("cpu", [])
    if len(cpu_states) == info.world_size:
        torch.set_rng_state(cpu_states[info.rank])
    if device.type == "cuda" and len(rng.get("cuda", [])) == info.world_size:
        torch.cuda.set_rng_state(rng["cuda"][info.rank], device)
    return state


def item_fingerprint(dataset: Any) -> str:
    """A hash of the names of the items the run reads, in order (cheap beside one epoch)."""
    source = getattr(dataset, "source", dataset)
    name = getattr(source, "name", None)
    if name is None:
        return ""
    digest = hashlib.sha1(usedforsecurity=False)
    for index in range(len(source)):
        digest.update(name(index).encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


def save_checkpoint(run: Run, tag: str = "last") -> None:
    """Write ``checkpoints/<tag>.pt`` (main process; every process gives its RNG state).
    Collective: every process calls it at the same step."""
    device, info, state = run.device, run.info, run.state
    cpu_rng = D.gather_rng_states(
        torch.get_rng_state(), info, device if device.type == "cuda" else torch.device("cpu")
    )
    cuda_rng = (
        D.gather_rng_states(torch.cuda.get_rng_state(device), info, device)
        if device.type == "cuda"
        else []
    )
    if info.is_main:
        payload = {
            "format": TRAIN_FORMAT,
            "method": run.cfg.method,
            "config": run.cfg.to_dict(),
            "model": run.method.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else {},
            "step": state.step,
            "epoch": state.step // run.schedule.steps_per_epoch,
            "skipped": state.skipped,
            "skipped_names": sorted(state.skipped_names),
            "rng": {"cpu": cpu_rng, "cuda": cuda_rng},
            "best": state.best,
            "data_items": state.data_items,
            "data_fingerprint": state.data_fingerprint,
        }
        if isinstance(run.monitor, WatchesTraining):
            # The online linear probe's head, optimizer and window: beside the model, never in it.
            payload["monitor_state"] = run.monitor.state_dict()
        save_atomic(payload, run.ckpt_dir / f"{tag}.pt")
    if tag == "last":
        state.last_checkpoint_step = state.step
    D.barrier(info)
