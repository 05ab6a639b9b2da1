"""Labelled image folders (``root/<class>/<image>``) read deterministically, for evaluation.

Images are decoded in loader workers and come out as uint8 (3, S, S) tensors after a
deterministic resize (short side to ``floor(S / crop_pct)``, bicubic) and a centre crop of S:
the DINO/MAE evaluation transform (256 -> 224 at the default ``crop_pct`` 0.875). Conversion to
float and ImageNet normalisation happen on the device (:func:`normalize`). Nothing here draws
random numbers from the global generators. The probes, fine-tuning's validation and the
attention maps read images through here.
"""

from __future__ import annotations

import io
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from siamae.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from siamae.data.shards import ShardSource, is_shard_spec, open_shards
from siamae.data.sources import DECODE_ERRORS, UnreadableSample, open_bytes, to_rgb
from siamae.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}

# A shard member's first bytes read to check it is an image (the header of a JPEG or PNG).
HEADER_BYTES = 1 << 16


@dataclass(frozen=True)
class EvalTransform:
    """Deterministic resize + centre crop to ``img_size`` (short side to img_size / crop_pct)."""

    img_size: int
    crop_pct: float = 0.875

    def __post_init__(self) -> None:
        if self.img_size <= 0:
            raise DataError(f"image size must be positive, got {self.img_size}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise DataError(f"crop_pct must be in (0, 1], got {self.crop_pct}")

    @property
    def resize(self) -> int:
        return int(math.floor(self.img_size / self.crop_pct))

    def __call__(self, image: object) -> torch.Tensor:
        """PIL image -> uint8 (3, img_size, img_size)."""

        assert isinstance(image, Image.Image)
        image = to_rgb(image)  # 16-bit, float, CMYK, alpha: scaled, not clipped
        w, h = image.size
        scale = self.resize / min(w, h)
        new_w, new_h = max(self.resize, round(w * scale)), max(self.resize, round(h * scale))
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left = (new_w - self.img_size) // 2
        top = (new_h - self.img_size) // 2
        image = image.crop((left, top, left + self.img_size, top + self.img_size))
        array = np.asarray(image, dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class ImageFolder(Dataset):
    """``root/<class>/**/<image>``: classes sorted by name, files sorted, labels 0..C-1.

    ``root`` may also name labelled tar shards (:mod:`siamae.data.shards`): the samples are
    then the shards' images in shard order, labelled by their ``.cls`` members and named by
    ``classes.json``; each sample's path is ``<shard>/<member>`` (no file of its own: read it
    with :meth:`open`), and ``root`` is the folder holding the shards.

    Args:
        root: the folder (or the shards).
        transform: uint8 transform applied to each decoded image.
        classes: the class names to use (e.g. the training folder's, for a validation folder);
            a class folder not in this list raises a DataError.
    """

    def __init__(
        self, root: str | Path, transform: EvalTransform, classes: list[str] | None = None
    ) -> None:
        self.transform = transform
        self.skipped: list[str] = []  # files dropped by drop_unreadable, path<TAB>reason
        self._shards: ShardSource | None = None
        self._items: np.ndarray | None = None  # sample i -> its index in self._shards
        if is_shard_spec(root):
            self._read_shards(root, classes)
            return
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(
                f"image folder {str(self.root)!r} does not exist; pass a folder laid out as "
                "<folder>/<class>/<image>.jpg"
            )
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not found:
            raise DataError(
                f"image folder {str(self.root)!r} has no class sub-folders; lay it out as "
                "<folder>/<class>/<image>.jpg (ImageFolder)"
            )
        self.classes = _known_classes(
            found,
            classes,
            lambda unknown: (
                f"image folder {str(self.root)!r} has classes the training folder "
                f"lacks: {unknown}; use train and val folders with the same class names"
            ),
        )
        index = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        for name in found:
            files = sorted(
                p
                for p in (self.root / name).rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            )
            self.samples.extend((p, index[name]) for p in files)
        if not self.samples:
            raise DataError(
                f"image folder {str(self.root)!r} has no images "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}) in its class folders"
            )

    def _read_shards(self, spec: str | Path, classes: list[str] | None) -> None:
        """The samples of labelled shards; labels mapped by name onto ``classes`` when given."""
        source = open_shards(spec, labelled=True)
        names = source.classes or []
        unlabelled = np.flatnonzero(source.labels < 0)
        if unlabelled.size:
            bad = int(unlabelled[0])
            raise DataError(
                f"{source.name(bad)}: the image has no class index (a <key>.cls member holding "
                f"one); {unlabelled.size} image(s) of the shards {str(spec)!r} lack one"
            )
        used = [names[i] for i in np.unique(source.labels)]
        self.classes = _known_classes(
            used,
            classes,
            lambda unknown: (
                f"the shards {str(spec)!r} have classes the training set lacks: "
                f"{unknown}; use train and val sets with the same class names"
            ),
            own=names,
        )
        index = {name: i for i, name in enumerate(self.classes)}
        to_ours = np.array([index.get(name, -1) for name in names], dtype=np.int64)
        self._shards = source
        self._items = np.arange(len(source), dtype=np.int64)
        shard_dirs = {str(Path(shard).parent) for shard in source.shards}
        self.root = Path(os.path.commonpath(sorted(shard_dirs)))
        self.samples = [
            (Path(source.name(i)), int(to_ours[source.labels[i]])) for i in range(len(source))
        ]

    def open(self, i: int) -> Image.Image:
        """Sample i's image, opened lazily (not decoded yet)."""
        if self._shards is None:
            return Image.open(self.samples[i][0])
        item = int(self._items[i])  # type: ignore[index]
        return open_bytes(self._shards.read(item), self._shards.name(item))

    def _header_ok(self, i: int) -> None:
        """Raise if sample i is not an image (its header is read, no pixels are decoded)."""
        if self._shards is None:
            with Image.open(self.samples[i][0]):
                return
        item = int(self._items[i])  # type: ignore[index]
        try:  # the header is in the first bytes; read them all when it is larger
            Image.open(io.BytesIO(self._shards.read(item, limit=HEADER_BYTES)))
        except DECODE_ERRORS:
            Image.open(io.BytesIO(self._shards.read(item)))

    def __len__(self) -> int:
        return len(self.samples)

    def drop_unreadable(self) -> list[str]:
        """Open every file's header (cheap: no pixels are decoded) and drop those that are not
        images (empty, truncated before the header, another format), as training skips them.
        Returns one ``path<TAB>reason`` line per dropped file (the ``skipped_files.txt`` format).
        """

        kept: list[int] = []
        dropped: list[str] = []
        for i, (path, _) in enumerate(self.samples):
            try:
                self._header_ok(i)
            except (*DECODE_ERRORS, UnreadableSample) as err:
                reason = err.reason if isinstance(err, UnreadableSample) else err
                dropped.append(f"{path}\t{type(err).__name__}: {reason}")
                continue
            kept.append(i)
        if not kept:
            raise DataError(
                f"image folder {str(self.root)!r}: none of its {len(self.samples)} images can be "
                "read; replace them"
            )
        self.samples = [self.samples[i] for i in kept]
        if self._items is not None:
            self._items = self._items[kept]
        return dropped

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.long)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        try:
            with self.open(i) as image:
                if image.format == "JPEG":
                    # Decode-time reduction: never below the size the resize needs.
                    image.draft("RGB", (self.transform.resize, self.transform.resize))
                pixels = self.transform(image)
        except (*DECODE_ERRORS, UnreadableSample) as err:  # a decompression bomb too
            raise DataError(
                f"image {str(path)!r} could not be decoded ({err}); remove or replace it"
            ) from None
        return pixels, label


def _known_classes(
    found: list[str],
    classes: list[str] | None,
    refusal: Callable[[list[str]], str],
    own: list[str] | None = None,
) -> list[str]:
    """The class list a set is labelled with: its own (``own``, else ``found``) when no
    training set's ``classes`` are given; otherwise those, refusing (``refusal`` of the first
    five) a class they lack."""
    if classes is None:
        return list(own if own is not None else found)
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise DataError(refusal(unknown[:5]))
    return list(classes)


def validation_folder(
    root: str | Path, transform: EvalTransform, classes: list[str]
) -> ImageFolder:
    """The validation ImageFolder of a probe or a fine-tuning run, checked before any work: its
    classes must be the training folder's, and files that are not images are dropped, counted
    and named (on stderr, and in the folder's ``skipped``: ``path<TAB>reason`` lines), as
    training skips them; the accuracy is then over the images that remain."""
    folder = ImageFolder(root, transform, classes=classes)
    folder.skipped = folder.drop_unreadable()
    if folder.skipped:
        first = folder.skipped[0].replace("\t", ": ", 1)
        more = f" (and {len(folder.skipped) - 1} more)" if len(folder.skipped) > 1 else ""
        print(
            f"siamae: note: validation folder {str(folder.root)!r}: skipped "
            f"{len(folder.skipped)} unreadable file(s), evaluating the other {len(folder)}: "
            f"{first}{more}",
            file=sys.stderr,
        )
    return folder


def loader(dataset: Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """An in-order loader that never draws from the global torch generator."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        # DataLoader seeds its workers from `generator`; a private one keeps the global
        # torch RNG untouched (the online monitor relies on this).
        generator=torch.Generator().manual_seed(0),
        persistent_workers=False,
    )


def normalize(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, H, W) on ``device``, ImageNet mean/std."""
    x = images.to(device, non_blocking=True).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
