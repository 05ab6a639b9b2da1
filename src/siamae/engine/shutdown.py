"""How a training call ends: the last checkpoint, the reporters closed, the summary, and the
run's pictures (the stop a signal asks for is :class:`siamae.engine.stop.StopRequest`)."""

from __future__ import annotations

import math
from typing import Any

from siamae.engine.checkpointing import save_checkpoint
from siamae.engine.pictures import save_loss_curve, save_reconstruction
from siamae.engine.state import Run
from siamae.methods.base import SkipsAtStart


def save_last_checkpoint(run: Run, interrupted: str | None) -> None:
    """``last.pt`` at the end of training, or at an interruption unless it is already there."""
    if interrupted is None and run.state.step >= run.schedule.total_steps:
        save_checkpoint(run)
    elif interrupted is not None and run.state.last_checkpoint_step != run.state.step:
        save_checkpoint(run)


def close_progress(run: Run) -> None:
    if run.progress is not None:
        run.progress.close()


def close_logger(run: Run) -> None:
    """After the pictures: a tracker (W&B) logs them when the logger closes."""
    if run.logger is not None:
        run.logger.close()


def summarize(run: Run, interrupted: str | None) -> dict[str, Any]:
    """The summary :func:`siamae.engine.trainer.train` returns; a run that finished draws its
    pictures (main process, ``run.visualize``)."""
    state, schedule, method = run.state, run.schedule, run.method
    summary = {
        "run_dir": str(run.run_dir),
        "checkpoint": str(run.ckpt_dir / "last.pt"),
        "method": run.cfg.method,
        "step": state.step,
        "total_steps": schedule.total_steps,
        "epoch": state.step / schedule.steps_per_epoch,
        "final_loss": run.last_loss,
        "skipped": state.skipped,
        "interrupted": interrupted,
        "skipped_at_start": (
            len(method.skipped_at_start) if isinstance(method, SkipsAtStart) else 0
        ),
        "effective_batch": schedule.effective_batch,
        "peak_lr": schedule.peak_lr,
        "device": str(run.device),
        "world_size": run.info.world_size,
        **({"eval": run.eval_results} if run.eval_results else {}),
    }
    if run.info.is_main and interrupted is None and run.cfg.run.visualize:
        summary.update(_draw_pictures(run))
    if math.isnan(run.last_loss) and run.info.is_main:
        summary["final_loss"] = None
    return summary


def _draw_pictures(run: Run) -> dict[str, str]:
    method, run_dir = run.method, run.run_dir
    pictures = {}
    method.eval()
    picture = save_reconstruction(
        method, run.dataset, run_dir / "reconstruction.png", run.device, step=run.state.step
    )
    if picture is not None:  # a classifier (fine-tuning) has nothing to reconstruct
        pictures["reconstruction"] = str(picture)
    pictures["loss_curve"] = str(save_loss_curve(run_dir, run_dir / "loss_curve.png"))
    method.train()
    return pictures
