"""What a run reports as it trains: every ``run.log_every`` steps the log window's means (loss,
learning rate, throughput, loader wait, the method's own scalars) to the metrics files
(:class:`siamae.engine.logging.MetricsLogger`) and the progress bar; the monitors; the
method's evaluations (a ``best`` checkpoint when its ``best_metric`` improves); the files
skipped as unreadable; the thread count re-fitted to the free cores.

The means are taken over every process (collectives: every process reports at the same steps).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from siamae.engine import distributed as D
from siamae.engine.checkpointing import save_checkpoint
from siamae.engine.setup import SKIPPED_FILE, THREADS_FILE
from siamae.engine.state import Run, WatchesTraining
from siamae.methods.base import EvalRequest, Evaluates


class LogWindow:
    """The sums one log window averages: the loss and the method's own scalars
    (``MethodOutput.logs``) per micro-batch, the pairs seen and the seconds spent waiting for
    the loader."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.count = 0
        self.log_sums: dict[str, torch.Tensor] = {}
        self.samples = 0
        self.start = time.perf_counter()
        self.data_wait = 0.0  # seconds this log window spent waiting for the loader

    def next_batch(self, iterator: Iterator[dict[str, Any]]) -> dict[str, Any]:
        wait_start = time.perf_counter()
        batch = next(iterator)
        self.data_wait += time.perf_counter() - wait_start
        return batch

    def add(self, loss: torch.Tensor, logs: dict[str, torch.Tensor], samples: int) -> None:
        self.loss_sum += loss.detach()
        for key, value in logs.items():
            self.log_sums[key] = self.log_sums.get(key, 0.0) + value.detach().float()
        self.count += 1
        self.samples += samples

    def reset(self) -> None:
        self.log_sums.clear()
        self.loss_sum.zero_()
        self.count = 0
        self.samples, self.start = 0, time.perf_counter()
        self.data_wait = 0.0


def log_window(run: Run, window: LogWindow, lr: float) -> None:
    """Log the window's means (over every process) and start a new window."""
    info, state = run.info, run.state
    mean_loss = D.all_reduce_mean(window.loss_sum / max(window.count, 1), info).item()
    skipped = int(
        D.all_reduce_sum(torch.tensor(float(state.skipped), device=run.device), info).item()
    )
    elapsed = time.perf_counter() - window.start
    record = {
        "step": state.step,
        "epoch": run.epoch_fraction(),
        "loss": mean_loss,
        "lr": lr,
        "pairs_per_s": window.samples / max(elapsed, 1e-9),
        # A loader that keeps up leaves this near 0.
        "data_wait": window.data_wait / max(elapsed, 1e-9),
        "skipped": skipped,
    }
    for key in sorted(window.log_sums):  # the same keys, in the same order, on every rank
        record[key] = D.all_reduce_mean(window.log_sums[key] / max(window.count, 1), info).item()
    run.last_loss = mean_loss
    window.reset()
    if isinstance(run.monitor, WatchesTraining):  # rank 0's online linear probe
        record.update(run.monitor.window_figures())
    if run.logger is not None:
        run.logger.log(record)
    if run.progress is not None:
        run.progress.set_postfix(
            loss=f"{mean_loss:.4f}",
            lr=f"{lr:.2e}",
            pairs_s=f"{record['pairs_per_s']:.1f}",
            data_wait=f"{record['data_wait']:.0%}",
        )


def note_skipped_files(run: Run, lines: list[str]) -> None:
    """Count and list (``skipped_files.txt``) the unreadable files of a batch not met before,
    each once: a batch names a file once per item that tried it (an item goes on to the next
    index when its own is unreadable, so a run of bad files is met by several items), and a
    file listed by an earlier try of the run (a crash after the last checkpoint, then the
    resume) or by another process is not listed again."""
    state = run.state
    reasons: dict[str, str] = {}
    for line in lines:
        name = line.split("\t")[0]
        if name not in state.skipped_names:
            reasons.setdefault(name, line)
    if not reasons:
        return
    state.skipped_names.update(reasons)
    listing = run.run_dir / SKIPPED_FILE
    if listing.is_file():  # read only when a new file is met: rare
        for name in _listed_names(listing):
            reasons.pop(name, None)
    new = list(reasons.values())
    if not new:
        return
    state.skipped += len(new)
    with listing.open("a") as f:
        f.writelines(line + "\n" for line in new)
    if run.progress is not None:
        run.progress.write(
            f"skipped unreadable file {new[0]}"
            + (f" (+{len(new) - 1} more)" if len(new) > 1 else "")
        )


def _listed_names(listing: Path) -> set[str]:
    """The file names ``skipped_files.txt`` lists (the part of each line before its tab)."""
    try:
        return {line.split("\t")[0] for line in listing.read_text().splitlines()}
    except (OSError, UnicodeDecodeError):
        return set()


def refit_run_threads(run: Run) -> None:
    """Re-fit the torch threads to the cores left free when a window closes; name a change on
    the console and in ``threads.json``."""
    if run.threads is None:
        return
    change = run.threads.after_step(run.state.step)
    if change is None or not run.info.is_main:
        return
    line = change.describe(run.threads.plan.cores)
    if run.progress is not None:
        run.progress.write(line)
    else:
        print(f"siamae: {line}", flush=True)
    (run.run_dir / THREADS_FILE).write_text(json.dumps(run.threads.to_dict()) + "\n")


def run_monitor(run: Run) -> None:
    """The monitors, when due at this step (at an epoch's end unless they count steps; before
    the first step too for those that take the untrained figure). Rank 0 only: the others go on
    to their next step and wait for it in the gradient all-reduce."""
    monitor, state, steps_per_epoch = run.monitor, run.state, run.schedule.steps_per_epoch
    if not (
        monitor is not None
        and monitor.due(state.step // steps_per_epoch, state.step)
        and (state.step % steps_per_epoch == 0 or run.cfg.monitor.every_steps)
    ):
        return
    _report(run, monitor.run(run.method.encoder))


def evaluation_due(method: Evaluates, step: int, steps_per_epoch: int, total_steps: int) -> bool:
    """Whether ``method`` evaluates after ``step``: at the end of training, and at an epoch's
    end; with ``eval_every_steps`` only at the epoch ends that close an interval (a multiple of
    it fell in the epoch that ends: segmentation's schedule). A function of the step alone, so
    a resumed run evaluates at the same steps as an uninterrupted one."""
    if step >= total_steps:
        return True
    if step % steps_per_epoch:
        return False
    interval = method.eval_every_steps
    return interval is None or step // interval > (step - steps_per_epoch) // interval


def run_evaluation(run: Run) -> None:
    """The method's own evaluation, when it has one and it is due; a ``best`` checkpoint when
    its ``best_metric`` improves."""
    method, state, schedule = run.method, run.state, run.schedule
    if not isinstance(method, Evaluates):
        return
    if not evaluation_due(method, state.step, schedule.steps_per_epoch, schedule.total_steps):
        return
    final = state.step >= schedule.total_steps
    request = EvalRequest(
        run.device, state.step, final, run.run_dir / method.name if final else None
    )
    result = method.evaluate(request)
    if not result:
        return
    result = {k: float(v) for k, v in result.items()}
    _report(run, result)
    run.eval_results.update(result)
    metric = method.best_metric
    if metric is not None and metric in result:
        if state.best is None or result[metric] > state.best:
            state.best = result[metric]
            save_checkpoint(run, "best")


def _report(run: Run, result: dict[str, float]) -> None:
    if run.logger is not None and result:
        run.logger.log({"step": run.state.step, "epoch": run.epoch_fraction(), **result})
    if run.progress is not None and result:
        run.progress.write(
            f"step {run.state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items())
        )
