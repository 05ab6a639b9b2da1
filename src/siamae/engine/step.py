"""The loop and its step: epochs of (epoch, index) batches; per micro-batch the forward pass
under autocast, the divergence check and the scaled backward pass (DDP synchronises gradients
on the last micro-batch of an accumulation only); per optimizer step the learning rate of the
schedule, gradient clipping, the scaler's step, and then the logging, the monitor, the
evaluations and the periodic checkpoint."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from siamae.data.dataset import CLASS_LABEL, batch_to_device, worker_batches
from siamae.engine.checkpointing import save_checkpoint
from siamae.engine.reporting import (
    LogWindow,
    log_window,
    note_skipped_files,
    refit_run_threads,
    run_evaluation,
    run_monitor,
)
from siamae.engine.state import Run, WatchesTraining
from siamae.engine.stop import StopRequest
from siamae.errors import TrainingDiverged
from siamae.methods.base import UpdatesAfterStep
from siamae.optim import lr_at, set_lr


def run_steps(run: Run, stop: StopRequest, stop_after_steps: int | None) -> str | None:
    """Train to ``schedule.total_steps``; return why it stopped before (a signal's name or
    ``"stop_after_steps"``), None when it got there."""
    window = LogWindow(run.device)
    interrupted = None
    if run.state.step == 0:
        run_monitor(run)  # the untrained figures (monitors that take them), once per run
    while run.state.step < run.schedule.total_steps and interrupted is None:
        interrupted = _run_epoch(run, stop, stop_after_steps, window)
    return interrupted


def _run_epoch(
    run: Run, stop: StopRequest, stop_after_steps: int | None, window: LogWindow
) -> str | None:
    """The rest of the current epoch (from the batch after the last step a resumed run made)."""
    state, schedule, accum = run.state, run.schedule, run.cfg.optim.accum_steps
    epoch = state.step // schedule.steps_per_epoch
    run.sampler.set_epoch(epoch, (state.step % schedule.steps_per_epoch) * accum)
    with worker_batches(run.loader) as iterator:
        return _run_batches(run, stop, stop_after_steps, window, iterator, epoch)


def _run_batches(
    run: Run,
    stop: StopRequest,
    stop_after_steps: int | None,
    window: LogWindow,
    iterator: Iterator[dict[str, Any]],
    epoch: int,
) -> str | None:
    """The epoch's batches from ``iterator``: what :func:`_run_epoch` returns."""
    state, schedule, accum = run.state, run.schedule, run.cfg.optim.accum_steps
    micro = 0
    while state.step < schedule.total_steps:
        if stop.agreed(run.info, run.device):
            return stop.name
        if stop_after_steps is not None and run.steps_this_call >= stop_after_steps:
            return "stop_after_steps"
        try:
            batch = window.next_batch(iterator)
        except StopIteration:
            return None
        except Exception:
            if stop.requested:  # a worker killed by the signal that asks this process to stop
                return stop.name
            raise
        note_skipped_files(run, batch["skipped_files"])
        sync = micro == accum - 1
        _forward_backward(run, batch, sync, epoch, window)
        micro += 1
        if not sync:
            continue
        micro = 0
        lr = _optimizer_step(run)
        _after_step(run, lr, window)
    return None


def _forward_backward(
    run: Run, batch: dict[str, Any], sync: bool, epoch: int, window: LogWindow
) -> None:
    """One micro-batch: its loss, scaled for the accumulation, backpropagated."""
    inputs = batch_to_device(batch, run.device)
    ctx = (
        run.model.no_sync()
        if (run.info.enabled and not sync and hasattr(run.model, "no_sync"))
        else contextlib.nullcontext()
    )
    with ctx:
        with run.autocast:
            out = run.model(inputs)
        loss = out.loss
        if not torch.isfinite(loss.detach()).item():
            raise _diverged(run, loss, epoch)
        run.scaler.scale(loss / run.cfg.optim.accum_steps).backward()
    window.add(loss, out.logs, batch["images"].shape[0] * run.info.world_size)
    if (
        isinstance(run.monitor, WatchesTraining)
        and CLASS_LABEL in batch
        and run.state.step % run.cfg.monitor.online_linear_every == 0
    ):
        # The online linear probe (rank 0): detached features of the weights this step used.
        run.monitor.observe_batch(
            run.method.encoder, inputs["images"], batch[CLASS_LABEL], run.autocast
        )


def _diverged(run: Run, loss: torch.Tensor, epoch: int) -> TrainingDiverged:
    state, last = run.state, run.ckpt_dir / "last.pt"
    return TrainingDiverged(
        f"the loss became {loss.item()} at step {state.step} (epoch {epoch}); training stopped. "
        + (
            f"The last good checkpoint is {last} (step {state.last_checkpoint_step}). "
            if state.last_checkpoint_step is not None
            else "No checkpoint had been written yet. "
        )
        + "Try a lower optim.base_lr, optim.clip_grad=1.0, or run.precision=bf16/fp32."
    )


def _optimizer_step(run: Run) -> float:
    """The optimizer step at the schedule's learning rate; returns that rate."""
    o, schedule, state = run.cfg.optim, run.schedule, run.state
    lr = lr_at(
        state.step,
        schedule.peak_lr,
        o.min_lr,
        schedule.warmup_steps,
        schedule.total_steps,
        o.schedule,
        o.poly_power,
    )
    set_lr(run.optimizer, lr)
    if o.clip_grad is not None:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.method.parameters(), o.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    run.steps_this_call += 1
    if isinstance(run.method, UpdatesAfterStep):
        run.method.after_step(state.step, schedule.total_steps)
    return lr


def _after_step(run: Run, lr: float, window: LogWindow) -> None:
    """Logging, progress, the thread count, monitor, the method's evaluation and the periodic
    checkpoint."""
    step, schedule, every = run.state.step, run.schedule, run.cfg.run
    if step % every.log_every == 0 or step == schedule.total_steps:
        log_window(run, window, lr)
    if run.progress is not None:
        run.progress.update(1)
    refit_run_threads(run)
    run_monitor(run)
    run_evaluation(run)  # when due: at an epoch's end or the end, the method's interval
    if step % every.checkpoint_every == 0 and step < schedule.total_steps:
        save_checkpoint(run)
