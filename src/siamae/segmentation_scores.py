"""Semantic segmentation scored: mIoU as the field computes it, sliding-window inference, and
the whole evaluation of a model on a data set (scores, predicted PNGs, pictures). The
fine-tuning task (:mod:`siamae.finetune.segmentation`) scores with it at every validation;
``siamae eval segment`` (:mod:`siamae.eval.segmentation`: the frozen linear probe, or a
fine-tuned model read back) scores with the same code.

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

from siamae.data.image_folder import normalize
from siamae.data.segmentation import IGNORE_INDEX, SegmentationSet, rescale_size, resize_pair
from siamae.data.sources import UnreadableSample
from siamae.overlays import PALETTE, save_labelled_grid
from siamae.world import rank_and_world_size

SUMMARY_FORMAT = "siamae-segmentation-v1"

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
    heads: int = 1,
) -> torch.Tensor:
    """(H, W, 3) uint8 -> (C, H, W) scores at the image's own size (logits for one scale
    without flip, else the mean softmax). ``heads`` > 1: the C channels are that many heads'
    logits one after the other (a grid of probes), each softmax over its own classes."""
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
            # one head per batch item: each resized as a single head's logits are
            logits = F.interpolate(
                logits.float().view(heads, -1, *logits.shape[-2:]),
                size=(h, w),
                mode="bilinear",
                align_corners=False,
            )
            outs.append(logits.flatten(0, 1))
    if len(outs) == 1:
        return outs[0]
    if heads > 1:
        return (
            torch.stack([o.unflatten(0, (heads, -1)).softmax(1) for o in outs])
            .mean(0)
            .flatten(0, 1)
        )
    return torch.stack([o.softmax(0) for o in outs]).mean(0)


def _colour(ids: np.ndarray) -> np.ndarray:
    out = PALETTE[np.where(ids == IGNORE_INDEX, 0, ids) % 255].copy()
    out[ids == IGNORE_INDEX] = 255  # ignored pixels white
    return out


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
    rank, world = rank_and_world_size()
    c = dataset.num_classes
    matrix = torch.zeros((c, c), dtype=torch.int64, device=device)
    skipped: list[str] = []
    rows: list[list[np.ndarray]] = []
    stems: list[str] = []
    shown: set[int] = set()  # the classes the pictured rows hold: the picture's legend
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        (out / "pred").mkdir(parents=True, exist_ok=True)
    indices = range(rank, len(dataset), world)
    start = time.perf_counter()
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(indices), desc="segmentation eval", unit="image")
    for i in indices:
        try:
            image, label = dataset.read(i)
        except UnreadableSample as bad:
            skipped.append(f"{bad.name}\t{bad.reason}")
            continue
        scores = predict(model_fn, image, c, inference, device, multiple)
        pred = scores.max(0).indices  # argmax's indices, about 10x faster over dim 0 on a CPU
        matrix += confusion_matrix(pred, torch.from_numpy(label).to(device), c)
        if out is not None:
            keep = pictures if rank == 0 else 0
            _save_prediction(out, dataset, i, image, label, pred, rows, stems, keep, shown)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if world > 1:
        dist.all_reduce(matrix)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, skipped)
        skipped = [s for part in gathered for s in part]
    result = segmentation_scores(matrix, dataset.class_names)
    summary = {
        "format": SUMMARY_FORMAT,
        "mIoU": result["mIoU"],
        "mAcc": result["mAcc"],
        "aAcc": result["aAcc"],
        "num_images": len(dataset) - len(skipped),
        "num_classes": c,
        "layout": dataset.layout,
        "split": dataset.split,
        "data": str(dataset.root),
        "skipped": skipped,
        "unpaired": list(dataset.unpaired),
        "inference": asdict(inference),
        "seconds": round(time.perf_counter() - start, 2),
        **(extra or {}),
        "per_class": result["per_class"],
    }
    if out is not None and rank == 0:
        legend = [(dataset.class_names[k], tuple(PALETTE[k % 255])) for k in sorted(shown)]
        _save_summary(out, summary, rows, stems, title, legend)
    return summary


def _save_prediction(
    out: Path,
    dataset: SegmentationSet,
    i: int,
    image: np.ndarray,
    label: np.ndarray,
    pred: torch.Tensor,
    rows: list[list[np.ndarray]],
    stems: list[str],
    keep: int,
    shown: set[int],
) -> None:
    """``pred/<stem>.png`` in the dataset's label space; the picture's row while fewer than
    ``keep`` are kept, its classes added to ``shown``."""
    pred_np = pred.to(torch.uint8).cpu().numpy()
    Image.fromarray(dataset.to_dataset_labels(pred_np, label)).save(
        out / "pred" / f"{dataset.pairs[i].stem}.png"
    )
    if len(rows) < keep:
        pictured = np.where(label == IGNORE_INDEX, IGNORE_INDEX, pred_np)
        rows.append([image, _colour(label), _colour(pictured)])
        stems.append(dataset.pairs[i].stem)
        for ids in (label, pictured):
            shown.update(int(k) for k in np.unique(ids) if k != IGNORE_INDEX)


def _save_summary(
    out: Path,
    summary: dict[str, Any],
    rows: list[list[np.ndarray]],
    stems: list[str],
    title: str,
    legend: list[tuple[str, tuple[int, ...]]],
) -> None:
    if rows:
        save_labelled_grid(
            out / "pictures.png",
            rows,
            stems,
            ["image", "ground truth", "prediction"],
            title=f"{title} mIoU {summary['mIoU']:.1f}".strip(),
            legend=legend + [("ignored", (255, 255, 255))],
        )
        summary["pictures"] = str(out / "pictures.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
