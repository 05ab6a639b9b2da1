"""What one call of :func:`siamae.engine.trainer.train` holds: the schedule, the counters a
checkpoint keeps (:class:`TrainState`), and :class:`Run`, everything the setup built, which the
step, the logging, the checkpoints and the shutdown share."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from siamae.config import Config
from siamae.data.dataset import EpochSampler
from siamae.engine import distributed as D
from siamae.engine.logging import MetricsLogger
from siamae.methods import Method
from siamae.models.vit import Encoder
from siamae.threads import ThreadGovernor


class Monitor(Protocol):
    """Figures of the encoder taken while it trains (the monitors of ``siamae.eval``: k-NN,
    RankMe, label propagation): whether they are due after a step (step 0: before the first),
    and their numbers, logged with the step's."""

    def due(self, epochs_done: int, step: int) -> bool: ...

    def run(self, encoder: Encoder) -> dict[str, float]: ...


@runtime_checkable
class WatchesTraining(Protocol):
    """A monitor that also learns from the training batches (the online linear probe): told
    the classes and feature width once, it sees each micro-batch's normalised images and
    ``class_label`` (rank 0's share), gives its figures when a log window closes, and keeps its
    state in the training checkpoint (``monitor_state``; {}: nothing to keep)."""

    def begin_training(self, num_classes: int, features: int) -> None: ...

    def observe_batch(
        self, encoder: Encoder, images: torch.Tensor, labels: torch.Tensor, autocast: Any
    ) -> None: ...

    def window_figures(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


#: Builds the monitor a config asks for on the run's device (None where it asks for none). Handed
#: to :func:`siamae.engine.trainer.train` by its caller, so the engine imports no evaluation.
MonitorFactory = Callable[[Config, torch.device], Monitor | None]


@dataclass
class Schedule:
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float
    effective_batch: int


@dataclass
class TrainState:
    step: int = 0
    skipped: int = 0  # unreadable files met so far (distinct names, this process)
    skipped_names: set[str] = field(default_factory=set)
    last_checkpoint_step: int | None = None
    best: float | None = None  # the best value of the method's best_metric so far
    history: list[dict[str, Any]] = field(default_factory=list)
    # The data this run reads, as the checkpoint records it: a resume says when it changed.
    data_items: int = 0
    data_fingerprint: str = ""


@dataclass
class Run:
    """One training call, set up: ``method`` is the model itself, ``model`` what runs the step
    (``method`` wrapped in DDP and/or ``torch.compile``, or ``method`` again). ``monitor``,
    ``logger`` and ``progress`` exist on the main process only (and ``progress`` with
    ``run.progress``). The last three fields are what this call has done so far."""

    cfg: Config
    info: D.DistInfo
    device: torch.device
    run_dir: Path
    method: Method
    model: nn.Module
    dataset: Any
    sampler: EpochSampler
    loader: DataLoader
    schedule: Schedule
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: Any  # torch.autocast, or a null context for fp32
    state: TrainState
    monitor: Monitor | None = None
    logger: MetricsLogger | None = None
    progress: Any = None  # a tqdm bar
    threads: ThreadGovernor | None = None  # re-fits the thread plan as the run goes, or None
    steps_this_call: int = 0
    last_loss: float = math.nan  # the mean loss of the last log window
    eval_results: dict[str, float] = field(default_factory=dict)

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def epoch_fraction(self) -> float:
        """The epoch the log records name: steps over steps per epoch, to 4 decimals."""
        return round(self.state.step / self.schedule.steps_per_epoch, 4)
