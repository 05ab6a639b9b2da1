"""VIP human-part propagation, scored by mIoU over 20 classes as CRW's ``eval_vip.py`` does.

Layout read (official): ``VIP_Fine/Images/<video>/*.jpg`` and
``VIP_Fine/Annotations/Category_ids/<video>/*.png`` (class ids 0..19; 255 is ignored). ``--data-root``
may point at the folder holding ``VIP_Fine`` or at ``VIP_Fine`` itself. A split file lists
videos, one per line (a name, or a path whose last part is the name); without one every video
is used.

Protocol: labels of the classes present in frame 0 are propagated through the whole video; every
frame's prediction (frame 0 included, as CRW writes it) is resized (nearest) to its annotation
and added to one 20 x 20 confusion matrix; mIoU is the mean over classes of
diag / (gt + pred - diag), classes never seen giving NaN and left out of the mean.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from siamae.data.sources import DECODE_ERRORS
from siamae.errors import DataError
from siamae.eval.propagation.engine import (
    PropagationParams,
    frame_size,
    labels_to_ids,
    propagate_video,
    resize_ids,
)

# Re-exported: layouts is their home (torch-free, for --score-only).
from siamae.eval.propagation.layouts import (
    CLASSES as CLASSES,
)
from siamae.eval.propagation.layouts import (
    NUM_CLASSES as NUM_CLASSES,
)
from siamae.eval.propagation.layouts import (
    list_videos as list_videos,
)
from siamae.eval.propagation.layouts import (
    read_category_ids as read_category_ids,
)
from siamae.eval.propagation.layouts import (
    vip_root as vip_root,
)
from siamae.eval.propagation.layouts import write_summary

# Re-exported: metrics is their home (torch-free, for --score-only).
from siamae.eval.propagation.metrics import (
    confusion as confusion,
)
from siamae.eval.propagation.metrics import (
    miou as miou,
)
from siamae.eval.propagation.results import BenchmarkRun, read_frame


@torch.no_grad()
def evaluate_vip(
    encoder: torch.nn.Module,
    root: str | Path,
    out: str | Path,
    params: PropagationParams,
    split: str | None = None,
    max_videos: int | None = None,
    max_frames: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Propagate frame-0 part labels through every video; write ``summary.json``."""
    root = vip_root(root)
    videos = list_videos(root, split)[:max_videos]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = BenchmarkRun.start(encoder, device)
    hist = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    for name in tqdm(videos, desc="VIP", unit="video", disable=not progress):
        hist += _propagate_parts(run, root, name, out, params, max_frames)
    mean_iou, per_class = miou(hist)
    figures = {
        "videos": len(videos),
        "mIoU": mean_iou,
        "per_class_IoU": {
            c: (None if np.isnan(v) else float(v)) for c, v in zip(CLASSES, per_class)
        },
    }
    summary = run.summary("VIP (part propagation, mIoU over 20 classes)", params, figures)
    write_summary(out, summary)
    return summary


def _propagate_parts(
    run: BenchmarkRun,
    root: Path,
    name: str,
    out: Path,
    params: PropagationParams,
    max_frames: int | None,
) -> np.ndarray:
    """Propagate one video's frame-0 parts, write its predictions to ``out/<name>/``: the
    confusion matrix of its annotated frames."""
    frames = sorted((root / "Images" / name).glob("*.jpg"))[:max_frames]
    ann_dir = root / "Annotations" / "Category_ids" / name
    if not frames:
        raise DataError(f"video {name!r}: no frames in {root / 'Images' / name}")
    first_ann = ann_dir / f"{frames[0].stem}.png"
    if not first_ann.is_file():
        raise DataError(f"video {name!r}: first annotation {first_ann} not found")
    first = read_category_ids(first_ann)
    first = np.where(first == 255, 0, first)
    classes = np.unique(first)  # CRW's label set: the classes present in frame 0
    index = np.searchsorted(classes, first).astype(np.uint8)
    try:
        with Image.open(frames[0]) as im:
            native = (im.height, im.width)
    except DECODE_ERRORS as err:
        raise DataError(f"cannot read frame {frames[0]}: {err}") from None
    size = frame_size(params.resize, native, run.patch)
    (out / name).mkdir(parents=True, exist_ok=True)
    soft_iter = propagate_video(
        run.encoder,
        (read_frame(p) for p in frames),
        index,
        len(classes),
        params,
        size,
        run.device,
        run.timer,
    )
    hist = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    for t, soft in enumerate(soft_iter):
        ids = classes[labels_to_ids(soft, size, params.norm_mask).numpy()].astype(np.uint8)
        ann = ann_dir / f"{frames[t].stem}.png"
        Image.fromarray(ids).save(out / name / f"{frames[t].stem}.png")
        if ann.is_file():
            gt = read_category_ids(ann)
            hist += confusion(gt, resize_ids(ids, gt.shape, exact=True))
    return hist


def format_summary(summary: dict) -> str:
    return (
        f"VIP mIoU {summary['mIoU']:.4f} over {summary['videos']} videos\n"
        f"  protocol {summary['protocol']} (resize {summary['params']['resize']}, top-k "
        f"{summary['params']['topk']})\n  encoder: {summary['encoder']}"
    )
