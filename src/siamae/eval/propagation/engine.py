"""Label propagation through frozen-encoder features; knows nothing of any benchmark.

A frozen encoder turns each frame into an L2-normalised grid of patch features (D, h, w).
Labels of the first frame are carried forward frame by frame: each target patch looks at the
context (the first frame, always, plus a queue of the previous frames' predictions), keeps the
top-k most similar context patches over the whole context, and takes the softmax-weighted sum of
their soft labels. Each prediction goes back into the queue.

Two protocol presets (``PROTOCOLS``) carry the published parameters; every field can be
overridden with ``--set key=value`` (``apply_overrides``).

- ``cropmae`` follows the CRW test code used by CropMAE and SiamMAE: the queue starts padded with
  ``queue`` copies of frame 0, a Euclidean radius (``distance < radius`` grid cells) restricts the
  queue but never the first frame, labels are one-hot maps downsampled bilinearly to the grid.
- ``dino`` follows DINO's ``eval_video_segmentation.py``: no padding (the queue grows to 7), a
  square neighbourhood (``|dy|, |dx| <= 12``) that DINO's code applies to every context frame,
  the first included (``restrict_first``), labels downsampled nearest to the grid, and each
  upsampled prediction min-max normalised per channel before the argmax (``norm_mask``).
"""

from __future__ import annotations

import dataclasses
import time
import typing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from siamae.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from siamae.errors import SiamaeError
from siamae.eval.propagation.layouts import resize_nearest
from siamae.options import check, convert, replace_from_overrides
from siamae.sizes import size_problem

OPTION = "propagation option"  # how its errors name a field


@dataclass
class PropagationParams:
    """Everything that decides the numbers. ``name`` is printed next to every result."""

    name: str = "cropmae"
    #: frame size for the encoder: "HxW" fixed, "long:N" (long side N, short side floored to a
    #: multiple of 64, CRW), "short:N" (short side N, long side floored to a multiple of 64, DINO),
    #: or "native" (floored to a multiple of the patch size).
    resize: str = "480x880"
    temperature: float = 0.7
    topk: int = 7
    radius: float = 20.0
    queue: int = 20
    # "euclidean" (distance < radius) or "square" (<= radius)
    neighbourhood: Literal["euclidean", "square"] = "euclidean"
    restrict_first: bool = False
    pad_queue: bool = True
    label_downsample: Literal["bilinear", "nearest"] = "bilinear"  # one-hot (CRW) or DINO's
    norm_mask: bool = False
    batch_size: int = 8  # frames per encoder forward
    chunk: int = 1024  # target patches per affinity block (memory only, not the numbers)

    def validate(self) -> None:
        """Raise a ConfigError naming the bad field (``propagation option 'topk': ...``)."""
        check(self.topk >= 1, "topk", f"expected 1 or more, got {self.topk}", OPTION)
        check(self.queue >= 0, "queue", f"expected 0 or more, got {self.queue}", OPTION)
        check(
            self.temperature > 0,
            "temperature",
            f"expected a positive number, got {self.temperature}",
            OPTION,
        )
        check(
            self.batch_size >= 1, "batch_size", f"expected 1 or more, got {self.batch_size}", OPTION
        )
        check(self.chunk >= 1, "chunk", f"expected 1 or more, got {self.chunk}", OPTION)
        for name in ("neighbourhood", "label_downsample"):
            # Typed as Literal, so --set refuses other words; this catches a Python caller.
            convert(getattr(self, name), _FIELD_TYPES[name], name, OPTION)
        frame_size(self.resize, (480, 854), 16)  # raises on a malformed resize string

    def describe(self) -> str:
        return (
            f"protocol {self.name}: resize {self.resize}, T={self.temperature}, top-k {self.topk}, "
            f"radius {self.radius:g} ({self.neighbourhood}"
            f"{', first frame too' if self.restrict_first else ''}), queue {self.queue}"
            f"{' (padded with frame 0)' if self.pad_queue else ''}"
        )

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


# The name is the preset's; every other field may be set with --set.
_SETTABLE = tuple(f.name for f in dataclasses.fields(PropagationParams) if f.name != "name")
_FIELD_TYPES = typing.get_type_hints(PropagationParams)

_CROPMAE = PropagationParams()
_DINO = PropagationParams(
    name="dino",
    resize="short:480",
    temperature=0.1,
    topk=5,
    radius=12,
    queue=7,
    neighbourhood="square",
    restrict_first=True,
    pad_queue=False,
    label_downsample="nearest",
    norm_mask=True,
)

#: (protocol, benchmark) -> preset. Benchmarks: "davis", "jhmdb", "vip", "any".
PROTOCOLS: dict[str, dict[str, PropagationParams]] = {
    "cropmae": {
        "any": _CROPMAE,
        "davis": _CROPMAE,
        "jhmdb": dataclasses.replace(_CROPMAE, resize="320x320"),
        "vip": dataclasses.replace(_CROPMAE, resize="long:880", topk=10),
    },
    "dino": {"any": _DINO, "davis": _DINO, "jhmdb": _DINO, "vip": _DINO},
}


def protocol(name: str, benchmark: str = "any", overrides: Iterable[str] = ()) -> PropagationParams:
    """The preset for ``name`` on ``benchmark``, with ``key=value`` overrides applied."""
    if name not in PROTOCOLS:
        raise SiamaeError(f"unknown protocol {name!r}; choose one of {sorted(PROTOCOLS)}")
    params = PROTOCOLS[name].get(benchmark, PROTOCOLS[name]["any"])
    return apply_overrides(dataclasses.replace(params), overrides)


def apply_overrides(params: PropagationParams, overrides: Iterable[str]) -> PropagationParams:
    """Apply ``key=value`` strings (``--set topk=5``) to a copy of ``params``, parsed and typed
    as the config's ``--set`` is (:mod:`siamae.options`), then checked."""
    out = replace_from_overrides(params, overrides, OPTION, settable=_SETTABLE)
    out.validate()
    return out


def frame_size(resize: str, size: tuple[int, int], patch: int) -> tuple[int, int]:
    """The (H, W) a frame of native ``size`` (H, W) is resized to under the ``resize`` rule."""
    h, w = size
    try:
        if resize == "native":
            out = (h // patch * patch, w // patch * patch)
        elif resize.startswith(("long:", "short:")):
            kind, n = resize.split(":")
            n = int(n)
            if (kind == "long") == (w > h):  # the side set to n is the width
                out = (int(int(h * n / w) // 64 * 64), n)
            else:
                out = (n, int(int(w * n / h) // 64 * 64))
        else:
            hh, ww = resize.lower().split("x")
            out = (int(hh), int(ww))
    except ValueError:
        raise SiamaeError(
            f"resize {resize!r}: expected 'HxW', 'long:N', 'short:N' or 'native'"
        ) from None
    if min(out) < patch:
        raise SiamaeError(f"resize {resize!r} gives {out[0]}x{out[1]}, smaller than a patch")
    return out


def check_resize_rule(resize: str, patch: int) -> None:
    """Refuse, before any frame is read, a fixed resize (``HxW``, or the N of ``long:N`` /
    ``short:N``) that does not cut into whole patches of the encoder."""
    if resize == "native":
        return  # cut down to whole patches per video
    if resize.startswith(("long:", "short:")):
        n = int(resize.split(":")[1])
        problem = None if n % patch == 0 else f"{n} is not a multiple of the patch size {patch}"
    else:
        hh, ww = resize.lower().split("x")
        problem = size_problem(int(hh), int(ww), patch)
    if problem is not None:
        raise SiamaeError(
            f"resize {resize!r} of the protocol: {problem} of the encoder; pass --set "
            "resize=HxW with sides in whole patches"
        )


def grid_size(image_size: tuple[int, int], patch: int) -> tuple[int, int]:
    return image_size[0] // patch, image_size[1] // patch


# -- frames -> features -----------------------------------------------------------------------


def prepare_frame(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, h, w) float, resized bilinearly and ImageNet-normalised."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


@dataclass
class Timer:
    """Seconds spent reading frames, in feature extraction and in propagation; frames seen."""

    load_s: float = 0.0
    features_s: float = 0.0
    propagation_s: float = 0.0
    frames: int = 0


@torch.no_grad()
def extract_features(
    encoder: Callable[[torch.Tensor], torch.Tensor],
    frames: Iterable[torch.Tensor],
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    timer: Timer | None = None,
) -> Iterator[torch.Tensor]:
    """Stream L2-normalised patch features, one (D, h, w) per frame, computed ``batch_size`` frames
    at a time (``encoder``: (B, 3, H, W) -> (B, D, h, w), e.g. ``Encoder.patch_features``).

    Only one batch of frames and features is held at a time.
    """
    batch: list[torch.Tensor] = []

    def run() -> list[torch.Tensor]:
        t0 = time.perf_counter()
        feats = encoder(torch.stack(batch).to(device))
        feats = F.normalize(feats.float(), dim=1).cpu()
        if timer is not None:
            timer.features_s += time.perf_counter() - t0
        batch.clear()
        return list(feats)

    for frame in frames:
        batch.append(frame)
        if len(batch) == batch_size:
            yield from run()
    if batch:
        yield from run()


# -- labels ---------------------------------------------------------------------------------


def one_hot(ids: np.ndarray | torch.Tensor, num_classes: int) -> torch.Tensor:
    """(H, W) integer ids -> (C, H, W) float one-hot; ids outside [0, C) give all-zero pixels."""
    t = torch.as_tensor(np.asarray(ids)).long()
    return (t[None] == torch.arange(num_classes).view(-1, 1, 1)).float()


def labels_to_grid(
    ids: np.ndarray, num_classes: int, grid: tuple[int, int], mode: str = "bilinear"
) -> torch.Tensor:
    """First-frame ids (H, W) -> soft labels (C, h, w) on the feature grid.

    ``bilinear``: one-hot per class, downsampled bilinearly (no antialias: OpenCV's INTER_LINEAR,
    as CRW does). ``nearest``: ids sampled at the cell centres (PIL's nearest, as DINO does), then
    one-hot.
    """
    if mode == "nearest":
        t = torch.as_tensor(np.asarray(ids)).float()[None, None]
        small = F.interpolate(t, size=grid, mode="nearest-exact")[0, 0].long()
        return one_hot(small, num_classes)
    oh = one_hot(ids, num_classes)[None]
    return F.interpolate(oh, size=grid, mode="bilinear", align_corners=False)[0]


def labels_to_ids(
    soft: torch.Tensor, size: tuple[int, int], norm_mask: bool = False
) -> torch.Tensor:
    """Soft labels (C, h, w) -> (H, W) class indices: bilinear upsampling then argmax.

    With ``norm_mask`` (DINO) every channel is min-max normalised after upsampling.
    """
    up = F.interpolate(soft[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    if norm_mask:
        lo = up.amin(dim=(1, 2), keepdim=True)
        hi = up.amax(dim=(1, 2), keepdim=True)
        scaled = (up - lo) / (hi - lo).clamp_min(1e-12)
        up = torch.where(hi > 0, scaled, up)
    return up.argmax(dim=0)


# -- the engine -----------------------------------------------------------------------------


def neighbourhood_mask(grid: tuple[int, int], radius: float, kind: str) -> torch.Tensor:
    """(N, N) bool, N = h*w: True where context cell (row) may serve target cell (column)."""
    h, w = grid
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    yy, xx = yy.flatten().float(), xx.flatten().float()
    dy = yy[:, None] - yy[None, :]
    dx = xx[:, None] - xx[None, :]
    if kind == "square":
        return (dy.abs() <= radius) & (dx.abs() <= radius)
    return (dy**2 + dx**2).sqrt() < radius


class LabelPropagator:
    """Carries soft labels through a sequence of feature maps.

    Memory is bounded by the context (first frame + ``queue`` frames), not the video length:
    features are consumed one frame at a time and only the context is kept.
    """

    def __init__(self, params: PropagationParams) -> None:
        self.params = params
        self._masks: dict[tuple[int, int], torch.Tensor] = {}

    def _mask(self, grid: tuple[int, int]) -> torch.Tensor:
        if grid not in self._masks:
            self._masks[grid] = neighbourhood_mask(
                grid, self.params.radius, self.params.neighbourhood
            )
        return self._masks[grid]

    @staticmethod
    def _runs(flags: list[bool]) -> list[slice]:
        """The True positions of ``flags`` as runs of consecutive positions: one masking pass
        per run (one run, slots 1..M-1 or 0..M-1, in a :meth:`propagate` call)."""
        runs: list[slice] = []
        for i, r in enumerate(flags):
            if r and runs and runs[-1].stop == i:
                runs[-1] = slice(runs[-1].start, i + 1)
            elif r:
                runs.append(slice(i, i + 1))
        return runs

    @torch.no_grad()
    def step(
        self,
        query: torch.Tensor,
        keys: list[torch.Tensor],
        labels: list[torch.Tensor],
        restricted: list[bool],
    ) -> torch.Tensor:
        """One target frame.

        Args:
            query: (D, h, w) L2-normalised features of the target frame.
            keys: M context feature maps (D, h, w); the same tensor may appear several times
                (padding) and is then multiplied only once.
            labels: M soft label maps (C, h, w), one per context frame.
            restricted: M flags: True where the spatial neighbourhood applies.
        Returns:
            (C, h, w) soft labels of the target frame (each cell sums to what its neighbours'
            labels sum to: 1 for one-hot labels).

        Each distinct key tensor is multiplied once; each distinct (key, restricted) pair, a
        "variant", is masked once. When every slot is its own variant, ONE top-k runs over all
        M x N context cells. When variants fill several slots (the queue padded with copies of
        frame 0), each variant's block is reduced to its k best first and the slots then draw
        from those: the k best of a union are among the k best of each part, so the result is
        the same, without expanding the copies to M x N. The temperature divides only the k
        kept scores (x / T keeps the order).
        """
        p = self.params
        d, h, w = query.shape
        n = h * w
        m = len(keys)
        q = query.reshape(d, n)
        unique: dict[int, int] = {}  # id(key) -> column block of key_mat
        distinct: list[torch.Tensor] = []
        variants: dict[tuple[int, bool], int] = {}  # (id(key), restricted) -> variant
        for key, r in zip(keys, restricted):
            if id(key) not in unique:
                unique[id(key)] = len(distinct)
                distinct.append(key.reshape(d, n))
            variants.setdefault((id(key), r), len(variants))
        key_mat = torch.cat(distinct, dim=1)  # (D, U*N)
        source = [unique[key_id] for key_id, _ in variants]  # key block of each variant
        slot_variant = torch.tensor([variants[id(k), r] for k, r in zip(keys, restricted)])
        runs = self._runs([r for _, r in variants])
        ctx_labels = torch.cat([lab.reshape(lab.shape[0], n) for lab in labels], dim=1)  # (C, M*N)
        blocked = ~self._mask((h, w))[:, None]  # (N, 1, N): broadcast over a run of variants
        k = min(p.topk, m * n)
        shared = len(variants) < m
        out = torch.empty(ctx_labels.shape[0], n)
        for start in range(0, n, p.chunk):
            stop = min(n, start + p.chunk)
            aff = (q[:, start:stop].T @ key_mat).view(stop - start, len(unique), n)  # (Q, U, N)
            if source != list(range(len(unique))):
                aff = aff[:, source]  # (Q, V, N): a key both free and restricted (a fresh tensor)
            for run in runs:
                aff[:, run].masked_fill_(blocked[start:stop], float("-inf"))
            if shared:
                best, cells = torch.topk(aff, min(k, n), dim=2)  # (Q, V, k) per variant
                cells = cells[:, slot_variant] + (torch.arange(m) * n).view(1, m, 1)
                scores, pick = torch.topk(best[:, slot_variant].flatten(1), k, dim=1)
                idx = cells.flatten(1).gather(1, pick)  # (Q, k) into the M*N context cells
            else:
                scores, idx = torch.topk(aff.view(stop - start, m * n), k, dim=1)  # ONE top-k
            weights = torch.softmax(scores.div_(p.temperature), dim=1)  # (Q, k)
            gathered = ctx_labels[:, idx]  # (C, Q, k)
            out[:, start:stop] = (gathered * weights[None]).sum(dim=2)
        return out.reshape(-1, h, w)

    def propagate(
        self, features: Iterable[torch.Tensor], first_labels: torch.Tensor
    ) -> Iterator[torch.Tensor]:
        """Yield (C, h, w) soft labels for every frame; the first is ``first_labels`` itself.

        Args:
            features: iterable of (D, h, w) L2-normalised feature maps, frame 0 first.
            first_labels: (C, h, w) soft labels of frame 0 on the same grid.
        """
        p = self.params
        it = iter(features)
        try:
            first = next(it)
        except StopIteration:
            return
        if tuple(first.shape[-2:]) != tuple(first_labels.shape[-2:]):
            raise ValueError(
                f"labels grid {tuple(first_labels.shape[-2:])} != features grid {tuple(first.shape[-2:])}"
            )
        first_labels = first_labels.float()
        yield first_labels
        queue: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=max(p.queue, 1))
        if p.pad_queue and p.queue > 0:
            queue.extend([(first, first_labels)] * p.queue)
        for feat in it:
            ctx = list(queue) if p.queue > 0 else []
            keys = [first] + [c[0] for c in ctx]
            labels = [first_labels] + [c[1] for c in ctx]
            restricted = [p.restrict_first] + [True] * len(ctx)
            pred = self.step(feat, keys, labels, restricted)
            if p.queue > 0:
                queue.append((feat, pred))
            yield pred


def resize_ids(ids: np.ndarray, size: tuple[int, int], exact: bool = False) -> np.ndarray:
    """Nearest-neighbour resize of an id map. ``exact=False`` samples like OpenCV's INTER_NEAREST
    (floor(i * scale)), ``exact=True`` like PIL's NEAREST (cell centres): torch's ``nearest`` /
    ``nearest-exact`` pixels, by the torch-free :func:`~.layouts.resize_nearest` the scorer uses."""
    return resize_nearest(ids, size, exact)


def propagate_video(
    encoder: torch.nn.Module,
    frames: Iterable[np.ndarray],
    first_ids: np.ndarray,
    num_classes: int,
    params: PropagationParams,
    size: tuple[int, int],
    device: str | torch.device = "cpu",
    timer: Timer | None = None,
) -> Iterator[torch.Tensor]:
    """The whole pipeline for one video whose first frame is labelled with class ids.

    Args:
        encoder: a frozen :class:`~siamae.models.vit.Encoder` (``patch_features``, ``patch_size``).
        frames: uint8 frames (H, W, 3) at any size, read lazily; resized bilinearly to ``size``.
        first_ids: (H0, W0) class ids of frame 0 (0 .. num_classes-1).
        size: (H, W) propagation size, multiples of the patch size.
    Yields:
        (C, h, w) soft labels per frame, the first being frame 0's own labels.
    """
    grid = _checked_grid(size, int(encoder.patch_size))
    if params.label_downsample == "bilinear":
        first_ids = resize_ids(first_ids, size)  # CRW resizes annotations (nearest) first
    first_labels = labels_to_grid(first_ids, num_classes, grid, params.label_downsample)
    yield from propagate_labels(encoder, frames, first_labels, params, size, device, timer)


def _checked_grid(size: tuple[int, int], patch: int) -> tuple[int, int]:
    if size[0] % patch or size[1] % patch:
        raise SiamaeError(f"frame size {size} is not a multiple of the patch size {patch}")
    return grid_size(size, patch)


def propagate_labels(
    encoder: torch.nn.Module,
    frames: Iterable[np.ndarray],
    first_labels: torch.Tensor,
    params: PropagationParams,
    size: tuple[int, int],
    device: str | torch.device = "cpu",
    timer: Timer | None = None,
) -> Iterator[torch.Tensor]:
    """:func:`propagate_video` from soft labels (C, h, w) of frame 0 already on the feature grid
    (e.g. JHMDB's joint heat-maps). ``timer`` gets the seconds spent reading frames, computing
    features and propagating, and the frames."""
    timer = timer if timer is not None else Timer()
    _checked_grid(size, int(encoder.patch_size))

    def tensors() -> Iterator[torch.Tensor]:
        it = iter(frames)
        while True:
            t0 = time.perf_counter()
            try:
                frame = prepare_frame(next(it), size)
            except StopIteration:
                return
            timer.load_s += time.perf_counter() - t0
            yield frame

    feats = extract_features(encoder.patch_features, tensors(), params.batch_size, device, timer)
    gen = LabelPropagator(params).propagate(feats, first_labels)
    while True:
        # Loading and feature batches are timed where they happen; the rest is propagation.
        before = timer.features_s + timer.load_s
        t0 = time.perf_counter()
        try:
            soft = next(gen)
        except StopIteration:
            return
        spent = timer.features_s + timer.load_s - before
        timer.propagation_s += time.perf_counter() - t0 - spent
        timer.frames += 1
        yield soft
