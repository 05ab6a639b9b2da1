"""Labelled images for fine-tuning: an ImageFolder source and timm's training transform.

The source reads ``root/<class>/**/<image>`` (classes sorted by folder name -> 0..C-1). The view
maker runs timm's own ImageNet training pipeline (``create_transform``: random resized crop,
flip, RandAugment, bicubic) in its "prefetcher" form, which stops at uint8 pixels: normalisation
and random erasing happen on the device, as timm's prefetching loader does. Random erasing needs
normalised pixels (its ``pixel`` mode draws N(0, 1) noise in normalised units), so each sample
carries an ``erase_seed`` and the method erases on the device with it (see
:func:`siamae.finetune.classification.erase_per_sample`).

timm's transforms draw from the global ``random``, ``numpy.random`` and ``torch`` generators. Each
sample seeds all three from its own ``rng`` (itself seeded by (seed, epoch, index)) and restores
them afterwards, so a sample is the same in any worker, after a resume, and in any process
layout, and the training process's own generators are never touched (with ``num_workers=0``
the transform runs in that process).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from siamae.data.image_folder import EvalTransform, ImageFolder
from siamae.data.shards import ShardSource, is_shard_spec, open_shards, shard_classes
from siamae.data.sources import DECODE_ERRORS, Source, UnreadableSample, open_lazy, to_rgb
from siamae.data.views import ViewSample
from siamae.errors import DataError


class LabelledImageSource:
    """``root/<class>/**/<image>``: items in (class, file) order, labels by sorted class name.

    ``classes`` fixes the class list (e.g. a validation folder takes the training folder's);
    a class folder outside it raises a DataError.
    """

    def __init__(self, root: str | Path, classes: list[str] | None = None) -> None:

        # ImageFolder does the scan and its checks (layout, unknown classes, no images).
        folder = ImageFolder(root, EvalTransform(32), classes=classes)
        self.root = folder.root
        self.classes = folder.classes
        self.files = [path for path, _ in folder.samples]
        self.labels = np.array([label for _, label in folder.samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def name(self, index: int) -> str:
        return str(self.files[index])

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def open_image(self, index: int, rng: np.random.Generator) -> Image.Image:
        return open_lazy(self.files[index])


def labelled_source(
    path: str | Path,
    cache_dir: str | Path | None = None,
    run_dir: str | Path | None = None,
    progress: bool = False,
    workers: int = 0,
) -> LabelledImageSource | ShardSource:
    """Labelled images: an ImageFolder, or tar shards with ``.cls`` members and their
    ``classes.json`` (index cached as :func:`siamae.data.shards.open_shards` says)."""
    if is_shard_spec(path):
        return open_shards(path, cache_dir, run_dir, progress, labelled=True, workers=workers)
    return LabelledImageSource(path)


def folder_classes(root: str | Path) -> list[str]:
    """The sorted class-folder names of an ImageFolder (what a head's class count comes from);
    for tar shards, the names their ``classes.json`` lists."""
    if is_shard_spec(root):
        return shard_classes(root)
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"image folder {str(root)!r} does not exist; pass a folder laid out as "
            "<folder>/<class>/<image>.jpg"
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(
            f"image folder {str(root)!r} has no class sub-folders; lay it out as "
            "<folder>/<class>/<image>.jpg (ImageFolder)"
        )
    return classes


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed python's ``random``, ``numpy.random`` and torch's CPU generator with ``seed`` for the
    block, and put all three back as they were afterwards."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed([seed & 0xFFFFFFFF, seed >> 32])
        torch.default_generator.manual_seed(seed)  # the CPU generator only; CUDA stays as is
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class LabelledViews:
    """``(source, index, rng) -> ViewSample``: one augmented uint8 view, its label, an erase seed.

    The transform is timm's ``create_transform(is_training=True, use_prefetcher=True, ...)``:
    random resized crop (``scale``, ``ratio``, ``interpolation``), horizontal flip, then
    ``auto_augment`` (e.g. RandAugment ``rand-m9-mstd0.5-inc1``) or, without it, colour jitter.
    """

    def __init__(
        self,
        img_size: int,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        color_jitter: float | None = None,
        interpolation: str = "bicubic",
    ) -> None:
        from timm.data import create_transform

        self.img_size = img_size
        self.transform = create_transform(
            img_size,
            is_training=True,
            scale=scale,
            ratio=ratio,
            hflip=hflip,
            color_jitter=color_jitter or 0.0,
            auto_augment=auto_augment,
            interpolation=interpolation,
            re_prob=0.0,  # erasing happens on the device (normalised pixels), per erase_seed
            use_prefetcher=True,  # stop at uint8 (3, H, W): no ToTensor/Normalize here
        )

        _posterize_zero_bits_compat(self.transform)

    def __call__(self, source: Source, index: int, rng: np.random.Generator) -> ViewSample:
        image = source.open_image(index, rng)
        name = getattr(image, "filename", "") or source.name(index)
        seed = int(rng.integers(0, 2**63 - 1))
        erase_seed = int(rng.integers(0, 2**63 - 1))
        try:
            image = to_rgb(image)
            image.load()
        except DECODE_ERRORS as err:
            raise UnreadableSample(str(name), f"{type(err).__name__}: {err}") from None
        with seeded_global_rngs(seed):
            pixels = self.transform(image)
        view = np.ascontiguousarray(np.asarray(pixels).transpose(1, 2, 0))
        return ViewSample(
            views=[view],
            extras={
                "label": np.int64(source.label(index)),
                "erase_seed": np.int64(erase_seed),
            },
        )


def _posterize(img: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """timm's posterize, with 0 bits kept meaning a black image (what PIL did before version 13,
    which now rejects 0; RandAugment's increasing posterize asks for 0 at high magnitudes)."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _posterize_zero_bits_compat(transform: object) -> None:
    """Point every posterize op of the transform's RandAugment/AutoAugment at :func:`_posterize`."""
    for step in getattr(transform, "transforms", []):
        ops = list(getattr(step, "ops", []))
        for sub in getattr(step, "policy", []):
            ops.extend(sub)
        for op in ops:
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = _posterize
