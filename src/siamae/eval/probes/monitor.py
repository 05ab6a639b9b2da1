"""Online monitors: representation quality while pre-training runs (rank 0 only). The k-NN
monitor is below; :class:`Monitors` adds RankMe on unlabelled images
(:mod:`siamae.eval.probes.rankme`) and label propagation J&F on a DAVIS-layout root
(:mod:`siamae.eval.propagation.dense_monitor`) at the same interval, and before the first step,
and trains the online linear probe on the training batches
(:mod:`siamae.eval.probes.online_linear`, every ``online_linear_every``-th step; logged
with each log window).
The other processes go on to their next step and wait for rank 0 in its gradient all-reduce:
no collective is added for the monitor.

Every ``monitor.every_epochs`` epochs (or ``monitor.every_steps`` steps, when set) the current
encoder embeds a labelled training folder and a labelled validation folder, and the weighted
cosine k-NN top-1/top-5 of the validation images is returned for the metrics log.

The monitor must not change the run it watches: it puts the encoder in eval mode and restores
its mode, computes under ``no_grad``, draws no random numbers (the loaders get private
generators), and saves and restores the global Python, NumPy, torch and CUDA generator states
around its work as a guard. Images are decoded once, on the first evaluation, and kept as uint8
in memory (a 50k-image folder at 224 px is 7.5 GB: point the monitor at a few thousand images).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch

from siamae.data.image_folder import EvalTransform, ImageFolder
from siamae.eval.probes.features import decode_all, extract_features
from siamae.eval.probes.knn import knn_classify
from siamae.eval.probes.online_linear import OnlineLinearProbe
from siamae.eval.probes.rankme import RankMeMonitor, read_images
from siamae.eval.propagation.dense_monitor import DenseMonitor, davis_params

if TYPE_CHECKING:
    from siamae.config import Config, MonitorConfig
    from siamae.models.vit import Encoder


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the Python, NumPy, torch CPU and (initialised) CUDA generators on exit."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    cuda_states = (
        torch.cuda.get_rng_state_all()
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else None
    )
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


class KNNMonitor:
    """k-NN top-1/top-5 of the encoder being pre-trained, on ``cfg.knn_train`` / ``cfg.knn_val``.

    Args:
        cfg: the ``monitor`` section; ``img_size`` must be set (``build_monitor`` fills it).
        device: where the encoder lives.
    """

    def __init__(self, cfg: MonitorConfig, device: torch.device) -> None:
        if cfg.knn_train is None or cfg.knn_val is None:
            raise ValueError("KNNMonitor needs monitor.knn_train and monitor.knn_val")
        self.cfg = cfg
        self.device = torch.device(device)
        transform = EvalTransform(cfg.img_size or 224, cfg.crop_pct)
        # Scanning is cheap and catches a wrong path before training starts; decoding waits.
        self.train_set = ImageFolder(cfg.knn_train, transform)
        self.val_set = ImageFolder(cfg.knn_val, transform, classes=self.train_set.classes)
        self._train_images: torch.Tensor | None = None
        self._val_images: torch.Tensor | None = None
        self._last_epoch: int | None = None
        self._last_step: int | None = None

    def due(self, epochs_done: int, step: int) -> bool:
        """Whether to evaluate now; True at most once per epoch count (or step) reached.

        With ``every_steps`` set, steps decide (a positive multiple of it); otherwise a
        positive multiple of ``every_epochs`` completed epochs does. A monitor built for a
        resumed run evaluates once at the first call whose count is due.
        """
        every_steps = self.cfg.every_steps
        if every_steps:
            if step > 0 and step % every_steps == 0 and step != self._last_step:
                self._last_step = step
                return True
            return False
        if (
            epochs_done > 0
            and epochs_done % self.cfg.every_epochs == 0
            and epochs_done != self._last_epoch
        ):
            self._last_epoch = epochs_done
            return True
        return False

    def _images(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._train_images is None or self._val_images is None:
            workers = self.cfg.num_workers
            self._train_images = decode_all(self.train_set, num_workers=workers)
            self._val_images = decode_all(self.val_set, num_workers=workers)
        return self._train_images, self._val_images

    def run(self, encoder: Encoder) -> dict[str, float]:
        """Evaluate ``encoder`` now: ``{"knn_top1", "knn_top5", "knn_seconds"}`` (percent, s)."""
        start = time.perf_counter()
        with preserved_rng():
            train_images, val_images = self._images()
            kw = dict(
                device=self.device,
                pool=self.cfg.pool,
                batch_size=self.cfg.batch_size,
                progress=False,
            )
            # extract_features runs in eval mode under no_grad and restores the encoder's mode.
            train_f = extract_features(encoder, train_images, **kw)  # type: ignore[arg-type]
            val_f = extract_features(encoder, val_images, **kw)  # type: ignore[arg-type]
            result = knn_classify(
                train_f.to(self.device),
                self.train_set.labels,
                val_f.to(self.device),
                self.val_set.labels,
                ks=[self.cfg.k],
                temperature=self.cfg.temperature,
                num_classes=len(self.train_set.classes),
            )
        return {
            "knn_top1": result.top1[self.cfg.k],
            "knn_top5": result.top5[self.cfg.k],
            "knn_seconds": time.perf_counter() - start,
        }


def interval_due(cfg: MonitorConfig, epochs_done: int, step: int) -> bool:
    """Whether the label-free and dense monitors run after ``step``: before the first step of
    a new run (the untrained figure), then as the k-NN monitor (a multiple of ``every_steps``,
    else of ``every_epochs`` completed epochs, counted at an epoch's end). A function of the
    step alone, so a resumed run logs them at the same steps as an uninterrupted one."""
    if step == 0:
        return True
    if cfg.every_steps:
        return step % cfg.every_steps == 0
    return epochs_done > 0 and epochs_done % cfg.every_epochs == 0


class Monitors:
    """The monitors a config asks for, as one: the k-NN monitor (its own schedule), RankMe and
    the dense monitor (:func:`interval_due`). ``run`` returns every due figure, each with the
    seconds it took (``*_seconds``). The online linear probe learns from every training batch
    (``observe_batch``; the engine's ``WatchesTraining``) and reports with the log window."""

    def __init__(
        self,
        cfg: MonitorConfig,
        knn: KNNMonitor | None,
        rankme: RankMeMonitor | None,
        dense: DenseMonitor | None,
        online_linear: OnlineLinearProbe | None = None,
    ) -> None:
        self.cfg, self.knn, self.rankme, self.dense = cfg, knn, rankme, dense
        self.online_linear = online_linear
        self._now: list[str] = []
        self._last_step: int | None = None

    def due(self, epochs_done: int, step: int) -> bool:
        self._now = []
        if self.knn is not None and self.knn.due(epochs_done, step):
            self._now.append("knn")
        if step != self._last_step and interval_due(self.cfg, epochs_done, step):
            self._last_step = step
            self._now += [n for n in ("rankme", "dense") if getattr(self, n) is not None]
        return bool(self._now)

    def run(self, encoder: Encoder) -> dict[str, float]:
        result: dict[str, float] = {}
        if "knn" in self._now and self.knn is not None:
            result.update(self.knn.run(encoder))
        parts = (("rankme", "rankme", self.rankme), ("dense", "davis", self.dense))
        for key, name, part in parts:
            if part is None or key not in self._now:
                continue
            start = time.perf_counter()
            with preserved_rng():
                result.update(part.run(encoder))
            result[f"monitor/{name}_seconds"] = time.perf_counter() - start
        self._now = []
        return result

    # -- the online linear probe (siamae.engine.state.WatchesTraining) ------------------------
    def begin_training(self, num_classes: int, features: int) -> None:
        if self.online_linear is not None:
            self.online_linear.begin(num_classes, features)

    def observe_batch(
        self, encoder: Encoder, images: torch.Tensor, labels: torch.Tensor, autocast: object
    ) -> None:
        if self.online_linear is not None:
            self.online_linear.observe(encoder, images, labels, autocast)

    def window_figures(self) -> dict[str, float]:
        return self.online_linear.window_figures() if self.online_linear is not None else {}

    def state_dict(self) -> dict[str, object]:
        return self.online_linear.state_dict() if self.online_linear is not None else {}

    def load_state_dict(self, state: dict[str, object]) -> None:
        if self.online_linear is not None and state:
            self.online_linear.load_state_dict(state)


def build_monitor(cfg: Config, device: torch.device | str) -> Monitors | None:
    """The monitors the config asks for (None when it asks for none); their data is read now,
    so a wrong path fails before training starts.

    ``monitor.img_size`` left null takes the encoder's ``model.img_size``.
    """
    mo = cfg.monitor
    if not mo.asked:
        return None
    if mo.img_size is None:
        mo = dataclasses.replace(mo, img_size=cfg.model.img_size)
    device = torch.device(device)
    assert mo.img_size is not None
    knn = KNNMonitor(mo, device) if mo.knn_train is not None else None
    rankme = (
        RankMeMonitor(
            read_images(mo.images, mo.img_size, mo.crop_pct, mo.max_images), device, mo.batch_size
        )
        if mo.images is not None
        else None
    )
    dense = (
        DenseMonitor(
            mo.davis,
            davis_params(mo.davis_protocol, mo.davis_set),
            cfg.model.patch_size,
            device,
            sequences=[s for s in (mo.sequences or "").split(",") if s] or None,
            max_frames=mo.max_frames,
        )
        if mo.davis is not None
        else None
    )
    online = (
        OnlineLinearProbe(device, mo.pool, mo.online_linear_lr, mo.online_linear_weight_decay)
        if mo.online_linear
        else None
    )
    return Monitors(mo, knn, rankme, dense, online)
