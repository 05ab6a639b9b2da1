"""The evaluators as functions on any model: label propagation (DAVIS, JHMDB, VIP), the image
probes (k-NN, linear, few-shot) and segmentation scores, each returning the dict that the
matching ``siamae eval`` command writes.

A model siamae did not make takes part through a callable:

- propagation reads a *patch-feature function*: a frame batch (B, 3, H, W), float,
  ImageNet-normalised, to a patch-feature map (B, D, H/p, W/p) for a patch size p (given, or
  inferred from the map's grid). A siamae :class:`~siamae.models.vit.Encoder` is used as it is,
  a timm ``VisionTransformer`` through :func:`timm_patch_features`, anything else (a DINO
  checkpoint's network, a CNN, a user's own model) as the callable it is;
- the image probes read feature tensors (:class:`ProbeFeatures`), or a *global-feature
  function*, images (B, 3, S, S) to (B, D), run over two labelled image folders
  (:func:`probe_features`).

Everything below runs the same code as the commands (``siamae.eval``): the same protocol
presets, the same files in ``out``, the same figures.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer
from tqdm.auto import tqdm  # type: ignore[import-untyped,unused-ignore]

from siamae.data.image_folder import (
    EvalTransform,
    ImageFolder,
    loader,
    normalize,
    validation_folder,
)
from siamae.errors import SiamaeError
from siamae.eval.probes.fewshot import FewShotResult, draw_subset, fit_logistic, predict
from siamae.eval.probes.knn import DEFAULT_KS, DEFAULT_TEMPERATURE, knn_classify
from siamae.eval.probes.linear import LinearConfig, fit_probe
from siamae.eval.propagation import davis, jhmdb, vip
from siamae.eval.propagation.engine import (
    PropagationParams,
    apply_overrides,
    check_resize_rule,
)
from siamae.eval.propagation.engine import protocol as propagation_protocol
from siamae.eval.propagation.results import write_summary
from siamae.eval.propagation.synthetic_videos import write_davis_layout
from siamae.loading import describe_encoder
from siamae.models.pos_embed import POS_RESAMPLE_HELP, POS_RESAMPLE_MODES, resample_position_table
from siamae.models.vit import Encoder
from siamae.segmentation_scores import SUMMARY_FORMAT, confusion_matrix, segmentation_scores

__all__ = [
    "FeatureFunction",
    "ProbeFeatures",
    "TimmPatchFeatures",
    "fewshot_probe",
    "knn_probe",
    "linear_probe",
    "probe_features",
    "propagate_davis",
    "propagate_jhmdb",
    "propagate_vip",
    "score_segmentation",
    "synthetic_davis",
    "timm_patch_features",
]

#: images (B, 3, H, W), float, ImageNet-normalised -> features: (B, D, H/p, W/p) patch maps for
#: propagation, (B, D) vectors for the image probes.
FeatureFunction = Callable[[torch.Tensor], torch.Tensor]

# The frame batch that checks a patch-feature function before any file is written; with an
# unknown patch size its output grid gives it (both sides divide by 8, 14, 16 and 32).
_PROBE_SIZE = (224, 448)


# -- a timm ViT as a patch-feature function ------------------------------------------------------


class TimmPatchFeatures(nn.Module):
    """A timm ``VisionTransformer`` as a patch-feature function: (B, 3, H, W) -> (B, D, H/p, W/p),
    the last block's tokens after the final norm, its prefix tokens (CLS, registers) dropped.

    Any image size in whole patches is encoded: the position table is resampled to the grid
    by DINO's formula (``pos_resample="dino"``, what the published propagation code runs and
    ``siamae eval davis`` does by default) or timm's own ``resample_abs_pos_embed``
    (``"timm"``, what the model does with ``dynamic_img_size=True``). The model is held, not
    copied: its weights, device and mode are the module's.

    >>> import timm, torch
    >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=0)
    >>> features = TimmPatchFeatures(vit)
    >>> features(torch.zeros(2, 3, 64, 96)).shape
    torch.Size([2, 192, 4, 6])
    """

    def __init__(self, model: VisionTransformer, pos_resample: str = "dino") -> None:
        super().__init__()
        if not isinstance(model, VisionTransformer):
            raise SiamaeError(
                f"timm_patch_features takes a timm VisionTransformer, got {type(model).__name__}; "
                "wrap other models in a function (B, 3, H, W) -> (B, D, H/p, W/p)"
            )
        ph, pw = (int(v) for v in model.patch_embed.patch_size)
        if ph != pw:
            raise SiamaeError(f"patches of {ph}x{pw}: only square patches are supported")
        if pos_resample not in POS_RESAMPLE_MODES:
            raise SiamaeError(
                f"pos_resample {pos_resample!r}: choose one of {', '.join(POS_RESAMPLE_MODES)}"
            )
        self.model = model
        self.patch_size = ph
        self.pos_resample = pos_resample

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D, H/p, W/p); H and W whole multiples of the patch size."""
        vit, p = self.model, self.patch_size
        b, _, h, w = images.shape
        if h % p or w % p:
            raise SiamaeError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        grid = (h // p, w // p)
        strict = vit.patch_embed.strict_img_size
        vit.patch_embed.strict_img_size = False  # other sizes: the grid is resampled below
        try:
            tokens = vit.patch_embed(images)
        finally:
            vit.patch_embed.strict_img_size = strict
        tokens = self._with_positions(tokens.reshape(b, -1, tokens.shape[-1]), grid)
        tokens = vit.norm(vit.blocks(vit.norm_pre(vit.patch_drop(tokens))))
        patches: torch.Tensor = tokens[:, vit.num_prefix_tokens :]
        return patches.transpose(1, 2).reshape(b, patches.shape[-1], *grid)

    def _with_positions(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """timm's ``_pos_embed`` with the table resampled by ``pos_resample`` (timm's own
        resamples only its way, and only for a model built with ``dynamic_img_size``)."""
        vit = self.model
        prefix = [
            t.expand(tokens.shape[0], -1, -1)
            for t in (vit.cls_token, vit.reg_token)
            if t is not None
        ]
        if vit.pos_embed is None:
            return torch.cat([*prefix, tokens], dim=1)
        pos = resample_position_table(
            vit.pos_embed,
            tuple(vit.patch_embed.grid_size),
            grid,
            mode=self.pos_resample,
            num_prefix_tokens=0 if vit.no_embed_class else vit.num_prefix_tokens,
        )
        if vit.no_embed_class:  # DeiT-3, registers: positions for the patches only
            tokens = torch.cat([*prefix, tokens + pos], dim=1)
        else:
            tokens = torch.cat([*prefix, tokens], dim=1) + pos
        return vit.pos_drop(tokens)  # type: ignore[no-any-return]

    def describe(self) -> str:
        """One line for ``summary.json``: the model and how its position grid is resampled."""
        name = getattr(self.model, "pretrained_cfg", {}).get("architecture") or "VisionTransformer"
        return (
            f"timm {name}, patch {self.patch_size}, {self.model.num_prefix_tokens} prefix "
            f"token(s); position grid at other sizes: {self.pos_resample}, "
            f"{POS_RESAMPLE_HELP[self.pos_resample]}"
        )


def timm_patch_features(model: VisionTransformer, pos_resample: str = "dino") -> TimmPatchFeatures:
    """Any ``timm.create_model(...)`` ViT (CLS and register tokens, learned or fixed positions)
    as the patch-feature function the propagation evaluators take (:class:`TimmPatchFeatures`).

    >>> import timm, torch
    >>> vit = timm.create_model(
    ...     "vit_tiny_patch16_224", img_size=64, depth=2, reg_tokens=4, no_embed_class=True
    ... )
    >>> timm_patch_features(vit, pos_resample="timm")(torch.zeros(1, 3, 48, 80)).shape
    torch.Size([1, 192, 3, 5])
    """
    return TimmPatchFeatures(model, pos_resample)


# -- any callable as the encoder the benchmarks read ----------------------------------------------


class _PatchFeatureEncoder(nn.Module):
    """What the propagation benchmarks read of an encoder (``patch_features``, ``patch_size``,
    ``eval()``, ``to(device)``) around a patch-feature function, checking each map it gives."""

    def __init__(self, function: FeatureFunction, patch_size: int, description: str) -> None:
        super().__init__()
        self.function = function
        owner = _owner(function)
        if owner is not None and owner is not function:
            self.owner = owner  # a bound method's module: moved and put in eval mode with it
        self.patch_size = patch_size
        self.description = description

    @property
    def patch(self) -> int:
        """The patch size, typed (``patch_size`` is what the benchmarks read)."""
        return self.patch_size

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        out = self.function(images)
        _check_feature_map(out, images, self.patch_size)
        return out


def _owner(function: object) -> nn.Module | None:
    """The module a feature function runs: itself, or the module of a bound method."""
    if isinstance(function, nn.Module):
        return function
    owner = getattr(function, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def _check_feature_map(out: object, images: torch.Tensor, patch: int) -> None:
    b, _, h, w = images.shape
    expected = f"(B, D, H/p, W/p) = ({b}, D, {h // patch}, {w // patch}) at patch size {patch}"
    if not isinstance(out, torch.Tensor):
        raise SiamaeError(
            f"the feature function returned a {type(out).__name__}, not a tensor; "
            f"expected {expected}"
        )
    if out.ndim != 4 or out.shape[0] != b or tuple(out.shape[2:]) != (h // patch, w // patch):
        raise SiamaeError(
            f"the feature function returned shape {tuple(out.shape)} for frames "
            f"{tuple(images.shape)}; expected {expected} (pass patch_size= if it is another)"
        )


def _name_of(function: object) -> str:
    name = getattr(function, "__qualname__", None) or type(function).__name__
    return str(name)


@torch.no_grad()
def _inferred_patch_size(function: FeatureFunction, device: str | torch.device) -> int:
    """The patch size a feature function's output grid shows on a 224x448 batch."""
    h, w = _PROBE_SIZE
    try:
        out = function(torch.zeros(2, 3, h, w, device=device))
    except SiamaeError:
        raise
    except Exception as err:
        raise SiamaeError(
            f"the feature function failed on a (2, 3, {h}, {w}) batch ({type(err).__name__}: "
            f"{err}); pass patch_size= so the patch size need not be inferred"
        ) from None
    if isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[2] and out.shape[3]:
        gh, gw = int(out.shape[2]), int(out.shape[3])
        if h % gh == 0 and w % gw == 0 and h // gh == w // gw:
            return h // gh
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    raise SiamaeError(
        f"cannot infer the patch size: the feature function gave {shape} for frames "
        f"(2, 3, {h}, {w}); expected (2, D, {h}/p, {w}/p), or pass patch_size="
    )


def _as_encoder(
    features: FeatureFunction | Encoder | VisionTransformer,
    patch_size: int | None,
    device: str | torch.device,
) -> tuple[Encoder | _PatchFeatureEncoder, str]:
    """The encoder the benchmarks take, and its description for ``summary.json``."""
    if isinstance(features, Encoder):
        if patch_size is not None and patch_size != features.patch_size:
            raise SiamaeError(
                f"patch_size {patch_size}: the encoder's patches are {features.patch_size}"
            )
        return features, describe_encoder(features)
    if isinstance(features, VisionTransformer):
        features = TimmPatchFeatures(features)
    if isinstance(features, TimmPatchFeatures):
        description = features.describe()
        patch_size = patch_size or features.patch_size
    else:
        description = f"a feature function ({_name_of(features)})"
    if patch_size is not None and patch_size < 1:
        raise SiamaeError(f"patch_size {patch_size}: expected 1 or more")
    owner = _owner(features)
    if owner is not None:
        owner.eval().to(device)
    patch = patch_size or _inferred_patch_size(features, device)
    encoder = _PatchFeatureEncoder(features, patch, f"{description}, patch {patch}")
    with torch.no_grad():  # one batch through it, before any file is written
        side = patch * max(1, _PROBE_SIZE[0] // patch)
        encoder.patch_features(torch.zeros(2, 3, side, side, device=device))
    return encoder, encoder.description


@contextlib.contextmanager
def _kept_mode(features: object) -> Iterator[None]:
    """The user's model back in the train/eval mode it came in, whatever the benchmark did."""
    owner = _owner(features)
    training = owner.training if owner is not None else False
    try:
        yield
    finally:
        if owner is not None:
            owner.train(training)


def _params(
    protocol: str | PropagationParams, benchmark: str, overrides: Mapping[str, object] | None
) -> PropagationParams:
    pairs = [f"{k}={_text(v)}" for k, v in (overrides or {}).items()]
    if isinstance(protocol, PropagationParams):
        return apply_overrides(dataclasses.replace(protocol), pairs)
    return propagation_protocol(protocol, benchmark, pairs)


def _text(value: object) -> str:
    """A value as ``--set`` reads it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _described(summary: dict[str, Any], description: str, out: str | Path) -> dict[str, Any]:
    """The summary with the encoder named as the caller gave it, ``summary.json`` rewritten."""
    summary["encoder"] = description
    write_summary(Path(out), summary)
    return summary


@contextlib.contextmanager
def _benchmark_encoder(
    features: FeatureFunction | Encoder | VisionTransformer,
    patch_size: int | None,
    device: str | torch.device,
    params: PropagationParams,
    out: str | Path,
) -> Iterator[tuple[Encoder | _PatchFeatureEncoder, str]]:
    if Path(out).exists() and not Path(out).is_dir():
        raise SiamaeError(f"out {str(out)!r} is a file; pass a folder for the predictions")
    with _kept_mode(features):
        encoder, description = _as_encoder(features, patch_size, device)
        patch = encoder.patch_size if isinstance(encoder, Encoder) else encoder.patch
        check_resize_rule(params.resize, patch)
        yield encoder, description


# -- propagation ----------------------------------------------------------------------------------


def propagate_davis(
    features: FeatureFunction | Encoder | VisionTransformer,
    root: str | Path,
    out: str | Path,
    *,
    sequences: Sequence[str] | str | None = None,
    split: str | None = None,
    protocol: str | PropagationParams = "cropmae",
    overrides: Mapping[str, object] | None = None,
    patch_size: int | None = None,
    max_frames: int | None = None,
    score_at: str | None = None,
    void: str = "background",
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """DAVIS J&F of any patch-feature function by label propagation: ``siamae eval davis``.

    Args:
        features: (B, 3, H, W) ImageNet-normalised frames -> (B, D, H/p, W/p) patch features;
            or a siamae ``Encoder``, or a timm ``VisionTransformer`` (read through
            :func:`timm_patch_features`). A module (or a bound method's module) is moved to
            ``device`` and run in eval mode, its mode restored afterwards.
        root: the DAVIS folder (``JPEGImages/480p``, ``Annotations/480p``, ``ImageSets``).
        out: where the predicted PNGs, ``per_sequence.csv`` and ``summary.json`` go.
        sequences: names (a list, or ``"a,b"``) instead of the split's.
        protocol: ``"cropmae"`` or ``"dino"`` (the presets), or a ``PropagationParams``.
        overrides: protocol fields to change, as ``--set`` does (``{"resize": "240x432"}``).
        patch_size: p; inferred from the output grid of a 224x448 batch when None.
        max_frames, score_at, void, split: as ``siamae eval davis``'s options.
    Returns:
        the dict written to ``out/summary.json`` (``"J&F-Mean"``, ``"J-Mean"``, ...).

    >>> import tempfile, torch
    >>> root = synthetic_davis(tempfile.mkdtemp(), videos=1, frames=4)
    >>> colour = lambda frames: torch.nn.functional.avg_pool2d(frames, 8)  # p = 8
    >>> summary = propagate_davis(
    ...     colour, root, tempfile.mkdtemp(), overrides={"resize": "64x96"}, progress=False
    ... )
    >>> summary["sequences"], 0.0 <= summary["J&F-Mean"] <= 1.0
    (['synthetic0'], True)
    """
    params = _params(protocol, "davis", overrides)
    if isinstance(sequences, str):
        sequences = [s for s in sequences.split(",") if s]
    davis.list_sequences(root, split, list(sequences) if sequences else None)  # the root first
    with _benchmark_encoder(features, patch_size, device, params, out) as (encoder, description):
        result = davis.evaluate_davis(
            encoder,
            root,
            out,
            params,
            sequences=list(sequences) if sequences else None,
            split=split,
            score_at=score_at,
            void=void,
            max_frames=max_frames,
            device=str(device),
            progress=progress,
        )
    return _described(result.summary, description, out)


def propagate_jhmdb(
    features: FeatureFunction | Encoder | VisionTransformer,
    root: str | Path,
    out: str | Path,
    *,
    split: str | None = None,
    protocol: str | PropagationParams = "cropmae",
    overrides: Mapping[str, object] | None = None,
    patch_size: int | None = None,
    max_clips: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """JHMDB keypoint propagation (PCK@0.1, PCK@0.2) of any patch-feature function:
    ``siamae eval jhmdb``. Arguments as :func:`propagate_davis`'s; ``root`` holds
    ``Rename_Images/`` and ``joint_positions/``; returns the dict of ``out/summary.json``.

    >>> propagate_jhmdb(lambda x: x, "/no/such/JHMDB", "out")
    Traceback (most recent call last):
    ...
    siamae.errors.DataError: JHMDB root /no/such/JHMDB does not exist; pass --data-root pointing at JHMDB/
    """
    params = _params(protocol, "jhmdb", overrides)
    jhmdb.list_clips(root, split)  # the data first: a wrong folder fails before any model runs
    with _benchmark_encoder(features, patch_size, device, params, out) as (encoder, description):
        summary = jhmdb.evaluate_jhmdb(
            encoder, root, out, params, split, max_clips, str(device), progress
        )
    return _described(summary, description, out)


def propagate_vip(
    features: FeatureFunction | Encoder | VisionTransformer,
    root: str | Path,
    out: str | Path,
    *,
    split: str | None = None,
    protocol: str | PropagationParams = "cropmae",
    overrides: Mapping[str, object] | None = None,
    patch_size: int | None = None,
    max_videos: int | None = None,
    max_frames: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """VIP part propagation (mIoU over 20 classes) of any patch-feature function:
    ``siamae eval vip``. Arguments as :func:`propagate_davis`'s; ``root`` holds ``VIP_Fine/``;
    returns the dict of ``out/summary.json``.

    >>> propagate_vip(lambda x: x, "/no/such/VIP", "out")
    Traceback (most recent call last):
    ...
    siamae.errors.DataError: VIP root /no/such/VIP does not exist; pass --data-root pointing at VIP/
    """
    params = _params(protocol, "vip", overrides)
    vip.list_videos(vip.vip_root(root), split)  # the data first
    with _benchmark_encoder(features, patch_size, device, params, out) as (encoder, description):
        summary = vip.evaluate_vip(
            encoder, root, out, params, split, max_videos, max_frames, str(device), progress
        )
    return _described(summary, description, out)


def synthetic_davis(
    root: str | Path, videos: int = 2, frames: int = 5, size: int = 64, width: int = 96
) -> Path:
    """Built-in synthetic videos (textured objects on textured backgrounds, masks known)
    written in the DAVIS-2017 layout under ``root``: a folder :func:`propagate_davis` and
    ``siamae eval davis`` read, to try them without a download. Returns ``root``.

    >>> import tempfile
    >>> root = synthetic_davis(tempfile.mkdtemp(), videos=2, frames=3)
    >>> (root / "ImageSets" / "2017" / "val.txt").read_text().split()
    ['synthetic0', 'synthetic1']
    """
    return write_davis_layout(root, videos, size, frames, seed=1, width=width)


# -- image probes ---------------------------------------------------------------------------------


@dataclass
class ProbeFeatures:
    """Frozen features and labels of a training and a validation set: what the probes read.

    Built from tensors (features (N, D), labels (N,) integers in [0, C)), or by
    :func:`probe_features` from a feature function and two image folders. ``info`` goes into
    every probe's result (where the features came from).

    >>> import torch
    >>> data = ProbeFeatures(torch.eye(4), torch.tensor([0, 1, 2, 3]), torch.eye(4)[:2],
    ...                      torch.tensor([0, 1]))
    >>> data.num_classes
    4
    """

    train_features: torch.Tensor
    train_labels: torch.Tensor
    val_features: torch.Tensor
    val_labels: torch.Tensor
    num_classes: int = 0  # 0: the largest label + 1
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("train", "val"):
            feats, labels = getattr(self, f"{name}_features"), getattr(self, f"{name}_labels")
            if not isinstance(feats, torch.Tensor) or feats.ndim != 2 or feats.shape[0] == 0:
                shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats)
                raise SiamaeError(
                    f"{name}_features: expected an (N, D) tensor, N >= 1, got {shape}"
                )
            labels = torch.as_tensor(labels)
            if labels.shape != (feats.shape[0],) or labels.is_floating_point():
                raise SiamaeError(
                    f"{name}_labels: expected {feats.shape[0]} integer labels (one a feature "
                    f"row), got {labels.dtype} {tuple(labels.shape)}"
                )
            setattr(self, f"{name}_labels", labels.long())
        if self.train_features.shape[1] != self.val_features.shape[1]:
            raise SiamaeError(
                f"train features have {self.train_features.shape[1]} dimensions, val features "
                f"{self.val_features.shape[1]}"
            )
        top = int(max(self.train_labels.max(), self.val_labels.max())) + 1
        low = int(min(self.train_labels.min(), self.val_labels.min()))
        if low < 0 or (self.num_classes and top > self.num_classes):
            raise SiamaeError(
                f"labels must lie in [0, {self.num_classes or top}), got {low}..{top - 1}"
            )
        self.num_classes = self.num_classes or top


@torch.no_grad()
def _folder_features(
    function: FeatureFunction,
    folder: ImageFolder,
    batch_size: int,
    num_workers: int,
    device: str | torch.device,
    progress: bool,
) -> torch.Tensor:
    out: list[torch.Tensor] = []
    desc = f"{folder.root.name} features"
    with tqdm(total=len(folder), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for images, _ in loader(folder, batch_size, num_workers):
            feats = function(normalize(images, device))
            if (
                not isinstance(feats, torch.Tensor)
                or feats.shape[:1] != images.shape[:1]
                or (feats.ndim != 2)
            ):
                shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats)
                raise SiamaeError(
                    f"the feature function returned {shape} for images {tuple(images.shape)}; "
                    f"expected (B, D) = ({images.shape[0]}, D)"
                )
            out.append(feats.float().cpu())
            bar.update(images.shape[0])
    return torch.cat(out)


def probe_features(
    features: FeatureFunction,
    train_dir: str | Path,
    val_dir: str | Path,
    *,
    img_size: int = 224,
    crop_pct: float = 0.875,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> ProbeFeatures:
    """The features a global-feature function ((B, 3, S, S) normalised images -> (B, D)) gives
    the images of two labelled folders (``DIR/<class>/<image>``, or tar shards), under the
    probes' evaluation transform (short side to ``img_size / crop_pct``, bicubic, centre crop
    of ``img_size``), in the folders' order, as the probe commands compute them.

    A module (or a bound method's module) runs in eval mode on ``device``, its mode restored.

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> root = Path(tempfile.mkdtemp())
    >>> for split in ("train", "val"):
    ...     for name, colour in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
    ...         (root / split / name).mkdir(parents=True)
    ...         Image.new("RGB", (40, 40), colour).save(root / split / name / "0.png")
    >>> mean_colour = lambda images: images.mean(dim=(2, 3))  # (B, 3)
    >>> data = probe_features(mean_colour, root / "train", root / "val", img_size=32,
    ...                       progress=False)
    >>> data.train_features.shape, data.info["classes"]
    (torch.Size([2, 3]), ['blue', 'red'])
    """
    transform = EvalTransform(img_size, crop_pct)
    train_set = ImageFolder(train_dir, transform)
    val_set = validation_folder(val_dir, transform, train_set.classes)
    owner = _owner(features)
    with _kept_mode(features):
        if owner is not None:
            owner.eval().to(device)
        run = (batch_size, num_workers, device, progress)
        train = _folder_features(features, train_set, *run)
        val = _folder_features(features, val_set, *run)
    info: dict[str, Any] = {
        "encoder": f"a feature function ({_name_of(features)})",
        "features": f"what {_name_of(features)} returns",
        "img_size": img_size,
        "crop_pct": crop_pct,
        "train": str(Path(train_dir).resolve()),
        "val": str(Path(val_dir).resolve()),
        "classes": list(train_set.classes),
        "val_skipped": [line.split("\t")[0] for line in val_set.skipped],
    }
    return ProbeFeatures(train, train_set.labels, val, val_set.labels, len(train_set.classes), info)


def knn_probe(
    data: ProbeFeatures,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
) -> dict[str, Any]:
    """Weighted cosine k-NN top-1/top-5 (percent; the DINO protocol) for each k:
    the dict ``siamae eval knn --out FILE`` writes (``"top1"``, ``"top5"``: k -> accuracy).

    >>> import torch
    >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    >>> y = torch.tensor([0, 0, 1, 1])
    >>> knn_probe(ProbeFeatures(x, y, x, y), ks=[1])["top1"]
    {'1': 100.0}
    """
    if not ks or any(int(k) < 1 for k in ks):
        raise SiamaeError(f"ks: every k must be 1 or more, got {list(ks)}")
    if temperature <= 0:
        raise SiamaeError(f"temperature must be positive, got {temperature}")
    result = knn_classify(
        data.train_features,
        data.train_labels,
        data.val_features,
        data.val_labels,
        ks=ks,
        temperature=temperature,
        num_classes=data.num_classes,
    )
    result.info = dict(data.info)
    return result.to_dict()


def linear_probe(
    data: ProbeFeatures,
    *,
    protocol: str = "mae-sgd256",
    epochs: int | None = None,
    batch_size: int | None = None,
    optimizer: str | None = None,
    lr: float | None = None,
    momentum: float | None = None,
    weight_decay: float | None = None,
    warmup_epochs: float | None = None,
    seed: int = 0,
    eval_every: int = 1,
    out_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """A linear probe (BatchNorm1d(affine=False) + Linear) trained on the features, top-1 on
    the validation ones: the dict ``siamae eval linear`` writes to ``results.json`` (also
    written to ``out_dir``, with a checkpoint per epoch, when given). ``protocol`` names the
    published settings (``mae``, ``siameseim``, ``mae-sgd256``); the other keyword arguments
    override them as the command's options do (``lr`` is the base rate, x batch / 256).

    >>> import torch
    >>> gen = torch.Generator().manual_seed(0)
    >>> x = torch.randn(40, 8, generator=gen) + torch.tensor([3.0] * 20 + [-3.0] * 20)[:, None]
    >>> y = torch.tensor([0] * 20 + [1] * 20)
    >>> result = linear_probe(ProbeFeatures(x, y, x, y), epochs=3, batch_size=8)
    >>> result["top1"], len(result["history"])
    (100.0, 3)
    """
    cfg = LinearConfig.for_protocol(
        protocol,
        epochs=epochs,
        batch_size=batch_size,
        optimizer=optimizer,
        base_lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        seed=seed,
        eval_every=eval_every,
    )
    result = fit_probe(
        data.train_features,
        data.train_labels,
        data.val_features,
        data.val_labels,
        num_classes=data.num_classes,
        cfg=cfg,
        out_dir=out_dir,
        device=device,
        progress=progress,
        run_info=data.info,
    )
    # The head's figures; what the features are is the data's to say, not the preset's pool.
    features = {"features": data.info.get("features", "given feature tensors")}
    return result.to_dict() | features | {"recipe": dataclasses.asdict(cfg), **data.info}


def fewshot_probe(
    data: ProbeFeatures,
    *,
    per_class: int = 13,
    subset: Iterable[int] | None = None,
    seed: int = 0,
    lambd: float = 0.1,
) -> dict[str, Any]:
    """Few-shot top-1 (the MSN / SiameseIM 1 %-label protocol): an L2-regularised logistic
    regression (``lambd``) on the features of ``per_class`` training images a class (drawn
    with ``seed``, as the command draws them) or of the ``subset`` indices, scored on every
    validation feature: the dict ``siamae eval fewshot`` writes to ``fewshot.json``.

    >>> import torch
    >>> x = torch.tensor([[2.0, 0.0, 1.0], [0.0, 2.0, 1.0]]).repeat(3, 1)
    >>> y = torch.tensor([0, 1]).repeat(3)
    >>> result = fewshot_probe(ProbeFeatures(x, y, x, y), per_class=2)
    >>> result["top1"], result["num_labelled"]
    (100.0, 4)
    """
    if subset is not None:
        chosen = np.array(sorted({int(i) for i in subset}), dtype=np.int64)
        n = data.train_features.shape[0]
        if chosen.size == 0 or chosen[0] < 0 or chosen[-1] >= n:
            raise SiamaeError(f"subset: expected indices of the {n} training features")
        described = f"{len(chosen)} given indices"
    else:
        chosen = draw_subset(data.train_labels.numpy(), per_class, seed)
        described = f"{per_class} images a class, seed {seed}"
    index = torch.from_numpy(chosen)
    weights = fit_logistic(
        data.train_features[index], data.train_labels[index], data.num_classes, lambd
    )
    correct = int((predict(weights, data.val_features) == data.val_labels).sum())
    result = FewShotResult(
        top1=100.0 * correct / data.val_features.shape[0],
        num_labelled=len(chosen),
        num_val=data.val_features.shape[0],
        num_classes=data.num_classes,
        lambd=lambd,
        subset=described,
        info=dict(data.info),
    )
    return result.to_dict()


# -- segmentation scores --------------------------------------------------------------------------


def score_segmentation(
    predictions: Iterable[np.ndarray | torch.Tensor],
    labels: Iterable[np.ndarray | torch.Tensor],
    num_classes: int,
    *,
    class_names: Sequence[str] | None = None,
    ignore_index: int = 255,
) -> dict[str, Any]:
    """mIoU, mAcc and aAcc (percent, mmsegmentation's ``IoUMetric``) and the per-class table of
    predicted class maps against ground-truth ones (pairs of (H, W) integer maps, or two
    (N, H, W) stacks; ``ignore_index`` pixels of the ground truth left out): the scores of the
    ``summary.json`` that ``siamae eval segment`` writes, with ``format``, ``num_images`` and
    ``num_classes``.

    >>> import numpy as np
    >>> pred = np.array([[0, 0], [1, 1]])
    >>> truth = np.array([[0, 1], [1, 255]])
    >>> scores = score_segmentation([pred], [truth], 2)
    >>> scores["mIoU"], scores["mAcc"], round(scores["aAcc"], 2)
    (50.0, 75.0, 66.67)
    """
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    if num_classes < 1 or len(names) != num_classes:
        raise SiamaeError(f"num_classes {num_classes} with {len(names)} class names")
    matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64)
    count = 0
    pairs = zip(predictions, labels, strict=False)
    for count, (pred, label) in enumerate(pairs, start=1):
        p, t = torch.as_tensor(np.asarray(pred)).long(), torch.as_tensor(np.asarray(label)).long()
        if p.shape != t.shape:
            raise SiamaeError(
                f"image {count - 1}: prediction {tuple(p.shape)} and ground truth "
                f"{tuple(t.shape)} differ in shape"
            )
        valid = t != ignore_index
        for what, ids in (("prediction", p[valid]), ("ground truth", t[valid])):
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_classes):
                raise SiamaeError(
                    f"image {count - 1}: {what} holds class {int(ids.max())} or "
                    f"{int(ids.min())}, outside 0..{num_classes - 1} (ignore_index "
                    f"{ignore_index} aside)"
                )
        matrix += confusion_matrix(p, t, num_classes, ignore_index)
    if count == 0:
        raise SiamaeError("no predictions to score")
    scores = segmentation_scores(matrix, names)
    return {
        "format": SUMMARY_FORMAT,
        "mIoU": scores["mIoU"],
        "mAcc": scores["mAcc"],
        "aAcc": scores["aAcc"],
        "num_images": count,
        "num_classes": num_classes,
        "per_class": scores["per_class"],
    }
