"""What every pre-training method provides to the one training loop."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn as nn

from siamae.models.vit import Encoder

if TYPE_CHECKING:
    from siamae.config import Config


@dataclass
class MethodOutput:
    """A training step's result: the loss to minimise and a few named scalars to log."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Reconstruction:
    """What a picture of the reconstruction needs, all (B, 3, H, W) in normalised units.

    ``reference`` is the view the model saw whole (None for MAE), ``masked`` the input with
    hidden patches greyed, ``prediction`` the decoder output pasted into the masked patches
    (visible patches kept), ``original`` the masked view before masking.
    """

    reference: torch.Tensor | None
    masked: torch.Tensor
    prediction: torch.Tensor
    original: torch.Tensor


class Method(nn.Module, metaclass=abc.ABCMeta):
    """A pre-training method: an encoder plus its own heads and loss.

    ``forward(batch)`` takes ``batch["images"]``: (B, V, 3, H, W) normalised floats, V the
    method's ``num_views`` and, optionally, ``batch["mask_noise"]``: (B, N) per-sample noise
    made by the data loader. It returns a :class:`MethodOutput`.
    """

    name: ClassVar[str]
    num_views: ClassVar[int]
    # Which data the method learns from: "single" view, "pair" of crops, or "frames" of a video.
    view_kind: ClassVar[str]
    encoder: Encoder

    @classmethod
    @abc.abstractmethod
    def published_defaults(cls, cfg: Config) -> dict[str, Any]:
        """Recipe values for fields left ``null``: mask_ratio, decoder.*, global_scale."""

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Method-specific checks beyond the generic ones; raise ConfigError."""

    @classmethod
    @abc.abstractmethod
    def from_config(cls, cfg: Config) -> Method:
        """Build the method from a resolved config."""

    @abc.abstractmethod
    def reconstruct(self, batch: dict[str, torch.Tensor]) -> Reconstruction:
        """What a picture of the reconstruction needs (no gradient)."""

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights with timm key names (what export writes)."""
        return {k: v.detach().clone() for k, v in self.encoder.vit.state_dict().items()}


def paste_prediction(
    pred: torch.Tensor, original: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of the masked input and of the prediction, for pictures.

    With norm-pix targets the prediction is in per-patch normalised units; it is mapped back
    with the visible original patch statistics of the same patch (what MAE's notebooks do).
    Returns (masked input, visible patches + predicted patches), both (B, 3, H, W).
    """
    from siamae.models.masking import patchify, unpatchify

    target = patchify(original, patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        std = (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
        pred = pred * std + mean
    grid = (original.shape[2] // patch_size, original.shape[3] // patch_size)
    m = mask.unsqueeze(-1)
    masked = unpatchify(target * (1 - m), patch_size, grid)
    pasted = unpatchify(target * (1 - m) + pred * m, patch_size, grid)
    return masked, pasted
