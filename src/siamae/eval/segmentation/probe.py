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
from siamae.models.vit import Encoder
from siamae.optim import lr_at
from siamae.segmentation_scores import InferenceConfig, evaluate_segmentation

PROBE_FORMAT = "siamae-segprobe-v1"

# -- the frozen linear probe ------------------------------------------------------------------


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
    return torch.cat(maps, dim=1)


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
) -> dict[str, Any]:
    """Train the head on frozen features of random crops, then score it on all of ``val_set``.

    Every crop is drawn from (seed, epoch, index); the head, its optimizer and the iteration are
    saved every ``checkpoint_every`` iterations to OUT/probe.pt, and a run started again resumes
    from there (the same crops follow)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if train_set.num_classes != val_set.num_classes:
        raise DataError(
            f"the training split has {train_set.num_classes} classes, the validation split "
            f"{val_set.num_classes}"
        )
    probe = _ProbeRun.build(encoder, train_set, cfg, device, out / "probe.pt", source)
    if resume and probe.ckpt.is_file():
        probe.resume()
    start = time.perf_counter()
    losses, skipped = probe.train(device, progress)
    train_seconds = time.perf_counter() - start
    probe.head.eval()
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
            "encoder": source,
            "probe": _plain(asdict(cfg)),
            "train_iters": probe.step,
            "final_train_loss": float(np.mean(losses[-20:])) if losses else None,
            "train_seconds": round(train_seconds, 1),
            "train_skipped": sorted(skipped),
            "train_unpaired": list(train_set.unpaired),  # as the val split's "unpaired"
        },
    )


@dataclass
class _ProbeRun:
    """A linear probe in training: the frozen encoder, the head and its optimizer, the seeded
    crops, the iteration reached and the checkpoint file."""

    encoder: Encoder
    cfg: ProbeConfig
    head: LinearSegHead
    optimizer: torch.optim.Optimizer
    sampler: EpochSampler
    loader: DataLoader
    ckpt: Path
    source: str
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
    ) -> _ProbeRun:
        encoder = encoder.to(device).eval()
        encoder.requires_grad_(False)
        torch.manual_seed(cfg.seed)  # the head's initial weights
        head = LinearSegHead(cfg.layers * encoder.embed_dim, train_set.num_classes).to(device)
        optimizer = torch.optim.AdamW(
            head.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay
        )
        views = SegmentationViews(cfg.crop, cfg.scale, cfg.ratio_range, photometric=cfg.photometric)
        dataset = PretrainDataset(train_set, views, encoder.num_patches, cfg.seed)
        sampler = EpochSampler(len(dataset), cfg.batch_size, seed=cfg.seed)
        loader = build_loader(dataset, sampler, cfg.num_workers)
        loader.generator = torch.Generator()
        return cls(encoder, cfg, head, optimizer, sampler, loader, ckpt, source)

    def resume(self) -> None:
        state = load_checkpoint(self.ckpt)  # a file in --out: anything may be there
        if state.get("format") != PROBE_FORMAT:
            raise CheckpointError(
                f"{str(self.ckpt)!r} is not a segmentation probe checkpoint; pass another --out, "
                "or --no-resume to train the probe again over it"
            )
        if state.get("config") != _plain(asdict(self.cfg)):
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
            "config": _plain(asdict(self.cfg)),
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
            epoch = self.step // self.sampler.batches_per_epoch
            self.sampler.set_epoch(epoch, self.step % self.sampler.batches_per_epoch)
            for batch in self.loader:
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
        images = normalize(batch["images"][:, 0], device)
        labels = batch["label"].to(device)
        with torch.no_grad():
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
