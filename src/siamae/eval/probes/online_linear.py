"""The online linear probe (solo-learn's online classifier): a linear head trained on the
pre-training batches' own labels while the encoder pre-trains, logged as
``monitor/online_linear_top1`` (and ``monitor/online_linear_loss``).

Each step (every ``monitor.online_linear_every``-th) the head sees the pooled features
(``monitor.pool``) of the first view of every training image that rank 0 loaded, and takes one
step of its own AdamW (``monitor.online_linear_lr``, ``monitor.online_linear_weight_decay``) on
their classes: Adam's steps do not grow with the features' scale (a ViT's pooled features have
a norm of about sqrt(width) after its final LayerNorm; an SGD head at lr 0.1 diverged on them).
Its top-1 is that of the batch's logits before the head's step, summed over the log window and
logged with the window's loss as their mean.

The features come from one more forward pass of the un-masked view, under ``no_grad`` and with
the encoder in eval mode (its mode is restored): MAE's own forward encodes a quarter of the
patches, no feature to probe, and a method hands out only its loss and logs; in eval mode the pass draws no random number (no dropout, no drop-path), so the encoder and every
later random choice of the run are bitwise those of a run without the probe. No gradient
reaches the encoder: the head learns from detached features, and its parameters are neither
the method's nor in its optimizer, so ``siamae export`` and ``load_encoder`` never see them.
Its weights, its optimizer's state and the open window's sums travel in the training
checkpoint (``monitor_state``), so a resumed run logs the same figures at the same steps.

The head starts at zero (weights and bias): a start that draws no random number, so building it
leaves the run's random streams alone, and a softmax regression converges from it as well.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from siamae.eval.probes.features import encode_features
from siamae.models.vit import Encoder

TOP1 = "monitor/online_linear_top1"
LOSS = "monitor/online_linear_loss"


class OnlineLinearProbe:
    """A stop-gradient linear head on the training batches.

    Args:
        device: where the encoder (and the head) live.
        pool: the encoder's pooling (``cls``, ``mean``, ...: :data:`features.FEATURES`).
        lr, weight_decay: the head's AdamW.

    :meth:`begin` builds the head once the number of classes and the feature width are known.
    """

    def __init__(
        self,
        device: torch.device | str,
        pool: str = "cls",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        self.device, self.pool = torch.device(device), pool
        self.lr, self.weight_decay = lr, weight_decay
        self.head: nn.Linear | None = None
        self.optimizer: torch.optim.AdamW | None = None
        self._reset_window()

    def _reset_window(self) -> None:
        self.correct = torch.zeros((), device=self.device)
        self.loss_sum = torch.zeros((), device=self.device)
        self.seen = 0
        self.batches = 0

    def begin(self, num_classes: int, features: int) -> None:
        """The head, ``features`` -> ``num_classes``, at zero, and its optimizer."""
        self.head = nn.Linear(features, num_classes, device=self.device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.optimizer = torch.optim.AdamW(
            self.head.parameters(), lr=self.lr, weight_decay=self.weight_decay
        )

    def features(
        self, encoder: Encoder, images: torch.Tensor, autocast: Any = None
    ) -> torch.Tensor:
        """Pooled float32 features of normalised images (B, 3, H, W), encoder in eval mode."""
        was_training = encoder.training
        encoder.eval()
        try:
            with torch.no_grad(), autocast or contextlib.nullcontext():
                return encode_features(encoder, images, self.pool).float()
        finally:
            encoder.train(was_training)

    def observe(
        self, encoder: Encoder, images: torch.Tensor, labels: torch.Tensor, autocast: Any = None
    ) -> None:
        """One step of the head on a batch: ``images`` normalised (B, V, 3, H, W) (view 0 is
        read) or (B, 3, H, W), ``labels`` (B,) class indices."""
        if self.head is None or self.optimizer is None:
            raise RuntimeError("OnlineLinearProbe.begin must be called before observe")
        view = images[:, 0] if images.dim() == 5 else images
        feats = self.features(encoder, view, autocast)
        labels = labels.to(self.device)
        logits = self.head(feats)
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.correct += (logits.detach().argmax(1) == labels).sum()
        self.loss_sum += loss.detach()
        self.seen += labels.shape[0]
        self.batches += 1

    def window_figures(self) -> dict[str, float]:
        """The top-1 (percent) and mean loss since the last call; {} when no batch came."""
        if not self.seen:
            return {}
        figures = {
            TOP1: 100.0 * self.correct.item() / self.seen,
            LOSS: self.loss_sum.item() / self.batches,
        }
        self._reset_window()
        return figures

    def state_dict(self) -> dict[str, Any]:
        """The head, its optimizer and the open window's sums."""
        if self.head is None or self.optimizer is None:
            return {}
        return {
            "head": self.head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "window": {
                "correct": self.correct.item(),
                "loss_sum": self.loss_sum.item(),
                "seen": self.seen,
                "batches": self.batches,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """What :meth:`state_dict` gave (after :meth:`begin`)."""
        if self.head is None or self.optimizer is None:
            raise RuntimeError("OnlineLinearProbe.begin must be called before load_state_dict")
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        window = state["window"]
        self.correct.fill_(window["correct"])
        self.loss_sum.fill_(window["loss_sum"])
        self.seen, self.batches = int(window["seen"]), int(window["batches"])
