"""Scoring a folder of predictions without an encoder: ``siamae eval davis|vip --score-only``.

The figures are those of the propagation commands (``metrics.frame_scores`` for DAVIS, the
confusion-matrix mIoU for VIP), computed frame by frame in a thread pool: reading a PNG, the
mask arithmetic and the boundary matching (SciPy's KD-tree) release the GIL, so the frames of
all sequences are scored side by side on as many threads as the other commands use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from tqdm import tqdm

from siamae.errors import DataError
from siamae.eval.propagation.davis import (
    PER_SEQUENCE_COLUMNS,
    DavisResult,
    check_root,
    list_sequences,
    load_sequence,
    read_mask,
)
from siamae.eval.propagation.engine import resize_ids
from siamae.eval.propagation.metrics import (
    SequenceScores,
    frame_scores,
    num_objects_of,
    summarise,
)
from siamae.eval.propagation.results import write_summary, write_table
from siamae.eval.propagation.vip import (
    CLASSES,
    NUM_CLASSES,
    confusion,
    list_videos,
    miou,
    read_category_ids,
    vip_root,
)

T = TypeVar("T")
R = TypeVar("R")


def _pool_map(
    fn: Callable[[T], R], jobs: list[T], threads: int | None, desc: str, progress: bool
) -> list[R]:
    """``fn`` over ``jobs`` in a thread pool (``threads``: torch's count, as every command sets
    it), results in the jobs' order, with a progress bar."""
    workers = max(1, threads or torch.get_num_threads())
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(fn, jobs)
        return list(tqdm(results, total=len(jobs), desc=desc, unit="frame", disable=not progress))


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
        n = num_objects_of(resize_ids(read_mask(seq.masks[0]), size))
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
    return frame_scores(resize_ids(read_mask(mask), size), read_mask(pred_file), n, void)


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
    return confusion(gt, resize_ids(pred, gt.shape, exact=True))
