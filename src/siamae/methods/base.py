"""What every pre-training method provides to the one training loop."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn as nn

from siamae.config import MaskedObjectiveConfig, check_fields, check_mask_ratio_range
from siamae.data.dataset import build_source, build_view_maker
from siamae.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from siamae.data.sources import Source
from siamae.data.views import MakesViews
from siamae.models.masking import num_visible, patchify, unpatchify
from siamae.models.vit import Encoder
from siamae.optim import param_groups
from siamae.options import option_error

if TYPE_CHECKING:
    from siamae.config import Config


#: What ``forward`` takes: ``"images"`` (B, V, 3, H, W) normalised floats, ``"mask_noise"`` (B, N)
#: and every extra array the method's view maker returned (boxes, masks, labels) by its name.
Batch = dict[str, torch.Tensor]


@dataclass
class MethodOutput:
    """A training step's result: the loss to minimise and a few named scalars to log.

    >>> import torch
    >>> from siamae import MethodOutput
    >>> out = MethodOutput(torch.tensor(0.5), {"recon": torch.tensor(0.5)})
    >>> out.loss.item(), list(out.logs)
    (0.5, ['recon'])
    """

    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Reconstruction:
    """What a picture of the reconstruction needs, all (B, 3, H, W) in normalised units.

    ``reference`` is the view the model saw whole (None for MAE), ``masked`` the input with
    hidden patches greyed, ``prediction`` the decoder output pasted into the masked patches
    (visible patches kept), ``original`` the masked view before masking: the target view the
    prediction is scored against (a crop, or a frame), the picture's "target view (unmasked)".
    """

    reference: torch.Tensor | None
    masked: torch.Tensor
    prediction: torch.Tensor
    original: torch.Tensor


Picture = list[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class ColourScale:
    """How a picture column of values was coloured: matplotlib colour map ``cmap`` from
    ``vmin`` to ``vmax``; the picture draws it as a colour bar titled ``label`` (with units)."""

    label: str
    vmin: float
    vmax: float
    cmap: str = "coolwarm"

    def colour(self, values: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) values -> (B, 3, H, W) RGB in [0, 1] through the colour map."""
        from matplotlib import colormaps

        scaled = ((values - self.vmin) / max(self.vmax - self.vmin, 1e-12)).clamp(0, 1)
        rgb = colormaps[self.cmap](scaled[:, 0].cpu().numpy())[..., :3]
        return torch.from_numpy(rgb).permute(0, 3, 1, 2).float().to(values.device)


class Method(nn.Module, metaclass=abc.ABCMeta):
    """A pre-training objective or downstream task: an encoder plus its own heads and loss.

    What every method gives: ``forward(batch)`` (a :data:`Batch` in, a :class:`MethodOutput`
    out), its views and source (``build_views``/``build_source``; the defaults fit the masked
    autoencoders), its published defaults and checks, ``from_config``, and its optimizer groups
    (``param_groups``; the default is timm's weight-decay rule).

    What only some give is declared by implementing one of the small protocols below, which
    the engine tests for (``isinstance``): :class:`Reconstructs` and :class:`DrawsPictures`
    (the run's picture), :class:`ScalesPictures` (colour bars), :class:`Evaluates` (evaluation
    at epoch ends or every ``eval_every_steps``), :class:`UpdatesAfterStep` (an EMA),
    :class:`KeepsRankLocalTensors` (tensors DDP must leave alone; the engine copies rank 0's
    at the start), :class:`SkipsAtStart` (files dropped while building), :class:`MasksPatches`
    (the mask ratio a picture names). A method without one
    simply lacks it: no stub raises, and the engine reads no undeclared attribute.

    >>> import siamae
    >>> issubclass(siamae.CropMAE, siamae.Method), siamae.CropMAE.view_kind
    (True, 'pair')
    """

    name: ClassVar[str]
    num_views: ClassVar[int]
    # Which data the method learns from: "single" view, "pair" of crops, or "frames" of a video.
    view_kind: ClassVar[str]
    # Tensors an older siamae saved in this method's checkpoints and this one no longer keeps:
    # dropped when a state dict is loaded, so old run folders resume and load.
    retired_tensors: ClassVar[frozenset[str]] = frozenset()
    # The config sections this method owns, by name (``cropmae``, ``decoder``, ``mixing``): a
    # resolved config of this method holds them beside the common ones, and nothing else.
    config_sections: ClassVar[dict[str, type]] = {}
    encoder: Encoder

    @classmethod
    @abc.abstractmethod
    def published_defaults(cls, cfg: Config) -> dict[str, Any]:
        """Recipe values for fields left ``null``: ``global_scale``, ``interpolation`` and, by
        section name, the null fields of the method's own sections (``{"decoder": {...}}``)."""

    @classmethod
    def progress_label(cls) -> str:
        """What the progress bar says the run does."""
        return f"{cls.name} pre-training"

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Method-specific checks beyond the generic ones; raise ConfigError.

        The default refuses a mask ratio that masks no patch or leaves none visible.
        """
        for name, section in cfg.sections.items():
            if isinstance(section, MaskedObjectiveConfig) and section.mask_ratio is not None:
                check_mask_ratio(cfg, section.mask_ratio, f"{name}.mask_ratio")

    @classmethod
    def resolve_config(cls, cfg: Config) -> Config:
        """``cfg`` with its ``null`` fields set to this method's published values, then every
        field checked: the generic checks (:func:`siamae.config.check_fields`), then the
        method's own (:meth:`check_config`). :func:`siamae.recipes.resolve` calls it for the
        method a config names; not a hook to override."""
        defaults = cls.published_defaults(cfg)
        for section_name, section in cfg.sections.items():
            for name, value in defaults.get(section_name, {}).items():
                if getattr(section, name) is None:
                    setattr(section, name, value)
        if cfg.data.global_scale is None:
            cfg.data.global_scale = tuple(defaults["global_scale"])
        if cfg.data.interpolation is None:
            cfg.data.interpolation = defaults.get("interpolation", "bilinear")
        check_fields(cfg)
        cls.check_config(cfg)
        return cfg

    # -- data ---------------------------------------------------------------------------------
    @classmethod
    def build_views(cls, cfg: Config) -> MakesViews:
        """The view maker run in the loader workers: ``(source, index, rng) -> views``."""

        return build_view_maker(cfg, cls.view_kind)

    @classmethod
    def build_source(
        cls, cfg: Config, cache_dir: str | None = None, run_dir: str | None = None
    ) -> Source:
        """Where the items come from (image files, videos, synthetic scenes). ``cache_dir``: where
        an index of the data may be written; ``run_dir``: the run folder the engine hands over,
        whose index is reused (a method never reads the run folder from the config)."""
        return build_source(cfg, cls.view_kind, cache_dir, run_dir)

    @classmethod
    @abc.abstractmethod
    def from_config(cls, cfg: Config) -> Method:
        """Build the method from a resolved config."""

    # -- training -----------------------------------------------------------------------------
    @abc.abstractmethod
    def forward(self, batch: Batch) -> MethodOutput:
        """The loss of one batch and the scalars to log."""

    def param_groups(self, weight_decay: float, no_decay_tokens: bool = False) -> list[dict]:
        """AdamW groups; a group may carry ``lr_scale`` (multiplied into the scheduled lr)."""

        return param_groups(self, weight_decay, no_decay_tokens)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights with timm key names (what export writes)."""
        return {k: v.detach().clone() for k, v in self.encoder.vit.state_dict().items()}

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """``nn.Module.load_state_dict`` without the tensors this method has retired."""
        return super().load_state_dict(
            without_retired(type(self), state_dict), strict=strict, assign=assign
        )


def without_retired(method: type[Method], state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` less the tensors an older siamae saved for ``method`` and it no longer keeps."""
    return {k: v for k, v in state.items() if k not in method.retired_tensors}


# -- optional capabilities: a method has one by implementing it; the engine tests for it ------


@runtime_checkable
class Reconstructs(Protocol):
    """A method that predicts pixels: what a picture of its reconstruction needs (no gradient)."""

    def reconstruct(self, batch: Batch) -> Reconstruction: ...


@runtime_checkable
class DrawsPictures(Protocol):
    """A method with a picture of what it learns, drawn at the end of a run and by
    ``siamae visualize``: titled columns of (B, 3, H, W) RGB in [0, 1], or None when this
    batch cannot make one."""

    def picture(self, batch: Batch) -> Picture | None: ...


@runtime_checkable
class MasksPatches(Protocol):
    """A method that hides this fraction of the patches (its pictures' titles say it)."""

    mask_ratio: float


@runtime_checkable
class ScalesPictures(Protocol):
    """A picture with columns coloured from values: title -> the scale, a colour bar each
    (set by the last ``picture`` call)."""

    picture_scales: dict[str, ColourScale]


@dataclass(frozen=True)
class EvalRequest:
    """What the engine hands an evaluation: the device, the step it is made at, whether it is
    the run's last, and (on the last) the folder for its files, ``<run>/<method name>``."""

    device: torch.device
    step: int
    final: bool = False
    results_dir: Path | None = None


@runtime_checkable
class Evaluates(Protocol):
    """A method with its own evaluation, run on every process at an epoch's end and at the end
    of training; with ``eval_every_steps``, only at the epoch ends that close an interval of
    that many steps (and at the end). ``best_metric`` (higher is better) keeps
    ``checkpoints/best.pt``."""

    best_metric: str | None
    eval_every_steps: int | None

    def evaluate(self, request: EvalRequest) -> dict[str, float] | None: ...


@runtime_checkable
class UpdatesAfterStep(Protocol):
    """Called after every optimizer step (``step`` already counts it): EMA updates, counters."""

    def after_step(self, step: int, total_steps: int) -> None: ...


@runtime_checkable
class KeepsRankLocalTensors(Protocol):
    """Parameters/buffers DDP must neither reduce nor broadcast (an EMA target, updated the same
    way on every process). The engine copies rank 0's once, when it wraps the method in DDP."""

    def ddp_ignored_names(self) -> list[str]: ...


@runtime_checkable
class SkipsAtStart(Protocol):
    """Files the method dropped while it was built (unreadable validation images, unpaired
    training images): the engine lists them in ``skipped_files.txt`` and the summary counts them."""

    skipped_at_start: list[str]


def reconstruction_picture(method: Reconstructs, batch: Batch) -> Picture:
    """The masked autoencoders' picture, from their reconstruction: reference view (when there
    is one), masked view, prediction and the target view unmasked."""
    rec = method.reconstruct(batch)
    columns = [
        ("reference view", rec.reference),
        ("masked view", rec.masked),
        ("prediction", rec.prediction),
        # the crop (or frame) the prediction is scored against, not the whole image: the
        # batch holds only the views, so the title says which it is
        ("target view (unmasked)", rec.original),
    ]
    return [(title, denormalize(images)) for title, images in columns if images is not None]


def encoder_from_config(cfg: Config) -> Encoder:
    """The encoder the ``model`` section describes (fixed sin-cos positions, MAE's init)."""
    m = cfg.model
    return Encoder(m.arch, m.patch_size, m.img_size, m.drop_path)


def check_mask_ratio(cfg: Config, ratio: float, field_name: str) -> None:
    """A mask ratio in [0, 1) that hides at least one patch (MAE's rounding keeps at least one
    visible)."""
    check_mask_ratio_range(ratio, field_name)
    n = (cfg.model.img_size // cfg.model.patch_size) ** 2
    if num_visible(n, ratio) >= n:
        raise option_error(
            field_name,
            f"{ratio} masks no patch of the {n} patches "
            f"({cfg.model.img_size}px images, patch {cfg.model.patch_size}), so {cfg.method} has "
            f"nothing to reconstruct; choose a ratio above 0",
        )


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised (B, 3, H, W) -> RGB in [0, 1] (for pictures)."""

    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp(0, 1)


def paste_prediction(
    pred: torch.Tensor, original: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of the masked input and of the prediction, for pictures.

    With norm-pix targets the prediction is in per-patch normalised units; it is mapped back
    with the visible original patch statistics of the same patch (what MAE's notebooks do).
    Returns (masked input, visible patches + predicted patches), both (B, 3, H, W).
    """

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
