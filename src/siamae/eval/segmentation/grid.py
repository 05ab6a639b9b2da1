"""A grid of segmentation probes trained in one pass (``siamae eval segment --protocol cached
--grid``): every combination of a learning rate and the last 1 or 4 blocks is a BatchNorm + 1x1
head (:class:`~siamae.eval.segmentation.probe.LinearSegHead`), all trained on the same batches
of the same cached features with the probe's AdamW and poly schedule (only the rate differs),
then all scored on the validation split in one pass of the encoder; the summary lists every
head's mIoU and names the best.

Each head starts from the seed's initial weights, as the single probe does, and takes the step
it would take alone (its own AdamW parameter group, its loss's gradient alone), so the head at
``--lr`` on the last block is the single cached probe's run. What the heads share: the feature
batch (read once), one bilinear upsampling and one cross-entropy over all their logits, one
backward; the heads' 1x1 convolutions are a few thousand weights each. A grid with 4-block heads
caches the last 4 blocks' features; its 1-block heads read the last block's channels of them.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from siamae.data.segmentation import IGNORE_INDEX, SegmentationSet
from siamae.data.sources import UnreadableSample
from siamae.eval.segmentation.features import probe_features
from siamae.eval.segmentation.probe import (
    PROTOCOLS,
    LinearSegHead,
    ProbeConfig,
    _cached_training_features,
    _plain,
    _ProbeRun,
)
from siamae.models.vit import Encoder
from siamae.optim import lr_at
from siamae.segmentation_scores import (
    SUMMARY_FORMAT,
    InferenceConfig,
    confusion_matrix,
    predict,
    segmentation_scores,
)

# AdamW rates around DINOv2's 1e-3 (the probe's default --lr), a half decade apart.
SEG_GRID_LRS: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
SEG_GRID_LAYERS = (1, 4)
# Logits upsampled at once (B x heads x classes x crop^2 floats): more heads are taken in turn.
# 4M floats: a few heads at 224 px, one at 512; larger chunks were 20-30 % slower on a CPU
# (the upsampled logits, their gradient and the loss's buffers then leave the cache).
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class SegHeadSpec:
    """One head of the grid: its AdamW peak rate and the blocks whose patch tokens it reads."""

    lr: float
    layers: int

    def name(self) -> str:
        return (
            f"lr {self.lr:g}, {'last block' if self.layers == 1 else f'last {self.layers} blocks'}"
        )


def seg_grid_specs(
    lrs: tuple[float, ...] = SEG_GRID_LRS, layers: tuple[int, ...] = (1,)
) -> list[SegHeadSpec]:
    return [SegHeadSpec(lr, n) for n in layers for lr in lrs]


class SegHeadGrid(nn.Module):
    """The heads of a grid; ``forward`` gives (B, H x C, g, g): head i's C logits at i x C."""

    def __init__(self, specs: list[SegHeadSpec], dim: int, num_classes: int, seed: int) -> None:
        super().__init__()
        self.specs, self.dim, self.num_classes = specs, dim, num_classes
        heads = []
        for spec in specs:
            torch.manual_seed(seed)  # the single probe's initial weights
            heads.append(LinearSegHead(spec.layers * dim, num_classes))
        self.heads = nn.ModuleList(heads)

    def head_logits(self, features: torch.Tensor, members: range) -> torch.Tensor:
        """(B, len(members) x C, g, g) logits of heads ``members``; features (B, L x D, g, g)
        with L the grid's most blocks (a head of fewer reads the last ones' channels)."""
        outs = []
        for i in members:
            width = self.specs[i].layers * self.dim
            x = features if width == features.shape[1] else features[:, -width:].contiguous()
            outs.append(self.heads[i](x))
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head_logits(features, range(len(self.specs)))


@dataclass
class _GridRun(_ProbeRun):
    """A grid of probes in training: :class:`_ProbeRun`'s loop, checkpoint (OUT/grid.pt) and
    resume, with every head stepped on each batch."""

    specs: list[SegHeadSpec] = field(default_factory=list)

    @classmethod
    def build_grid(
        cls,
        encoder: Encoder,
        train_set: SegmentationSet,
        cfg: ProbeConfig,
        specs: list[SegHeadSpec],
        device: torch.device,
        ckpt: Path,
        source: str,
        cached: Any,
    ) -> _GridRun:
        encoder = encoder.to(device).eval()
        encoder.requires_grad_(False)
        heads = SegHeadGrid(specs, encoder.embed_dim, train_set.num_classes, cfg.seed).to(device)
        # one parameter group per head: each its own rate, AdamW's step per parameter as alone
        optimizer = torch.optim.AdamW(
            [{"params": h.parameters(), "lr": s.lr} for h, s in zip(heads.heads, specs)],
            lr=cfg.lr,
            betas=(0.9, 0.999),
            weight_decay=cfg.weight_decay,
        )
        return cls(encoder, cfg, heads, optimizer, None, None, ckpt, source, cached, specs=specs)  # type: ignore[arg-type]

    def settings(self) -> dict[str, Any]:
        return super().settings() | {"grid": [[s.lr, s.layers] for s in self.specs]}

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, heads x C, h, w) logits of every head at the images' size."""
        logits = self.head(probe_features(self.encoder, images, self.cfg.layers))
        b, heads = logits.shape[0], len(self.specs)
        logits = F.interpolate(
            logits.view(b * heads, -1, *logits.shape[-2:]),  # per head, as the single probe's
            size=images.shape[-2:],
            mode="bilinear",
            align_corners=False,
        )
        return logits.view(b, -1, *logits.shape[-2:])

    def _step(self, batch: dict[str, Any], device: torch.device) -> float:
        """One AdamW step of every head on the batch; the mean of the heads' losses."""
        cfg = self.cfg
        labels = batch["label"].to(device)
        features = batch["features"].to(device)
        for group, spec in zip(self.optimizer.param_groups, self.specs):
            group["lr"] = lr_at(self.step, spec.lr, 0.0, cfg.warmup_iters, cfg.iters, "poly")
        self.optimizer.zero_grad(set_to_none=True)
        # each head's mean loss over the labelled pixels (as the single probe's), summed
        labelled = (labels != IGNORE_INDEX).sum().clamp(min=1)
        c, total = self.head.num_classes, 0.0  # type: ignore[union-attr]
        per_chunk = max(1, CHUNK_ELEMENTS // max(1, labels.numel() * c))
        for lo in range(0, len(self.specs), per_chunk):
            members = range(lo, min(lo + per_chunk, len(self.specs)))
            logits = self.head.head_logits(features, members)  # type: ignore[operator]
            # the heads as batch items, (B x h, C, g, g): the upsampling and the loss then see
            # the single probe's shapes per item (more channels at once round differently)
            logits = logits.view(-1, c, *logits.shape[-2:])
            logits = F.interpolate(
                logits, size=labels.shape[-2:], mode="bilinear", align_corners=False
            )
            target = labels[:, None].expand(-1, len(members), -1, -1).flatten(0, 1)
            loss = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
            loss = loss / labelled
            loss.backward()
            total += loss.item()
        self.optimizer.step()
        self.step += 1
        return total / len(self.specs)


def train_probe_grid(
    encoder: Encoder,
    train_set: SegmentationSet,
    val_set: SegmentationSet,
    out_dir: str | Path,
    cfg: ProbeConfig,
    specs: list[SegHeadSpec],
    inference: InferenceConfig,
    device: torch.device,
    resume: bool = True,
    progress: bool = True,
    source: str = "",
    feature_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Train every head of ``specs`` on the cached features of ``train_set`` (``cfg.layers``:
    the most blocks any head reads), then score them all on ``val_set``; OUT/summary.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cached = _cached_training_features(
        encoder, train_set, cfg, device, Path(feature_cache or out / "features"), progress
    )
    feature_seconds = time.perf_counter() - start
    run = _GridRun.build_grid(
        encoder, train_set, cfg, specs, device, out / "grid.pt", source, cached
    )
    if resume and run.ckpt.is_file():
        run.resume()
    start = time.perf_counter()
    losses, _ = run.train(device, progress)
    train_seconds = time.perf_counter() - start
    run.head.eval()
    extra = {
        "protocol": "linear probe grid (frozen encoder, BatchNorm + 1x1 conv per head)",
        "probe_protocol": cfg.protocol,
        "probe_protocol_summary": PROTOCOLS[cfg.protocol],
        "encoder": source,
        "probe": _plain(asdict(cfg)),
        "train_iters": run.step,
        "final_train_loss": float(np.mean(losses[-20:])) if losses else None,
        "train_seconds": round(train_seconds, 1),
        "feature_cache": str(cached.folder),
        "cached_views": int(len(cached.valid)),
        "feature_seconds": round(feature_seconds, 1),
        "features_reused": not cached.computed,
        "train_skipped": sorted(line.split("\t")[0] for line in cached.skipped),
        "train_unpaired": list(train_set.unpaired),
    }
    return evaluate_grid(run, val_set, device, inference, out, extra, progress)


@torch.no_grad()
def evaluate_grid(
    run: _GridRun,
    dataset: SegmentationSet,
    device: torch.device,
    inference: InferenceConfig,
    out: Path,
    extra: dict[str, Any],
    progress: bool = False,
) -> dict[str, Any]:
    """Every head's scores on the whole of ``dataset``, one encoder pass per image for all;
    OUT/summary.json: the best head's scores at the top, every head under ``heads``."""
    heads, c = len(run.specs), dataset.num_classes
    matrices = torch.zeros((heads, c, c), dtype=torch.int64, device=device)
    skipped: list[str] = []
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(dataset), desc="segmentation eval", unit="image")
    for i in range(len(dataset)):
        try:
            image, label = dataset.read(i)
        except UnreadableSample as bad:
            skipped.append(f"{bad.name}\t{bad.reason}")
            continue
        scores = predict(
            run.logits, image, heads * c, inference, device, run.encoder.patch_size, heads
        )
        # every head's class: max's indices are argmax's (the first of equal maxima), about
        # 10x faster than argmax over a leading dimension on a CPU
        preds = scores.unflatten(0, (heads, c)).max(1).indices
        target = torch.from_numpy(label).to(device)
        for h in range(heads):
            matrices[h] += confusion_matrix(preds[h], target, c)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    scores_of = [segmentation_scores(m, dataset.class_names) for m in matrices]
    rows = [
        {"name": s.name(), "lr": s.lr, "layers": s.layers}
        | {k: scores_of[h][k] for k in ("mIoU", "mAcc", "aAcc")}
        for h, s in enumerate(run.specs)
    ]
    # the first of equals; a head with no score (no class anywhere) last
    best = max(
        range(heads), key=lambda h: -math.inf if math.isnan(rows[h]["mIoU"]) else rows[h]["mIoU"]
    )
    summary = {
        "format": SUMMARY_FORMAT,
        "mIoU": rows[best]["mIoU"],
        "mAcc": rows[best]["mAcc"],
        "aAcc": rows[best]["aAcc"],
        "best_head": rows[best],
        "heads": rows,
        "num_images": len(dataset) - len(skipped),
        "num_classes": c,
        "layout": dataset.layout,
        "split": dataset.split,
        "data": str(dataset.root),
        "skipped": skipped,
        "unpaired": list(dataset.unpaired),
        "inference": _plain(asdict(inference)),
        "seconds": round(time.perf_counter() - start, 2),
        **extra,
        "per_class": scores_of[best]["per_class"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
