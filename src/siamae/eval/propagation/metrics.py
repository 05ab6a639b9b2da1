"""DAVIS region (J) and boundary (F) measures, computed as davis2017-evaluation does.

- J: IoU of the binary masks, 1 when both are empty (union 0).
- F: one-pixel boundaries of both masks (``seg2bmap``); a predicted boundary pixel counts as
  matched when a ground-truth boundary pixel lies within a disk of radius
  ``ceil(bound_th * image diagonal)`` (``bound_th=0.008``), and the other way round for recall.
  Empty-vs-empty gives 1, empty-vs-nonempty gives 0. The disk dilation of the reference is
  replaced by an exact separable distance test at the boundary pixels only, inside the box of
  both masks (same sets, much faster).
- Per object: mean, recall (fraction of frames > 0.5) and decay (mean of the first of four bins
  minus the mean of the last), as ``davis2017/utils.py:db_statistics``.
- Semi-supervised task: first and last frames excluded; object ids 1..N with N the largest id in
  the first ground-truth frame.

Void pixels (255): the official reader turns 255 into background *before* scoring, so its void
masks are always empty; ``void="background"`` reproduces that (the default). ``void="ignore"``
removes void pixels from both masks before J and F, as the metric functions allow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from siamae.eval.propagation.layouts import NUM_CLASSES, NUM_JOINTS

VOID = 255
BOUND_TH = 0.008


def jaccard(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None) -> float:
    """IoU of two boolean masks (H, W), void pixels excluded; 1.0 when the union is empty."""
    gt = np.asarray(gt, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape:
        raise ValueError(f"mask shapes differ: {gt.shape} vs {pred.shape}")
    keep = ~np.asarray(void, dtype=bool) if void is not None else np.ones_like(gt)
    inter = np.count_nonzero(gt & pred & keep)
    union = np.count_nonzero((gt | pred) & keep)
    return 1.0 if union == 0 else inter / union


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """One-pixel boundary map of a binary mask (boundaries offset half a pixel to the origin).

    A pixel is on the boundary when it differs from its east, south or south-east neighbour;
    the last row compares east only, the last column south only, the corner is never set.
    """
    seg = np.asarray(seg, dtype=bool)
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def bound_pixels(shape: tuple[int, ...], bound_th: float = BOUND_TH) -> float:
    """The tolerance radius in pixels: ``bound_th`` itself if >= 1, else ceil(bound_th * diag)."""
    return bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*shape[:2]))


def _count_within(flat: np.ndarray, dst_map: np.ndarray, radius: float) -> int:
    """How many of the points at flat indices ``flat`` (of an array shaped as ``dst_map``) have
    a True pixel of ``dst_map`` within Euclidean ``radius`` (``dy**2 + dx**2 <= radius**2``: the
    reference's disk).

    Exact and separable: the disk is a stack of rows, row ``dy`` reaching ``dx`` up to the
    largest ``k`` with ``dy**2 + k**2 <= radius**2``; a point is matched when one of those row
    segments holds a True pixel, which a running count along each row answers in two look-ups.
    """
    if len(flat) == 0 or not dst_map.any():
        return 0
    h, w = dst_map.shape
    reach = int(math.floor(radius))
    dys = np.arange(-reach, reach + 1)
    half = np.array([_half_width(int(dy) * int(dy), radius * radius, reach) for dy in dys])
    # counts[y + reach, x + reach + 1]: True pixels of row y in columns < x + 1, in a frame of
    # zeros (``reach`` rows above and below, columns on both sides) so every segment's ends
    # index inside; flat indices, each point's row of look-ups at fixed offsets from it.
    width = w + 2 * reach + 1
    padded = np.zeros((h + 2 * reach, width), dtype=np.int32)
    padded[reach : reach + h, reach + 1 : reach + 1 + w] = dst_map
    counts = np.cumsum(padded, axis=1, dtype=np.int32).ravel()
    start = (flat + (flat // w) * (width - w) + reach)[:, None]  # (y, x) -> (y, x + reach)
    rows = (dys + reach) * width
    hit = counts[start + (rows + half + 1)] > counts[start + (rows - half)]
    return int(np.count_nonzero(hit.any(axis=1)))


def _half_width(dy2: int, r2: float, reach: int) -> int:
    """The largest ``k`` in 0..reach with ``dy2 + k * k <= r2`` (``dy2 <= r2``)."""
    k = reach
    while k > 0 and dy2 + k * k > r2:
        k -= 1
    return k


def _box(gt: np.ndarray, pred: np.ndarray) -> tuple[slice, slice] | None:
    """The rows and columns of both masks' pixels with a 1-pixel margin above and to the left
    and one row and column of background below and to the right (clipped to the image), None
    when both are empty: every boundary pixel of both masks lies inside, and ``seg2bmap`` of the
    crop equals the crop of ``seg2bmap`` (outside, both masks are background)."""
    rows = np.flatnonzero(gt.any(axis=1) | pred.any(axis=1))
    if len(rows) == 0:
        return None
    band = slice(rows[0], rows[-1] + 1)
    cols = np.flatnonzero(gt[band].any(axis=0) | pred[band].any(axis=0))
    h, w = gt.shape
    return (
        slice(max(0, rows[0] - 1), min(h, rows[-1] + 2)),
        slice(max(0, cols[0] - 1), min(w, cols[-1] + 2)),
    )


def boundary_f(
    gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None, bound_th: float = BOUND_TH
) -> float:
    """Boundary F-measure of two boolean masks (H, W), as davis2017-evaluation's ``f_measure``."""
    return object_scores(gt, pred, void, bound_th)[1]


def object_scores(
    gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None, bound_th: float = BOUND_TH
) -> tuple[float, float]:
    """(J, F) of one object's two boolean masks (H, W), void pixels left out of both.

    Both are computed inside the box of the two masks (:func:`_box`): the intersection, the
    union and every boundary pixel lie there, and the tolerance radius comes from the whole
    image's diagonal, so the figures are those of the whole masks.
    """
    gt = np.asarray(gt, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape:
        raise ValueError(f"mask shapes differ: {gt.shape} vs {pred.shape}")
    if void is not None:
        keep = ~np.asarray(void, dtype=bool)
        gt, pred = gt & keep, pred & keep
    radius = bound_pixels(gt.shape, bound_th)
    box = _box(gt, pred)
    if box is None:
        return 1.0, 1.0  # both empty: J's empty union and F's empty boundaries both give 1
    gt, pred = gt[box], pred[box]
    j = np.count_nonzero(gt & pred) / np.count_nonzero(gt | pred)
    return j, _boundary_f_in_box(gt, pred, radius)


def _boundary_f_in_box(gt: np.ndarray, pred: np.ndarray, radius: float) -> float:
    """Boundary F of two boolean masks cropped to their box, ``radius`` the whole image's."""
    fg_map, gt_map = seg2bmap(pred), seg2bmap(gt)
    fg_b, gt_b = np.flatnonzero(fg_map), np.flatnonzero(gt_map)
    n_fg, n_gt = len(fg_b), len(gt_b)
    if n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    elif n_fg == 0:
        precision, recall = 1.0, 0.0
    elif n_gt == 0:
        precision, recall = 0.0, 1.0
    else:
        precision = _count_within(fg_b, gt_map, radius) / n_fg
        recall = _count_within(gt_b, fg_map, radius) / n_gt
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def db_statistics(values: np.ndarray) -> tuple[float, float, float]:
    """(mean, recall, decay) of per-frame values, as ``davis2017/utils.py:db_statistics``."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(np.nanmean(v))
    recall = float(np.nanmean(v > 0.5))
    ids = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(int)
    bins = [v[ids[i] : ids[i + 1] + 1] for i in range(4)]
    decay = float(np.nanmean(bins[0]) - np.nanmean(bins[3]))
    return mean, recall, decay


def split_objects(ids: np.ndarray, num_objects: int, void: str = "background") -> tuple:
    """(H, W) ids -> (N, H, W) bool object masks and the (H, W) void mask (or None)."""
    ids = np.asarray(ids)
    objs = ids[None] == np.arange(1, num_objects + 1, dtype=ids.dtype).reshape(-1, 1, 1)
    void_mask = (ids == VOID) if void == "ignore" else None
    return objs, void_mask


def frame_scores(
    gt_ids: np.ndarray,
    pred_ids: np.ndarray,
    num_objects: int,
    void: str = "background",
    bound_th: float = BOUND_TH,
) -> tuple[np.ndarray, np.ndarray]:
    """J and F of every object 1..N on one frame: two arrays of shape (N,)."""
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(f"mask shapes differ: {gt_ids.shape} vs {pred_ids.shape}")
    gt, void_mask = split_objects(gt_ids, num_objects, void)
    pred, _ = split_objects(pred_ids, num_objects)
    scores = [object_scores(g, p, void_mask, bound_th) for g, p in zip(gt, pred)]
    j = np.array([s[0] for s in scores], dtype=np.float64)
    f = np.array([s[1] for s in scores], dtype=np.float64)
    return j, f


def num_objects_of(first_gt: np.ndarray) -> int:
    """N as the official reader counts it: the largest id of frame 0, void counted as 0."""
    ids = np.asarray(first_gt)
    ids = np.where(ids == VOID, 0, ids)
    return int(ids.max()) if ids.size else 0


@dataclass
class SequenceScores:
    """Per-object, per-frame J and F of one sequence (scored frames only)."""

    name: str
    j: np.ndarray  # (N, T_scored)
    f: np.ndarray  # (N, T_scored)

    def object_rows(self) -> list[dict[str, float | str]]:
        rows = []
        for i in range(self.j.shape[0]):
            jm, jr, jd = db_statistics(self.j[i])
            fm, fr, fd = db_statistics(self.f[i])
            rows.append(
                {
                    "sequence": self.name,
                    "object": i + 1,
                    "J&F-Mean": (jm + fm) / 2,
                    "J-Mean": jm,
                    "J-Recall": jr,
                    "J-Decay": jd,
                    "F-Mean": fm,
                    "F-Recall": fr,
                    "F-Decay": fd,
                    "frames": int(self.j.shape[1]),
                }
            )
        return rows


def score_sequence(
    name: str,
    gt_ids: np.ndarray,
    pred_ids: np.ndarray,
    void: str = "background",
    bound_th: float = BOUND_TH,
) -> SequenceScores:
    """Semi-supervised scoring of a whole sequence (T, H, W): frames 1..T-2 are scored."""
    n = num_objects_of(gt_ids[0])
    scored = range(1, len(gt_ids) - 1)
    j = np.zeros((n, len(scored)))
    f = np.zeros((n, len(scored)))
    for col, t in enumerate(scored):
        j[:, col], f[:, col] = frame_scores(gt_ids[t], pred_ids[t], n, void, bound_th)
    return SequenceScores(name, j, f)


@dataclass
class DavisResult:
    """A DAVIS run's or folder's ``summary.json`` figures and every sequence's scores."""

    summary: dict
    sequences: list[SequenceScores] = field(default_factory=list)


PER_SEQUENCE_COLUMNS = ["sequence", "object", "J&F-Mean", "J-Mean", "J-Recall", "J-Decay",
                        "F-Mean", "F-Recall", "F-Decay", "frames"]  # fmt: skip


def summarise(sequences: list[SequenceScores]) -> dict[str, float]:
    """Global figures: every statistic averaged over all objects of all sequences."""
    rows = [r for s in sequences for r in s.object_rows()]
    keys = ["J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]
    out = {k: float(np.mean([r[k] for r in rows])) if rows else float("nan") for k in keys}
    out = {"J&F-Mean": (out["J-Mean"] + out["F-Mean"]) / 2, **out}
    out["objects"] = len(rows)
    return out


# -- JHMDB (PCK) and VIP (confusion-matrix mIoU) --------------------------------------------

ALPHAS = (0.1, 0.2)


def pck(
    preds: list[np.ndarray], gts: list[np.ndarray], alphas: tuple[float, ...] = ALPHAS
) -> dict[str, float]:
    """PCK (percent) from per-clip predictions and ground truth, both (2, 15, T) pixel coordinates.

    A joint is skipped where its prediction is negative (lost); frame 0 is skipped. The
    reference length is 0.6 x the diagonal of the box around the frame's visible ground-truth
    joints; the result is the mean over joints of each joint's pooled PCK.
    """
    dists: list[list[float]] = [[] for _ in range(NUM_JOINTS)]
    for pred, gt in zip(preds, gts):
        n = min(pred.shape[2], gt.shape[2])
        for k in range(1, n):
            visible = pred[0, :, k] >= 0
            if not visible.any():
                continue
            pts = gt[:, visible, k]
            box = 0.6 * np.linalg.norm(pts.max(axis=1) - pts.min(axis=1))
            d = np.linalg.norm(pred[:, :, k] - gt[:, :, k], axis=0)
            with np.errstate(divide="ignore", invalid="ignore"):
                dn = d / box
            for j in np.flatnonzero(visible):
                dists[j].append(float(dn[j]))
    out = {}
    for a in alphas:
        per_joint = [100.0 * np.mean(np.asarray(d) <= a) for d in dists if d]
        out[f"PCK@{a:g}"] = float(np.mean(per_joint)) if per_joint else float("nan")
    return out


def confusion(gt: np.ndarray, pred: np.ndarray, n: int = NUM_CLASSES) -> np.ndarray:
    """(n, n) counts, rows = ground truth, columns = prediction; gt outside [0, n) ignored."""
    gt = gt.astype(np.int64).ravel()
    pred = pred.astype(np.int64).ravel()
    keep = (gt >= 0) & (gt < n) & (pred >= 0) & (pred < n)
    return np.bincount(n * gt[keep] + pred[keep], minlength=n * n).reshape(n, n)


def miou(hist: np.ndarray) -> tuple[float, np.ndarray]:
    """(mean IoU over classes with any pixel, per-class IoU with NaN for unseen classes)."""
    diag = np.diag(hist).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = diag / (hist.sum(1) + hist.sum(0) - diag)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"), iou
