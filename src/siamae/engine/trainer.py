"""The one training loop for every method.

One process or many (torchrun: gloo on CPU, NCCL on GPU); AdamW with the recipe's parameter
groups; learning rate scaled by the effective batch and set per iteration before each step;
gradient accumulation; fp16 (with scaling) or bf16 autocast on GPU, fp32 on CPU; optional
``torch.compile`` and gradient clipping. Checkpoints are atomic and resume exactly: every random
choice of the data depends on (seed, epoch, index), and the model's RNG state is saved per rank.

The parts, in the order a call runs them: :mod:`~siamae.engine.setup` (device, model, data,
optimizer, the resumed state of :mod:`~siamae.engine.checkpointing`, reporters),
:mod:`~siamae.engine.step` (the loop; it logs through :mod:`~siamae.engine.reporting`), and
:mod:`~siamae.engine.shutdown` (signals, the last checkpoint, the summary and the pictures).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from siamae.config import Config
from siamae.data.dataset import normalize_images
from siamae.engine import distributed as D
from siamae.engine.run_lock import lock_run_folder
from siamae.engine.setup import set_up
from siamae.engine.shutdown import close_logger, close_progress, save_last_checkpoint, summarize
from siamae.engine.state import MonitorFactory
from siamae.engine.step import run_steps
from siamae.engine.stop import StopRequest
from siamae.engine.tracking import check_tracking
from siamae.paths import check_writable

__all__ = ["normalize_images", "train"]


def train(
    cfg: Config,
    resume: str | Path | bool | None = "auto",
    stop_after_steps: int | None = None,
    monitor: MonitorFactory | None = None,
) -> dict[str, Any]:
    """Pre-train ``cfg.method`` and return a summary (run folder, steps, final loss, ...).

    ``stop_after_steps`` interrupts the run after that many optimizer steps of this call, as a
    signal would (used by tests of resume). ``monitor`` builds the monitor a config with
    ``monitor.knn_train``, ``images``, ``davis`` or ``online_linear`` asks for (the commands pass
    :func:`siamae.eval.probes.monitor.build_monitor`; the engine imports no evaluation).
    """
    check_tracking(cfg)  # a missing optional tracker fails before any work
    device_kind = "cuda" if (cfg.run.device != "cpu" and torch.cuda.is_available()) else "cpu"
    info = D.init_distributed(device_kind)
    try:
        return _train(cfg, info, resume, stop_after_steps, monitor)
    finally:
        D.cleanup(info)


def _train(
    cfg: Config,
    info: D.DistInfo,
    resume: str | Path | bool | None,
    stop_after_steps: int | None,
    monitor: MonitorFactory | None,
) -> dict[str, Any]:
    run_dir = Path(cfg.run.out_dir)
    if info.is_main:  # before any work (the CLI checks --out; this covers run.out_dir too)
        check_writable(run_dir, "run.out_dir")
    # One run per folder, from before the first check to the very end (released on every path).
    with lock_run_folder(run_dir, enabled=info.is_main) as folder:
        run = set_up(cfg, info, resume, folder, monitor)
        try:
            run.method.train()
            with StopRequest() as stop:
                interrupted = run_steps(run, stop, stop_after_steps)
                save_last_checkpoint(run, interrupted)
            close_progress(run)
            return summarize(run, interrupted)
        finally:
            # Also on an error: the bar ends its line before the error's, the metrics are flushed.
            close_progress(run)
            close_logger(run)
