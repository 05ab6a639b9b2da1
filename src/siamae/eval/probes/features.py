"""Frozen features of a labelled ImageFolder (``root/<class>/<image>``), for the image probes,
and their cache (:class:`FeatureCache`), shared by the k-NN, linear and few-shot probes.

Images are decoded in loader workers and come out as uint8 (3, S, S) tensors after a
deterministic resize (short side to ``floor(S / crop_pct)``, bicubic) and a centre crop of S:
the DINO/MAE evaluation transform (256 -> 224 at the default ``crop_pct`` 0.875). Conversion to
float and ImageNet normalisation happen on the device. Nothing here draws random numbers from
the global generators, so calling it in the middle of a training run changes nothing there.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from siamae.checkpoint import load_checkpoint, save_atomic
from siamae.data.image_folder import (
    EvalTransform,
    ImageFolder,
    loader,
    normalize,
    validation_folder,
)
from siamae.errors import CheckpointError, SiamaeError
from siamae.models.vit import Encoder

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
# What the grid of linear heads reads (``eval linear --grid``): for every image, the CLS token
# of each of the last 4 blocks and the mean of the last block's patch tokens, all after the
# final norm (DINOv2's ``get_intermediate_layers(n=4, norm=True)``), as (B, 5 x D).
GRID_POOL = "grid"
GRID_BLOCKS = 4
RAW_POOLS = {"mean-ln", "cls-raw"}
FC_NORM_EPS = 1e-6
FEATURES_FORMAT = "siamae-features-v1"


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


def grid_tokens(encoder: Encoder, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) normalised images -> (B, 5, D): the CLS token after the final norm of each
    of the last 4 blocks (the oldest first), then the mean of the last block's patch tokens
    after the final norm. Slot 3 is the "cls" feature, the mean of slot 4 the "mean" one."""
    tokens, cls, _ = encoder.embed(images)
    x = torch.cat([cls, tokens], dim=1)
    depth = len(encoder.vit.blocks)
    slots = []
    for i, block in enumerate(encoder.vit.blocks):
        x = block(x)
        if i >= depth - GRID_BLOCKS:
            normed = encoder.vit.norm(x)
            slots.append(normed[:, 0])
    slots.append(normed[:, 1:].mean(dim=1))
    return torch.stack(slots, dim=1)


def encode_features(encoder: Encoder, images: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, 3, H, W) normalised images -> (B, D) features by ``pool`` (see FEATURES), or
    (B, 5 x D) for GRID_POOL (see grid_tokens)."""
    if pool == GRID_POOL:
        return grid_tokens(encoder, images).flatten(1)
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

    if pool not in POOLS and pool != GRID_POOL:
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


def encoder_fingerprint(source: str) -> dict[str, Any]:
    """What identifies the encoder's weights: the file's path, size and modification time."""
    path = Path(source)
    if path.is_dir() and (path / "checkpoints" / "last.pt").is_file():
        path = path / "checkpoints" / "last.pt"  # a run folder: the checkpoint it resolves to
    if path.is_file():
        st = path.stat()
        return {"source": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"source": source}


@dataclass
class FeatureCache:
    """Frozen features of one encoder under one transform, computed once.

    Each set of features is a file ``directory/<name>.pt`` (``directory`` None: kept nowhere)
    holding a key: the encoder's weights (:func:`encoder_fingerprint` of ``source``), the
    pooling, the image size, the crop, the position resampling, the folder and its image count
    (and whatever a probe adds, e.g. the few-shot subset). A file whose key differs is computed
    again and replaced. ``eval linear`` and ``eval fewshot`` with one ``--out-dir`` share it.
    """

    encoder: Encoder
    directory: Path | None
    source: str
    pool: str
    img_size: int
    crop_pct: float
    device: torch.device | str = "cpu"
    batch_size: int = 64
    num_workers: int = 0
    progress: bool = True

    def key(self, folder: ImageFolder, **extra: Any) -> dict[str, Any]:
        return {
            **encoder_fingerprint(self.source),
            "pool": self.pool,
            "img_size": self.img_size,
            "crop_pct": self.crop_pct,
            # Features at another size than the trained one depend on how the grid is resampled.
            "pos_resample": getattr(self.encoder, "pos_resample", "dino"),
            "folder": str(folder.root.resolve()),
            "n": len(folder),
            **extra,
        }

    def _path(self, name: str) -> Path | None:
        return self.directory / f"{name}.pt" if self.directory is not None else None

    def stored(self, name: str, key: dict[str, Any]) -> torch.Tensor | None:
        """The features saved as ``name`` under ``key``; None if there are none."""
        path = self._path(name)
        if path is None or not path.is_file():
            return None
        try:
            stored = load_checkpoint(path)
        except CheckpointError:
            return None
        if stored.get("format") == FEATURES_FORMAT and stored.get("key") == key:
            return stored["features"]
        return None

    def features(
        self, name: str, images: Dataset, key: dict[str, Any], desc: str = "features"
    ) -> torch.Tensor:
        """The features of ``images`` (in order), read back when saved as ``name`` under
        ``key``, else computed and saved."""
        found = self.stored(name, key)
        if found is not None:
            return found
        feats = extract_features(
            self.encoder,
            images,
            device=self.device,
            pool=self.pool,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            progress=self.progress,
            desc=desc,
        )
        path = self._path(name)
        if path is not None:
            save_atomic({"format": FEATURES_FORMAT, "key": key, "features": feats}, path)
        return feats

    def of_folder(self, name: str, folder: ImageFolder, desc: str) -> torch.Tensor:
        """:meth:`features` of a whole folder, under its :meth:`key`."""
        return self.features(name, folder, self.key(folder), desc)


def open_probe(
    encoder: Encoder,
    train_dir: str | Path,
    val_dir: str | Path,
    img_size: int | None,
    crop_pct: float,
    pool: str,
    cache_dir: str | Path | None,
    source: str,
    device: torch.device | str,
    batch_size: int,
    num_workers: int,
    progress: bool,
) -> tuple[ImageFolder, ImageFolder, FeatureCache]:
    """What every image probe starts from: the training and validation folders under the
    evaluation transform at ``img_size`` (default: the encoder's; a multiple of its patch
    size), and the cache of their features in ``cache_dir`` (None: kept nowhere), the encoder
    moved to ``device``."""
    img_size = img_size or encoder.img_size
    if img_size % encoder.patch_size:
        raise SiamaeError(
            f"image size {img_size} is not a multiple of the patch size {encoder.patch_size}"
        )
    transform = EvalTransform(img_size, crop_pct)
    train_set = ImageFolder(train_dir, transform)
    val_set = validation_folder(val_dir, transform, train_set.classes)
    cache = FeatureCache(
        encoder.to(device),
        Path(cache_dir) if cache_dir is not None else None,
        source,
        pool,
        img_size,
        crop_pct,
        device,
        batch_size,
        num_workers,
        progress,
    )
    return train_set, val_set, cache
