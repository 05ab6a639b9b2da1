"""Scoring a folder of predictions without an encoder: ``siamae eval davis|vip|jhmdb
--score-only``.

The figures are those of the propagation commands (``metrics.frame_scores`` for DAVIS, the
confusion-matrix mIoU for VIP, ``metrics.pck`` for JHMDB), computed frame by frame (clip by
clip) in a thread pool: PNG decoding and NumPy's array work release the GIL, so the frames of
all sequences are scored side by side. Nothing here imports torch: a short scoring run's time
would otherwise be mostly torch's import.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
from tqdm import tqdm

from siamae.cores import usable_cores
from siamae.errors import DataError
from siamae.eval.propagation.layouts import (
    CLASSES,
    NUM_CLASSES,
    NUM_JOINTS,
    check_root,
    list_clips,
    list_sequences,
    list_videos,
    load_sequence,
    read_category_ids,
    read_joints,
    read_mask,
    resize_nearest,
    vip_root,
    write_summary,
    write_table,
)
from siamae.eval.propagation.metrics import (
    ALPHAS,
    PER_SEQUENCE_COLUMNS,
    DavisResult,
    SequenceScores,
    confusion,
    frame_scores,
    miou,
    num_objects_of,
    pck,
    summarise,
)

T = TypeVar("T")
R = TypeVar("R")


def _pool_map(
    fn: Callable[[T], R],
    jobs: list[T],
    threads: int | None,
    desc: str,
    progress: bool,
    unit: str = "frame",
) -> list[R]:
    """``fn`` over ``jobs`` in a thread pool of ``threads`` (default: :func:`usable_cores`),
    results in the jobs' order, with a progress bar."""
    workers = max(1, threads or usable_cores())
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(fn, jobs)
        return list(tqdm(results, total=len(jobs), desc=desc, unit=unit, disable=not progress))


def check_predictions(predictions: str | Path, names: Iterable[str], layout: str) -> Path:
    """The predictions folder, refused in one line when it is missing or holds none of the
    expected sub-folders (``layout`` names the expected layout)."""
    folder = Path(predictions)
    if not folder.is_dir():
        raise DataError(f"predictions folder {folder} does not exist; pass the folder of {layout}")
    if not any((folder / name).is_dir() for name in names):
        raise DataError(
            f"predictions folder {folder} holds no sequence folder of the benchmark; expected "
            f"{layout}"
        )
    return folder


DAVIS_LAYOUT = "<dir>/<sequence>/%05d.png (the DAVIS submission layout)"


def score_davis_folder(
    root: str | Path,
    predictions: str | Path,
    out: str | Path | None = None,
    sequences: list[str] | None = None,
    split: str | None = None,
    void: str = "background",
    threads: int | None = None,
    progress: bool = True,
) -> DavisResult:
    """J&F of a DAVIS submission folder, the same figures as
    :func:`~siamae.eval.propagation.davis.score_predictions` (annotations resized nearest to the
    predictions' size; sequences missing or incomplete skipped and listed), frames scored in a
    thread pool. With ``out``: ``summary.json`` and ``per_sequence.csv`` written there."""
    root = check_root(root)
    names = list_sequences(root, split, sequences)
    folder = check_predictions(predictions, names, DAVIS_LAYOUT)
    jobs, spans, skipped = [], [], []
    for name in names:
        seq = load_sequence(root, name)
        files = [folder / name / f"{m.stem}.png" for m in seq.masks]
        if not seq.fully_annotated or len(files) < 3 or not all(f.is_file() for f in files):
            skipped.append(name)
            continue
        size = read_mask(files[0]).shape
        n = num_objects_of(resize_nearest(read_mask(seq.masks[0]), size))
        spans.append((name, len(jobs), n))
        jobs.extend((m, f, size, n, void) for m, f in zip(seq.masks[1:-1], files[1:-1]))
    if not spans:
        raise DataError(
            f"predictions folder {folder}: no sequence has a prediction for every annotated "
            f"frame; expected {DAVIS_LAYOUT}"
        )
    scores = _pool_map(_davis_frame, jobs, threads, "DAVIS scoring", progress)
    results = []
    for i, (name, start, _n) in enumerate(spans):
        stop = spans[i + 1][1] if i + 1 < len(spans) else len(jobs)
        j, f = zip(*scores[start:stop])
        results.append(SequenceScores(name, np.stack(j, axis=1), np.stack(f, axis=1)))
    summary = {
        "benchmark": "DAVIS (semi-supervised, davis2017-evaluation J&F), scored from a folder",
        "predictions": str(folder),
        "void": void,
        **summarise(results),
        "sequences": [s.name for s in results],
        "skipped": skipped,
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        rows = [r for s in results for r in s.object_rows()]
        write_table(out / "per_sequence.csv", PER_SEQUENCE_COLUMNS, rows, float_format="{:.4f}")
        write_summary(out, summary)
    return DavisResult(summary, results)


def _davis_frame(job: tuple) -> tuple[np.ndarray, np.ndarray]:
    mask, pred_file, size, n, void = job
    return frame_scores(resize_nearest(read_mask(mask), size), read_mask(pred_file), n, void)


VIP_LAYOUT = "<dir>/<video>/<frame>.png of class ids, as siamae eval vip writes them"


def score_vip_folder(
    root: str | Path,
    predictions: str | Path,
    out: str | Path | None = None,
    split: str | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    """mIoU of a folder of VIP predictions (class-id PNGs), as ``siamae eval vip`` computes it:
    each annotated frame's prediction resized (nearest) to its annotation, one confusion matrix.
    Videos without a prediction folder are skipped and listed."""
    root = vip_root(root)
    names = list_videos(root, split)
    folder = check_predictions(predictions, names, VIP_LAYOUT)
    jobs, scored, skipped = [], [], []
    for name in names:
        preds = sorted((folder / name).glob("*.png")) if (folder / name).is_dir() else []
        ann_dir = root / "Annotations" / "Category_ids" / name
        pairs = [(ann_dir / p.name, p) for p in preds if (ann_dir / p.name).is_file()]
        (scored if pairs else skipped).append(name)
        jobs.extend(pairs)
    if not jobs:
        raise DataError(f"predictions folder {folder}: no annotated frame has a prediction")
    hist = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    for part in _pool_map(_vip_frame, jobs, threads, "VIP scoring", progress):
        hist += part
    mean_iou, per_class = miou(hist)
    summary = {
        "benchmark": "VIP (part propagation, mIoU over 20 classes), scored from a folder",
        "predictions": str(folder),
        "videos": len(scored),
        "skipped": skipped,
        "mIoU": mean_iou,
        "per_class_IoU": {
            c: (None if np.isnan(v) else float(v)) for c, v in zip(CLASSES, per_class)
        },
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_summary(out, summary)
    return summary


def _vip_frame(job: tuple[Path, Path]) -> np.ndarray:
    ann, pred_file = job
    gt = read_category_ids(ann)
    pred = read_category_ids(pred_file)
    return confusion(gt, resize_nearest(pred, gt.shape, exact=True))


JHMDB_LAYOUT = (
    "<dir>/<action>__<clip>_joints.npy, (2, 15, frames) x and y in pixels (-1: lost), as "
    "siamae eval jhmdb writes them"
)


def jhmdb_prediction_file(folder: Path, clip: str) -> Path:
    """Where ``siamae eval jhmdb`` writes a clip's predicted joints (``action/clip``)."""
    return folder / f"{clip.replace('/', '__')}_joints.npy"


def score_jhmdb_folder(
    root: str | Path,
    predictions: str | Path,
    out: str | Path | None = None,
    split: str | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    """PCK@0.1 and @0.2 of a folder of predicted joints, as ``siamae eval jhmdb`` computes them
    (:func:`~siamae.eval.propagation.metrics.pck` over every clip at once). Clips without a
    prediction file are skipped and listed. With ``out``: ``summary.json`` and ``per_clip.csv``
    written there."""
    clips = list_clips(root, split)
    folder = Path(predictions)
    if not folder.is_dir():
        raise DataError(f"predictions folder {folder} does not exist; expected {JHMDB_LAYOUT}")
    scored = [c for c in clips if jhmdb_prediction_file(folder, c.name).is_file()]
    if not scored:
        raise DataError(
            f"predictions folder {folder} holds no prediction of a listed clip; expected "
            f"{JHMDB_LAYOUT}"
        )
    jobs = [(c.mat, jhmdb_prediction_file(folder, c.name)) for c in scored]
    pairs = _pool_map(_jhmdb_clip, jobs, threads, "JHMDB scoring", progress, unit="clip")
    preds, gts = [p for p, _ in pairs], [g for _, g in pairs]
    rows = [
        {"clip": c.name, "frames": p.shape[2], **pck([p], [g])} for c, (p, g) in zip(scored, pairs)
    ]
    names = {c.name for c in scored}
    summary = {
        "benchmark": "JHMDB (keypoint propagation, PCK), scored from a folder",
        "predictions": str(folder),
        "clips": len(scored),
        "skipped": [c.name for c in clips if c.name not in names],
        **pck(preds, gts),
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        columns = ["clip", "frames", *[f"PCK@{a:g}" for a in ALPHAS]]
        write_table(out / "per_clip.csv", columns, rows, line_end="\n")
        write_summary(out, summary)
    return summary


def _jhmdb_clip(job: tuple[Path, Path]) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, ground-truth) joints of one clip, both (2, 15, T) pixels."""
    mat, pred_file = job
    try:
        pred = np.load(pred_file, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read predicted joints {pred_file}: {err}") from None
    if pred.ndim != 3 or pred.shape[:2] != (2, NUM_JOINTS) or pred.dtype.kind not in "fiu":
        raise DataError(
            f"predicted joints {pred_file} hold an array of shape {pred.shape} and type "
            f"{pred.dtype}; expected (2, {NUM_JOINTS}, frames) numbers"
        )
    return pred.astype(np.float64, copy=False), read_joints(mat)
