"""The segmentation probe's cached features (``siamae eval segment --protocol cached``).

The encoder is frozen, so its patch features of a training view never change: they are computed
once and the head then trains for as many epochs as asked on the stored features. What is
stored, per training image:

- copy 0: the image resized (keep ratio) into the protocol's ``scale``, covered by the fewest
  ``crop`` x ``crop`` windows (the last one flush with the border; a window larger than the image
  is padded: pixels 0, labels ignored, as the training views pad);
- copies 1 .. ``copies - 1`` (an option, default none): augmented views drawn as the DINOv2
  protocol draws its crops (:class:`siamae.data.segmentation.SegmentationViews`), each seeded
  by (seed, copy, index).

With ``crops=True`` (``--cached-views crops``) no windows are stored: copies 0 .. ``copies - 1``
are all augmented crops, copy c of an image being the very crop the DINOv2 protocol draws for it
in epoch c (the same seed triple), and the probe's epoch e reads copy e mod ``copies`` in
the DINOv2 protocol's batch order: with as many copies as epochs it is that protocol's run.

The features ((M, layers x D, crop/p, crop/p) float32) and labels ((M, crop, crop) uint8) are
``.npy`` files opened memory-mapped, so a set larger than memory trains from disk. They live in
a folder named by a digest of the key: the encoder's weights (a SHA-256 of its tensors), the
data (root, split, image count), the resolution (crop, scale), the copies and how they are drawn,
and the blocks read. A run stopped during extraction continues where it stopped; a second probe
of the same encoder (another lr, another ``--out`` with the same ``--feature-cache``) reuses them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from siamae.data.dataset import worker_batches
from siamae.data.image_folder import normalize
from siamae.data.segmentation import (
    IGNORE_INDEX,
    SegmentationSet,
    SegmentationViews,
    rescale_size,
    resize_pair,
)
from siamae.data.sources import DECODE_ERRORS, UnreadableSample
from siamae.errors import DataError
from siamae.models.vit import Encoder

CACHE_FORMAT = "siamae-segfeatures-v1"


def probe_features(encoder: Encoder, images: torch.Tensor, layers: int = 1) -> torch.Tensor:
    """(B, layers x D, H/p, W/p): the patch tokens of the last ``layers`` blocks, each after the
    encoder's final norm (DINOv2's ``get_intermediate_layers(norm=True)``), concatenated."""
    tokens, cls, (gh, gw) = encoder.embed(images)
    x = torch.cat([cls, tokens], dim=1)
    depth = len(encoder.vit.blocks)
    maps = []
    for i, block in enumerate(encoder.vit.blocks):
        x = block(x)
        if i >= depth - layers:
            patches = encoder.vit.norm(x)[:, 1:]
            maps.append(patches.transpose(1, 2).reshape(x.shape[0], -1, gh, gw))
    # contiguous: the head then sees the same memory layout as the cached features, so both
    # paths give bit-identical logits
    return torch.cat(maps, dim=1).contiguous()


def weights_digest(encoder: Encoder) -> str:
    """SHA-256 of the encoder's tensors (names, dtypes, shapes, values) and position resampling:
    the same digest for the same weights, whatever file they came from."""
    digest = hashlib.sha256(str(encoder.pos_resample).encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


def cover_starts(length: int, crop: int) -> list[int]:
    """Starts of the fewest ``crop`` windows covering ``length`` pixels, the last one flush."""
    if length <= crop:
        return [0]
    starts = list(range(0, length - crop, crop))
    return starts + [length - crop]


def _image_size(path: Path) -> tuple[int, int] | None:
    """(h, w) from the file's header; None when it cannot be read (skipped when decoded)."""
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except DECODE_ERRORS:
        return None


class CachedViews(Dataset):
    """The views whose features are cached: item j -> (uint8 image (3, crop, crop), uint8 labels
    (crop, crop), the reason it is unreadable or "")."""

    def __init__(
        self,
        source: SegmentationSet,
        crop: int,
        scale: tuple[int, int],
        copies: int = 1,
        seed: int = 0,
        ratio_range: tuple[float, float] = (0.5, 2.0),
        photometric: bool = True,
        crops: bool = False,
    ) -> None:
        self.source, self.crop, self.scale, self.seed = source, crop, scale, seed
        self.views = SegmentationViews(crop, scale, ratio_range, photometric=photometric)
        self.crops = crops
        # (image index, copy, top, left): copy 0 the windows (unless crops), others one
        # augmented view each; with crops item j is copy j // images of image j % images
        self.items: list[tuple[int, int, int, int]] = []
        if crops:
            self.items = [(i, c, 0, 0) for c in range(copies) for i in range(len(source))]
            return
        for i, pair in enumerate(source.pairs):
            size = _image_size(pair.image)
            h, w = rescale_size(*size, scale) if size is not None else (crop, crop)
            self.items += [
                (i, 0, t, s) for t in cover_starts(h, crop) for s in cover_starts(w, crop)
            ]
        for copy in range(1, copies):
            self.items += [(i, copy, 0, 0) for i in range(len(source))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        index, copy, top, left = self.items[j]
        crop = self.crop
        try:
            if copy == 0 and not self.crops:
                image, label = self.source.read(index)
                image, label = resize_pair(image, label, rescale_size(*label.shape, self.scale))
                image = image[top : top + crop, left : left + crop]
                label = label[top : top + crop, left : left + crop]  # type: ignore[index]
            else:
                rng = np.random.default_rng([self.seed, copy, index])
                view = self.views(self.source, index, rng)
                image, label = view.views[0], view.extras["label"]
        except UnreadableSample as bad:
            blank = torch.zeros(3, crop, crop, dtype=torch.uint8)
            return blank, torch.full((crop, crop), IGNORE_INDEX, dtype=torch.uint8), str(bad)
        out_image = np.zeros((crop, crop, 3), dtype=np.uint8)
        out_label = np.full((crop, crop), IGNORE_INDEX, dtype=np.uint8)
        out_image[: image.shape[0], : image.shape[1]] = image
        out_label[: label.shape[0], : label.shape[1]] = label
        pixels = torch.from_numpy(out_image).permute(2, 0, 1).contiguous()
        return pixels, torch.from_numpy(out_label), ""


@dataclass
class CachedFeatures:
    """The stored features and labels (memory-mapped) and which items are readable."""

    folder: Path
    features: np.ndarray  # (M, C, g, g) float32
    labels: np.ndarray  # (M, crop, crop) uint8
    valid: np.ndarray  # indices of the readable items
    skipped: list[str] = field(default_factory=list)
    computed: bool = False  # False: read back from an earlier run
    crop_copies: int = 0  # > 0: the crops layout (item copy x images + image), this many copies

    def batches_per_epoch(self, batch_size: int) -> int:
        if self.crop_copies:  # the DINOv2 protocol's: whole batches of images
            return max(1, len(self.labels) // self.crop_copies // batch_size)
        return batches_per_epoch(len(self.valid), batch_size)

    def batches(self, batch_size: int, seed: int, epoch: int, skip: int = 0) -> Iterator[dict]:
        """The epoch's batches (shuffled by (seed, epoch)) from batch ``skip`` on: features
        (B, C, g, g) float32 and labels (B, crop, crop) int64."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        if self.crop_copies:
            yield from self._crop_batches(batch_size, g, epoch, skip)
            return
        order = self.valid[torch.randperm(len(self.valid), generator=g).numpy()]
        for b in range(skip, self.batches_per_epoch(batch_size)):
            idx = np.sort(order[b * batch_size : (b + 1) * batch_size])
            yield self._batch(idx)

    def _crop_batches(
        self, batch_size: int, g: torch.Generator, epoch: int, skip: int
    ) -> Iterator[dict]:
        """Copy ``epoch mod copies`` of the images in the DINOv2 protocol's order (its
        EpochSampler's permutation, cut into whole batches); an unreadable image's place is
        taken by the next readable one, as that protocol's data set does."""
        images = len(self.labels) // self.crop_copies
        first = epoch % self.crop_copies * images
        readable = np.zeros(len(self.labels), dtype=bool)
        readable[self.valid] = True
        order = torch.randperm(images, generator=g).numpy()
        for b in range(skip, self.batches_per_epoch(batch_size)):
            idx = []
            for i in order[b * batch_size : (b + 1) * batch_size]:
                for attempt in range(images):
                    if readable[first + (i + attempt) % images]:
                        idx.append(first + (i + attempt) % images)
                        break
                else:
                    raise DataError(f"no crop of copy {epoch % self.crop_copies} is readable")
            yield self._batch(np.array(idx, dtype=np.int64))

    def _batch(self, idx: np.ndarray) -> dict:
        return {
            "features": torch.from_numpy(np.ascontiguousarray(self.features[idx])),
            "label": torch.from_numpy(self.labels[idx].astype(np.int64)),
            "skipped_files": [],
        }


def batches_per_epoch(items: int, batch_size: int) -> int:
    """Whole batches, a last one of 2 or more kept (BatchNorm cannot train on one item)."""
    return max(1, items // batch_size + (1 if items % batch_size >= 2 else 0))


def cache_key(
    encoder: Encoder, views: CachedViews, layers: int, copies: int, extra: dict[str, Any]
) -> dict[str, Any]:
    source = views.source
    return {
        "format": CACHE_FORMAT,
        "weights": weights_digest(encoder),
        "data": str(Path(source.root).resolve()),
        "split": source.split,
        "images": [p.stem for p in source.pairs],
        "crop": views.crop,
        "scale": list(views.scale),
        "copies": copies,
        "layers": layers,
        "items": len(views),
        # crops name their kind (the windows' keys predate the option and stay as they were)
        **({"views": "crops"} if views.crops else {}),
        **extra,
    }


@torch.no_grad()
def cached_features(
    encoder: Encoder,
    views: CachedViews,
    layers: int,
    directory: Path,
    key: dict[str, Any],
    device: torch.device,
    batch_size: int = 16,
    num_workers: int = 0,
    progress: bool = True,
) -> CachedFeatures:
    """The features of every view, read back from ``directory`` when stored there under ``key``
    (a stopped extraction continues from its last written batch), else computed and stored."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = directory / digest
    meta_path = folder / "meta.json"
    grid = views.crop // encoder.patch_size
    shape = (len(views), layers * encoder.embed_dim, grid, grid)
    meta = _read_meta(meta_path, key)
    mode = "r+" if meta is not None else "w+"
    if meta is None:
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"key": key, "done": 0, "skipped": {}}
    feats = np.lib.format.open_memmap(folder / "features.npy", mode, np.float32, shape)
    labels = np.lib.format.open_memmap(
        folder / "labels.npy", mode, np.uint8, (len(views), views.crop, views.crop)
    )
    start = int(meta["done"])
    if start < len(views):
        _extract(
            encoder,
            views,
            layers,
            (feats, labels),
            meta,
            meta_path,
            device,
            batch_size,
            num_workers,
            progress,
        )
    bad = {int(j) for j in meta["skipped"]}
    valid = np.array([j for j in range(len(views)) if j not in bad], dtype=np.int64)
    return CachedFeatures(
        folder,
        np.load(folder / "features.npy", mmap_mode="r"),
        np.load(folder / "labels.npy", mmap_mode="r"),
        valid,
        sorted(set(meta["skipped"].values())),
        computed=start < len(views),
        crop_copies=len(views) // len(views.source) if views.crops else 0,
    )


def _extract(
    encoder: Encoder,
    views: CachedViews,
    layers: int,
    arrays: tuple[np.ndarray, np.ndarray],
    meta: dict[str, Any],
    meta_path: Path,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    progress: bool,
) -> None:
    """Encode the views from ``meta["done"]`` on, flushing the arrays and the count batch by
    batch (the count last, so a stop never counts a batch that is not on disk)."""
    from tqdm.auto import tqdm

    feats, labels = arrays
    start = int(meta["done"])
    rest = torch.utils.data.Subset(views, range(start, len(views)))
    loader = DataLoader(rest, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    encoder = encoder.to(device).eval()
    bar = tqdm(
        total=len(views), initial=start, desc="probe features", unit="view", disable=not progress
    )
    with worker_batches(loader) as batches:
        for images, label, reasons in batches:
            end = start + images.shape[0]
            out = probe_features(encoder, normalize(images, device), layers)
            feats[start:end] = out.float().cpu().numpy()
            labels[start:end] = label.numpy()
            for j, reason in enumerate(reasons):
                if reason:
                    meta["skipped"][str(start + j)] = reason
            feats.flush()
            labels.flush()
            start = meta["done"] = end
            _write_meta(meta_path, meta)
            bar.update(images.shape[0])
    bar.close()


def _read_meta(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("key") != key:
        return None
    for name in ("features.npy", "labels.npy"):
        if not (path.parent / name).is_file():
            return None
    return meta


def _write_meta(path: Path, meta: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, path)
