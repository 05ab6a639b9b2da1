"""View makers: the crop-parameter samplers of the recipes, and fast pixel work.

The sampler is the recipe (areas, aspect ratios, flips); how pixels are decoded and resampled is
ours: JPEGs are decoded at the smallest 1/2-1/4-1/8 scale that still leaves the crop at least the
output size (``draft``), and each crop is one fused crop+resize on uint8 pixels with torch's
vectorised antialiased bilinear kernel (about 3x faster than PIL's resize on one core, and the
same filter). Views come out as uint8 (H, W, 3); normalisation happens on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter

from siamae.data.sources import (
    DECODE_ERRORS,
    FULL_SIZE,
    FrameSource,
    Source,
    UnreadableSample,
    to_rgb,
)

Box = tuple[float, float, float, float]  # top, left, height, width


CropSampler = Literal["torchvision", "clamp"]
Interpolation = Literal["bilinear", "bicubic"]


def sample_box(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    sampler: CropSampler = "torchvision",
) -> Box:
    """Random resized crop box (top, left, height, width) in integer pixels.

    ``"torchvision"`` (the default) is ``RandomResizedCrop.get_params``: up to 10 tries of area
    fraction uniform in ``scale`` and log-aspect uniform in ``ratio``, a try accepted when the
    box fits, position uniform; after 10 failures a centre crop with the aspect clamped to
    ``ratio``. This is what the published CropMAE/SiamMAE/MAE runs executed. ``"clamp"`` is the
    BYOL-style sampler the official CropMAE code defines but never calls: one draw, sides
    clamped to the image (larger crops on average).
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    if sampler == "clamp":
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = min(max(int(round(math.sqrt(target * aspect))), 1), width)
        h = min(max(int(round(math.sqrt(target / aspect))), 1), height)
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        return float(top), float(left), float(h), float(w)
    if sampler != "torchvision":
        raise ValueError(f"unknown crop sampler {sampler!r}; use 'torchvision' or 'clamp'")
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return float(top), float(left), float(h), float(w)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return float((height - h) // 2), float((width - w) // 2), float(h), float(w)


def full_size(img: Image.Image) -> tuple[int, int]:
    """The (width, height) crop boxes are drawn in: the original video's size for a prepared
    frame (``img.info[FULL_SIZE]``), else the image's own size."""
    size = img.info.get(FULL_SIZE)
    return (int(size[0]), int(size[1])) if size else img.size


def decode(
    img: Image.Image, box: Box | None = None, out: int | None = None
) -> tuple[np.ndarray, float, float]:
    """Decode to uint8 (H, W, 3). With ``box`` and ``out``, a JPEG not yet decoded is decoded at
    the smallest DCT scale (1/2, 1/4, 1/8) that leaves the crop at least ``out`` pixels a side.

    Returns the pixels and the (x, y) scale from full-resolution coordinates to them.
    """
    full_w, full_h = full_size(img)
    name = getattr(img, "filename", "") or "image"
    try:
        if (
            box is not None and out is not None and img.format == "JPEG" and img.tile
        ):  # not decoded yet
            _, _, h, w = box
            # the crop's size in this image's own pixels (a prepared frame is stored smaller)
            rx, ry = img.size[0] / full_w, img.size[1] / full_h
            scale = min(1.0, max(out / (w * rx), out / (h * ry)))
            img.draft("RGB", (math.ceil(img.size[0] * scale), math.ceil(img.size[1] * scale)))
        # Wide modes (16-bit PNGs, float TIFFs) are scaled by their range, not clipped to white.
        img = to_rgb(img)
        pixels = np.array(img)  # writable, so torch can view it without a copy or a warning
    except DECODE_ERRORS as err:
        raise UnreadableSample(str(name), f"{type(err).__name__}: {err}") from None
    return pixels, pixels.shape[1] / full_w, pixels.shape[0] / full_h


def resize_box(
    pixels: np.ndarray,
    box: Box,
    out: int,
    sx: float = 1.0,
    sy: float = 1.0,
    interpolation: Interpolation = "bilinear",
) -> np.ndarray:
    """Crop ``box`` (full-resolution coordinates, scaled by ``sx``, ``sy``) from uint8 (H, W, 3)
    pixels and resize it to (out, out, 3), antialiased, in one pass. ``interpolation`` is the
    recipe's filter: bilinear (CropMAE, SiamMAE) or bicubic (MAE, SiameseIM: torchvision's
    ``interpolation=3``)."""
    top, left, h, w = box
    y0, x0 = int(round(top * sy)), int(round(left * sx))
    y1 = min(pixels.shape[0], max(y0 + 1, int(round((top + h) * sy))))
    x1 = min(pixels.shape[1], max(x0 + 1, int(round((left + w) * sx))))
    # (H, W, 3) -> (1, 3, h, w) as a view: channels-last memory, the fast uint8 kernel's layout.
    crop = torch.from_numpy(pixels[y0:y1, x0:x1]).permute(2, 0, 1).unsqueeze(0)
    if crop.shape[-2:] == (out, out):
        return np.ascontiguousarray(pixels[y0:y1, x0:x1])
    # torch's uint8 kernels (channels-last) are the fast path and follow PIL's antialiased
    # filters, which is what torchvision applies to the published pipelines' PIL images.
    resized = F.interpolate(
        crop, size=(out, out), mode=interpolation, antialias=True, align_corners=False
    )
    return resized[0].permute(1, 2, 0).numpy()


def crop_resize(
    img: Image.Image | np.ndarray, box: Box, out: int, interpolation: Interpolation = "bilinear"
) -> np.ndarray:
    """Crop ``box`` (in ``img``'s full-resolution coordinates) and resize to (out, out, 3) uint8.

    ``img`` is a PIL image (decoded here, at a reduced scale when the crop allows it) or
    already-decoded uint8 (H, W, 3) pixels.
    """
    if isinstance(img, np.ndarray):
        return resize_box(img, box, out, interpolation=interpolation)
    pixels, sx, sy = decode(img, box, out)
    return resize_box(pixels, box, out, sx, sy, interpolation)


@dataclass
class Augment:
    """Photometric options, off in the CropMAE recipe (the paper found they hurt)."""

    color_jitter: float = 0.0
    blur: float = 0.0

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        if self.color_jitter > 0 and rng.random() < 0.8:
            s = self.color_jitter
            for enhance, strength in (
                (ImageEnhance.Brightness, 0.4),
                (ImageEnhance.Contrast, 0.4),
                (ImageEnhance.Color, 0.2),
            ):
                img = enhance(img).enhance(
                    float(rng.uniform(max(0.0, 1 - s * strength), 1 + s * strength))
                )
        if self.blur > 0 and rng.random() < self.blur:
            img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.1, 2.0))))
        return img


@dataclass
class ViewSample:
    """What a view maker may return instead of a bare list of views: the views (uint8
    (H, W, 3) each) and named extra arrays (boxes, flips, masks, labels) that the loader stacks
    over the batch and the method receives under the same names."""

    views: list[np.ndarray]
    extras: dict[str, np.ndarray] = field(default_factory=dict)


def _finish(pixels: np.ndarray, flip: bool) -> np.ndarray:
    return pixels[:, ::-1] if flip else pixels


class MakesViews(Protocol):
    """What the loader calls for each item: its views, all randomness from ``rng`` (the
    crop views below, SiameseIM's, fine-tuning's labelled views)."""

    def __call__(
        self, source: Source, index: int, rng: np.random.Generator
    ) -> list[np.ndarray] | ViewSample: ...


@dataclass
class ViewMaker:
    """Makes a sample's views from a source item, all randomness from ``rng``.

    ``kind``: "single" (MAE: one random resized crop), "pair" (CropMAE, with ``strategy``),
    "frames" (SiamMAE: two frames, same crop, same flip). Pair order is always
    (reference view encoded whole, view to reconstruct).
    """

    kind: str
    out: int = 224
    strategy: str = "global_to_local"
    global_scale: tuple[float, float] = (0.1, 1.0)
    local_scale: tuple[float, float] = (0.3, 0.6)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    frame_gap: tuple[int, int] = (4, 48)
    augment: Augment | None = None
    sampler: CropSampler = "torchvision"
    interpolation: Interpolation = "bilinear"

    def __call__(self, source: Source, index: int, rng: np.random.Generator) -> list[np.ndarray]:
        if self.kind == "frames":
            return self.frame_pair(source, index, rng)  # type: ignore[arg-type] # kind frames: a video source
        img = source.open_image(index, rng)
        if self.kind == "single":
            return [self._global(img, rng)[1]]
        return self.crop_pair(img, rng)

    def _flip(self, rng: np.random.Generator) -> bool:
        return bool(rng.random() < self.hflip)

    def _aug(self, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.augment is None:
            return pixels
        return np.asarray(self.augment(Image.fromarray(pixels), rng))

    def _global(
        self, img: Image.Image | np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        width, height = (
            (img.shape[1], img.shape[0]) if isinstance(img, np.ndarray) else full_size(img)
        )
        box = sample_box(rng, width, height, self.global_scale, self.ratio, self.sampler)
        crop = crop_resize(img, box, self.out, self.interpolation)
        return crop, _finish(self._aug(crop, rng), self._flip(rng))

    def _local_from(self, crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        box = sample_box(rng, self.out, self.out, self.local_scale, self.ratio, self.sampler)
        local = crop_resize(crop, box, self.out, self.interpolation)
        return _finish(self._aug(local, rng), self._flip(rng))

    def crop_pair(self, img: Image.Image, rng: np.random.Generator) -> list[np.ndarray]:
        """CropMAE's four strategies; the local crop is taken from the resized global crop."""
        if self.strategy == "same":
            _, view = self._global(img, rng)
            return [view, view.copy()]
        if self.strategy == "random":
            # Both crops come from the decoded image; decode once at full resolution.
            pixels, _, _ = decode(img)
            return [self._global(pixels, rng)[1], self._global(pixels, rng)[1]]
        crop, global_view = self._global(img, rng)
        local_view = self._local_from(crop, rng)
        if self.strategy == "global_to_local":
            return [global_view, local_view]
        return [local_view, global_view]

    def frame_pair(
        self, source: FrameSource, index: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        """Two frames ``gap`` apart with the SAME random resized crop and the SAME flip."""
        first, second = source.load_frame_pair(index, rng, self.frame_gap)
        return self._same_crop(first, second, rng)

    def _same_crop(
        self, first: Image.Image, second: Image.Image, rng: np.random.Generator
    ) -> list[np.ndarray]:
        width, height = full_size(first)
        box = sample_box(rng, width, height, self.global_scale, self.ratio, self.sampler)
        flip = self._flip(rng)
        return [
            _finish(crop_resize(f, box, self.out, self.interpolation), flip)
            for f in (first, second)
        ]

    def repeated(
        self, source: Source, index: int, rng: np.random.Generator, count: int
    ) -> list[list[np.ndarray]]:
        """``count`` samples of one item (repeated sampling). Frame pairs come from one decode
        of the video where the source can (``load_frame_pairs``), each with its own crop+flip."""
        if self.kind == "frames" and hasattr(source, "load_frame_pairs"):
            pairs = source.load_frame_pairs(index, rng, self.frame_gap, count)
            return [self._same_crop(a, b, rng) for a, b in pairs]
        return [self(source, index, rng) for _ in range(count)]
