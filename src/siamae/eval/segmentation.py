"""Semantic segmentation: mIoU as the field computes it, sliding-window inference, the whole
evaluation of a model on a data set (scores, predicted PNGs, pictures), and the frozen linear
probe (``siamae eval segment``).

Scores (mmsegmentation's ``IoUMetric``): a confusion matrix of (ground truth, prediction) pixel
counts accumulated over the whole validation set, ignored pixels left out; per class
IoU = TP / (TP + FP + FN) and Acc = TP / (TP + FN); mIoU is the mean IoU over the classes with
a non-empty union (a class that is neither labelled nor predicted anywhere is left out; one that
is predicted but never labelled counts with IoU 0), mAcc the mean Acc over labelled classes,
aAcc the share of labelled pixels predicted right. All three in percent.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from siamae.data.dataset import EpochSampler, PretrainDataset, build_loader
from siamae.data.image_folder import normalize
from siamae.data.segmentation import (
    IGNORE_INDEX,
    SegmentationSet,
    SegmentationViews,
    rescale_size,
    resize_pair,
)
from siamae.data.sources import UnreadableSample
from siamae.errors import CheckpointError, DataError
from siamae.eval.propagation.overlays import PALETTE, save_labelled_grid
from siamae.models.vit import Encoder
from siamae.optim import lr_at

SUMMARY_FORMAT = "siamae-segmentation-v1"
PROBE_FORMAT = "siamae-segprobe-v1"

# -- scores ------------------------------------------------------------------------------------


def confusion_matrix(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """(C, C) int64 counts, rows the ground truth, columns the prediction; ignored pixels left
    out. ``pred`` and ``label`` are integer tensors of one shape."""
    valid = label != ignore_index
    index = label[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def segmentation_scores(matrix: np.ndarray | torch.Tensor, class_names: Sequence[str]) -> dict:
    """mIoU, mAcc, aAcc (percent) and the per-class table of a confusion matrix."""
    m = np.asarray(matrix.cpu() if torch.is_tensor(matrix) else matrix, dtype=np.float64)
    tp = np.diag(m)
    labelled = m.sum(axis=1)
    predicted = m.sum(axis=0)
    union = labelled + predicted - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(labelled > 0, tp / labelled, np.nan)
    total = labelled.sum()
    per_class = [
        {
            "class": str(name),
            "IoU": _nan_to_none(100 * float(iou[c])),
            "Acc": _nan_to_none(100 * float(acc[c])),
            "gt_pixels": int(labelled[c]),
            "pred_pixels": int(predicted[c]),
        }
        for c, name in enumerate(class_names)
    ]
    return {
        "mIoU": 100 * float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        "mAcc": 100 * float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
        "aAcc": 100 * float(tp.sum() / total) if total > 0 else float("nan"),
        "per_class": per_class,
    }


# -- inference ------------------------------------------------------------------------------------

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, h, w) -> (B, C, h, w)


def _padded(model_fn: LogitsFn, images: torch.Tensor, multiple: int) -> torch.Tensor:
    """``model_fn`` on images zero-padded (bottom/right) to a multiple of the patch size, its
    logits cut back to the input size."""
    h, w = images.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        images = F.pad(images, (0, pw, 0, ph))
    return model_fn(images)[..., :h, :w]


def slide_logits(
    model_fn: LogitsFn,
    images: torch.Tensor,
    num_classes: int,
    crop: int,
    stride: int,
    multiple: int = 16,
) -> torch.Tensor:
    """Sliding-window logits (mmseg's ``slide`` mode): ``crop`` windows every ``stride`` pixels,
    the last one flush with the border, overlapping logits averaged."""
    b, _, h, w = images.shape
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    out = images.new_zeros((b, num_classes, h, w))
    count = images.new_zeros((1, 1, h, w))
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            out[:, :, y1:y2, x1:x2] += _padded(model_fn, images[:, :, y1:y2, x1:x2], multiple)
            count[:, :, y1:y2, x1:x2] += 1
    return out / count


@dataclass
class InferenceConfig:
    """How a model segments one image: keep-ratio resize into ``scale`` (long, short), then
    ``slide`` windows (``crop``, ``stride``) or the ``whole`` image, logits resized to the label
    size. ``ratios``/``flip``: multi-scale (and flipped) test, softmax scores averaged."""

    scale: tuple[int, int] = (2048, 512)
    mode: str = "slide"
    crop: int = 512
    stride: int = 341
    ratios: tuple[float, ...] = (1.0,)
    flip: bool = False


def predict(
    model_fn: LogitsFn,
    image: np.ndarray,
    num_classes: int,
    cfg: InferenceConfig,
    device: torch.device,
    multiple: int,
) -> torch.Tensor:
    """(H, W, 3) uint8 -> (C, H, W) scores at the image's own size (logits for one scale
    without flip, else the mean softmax)."""
    h, w = image.shape[:2]
    outs = []
    for ratio in cfg.ratios:
        bounds = (int(cfg.scale[0] * ratio), int(cfg.scale[1] * ratio))
        resized, _ = resize_pair(image, None, rescale_size(h, w, bounds))
        x = normalize(torch.from_numpy(np.array(resized)).permute(2, 0, 1)[None], device)
        for flipped in (False, True) if cfg.flip else (False,):
            xi = x.flip(-1) if flipped else x
            if cfg.mode == "slide":
                logits = slide_logits(model_fn, xi, num_classes, cfg.crop, cfg.stride, multiple)
            else:
                logits = _padded(model_fn, xi, multiple)
            logits = logits.flip(-1) if flipped else logits
            logits = F.interpolate(
                logits.float(), size=(h, w), mode="bilinear", align_corners=False
            )
            outs.append(logits[0])
    if len(outs) == 1:
        return outs[0]
    return torch.stack([o.softmax(0) for o in outs]).mean(0)


def _colour(ids: np.ndarray) -> np.ndarray:
    out = PALETTE[np.where(ids == IGNORE_INDEX, 0, ids) % 255].copy()
    out[ids == IGNORE_INDEX] = 255  # ignored pixels white
    return out


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def evaluate_segmentation(
    model_fn: LogitsFn,
    dataset: SegmentationSet,
    device: torch.device,
    inference: InferenceConfig,
    multiple: int,
    out_dir: str | Path | None = None,
    pictures: int = 4,
    title: str = "",
    extra: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Scores of ``model_fn`` on the whole of ``dataset`` (each process its every world-th
    image, the confusion matrices summed). With ``out_dir``: ``pred/<stem>.png`` for every
    image (the dataset's label space), ``pictures.png`` (image, ground truth, prediction of the
    first ``pictures`` images) and ``summary.json`` (rank 0)."""
    rank, world = _world()
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        (out / "pred").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    scored = _score_images(
        model_fn, dataset, device, inference, multiple, out, pictures, progress and rank == 0
    )
    if world > 1:
        dist.all_reduce(scored.matrix)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, scored.skipped)
        scored.skipped = [s for part in gathered for s in part]
    result = segmentation_scores(scored.matrix, dataset.class_names)
    summary = {
        "format": SUMMARY_FORMAT,
        "mIoU": result["mIoU"],
        "mAcc": result["mAcc"],
        "aAcc": result["aAcc"],
        "num_images": len(dataset) - len(scored.skipped),
        "num_classes": dataset.num_classes,
        "layout": dataset.layout,
        "split": dataset.split,
        "data": str(dataset.root),
        "skipped": scored.skipped,
        "unpaired": list(dataset.unpaired),
        "inference": asdict(inference),
        "seconds": round(time.perf_counter() - start, 2),
        **(extra or {}),
        "per_class": result["per_class"],
    }
    if out is not None and rank == 0:
        if scored.rows:
            save_labelled_grid(
                out / "pictures.png",
                scored.rows,
                scored.stems,
                ["image", "ground truth", "prediction"],
                title=f"{title} mIoU {summary['mIoU']:.1f}".strip(),
            )
            summary["pictures"] = str(out / "pictures.png")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@dataclass
class _Scored:
    """What one process's share of the images gave: the confusion matrix, the unreadable
    files, and the first images' picture rows (image, ground truth, prediction) and stems."""

    matrix: torch.Tensor
    skipped: list[str] = field(default_factory=list)
    rows: list[list[np.ndarray]] = field(default_factory=list)
    stems: list[str] = field(default_factory=list)


def _score_images(
    model_fn: LogitsFn,
    dataset: SegmentationSet,
    device: torch.device,
    inference: InferenceConfig,
    multiple: int,
    out: Path | None,
    pictures: int,
    progress: bool,
) -> _Scored:
    """This process's every world-th image predicted and scored; with ``out``, its predicted
    PNG written (and, on rank 0, the first ``pictures`` kept for the picture)."""
    rank, world = _world()
    c = dataset.num_classes
    scored = _Scored(torch.zeros((c, c), dtype=torch.int64, device=device))
    indices = range(rank, len(dataset), world)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(indices), desc="segmentation eval", unit="image")
    for i in indices:
        try:
            image, label = dataset.read(i)
        except UnreadableSample as bad:
            scored.skipped.append(f"{bad.name}\t{bad.reason}")
            continue
        pred = predict(model_fn, image, c, inference, device, multiple).argmax(0)
        scored.matrix += confusion_matrix(pred, torch.from_numpy(label).to(device), c)
        if out is not None:
            pred_np = pred.to(torch.uint8).cpu().numpy()
            Image.fromarray(dataset.to_dataset_labels(pred_np, label)).save(
                out / "pred" / f"{dataset.pairs[i].stem}.png"
            )
            if rank == 0 and len(scored.rows) < pictures:
                truth = _colour(label)
                shown = _colour(np.where(label == IGNORE_INDEX, 255, pred_np))
                scored.rows.append([image, truth, shown])
                scored.stems.append(dataset.pairs[i].stem)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return scored


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
        state = torch.load(self.ckpt, map_location="cpu", weights_only=True)
        if state.get("format") != PROBE_FORMAT or state.get("config") != _plain(asdict(self.cfg)):
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
