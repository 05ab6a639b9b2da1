"""Semantic-segmentation data in its published layouts, and the training views of the protocol.

Three layouts are read as they come:

- **ADE20K** (``ADEChallengeData2016/images/{training,validation}/*.jpg`` with
  ``annotations/{training,validation}/*.png``, grey PNGs): label 0 ("other") is ignored and
  classes 1..150 become 0..149 (mmsegmentation's ``reduce_zero_label``). Class names come from
  the release's ``objectInfo150.txt``/``.csv`` when present.
- **Pascal VOC 2012** (``JPEGImages/*.jpg``, palette PNGs in ``SegmentationClass/``,
  ``ImageSets/Segmentation/{train,val}.txt``): pixel values are the palette indices, 255 (the
  white border) is void and ignored; 21 classes (background + 20), or as many as a
  ``class_names.txt`` beside the folders lists.
- **plain**: ``images/`` + ``masks/`` (optionally ``images/<split>/`` + ``masks/<split>/``), a mask
  ``<stem>.png`` per image holding class indices 0..C-1 and 255 for ignored pixels; the class
  count is given (``num_classes``) or read from ``class_names.txt``.

Every layout gives training labels in 0..C-1 with :data:`IGNORE_INDEX` (255) for ignored pixels,
and maps predictions back to its own label space (:meth:`SegmentationSet.to_dataset_labels`).

Bad files never become labels silently: an image without its mask (or the other way round) is
skipped and counted at scan time (:attr:`SegmentationSet.unpaired`); a file that does not decode,
a mask whose size differs from its image's, a colour (RGB) mask, or a mask value that is no class
raises :class:`UnreadableSample` when read, which training skips and counts (the engine's
``skipped_files.txt``) and evaluation skips and lists in its summary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from siamae.data.sources import DECODE_ERRORS, UnreadableSample, to_rgb
from siamae.data.views import ViewSample
from siamae.errors import DataError

IGNORE_INDEX = 255
LAYOUTS = ("auto", "ade20k", "voc", "plain")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
ADE20K_NUM_CLASSES = 150
# The split names each layout uses for "train" and "val".
SPLIT_NAMES = {
    "ade20k": {"train": "training", "val": "validation"},
    "voc": {"train": "train", "val": "val"},
    "plain": {"train": "train", "val": "val"},
}


@dataclass
class Pair:
    image: Path
    label: Path

    @property
    def stem(self) -> str:
        return self.image.stem


def _find_ade_root(root: Path) -> Path | None:
    for candidate in (root, root / "ADEChallengeData2016"):
        if (candidate / "images").is_dir() and (candidate / "annotations").is_dir():
            if any((candidate / "annotations" / s).is_dir() for s in ("training", "validation")):
                return candidate
    return None


def _find_voc_root(root: Path) -> Path | None:
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir() and (candidate / "SegmentationClass").is_dir():
            return candidate
    return None


def detect_layout(root: str | Path) -> tuple[str, Path]:
    """(layout, the folder that holds it) of a segmentation data set, or a DataError."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"--data {str(root)!r} is not a folder; pass an ADE20K, Pascal VOC or images/+masks/ "
            "segmentation data set"
        )
    found = _find_ade_root(root)
    if found is not None:
        return "ade20k", found
    found = _find_voc_root(root)
    if found is not None:
        return "voc", found
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "plain", root
    raise DataError(
        f"{str(root)!r} is no segmentation layout siamae knows: expected ADE20K "
        "(images/training + annotations/training), Pascal VOC (JPEGImages + SegmentationClass) "
        "or images/ + masks/"
    )


def _read_class_names(folder: Path) -> list[str] | None:
    path = folder / "class_names.txt"
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) < 2:
        raise DataError(f"{path}: lists {len(names)} class names; a segmentation set needs 2+")
    return names


def _ade_class_names(root: Path) -> list[str]:
    """The 150 names of ``objectInfo150`` (its last column, first synonym), else class_1.."""
    for name in ("objectInfo150.txt", "objectInfo150.csv"):
        path = root / name
        if not path.is_file():
            continue
        rows = path.read_text(errors="replace").splitlines()[1:]
        sep = "," if name.endswith(".csv") else "\t"
        names = [row.split(sep)[-1].split(";")[0].strip() for row in rows if row.strip()]
        if len(names) == ADE20K_NUM_CLASSES:
            return names
    return [f"class_{i}" for i in range(1, ADE20K_NUM_CLASSES + 1)]


def _images_by_stem(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


@dataclass
class SegmentationSet:
    """One split of a segmentation data set: (image, label) pairs, the class list, and how its
    label files map to training labels (0..C-1, 255 ignored) and back."""

    layout: str
    root: Path
    split: str
    pairs: list[Pair]
    class_names: list[str]
    unpaired: list[str] = field(default_factory=list)  # files skipped at scan time, with why

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.pairs)

    def name(self, index: int) -> str:
        return str(self.pairs[index].image)

    # -- labels -------------------------------------------------------------------------------
    @property
    def reduce_zero_label(self) -> bool:
        return self.layout == "ade20k"

    def to_train_labels(self, values: np.ndarray, name: str) -> np.ndarray:
        """Label-file values -> uint8 training labels (0..C-1, 255 ignored); a value that is no
        class of the layout raises UnreadableSample."""
        values = values.astype(np.int64)
        if self.reduce_zero_label:
            bad = values > self.num_classes
            out = np.where(values == 0, IGNORE_INDEX, values - 1)
        else:
            bad = (values >= self.num_classes) & (values != IGNORE_INDEX)
            out = values
        if bad.any():
            wrong = sorted(set(np.unique(values[bad]).tolist()))[:5]
            allowed = (
                f"0..{self.num_classes} (0 ignored)"
                if self.reduce_zero_label
                else f"0..{self.num_classes - 1} or {IGNORE_INDEX} (ignored)"
            )
            raise UnreadableSample(name, f"label values {wrong} are no class; expected {allowed}")
        return out.astype(np.uint8)

    def to_dataset_labels(
        self, pred: np.ndarray, train_label: np.ndarray | None = None
    ) -> np.ndarray:
        """Predicted class indices (0..C-1) -> the layout's own label values (ADE20K 1..150,
        VOC/plain 0..C-1). Where ``train_label`` is ignored, the layout's ignore value is
        written (ADE20K 0, VOC/plain 255), so a scorer reading the PNGs gets the same numbers."""
        out = pred.astype(np.int64) + (1 if self.reduce_zero_label else 0)
        if train_label is not None:
            out = np.where(train_label == IGNORE_INDEX, 0 if self.reduce_zero_label else 255, out)
        return out.astype(np.uint8)

    # -- reading ------------------------------------------------------------------------------
    def read_label(self, index: int) -> np.ndarray:
        """(H, W) uint8 training labels of item ``index``; UnreadableSample when bad."""
        path = self.pairs[index].label
        try:
            with Image.open(path) as img:
                img.load()
                mode = img.mode
                values = np.asarray(img)
        except DECODE_ERRORS as err:
            raise UnreadableSample(str(path), f"{type(err).__name__}: {err}") from None
        if self.layout == "voc" and mode != "P":
            raise UnreadableSample(
                str(path),
                f"a {mode} image, not a palette PNG: VOC's SegmentationClass masks store class "
                "indices as palette entries",
            )
        if values.ndim == 3:
            if values.shape[2] >= 3 and not (
                np.array_equal(values[..., 0], values[..., 1])
                and np.array_equal(values[..., 0], values[..., 2])
            ):
                raise UnreadableSample(
                    str(path),
                    "a colour mask; masks must hold class indices (grey or palette PNG)",
                )
            values = values[..., 0]
        return self.to_train_labels(values, str(path))

    def read_image(self, index: int) -> np.ndarray:
        path = self.pairs[index].image
        try:
            with Image.open(path) as img:
                rgb = to_rgb(img)
                rgb.load()
                return np.asarray(rgb)
        except DECODE_ERRORS as err:
            raise UnreadableSample(str(path), f"{type(err).__name__}: {err}") from None

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image (H, W, 3) uint8, labels (H, W) uint8 in 0..C-1 / 255); sizes must agree."""
        image = self.read_image(index)
        label = self.read_label(index)
        if image.shape[:2] != label.shape:
            raise UnreadableSample(
                str(self.pairs[index].label),
                f"mask is {label.shape[1]}x{label.shape[0]}, its image "
                f"{image.shape[1]}x{image.shape[0]}",
            )
        return image, label


def open_segmentation(
    root: str | Path,
    split: str = "train",
    layout: str = "auto",
    num_classes: int | None = None,
) -> SegmentationSet:
    """The ``split`` ("train" or "val", or the layout's own name for it) of the data set at
    ``root``. ``num_classes``: the plain layout's class count (else from class_names.txt);
    for VOC it overrides 21 (a VOC-layout set of other classes)."""
    if layout not in LAYOUTS:
        raise DataError(f"--layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    root = Path(root)
    if layout == "auto":
        layout, base = detect_layout(root)
    else:
        base = {"ade20k": _find_ade_root, "voc": _find_voc_root}.get(layout, lambda r: r)(root)
        if base is None or not base.is_dir():
            raise DataError(f"--data {str(root)!r} is not laid out as {layout}")
    names = SPLIT_NAMES[layout]
    split_name = names.get(split, split)
    if layout == "ade20k":
        pairs, unpaired = _pair_folders(
            base / "images" / split_name, base / "annotations" / split_name
        )
        classes = _ade_class_names(base)
        if num_classes not in (None, ADE20K_NUM_CLASSES):
            raise DataError(
                f"ADE20K has {ADE20K_NUM_CLASSES} classes, got num_classes={num_classes}"
            )
    elif layout == "voc":
        pairs, unpaired = _voc_pairs(base, split_name)
        classes = _read_class_names(base) or list(VOC_CLASSES)
        if num_classes is not None and num_classes != len(classes):
            if len(classes) != len(VOC_CLASSES) or _read_class_names(base) is not None:
                raise DataError(
                    f"{base / 'class_names.txt'} lists {len(classes)} classes, num_classes is "
                    f"{num_classes}; make them agree"
                )
            classes = [f"class_{i}" for i in range(num_classes)]
    else:
        image_dir, mask_dir = base / "images", base / "masks"
        if (image_dir / split_name).is_dir():
            image_dir, mask_dir = image_dir / split_name, mask_dir / split_name
        pairs, unpaired = _pair_folders(image_dir, mask_dir)
        listed = _read_class_names(base)
        if num_classes is None and listed is None:
            raise DataError(
                f"{str(base)!r} (images/ + masks/) does not say how many classes it has; pass "
                "--num-classes C (segmentation.num_classes) or write class_names.txt there"
            )
        if listed is not None and num_classes not in (None, len(listed)):
            raise DataError(
                f"{base / 'class_names.txt'} lists {len(listed)} classes, num_classes is "
                f"{num_classes}; make them agree"
            )
        classes = listed or [f"class_{i}" for i in range(int(num_classes))]  # type: ignore[arg-type]
    if len(classes) < 2:
        raise DataError(f"a segmentation set needs 2 or more classes, got {len(classes)}")
    if not pairs:
        raise DataError(
            f"no (image, mask) pairs found for split {split_name!r} of the {layout} set at "
            f"{str(base)!r}" + (f" ({len(unpaired)} unpaired files)" if unpaired else "")
        )
    return SegmentationSet(layout, base, split_name, pairs, classes, unpaired)


def _pair_folders(image_dir: Path, mask_dir: Path) -> tuple[list[Pair], list[str]]:
    images = _images_by_stem(image_dir)
    masks = {p.stem: p for p in sorted(mask_dir.glob("*.png"))} if mask_dir.is_dir() else {}
    pairs = [Pair(images[s], masks[s]) for s in sorted(images) if s in masks]
    unpaired = [
        f"{images[s]}\tno mask {s}.png in {mask_dir}" for s in sorted(images) if s not in masks
    ]
    unpaired += [
        f"{masks[s]}\tno image {s}.* in {image_dir}" for s in sorted(masks) if s not in images
    ]
    return pairs, unpaired


def _voc_pairs(base: Path, split: str) -> tuple[list[Pair], list[str]]:
    listing = base / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise DataError(
            f"{listing} does not exist; a VOC layout lists its split in "
            "ImageSets/Segmentation/<split>.txt"
        )
    pairs, unpaired = [], []
    for line in listing.read_text().splitlines():
        stem = line.strip().split(" ")[0]
        if not stem:
            continue
        image = base / "JPEGImages" / f"{stem}.jpg"
        label = base / "SegmentationClass" / f"{stem}.png"
        if image.is_file() and label.is_file():
            pairs.append(Pair(image, label))
        else:
            missing = image if not image.is_file() else label
            unpaired.append(f"{missing}\tlisted in {listing.name} but missing")
    return pairs, unpaired


# -- the training views (mmsegmentation's ADE20K pipeline) ---------------------------------------


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of keep-ratio resizing into ``scale`` = (long side, short side) bounds:
    the largest size whose long side <= scale[0] and short side <= scale[1] (mmcv's rescale)."""
    long_side, short_side = max(scale), min(scale)
    factor = min(long_side / max(height, width), short_side / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def resize_pair(
    image: np.ndarray, label: np.ndarray | None, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Bilinear image, nearest-neighbour labels, to (h, w)."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image, label
    image = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
    if label is not None:
        label = np.asarray(Image.fromarray(label).resize((w, h), Image.Resampling.NEAREST))
    return image, label


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's PhotoMetricDistortion: each with probability 1/2, brightness +-32, contrast
    x[0.5, 1.5] (before or after the colour steps, at random), saturation x[0.5, 1.5] and hue
    +-18 degrees of 180 (in PIL's HSV, whose hue runs over 256 steps)."""
    x = image.astype(np.float32)
    if rng.random() < 0.5:
        x = np.clip(x + rng.uniform(-32, 32), 0, 255)
    contrast_first = rng.random() < 0.5

    def contrast(values: np.ndarray) -> np.ndarray:
        if rng.random() < 0.5:
            values = np.clip(values * rng.uniform(0.5, 1.5), 0, 255)
        return values

    if contrast_first:
        x = contrast(x)
    saturate, shift_hue = rng.random() < 0.5, rng.random() < 0.5
    saturation, hue = rng.uniform(0.5, 1.5), rng.uniform(-18, 18)
    if saturate or shift_hue:
        hsv = np.asarray(Image.fromarray(x.astype(np.uint8)).convert("HSV")).astype(np.float32)
        if saturate:
            hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
        if shift_hue:
            hsv[..., 0] = np.mod(hsv[..., 0] + hue * 256 / 180, 256)
        x = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")).astype(
            np.float32
        )
    if not contrast_first:
        x = contrast(x)
    return x.astype(np.uint8)


def random_crop_box(
    label: np.ndarray, crop: int, rng: np.random.Generator, cat_max_ratio: float
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop of at most ``crop`` x ``crop``; up to 10 tries for one where
    no class covers more than ``cat_max_ratio`` of the labelled pixels (mmseg's RandomCrop)."""
    h, w = label.shape
    ch, cw = min(crop, h), min(crop, w)
    box = (0, 0, ch, cw)
    for _ in range(10):
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        box = (top, left, ch, cw)
        if cat_max_ratio >= 1.0:
            break
        patch = label[top : top + ch, left : left + cw]
        counts = np.bincount(patch[patch != IGNORE_INDEX].ravel(), minlength=1)
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return box


class SegmentationViews:
    """``(source, index, rng) -> ViewSample``: one ``crop`` x ``crop`` training view and its labels.

    mmseg's ADE20K training pipeline: keep-ratio resize into ``scale`` times a ratio drawn from
    ``ratio_range``, a random crop (``cat_max_ratio``), a horizontal flip (``hflip``), the
    photometric distortion, then padding to the crop (pixels 0, labels ignored). Every draw comes
    from ``rng`` (seeded by (seed, epoch, index)): the same view in any worker, process or resume.
    """

    def __init__(
        self,
        crop: int,
        scale: tuple[int, int] = (2048, 512),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        hflip: float = 0.5,
        photometric: bool = True,
    ) -> None:
        self.crop = crop
        self.scale = scale
        self.ratio_range = ratio_range
        self.cat_max_ratio = cat_max_ratio
        self.hflip = hflip
        self.photometric = photometric

    def __call__(self, source: SegmentationSet, index: int, rng: np.random.Generator) -> ViewSample:
        image, label = source.read(index)
        ratio = rng.uniform(*self.ratio_range)
        bounds = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        image, label = resize_pair(image, label, rescale_size(*label.shape, bounds))
        top, left, ch, cw = random_crop_box(label, self.crop, rng, self.cat_max_ratio)
        image = image[top : top + ch, left : left + cw]
        label = label[top : top + ch, left : left + cw]
        if rng.random() < self.hflip:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric:
            image = photometric_distortion(np.ascontiguousarray(image), rng)
        out_image = np.zeros((self.crop, self.crop, 3), dtype=np.uint8)
        out_label = np.full((self.crop, self.crop), IGNORE_INDEX, dtype=np.uint8)
        out_image[:ch, :cw] = image
        out_label[:ch, :cw] = label
        return ViewSample(views=[out_image], extras={"label": out_label.astype(np.int64)})
