"""Frozen features of a labelled ImageFolder (``root/<class>/<image>``), for the image probes.

Images are decoded in loader workers and come out as uint8 (3, S, S) tensors after a
deterministic resize (short side to ``floor(S / crop_pct)``, bicubic) and a centre crop of S:
the DINO/MAE evaluation transform (256 -> 224 at the default ``crop_pct`` 0.875). Conversion to
float and ImageNet normalisation happen on the device. Nothing here draws random numbers from
the global generators, so calling it in the middle of a training run changes nothing there.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from siamae.data.sources import DECODE_ERRORS, UnreadableSample, to_rgb
from siamae.errors import DataError, SiamaeError
from siamae.models.vit import Encoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}

Pool = Literal["cls", "mean", "mean-ln", "cls-raw"]
# What a probe reads from the frozen encoder. The last two skip the final norm, as SiameseIM's
# evaluation code does (its ViT has none; it deletes any it is given).
FEATURES: dict[str, str] = {
    "cls": "the CLS token after the final norm",
    "mean": "the mean of the patch tokens after the final norm",
    "mean-ln": "the mean of the last block's patch tokens (final norm skipped), then a fresh "
    "LayerNorm without affine, eps 1e-6 (SiameseIM's linear probe: global_pool + fc_norm)",
    "cls-raw": "the last block's CLS token, final norm skipped (SiameseIM's few-shot code: "
    "forward_features(x)[:, 0])",
}
POOLS: tuple[str, ...] = tuple(FEATURES)
RAW_POOLS = {"mean-ln", "cls-raw"}
FC_NORM_EPS = 1e-6


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
        from PIL import Image

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

    Args:
        root: the folder.
        transform: uint8 transform applied to each decoded image.
        classes: the class names to use (e.g. the training folder's, for a validation folder);
            a class folder not in this list raises a DataError.
    """

    def __init__(
        self, root: str | Path, transform: EvalTransform, classes: list[str] | None = None
    ) -> None:
        self.root = Path(root)
        self.transform = transform
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
        if classes is None:
            classes = found
        else:
            unknown = [c for c in found if c not in classes]
            if unknown:
                raise DataError(
                    f"image folder {str(self.root)!r} has classes the training folder lacks: "
                    f"{unknown[:5]}; use train and val folders with the same class names"
                )
        self.classes = list(classes)
        self.skipped: list[str] = []  # files dropped by drop_unreadable, path<TAB>reason
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

    def __len__(self) -> int:
        return len(self.samples)

    def drop_unreadable(self) -> list[str]:
        """Open every file's header (cheap: no pixels are decoded) and drop those that are not
        images (empty, truncated before the header, another format), as training skips them.
        Returns one ``path<TAB>reason`` line per dropped file (the ``skipped_files.txt`` format).
        """
        from PIL import Image

        kept: list[tuple[Path, int]] = []
        dropped: list[str] = []
        for path, label in self.samples:
            try:
                with Image.open(path):
                    pass
            except DECODE_ERRORS as err:
                dropped.append(f"{path}\t{type(err).__name__}: {err}")
                continue
            kept.append((path, label))
        if not kept:
            raise DataError(
                f"image folder {str(self.root)!r}: none of its {len(self.samples)} images can be "
                "read; replace them"
            )
        self.samples = kept
        return dropped

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.long)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[i]
        try:
            with Image.open(path) as image:
                if image.format == "JPEG":
                    # Decode-time reduction: never below the size the resize needs.
                    image.draft("RGB", (self.transform.resize, self.transform.resize))
                pixels = self.transform(image)
        except (UnidentifiedImageError, UnreadableSample, OSError, ValueError) as err:
            raise DataError(
                f"image {str(path)!r} could not be decoded ({err}); remove or replace it"
            ) from None
        return pixels, label


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


def pool_tokens(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, 1 + N, D) tokens -> (B, D) by ``pool`` (see FEATURES): the tokens are the final
    norm's output for "cls"/"mean", the last block's for "mean-ln"/"cls-raw"."""
    if pool in ("cls", "cls-raw"):
        return tokens[:, 0]
    if pool == "mean":
        return tokens[:, 1:].mean(dim=1)
    if pool == "mean-ln":
        pooled = tokens[:, 1:].mean(dim=1)
        return F.layer_norm(pooled, (pooled.shape[-1],), eps=FC_NORM_EPS)
    raise ValueError(f"unknown pooling {pool!r}; choose one of {', '.join(POOLS)}")


def encode_features(encoder: Encoder, images: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, 3, H, W) normalised images -> (B, D) features by ``pool`` (see FEATURES)."""
    return pool_tokens(encoder(images, final_norm=pool not in RAW_POOLS), pool)


def _batches(
    source: Dataset | torch.Tensor, batch_size: int, num_workers: int
) -> Iterator[torch.Tensor]:
    if isinstance(source, torch.Tensor):
        for start in range(0, source.shape[0], batch_size):
            yield source[start : start + batch_size]
    else:
        for images, _ in loader(source, batch_size, num_workers):
            yield images


@torch.no_grad()
def extract_features(
    encoder: Encoder,
    source: Dataset | torch.Tensor,
    device: torch.device | str = "cpu",
    pool: str = "cls",
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "features",
) -> torch.Tensor:
    """Features of every image, in order: (N, D) float32 on the CPU (not normalised).

    ``source`` is an :class:`ImageFolder` (decoded in ``num_workers`` workers) or a uint8
    tensor (N, 3, S, S) already decoded. The encoder is run in eval mode and its mode is
    restored afterwards.
    """
    from tqdm.auto import tqdm

    if pool not in POOLS:
        raise ValueError(f"unknown pooling {pool!r}; choose one of {', '.join(POOLS)}")
    total = source.shape[0] if isinstance(source, torch.Tensor) else len(source)  # type: ignore[arg-type]
    was_training = encoder.training
    encoder.eval()
    out: list[torch.Tensor] = []
    try:
        with tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False) as bar:
            for images in _batches(source, batch_size, num_workers):
                feats = encode_features(encoder, normalize(images, device), pool)
                out.append(feats.float().cpu())
                bar.update(images.shape[0])
    finally:
        encoder.train(was_training)
    return torch.cat(out) if out else torch.empty(0, encoder.embed_dim)


def decode_all(
    dataset: ImageFolder, batch_size: int = 256, num_workers: int = 0, progress: bool = False
) -> torch.Tensor:
    """Every image of ``dataset`` decoded once: uint8 (N, 3, S, S) on the CPU."""
    from tqdm.auto import tqdm

    chunks = []
    with tqdm(total=len(dataset), desc=f"decode {dataset.root.name}", disable=not progress) as bar:
        for images in _batches(dataset, batch_size, num_workers):
            chunks.append(images)
            bar.update(images.shape[0])
    return torch.cat(chunks)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SiamaeError(
            f"device {name!r} was asked for but CUDA is not available; use --device cpu"
        )
    return torch.device(name)
