"""SiameseIM's views: two crops of one image with their geometry, and BEiT's block mask.

Each view gets its own horizontal flip of the whole image, then its own random resized crop
(torchvision's sampling, bicubic), then its own photometric augmentation (view 1: colour jitter,
grayscale, blur always; view 2: the same jitter and grayscale, blur rarely, solarize). What the
model needs to relate the views travels with them: each crop's box (top, left, height, width)
in the coordinates of the image it was cropped from (the flipped image when flipped), the flip
flags and the image width. View 1 also gets its block-wise mask here, in the loader worker.

Every random choice comes from the ``rng`` the dataset seeds with (seed, epoch, index).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

from siamae.data.sources import Source
from siamae.data.views import Box, Interpolation, ViewSample, crop_resize, decode, sample_box


@dataclass
class BlockMaskGenerator:
    """BEiT's block-wise masking on a (height, width) patch grid, exactly ``num_masked`` patches.

    Rectangles of ``min_block`` to ``max_block`` patches (aspect ``min_aspect`` to its inverse)
    are added while each adds new patches without overshooting; 10 failed placements in a row
    end the loop and the few patches still missing are drawn uniformly from the unmasked ones,
    as the SiameseIM recipe does (``fixed_num_masking_patches``).
    """

    height: int
    width: int
    num_masked: int
    min_block: int = 16
    max_block: int | None = None
    min_aspect: float = 0.3

    def __post_init__(self) -> None:
        if not 0 < self.num_masked < self.height * self.width:
            raise ValueError(
                f"num_masked must be in (0, {self.height * self.width}), got {self.num_masked}"
            )
        self.log_aspect = (math.log(self.min_aspect), math.log(1 / self.min_aspect))

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Try up to 10 rectangles; mask the first that adds 1..budget new patches."""
        for _ in range(10):
            # BEiT draws the area between min_block and the budget, whichever is smaller.
            low, high = sorted((self.min_block, budget))
            area = rng.uniform(low, high)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                new = h * w - int(mask[top : top + h, left : left + w].sum())
                if 0 < new <= budget:
                    mask[top : top + h, left : left + w] = True
                    return new
        return 0

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """A (height, width) bool mask, True where a patch is hidden."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        max_block = self.max_block or self.num_masked
        while count < self.num_masked:
            added = self._add_block(mask, min(self.num_masked - count, max_block), rng)
            if added == 0:
                break
            count += added
        if count < self.num_masked:
            free = np.flatnonzero(~mask.reshape(-1))
            pick = rng.permutation(free)[: self.num_masked - count]
            mask.reshape(-1)[pick] = True
        return mask


def photometric(
    img: Image.Image, rng: np.random.Generator, blur: float, solarize: float
) -> Image.Image:
    """The BYOL/MoCo-v3 colour pipeline of torchvision, its randomness drawn from ``rng``.

    Colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in a random order)
    with p 0.8, grayscale p 0.2, Gaussian blur (sigma 0.1-2) with p ``blur``, solarize
    (threshold 128) with p ``solarize``.
    """
    if rng.random() < 0.8:
        factors = {
            "brightness": rng.uniform(0.6, 1.4),
            "contrast": rng.uniform(0.6, 1.4),
            "saturation": rng.uniform(0.8, 1.2),
            "hue": rng.uniform(-0.1, 0.1),
        }
        for which in rng.permutation(4):
            name = ("brightness", "contrast", "saturation", "hue")[which]
            adjust = getattr(TF, f"adjust_{name}")
            img = adjust(img, float(factors[name]))
    if rng.random() < 0.2:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if rng.random() < blur:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.1, 2.0))))
    if rng.random() < solarize:
        img = ImageOps.solarize(img, 128)
    return img


def flipped_box(box: Box, width: int) -> Box:
    """The same region in the mirrored image: a box of the flipped image in original coordinates."""
    top, left, h, w = box
    return top, width - left - w, h, w


@dataclass
class SiameseIMViews:
    """Two views + geometry + view 1's block mask: a :class:`ViewSample` with extras

    ``box`` float32 (2, 4) (top, left, height, width; each in the coordinates of the image its
    view was cropped from, i.e. after that view's flip), ``flip`` bool (2,), ``image_width``
    float32 (1,) and ``mask`` bool (N,) (True = hidden patch of view 1, row-major).
    """

    out: int = 224
    patch_size: int = 16
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    num_masked: int = 118
    min_block: int = 16
    photometric: bool = True
    interpolation: Interpolation = "bicubic"

    def __post_init__(self) -> None:
        grid = self.out // self.patch_size
        self.masker = BlockMaskGenerator(grid, grid, self.num_masked, self.min_block)

    def _crop(
        self, pixels: np.ndarray, box: Box, flip: bool, width: int, sx: float, sy: float
    ) -> np.ndarray:
        """Crop ``box`` of the (maybe flipped) image from the unflipped decoded ``pixels``."""
        top, left, h, w = flipped_box(box, width) if flip else box
        y0, x0 = int(round(top * sy)), int(round(left * sx))
        y1 = min(pixels.shape[0], max(y0 + 1, int(round((top + h) * sy))))
        x1 = min(pixels.shape[1], max(x0 + 1, int(round((left + w) * sx))))
        region = pixels[y0:y1, x0:x1]
        if flip:  # mirror only the region: the same pixels as cropping the mirrored image
            # A copy, not ascontiguousarray: a one-pixel-wide region counts as contiguous and
            # would keep its negative stride, which torch refuses.
            region = region[:, ::-1].copy()
        full: Box = (0.0, 0.0, float(y1 - y0), float(x1 - x0))
        return crop_resize(region, full, self.out, self.interpolation)

    def __call__(self, source: Source, index: int, rng: np.random.Generator) -> ViewSample:
        img = source.open_image(index, rng)
        width, height = img.size
        flips = [bool(rng.random() < self.hflip) for _ in range(2)]
        boxes = [
            sample_box(rng, width, height, self.scale, self.ratio, sampler="torchvision")
            for _ in range(2)
        ]
        # One decode for both crops, at the smallest JPEG scale that still serves both.
        smallest: Box = (0.0, 0.0, min(b[2] for b in boxes), min(b[3] for b in boxes))
        pixels, sx, sy = decode(img, smallest, self.out)
        views = [self._crop(pixels, box, flip, width, sx, sy) for box, flip in zip(boxes, flips)]
        if self.photometric:
            views = [
                np.asarray(photometric(Image.fromarray(v), rng, blur, solarize))
                for v, (blur, solarize) in zip(views, ((1.0, 0.0), (0.1, 0.2)))
            ]
        mask = self.masker(rng).reshape(-1)
        return ViewSample(
            views=views,
            extras={
                "box": np.asarray(boxes, dtype=np.float32),
                "flip": np.asarray(flips, dtype=bool),
                "image_width": np.asarray([width], dtype=np.float32),
                "mask": mask,
            },
        )
