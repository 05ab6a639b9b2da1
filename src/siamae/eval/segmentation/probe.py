"""The frozen linear segmentation probe (``siamae eval segment``): a BatchNorm + 1x1 convolution
head trained on a frozen encoder's patch tokens (DINOv2's linear protocol), then scored on the
whole validation split by :func:`siamae.segmentation_scores.evaluate_segmentation`, the
scores the fine-tuning task reports too (mIoU, mAcc, aAcc as mmsegmentation computes them).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from siamae.checkpoint import load_checkpoint
from siamae.data.dataset import EpochSampler, PretrainDataset, build_loader
from siamae.data.image_folder import normalize
from siamae.data.segmentation import IGNORE_INDEX, SegmentationSet, SegmentationViews
from siamae.errors import CheckpointError, DataError
from siamae.eval.segmentation.features import (
    CachedFeatures,
    CachedViews,
    cache_key,
    cached_features,
    probe_features,
)
from siamae.models.vit import Encoder
from siamae.optim import lr_at
from siamae.segmentation_scores import InferenceConfig, evaluate_segmentation

PROBE_FORMAT = "siamae-segprobe-v1"
CACHED_VIEWS = {
    "crops": "--copies augmented crops per image, drawn as the dinov2 protocol draws its epochs' "
    "crops; epoch e reads copy e mod --copies in that protocol's order",
    "windows": "each training image's windows at the inference geometry, plus --copies - 1 "
    "augmented crops, every epoch reads them all",
}
# --copies when not given: 4 crops matched the dinov2 protocol's mIoU in docs/segmentation.md
DEFAULT_COPIES = {"crops": 4, "windows": 1}
PROTOCOLS = {
    "dinov2": "DINOv2's: the frozen encoder runs on fresh augmented crops every iteration",
    "cached": "the frozen encoder's features of a fixed set of views of each training image "
    "computed once (--copies of the dinov2 protocol's own augmented crops; --cached-views "
    "windows: the image's windows at the protocol's size), the head trained on them",
}

# -- the frozen linear probe ------------------------------------------------------------------


class LinearSegHead(nn.Module):
    """BatchNorm2d + 1x1 convolution: DINOv2's linear segmentation head."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.bn(features))


@dataclass
class ProbeConfig:
    """The linear probe's recipe (DINOv2's linear ADE20K setting: AdamW lr 1e-3, wd 1e-4,
    batch 16, 40k iterations, 1,500 warm-up iterations then poly decay, 512 crops)."""

    layers: int = 1
    iters: int = 40000
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_iters: int = 1500
    crop: int = 512
    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    photometric: bool = True
    seed: int = 0
    num_workers: int = 2
    checkpoint_every: int = 1000
    protocol: str = "dinov2"  # or "cached" (see PROTOCOLS)
    cached_views: str = "crops"  # cached: or "windows" (see CACHED_VIEWS)
    copies: int = 4  # cached: crops per image (windows: 1, the windows of the image alone)


def train_linear_probe(
    encoder: Encoder,
    train_set: SegmentationSet,
    val_set: SegmentationSet,
    out_dir: str | Path,
    cfg: ProbeConfig,
    inference: InferenceConfig,
    device: torch.device,
    resume: bool = True,
    progress: bool = True,
    source: str = "",
    pictures: int = 4,
    feature_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Train the head on frozen features, then score it on all of ``val_set``.

    ``cfg.protocol`` "dinov2": features of random crops, each drawn from (seed, epoch, index).
    "cached": features of each training image computed once and kept in ``feature_cache``
    (default OUT/features; see :mod:`siamae.eval.segmentation.features`). Either way the head,
    its optimizer and the iteration are saved every ``checkpoint_every`` iterations to
    OUT/probe.pt, and a run started again resumes from there (the same batches follow)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if train_set.num_classes != val_set.num_classes:
        raise DataError(
            f"the training split has {train_set.num_classes} classes, the validation split "
            f"{val_set.num_classes}"
        )
    start = time.perf_counter()
    cached = None
    if cfg.protocol == "cached":
        cached = _cached_training_features(
            encoder, train_set, cfg, device, Path(feature_cache or out / "features"), progress
        )
    feature_seconds = time.perf_counter() - start
    probe = _ProbeRun.build(encoder, train_set, cfg, device, out / "probe.pt", source, cached)
    if resume and probe.ckpt.is_file():
        probe.resume()
    start = time.perf_counter()
    losses, skipped = probe.train(device, progress)
    train_seconds = time.perf_counter() - start
    probe.head.eval()
    extra: dict[str, Any] = {}
    if cached is not None:
        skipped |= {line.split("\t")[0] for line in cached.skipped}
        extra = {
            "feature_cache": str(cached.folder),
            "cached_views": int(len(cached.valid)),
            "feature_seconds": round(feature_seconds, 1),
            "features_reused": not cached.computed,
        }
    return evaluate_segmentation(
        probe.logits,
        val_set,
        device,
        inference,
        encoder.patch_size,
        out_dir=out,
        pictures=pictures,
        title=f"linear probe ({'last block' if cfg.layers == 1 else f'last {cfg.layers} blocks'})",
        extra={
            "protocol": "linear probe (frozen encoder, BatchNorm + 1x1 conv)",
            "probe_protocol": cfg.protocol,
            "probe_protocol_summary": PROTOCOLS[cfg.protocol],
            "encoder": source,
            "probe": _plain(asdict(cfg)),
            "train_iters": probe.step,
            "final_train_loss": float(np.mean(losses[-20:])) if losses else None,
            "train_seconds": round(train_seconds, 1),
            **extra,
            "train_skipped": sorted(skipped),
            "train_unpaired": list(train_set.unpaired),  # as the val split's "unpaired"
        },
    )


def cached_views(train_set: SegmentationSet, cfg: ProbeConfig) -> CachedViews:
    """The training views the cached protocol encodes once (see CachedViews)."""
    return CachedViews(
        train_set,
        cfg.crop,
        cfg.scale,
        cfg.copies,
        cfg.seed,
        cfg.ratio_range,
        cfg.photometric,
        crops=cfg.cached_views == "crops",
    )


def _cached_training_features(
    encoder: Encoder,
    train_set: SegmentationSet,
    cfg: ProbeConfig,
    device: torch.device,
    directory: Path,
    progress: bool,
) -> CachedFeatures:
    views = cached_views(train_set, cfg)
    # Augmented copies depend on how they are drawn; the windows alone do not.
    drawn: dict[str, Any] = {}
    if cfg.copies > 1 or views.crops:
        drawn = {"seed": cfg.seed, "ratio_range": list(cfg.ratio_range)}
        drawn["photometric"] = cfg.photometric
    key = cache_key(encoder, views, cfg.layers, cfg.copies, drawn)
    found = cached_features(
        encoder,
        views,
        cfg.layers,
        directory,
        key,
        device,
        cfg.batch_size,
        cfg.num_workers,
        progress,
    )
    if len(found.valid) < 2:
        raise DataError(
            f"the training split has {len(found.valid)} readable views; the probe needs 2 or more"
        )
    return found


@dataclass
class _ProbeRun:
    """A linear probe in training: the frozen encoder, the head and its optimizer, where its
    batches come from (seeded crops, or cached features), the iteration reached and the
    checkpoint file."""

    encoder: Encoder
    cfg: ProbeConfig
    head: LinearSegHead
    optimizer: torch.optim.Optimizer
    sampler: EpochSampler | None
    loader: DataLoader | None
    ckpt: Path
    source: str
    cached: CachedFeatures | None = None
    step: int = 0

    @classmethod
    def build(
        cls,
        encoder: Encoder,
        train_set: SegmentationSet,
        cfg: ProbeConfig,
        device: torch.device,
        ckpt: Path,
        source: str,
        cached: CachedFeatures | None = None,
    ) -> _ProbeRun:
        encoder = encoder.to(device).eval()
        encoder.requires_grad_(False)
        torch.manual_seed(cfg.seed)  # the head's initial weights
        head = LinearSegHead(cfg.layers * encoder.embed_dim, train_set.num_classes).to(device)
        optimizer = torch.optim.AdamW(
            head.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay
        )
        if cached is not None:
            return cls(encoder, cfg, head, optimizer, None, None, ckpt, source, cached)
        views = SegmentationViews(cfg.crop, cfg.scale, cfg.ratio_range, photometric=cfg.photometric)
        dataset = PretrainDataset(train_set, views, encoder.num_patches, cfg.seed)
        sampler = EpochSampler(len(dataset), cfg.batch_size, seed=cfg.seed)
        loader = build_loader(dataset, sampler, cfg.num_workers)
        loader.generator = torch.Generator()
        return cls(encoder, cfg, head, optimizer, sampler, loader, ckpt, source)

    @property
    def batches_per_epoch(self) -> int:
        if self.cached is not None:
            return self.cached.batches_per_epoch(self.cfg.batch_size)
        assert self.sampler is not None
        return self.sampler.batches_per_epoch

    def epoch_batches(self, epoch: int, skip: int) -> Any:
        """The batches of ``epoch`` from its batch ``skip`` on."""
        if self.cached is not None:
            return self.cached.batches(self.cfg.batch_size, self.cfg.seed, epoch, skip)
        assert self.sampler is not None
        self.sampler.set_epoch(epoch, skip)
        return self.loader

    def settings(self) -> dict[str, Any]:
        """What a checkpoint must have been trained with to be resumed."""
        return _plain(asdict(self.cfg))

    def resume(self) -> None:
        state = load_checkpoint(self.ckpt)  # a file in --out: anything may be there
        if state.get("format") != PROBE_FORMAT:
            raise CheckpointError(
                f"{str(self.ckpt)!r} is not a segmentation probe checkpoint; pass another --out, "
                "or --no-resume to train the probe again over it"
            )
        if state.get("config") != self.settings():
            raise CheckpointError(
                f"{self.ckpt} was made with other probe settings; pass another --out or --no-resume"
            )
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"])

    def save(self) -> None:
        payload = {
            "format": PROBE_FORMAT,
            "config": self.settings(),
            "encoder": self.source,
            "head": self.head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "rng": torch.get_rng_state(),
        }
        tmp = self.ckpt.with_name(f".{self.ckpt.name}.tmp")
        torch.save(payload, tmp)
        tmp.replace(self.ckpt)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) logits at the images' size."""
        logits = self.head(probe_features(self.encoder, images, self.cfg.layers))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def train(self, device: torch.device, progress: bool) -> tuple[list[float], set[str]]:
        """Iterate to ``cfg.iters``, saving every ``checkpoint_every``: the losses, and the
        files skipped as unreadable."""
        cfg = self.cfg
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.iters, initial=self.step, desc="linear probe", unit="iter")
        losses: list[float] = []
        skipped: set[str] = set()
        self.head.train()
        while self.step < cfg.iters:
            epoch, skip = divmod(self.step, self.batches_per_epoch)
            for batch in self.epoch_batches(epoch, skip):
                skipped.update(batch["skipped_files"])
                losses.append(self._step(batch, device))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.iters:
                    self.save()
                if self.step >= cfg.iters:
                    break
        if bar is not None:
            bar.close()
        return losses, skipped

    def _step(self, batch: dict[str, Any], device: torch.device) -> float:
        cfg = self.cfg
        labels = batch["label"].to(device)
        if "features" in batch:
            features = batch["features"].to(device)
        else:
            with torch.no_grad():
                images = normalize(batch["images"][:, 0], device)
                features = probe_features(self.encoder, images, cfg.layers)
        logits = F.interpolate(
            self.head(features), size=labels.shape[-2:], mode="bilinear", align_corners=False
        )
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg.lr, 0.0, cfg.warmup_iters, cfg.iters, "poly")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return loss.item()


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
