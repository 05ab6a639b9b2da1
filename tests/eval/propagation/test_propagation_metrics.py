"""DAVIS J/F and statistics on hand-made masks with known answers; JHMDB PCK; VIP mIoU."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from siamae.eval.propagation.jhmdb import pck
from siamae.eval.propagation.metrics import (
    bound_pixels,
    boundary_f,
    db_statistics,
    frame_scores,
    jaccard,
    score_sequence,
    seg2bmap,
    summarise,
)
from siamae.eval.propagation.vip import confusion, miou


def box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def reference_f(gt, pred, bound_th=0.008):
    """davis2017-evaluation's f_measure, with its disk dilation, written plainly."""
    r = bound_pixels(gt.shape, bound_th)
    ax = np.arange(-r, r + 1)
    xx, yy = np.meshgrid(ax, ax)
    disk = xx**2 + yy**2 <= r**2
    fb, gb = seg2bmap(pred), seg2bmap(gt)
    fd, gd = ndimage.binary_dilation(fb, disk), ndimage.binary_dilation(gb, disk)
    nf, ng = fb.sum(), gb.sum()
    if nf == 0 and ng == 0:
        return 1.0
    if nf == 0 or ng == 0:
        return 0.0
    p, rc = (fb & gd).sum() / nf, (gb & fd).sum() / ng
    return 0.0 if p + rc == 0 else 2 * p * rc / (p + rc)


def test_identical_masks_score_one():
    m = box(60, 80, 10, 40, 20, 60)
    assert jaccard(m, m) == 1.0
    assert boundary_f(m, m) == 1.0


def test_disjoint_masks_score_zero():
    a, b = box(100, 200, 10, 40, 10, 40), box(100, 200, 60, 90, 150, 190)
    assert jaccard(a, b) == 0.0
    assert boundary_f(a, b) == 0.0


def test_shift_within_tolerance_keeps_f_one():
    h, w = 240, 320  # diagonal 400 -> tolerance ceil(3.2) = 4 pixels
    assert bound_pixels((h, w)) == 4
    a = box(h, w, 50, 150, 60, 200)
    shifted = box(h, w, 53, 153, 63, 203)  # 3 px down and right: |d| = 4.24 on corners only
    straight = box(h, w, 50, 150, 64, 204)  # 4 px right: within the disk everywhere
    assert jaccard(a, straight) < 1.0
    assert boundary_f(a, straight) == 1.0
    assert boundary_f(a, shifted) == pytest.approx(reference_f(a, shifted))
    far = box(h, w, 50, 150, 70, 210)  # 10 px: vertical edges no longer match
    assert boundary_f(a, far) < 1.0


def test_empty_conventions():
    e = np.zeros((30, 40), dtype=bool)
    m = box(30, 40, 5, 15, 5, 15)
    assert jaccard(e, e) == 1.0 and boundary_f(e, e) == 1.0
    assert jaccard(m, e) == 0.0 and boundary_f(m, e) == 0.0
    assert jaccard(e, m) == 0.0 and boundary_f(e, m) == 0.0


def test_seg2bmap_known_map():
    seg = np.zeros((4, 5), dtype=bool)
    seg[1:3, 1:3] = True
    expected = np.array(
        [
            [1, 1, 1, 0, 0],
            [1, 0, 1, 0, 0],
            [1, 1, 1, 0, 0],
            [0, 0, 0, 0, 0],
        ],
        dtype=bool,
    )
    assert (seg2bmap(seg) == expected).all()


@pytest.mark.parametrize("seed", range(6))
def test_f_equals_disk_dilation_reference(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(40, 120, size=2)
    gt = ndimage.binary_opening(rng.random((h, w)) > 0.55, iterations=2)
    pred = ndimage.binary_opening(rng.random((h, w)) > 0.5, iterations=2)
    for th in (0.008, 0.03, 3):
        assert boundary_f(gt, pred, bound_th=th) == pytest.approx(
            reference_f(gt, pred, th), abs=1e-12
        )


@pytest.mark.parametrize("seed", range(8))
def test_f_on_small_objects_anywhere_equals_the_reference(seed):
    """Objects away from the borders, at the top-left, at the bottom-right (where seg2bmap's
    last-row and last-column rules apply): the crop to both masks' box changes nothing."""
    rng = np.random.default_rng(seed)
    h, w = 48, 72
    gt, pred = np.zeros((h, w), bool), np.zeros((h, w), bool)
    for m in (gt, pred):
        for _ in range(int(rng.integers(1, 3))):
            y, x = int(rng.integers(-4, h - 2)), int(rng.integers(-4, w - 2))
            m[
                max(0, y) : y + int(rng.integers(2, 14)), max(0, x) : x + int(rng.integers(2, 14))
            ] = 1
    if seed % 4 == 0:
        pred[:] = 0  # empty against non-empty
    for th in (0.008, 0.05, 2):
        assert boundary_f(gt, pred, bound_th=th) == pytest.approx(
            reference_f(gt, pred, th), abs=1e-12
        )


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bound_th", [1, 2, 5, 9])
def test_f_on_ragged_objects_equals_the_reference(seed, bound_th):
    """Ragged shapes (many boundary pixels, some near, some far, some in between): the square
    tests and the row tests of the boundary match give the disk dilation's counts."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(90, 120)), 3)
    gt = field > 0.05
    pred = np.roll(ndimage.gaussian_filter(rng.normal(size=(90, 120)), 2) * 0.5 + field, 3, 1) > 0
    assert 0.0 < boundary_f(gt, pred, bound_th=bound_th) < 1.0
    assert boundary_f(gt, pred, bound_th=bound_th) == pytest.approx(
        reference_f(gt, pred, bound_th), abs=1e-12
    )


def test_statistics_on_known_sequence():
    v = np.arange(8) / 10  # 0.0 .. 0.7
    mean, recall, decay = db_statistics(v)
    assert mean == pytest.approx(0.35)
    assert recall == pytest.approx(2 / 8)  # 0.6 and 0.7 are > 0.5
    # four bins over 8 frames: indices [0, 2, 4, 5, 7] -> v[0:3] and v[5:8]
    assert decay == pytest.approx(0.1 - 0.6)
    assert db_statistics(np.full(5, 0.5))[1] == 0.0  # recall counts > 0.5 strictly


def test_multi_object_sequence_excludes_first_and_last_frames():
    t, h, w = 6, 40, 60
    gt = np.zeros((t, h, w), dtype=np.uint8)
    gt[:, 5:20, 5:25] = 1
    gt[:, 22:38, 30:55] = 2
    pred = gt.copy()
    pred[0] = 0  # first and last frames are not scored
    pred[-1] = 7
    pred[3][pred[3] == 2] = 0  # object 2 lost on one scored frame
    scores = score_sequence("toy", gt, pred)
    assert scores.j.shape == (2, 4)
    assert (scores.j[0] == 1).all()
    assert list(scores.j[1]) == [1, 1, 0, 1]
    rows = scores.object_rows()
    assert rows[0]["J-Mean"] == 1 and rows[1]["J-Mean"] == 0.75
    assert rows[1]["J-Recall"] == 0.75
    summary = summarise([scores])
    assert summary["J-Mean"] == pytest.approx((1 + 0.75) / 2)
    assert summary["J&F-Mean"] == pytest.approx((summary["J-Mean"] + summary["F-Mean"]) / 2)
    assert summary["objects"] == 2


def test_void_pixels():
    gt = np.zeros((40, 40), dtype=np.uint8)
    gt[10:30, 10:30] = 1
    gt[10:30, 30:34] = 255  # a void band next to the object
    pred = np.zeros_like(gt)
    pred[10:30, 10:34] = 1  # covers the void band too
    j_bg, _ = frame_scores(gt, pred, 1, void="background")  # the official reading
    j_ig, f_ig = frame_scores(gt, pred, 1, void="ignore")
    assert j_bg[0] == pytest.approx(400 / 480)
    assert j_ig[0] == 1.0 and f_ig[0] == 1.0


def test_pck_counts_within_threshold():
    gt = np.zeros((2, 15, 3))
    gt[0, :, :] = np.linspace(0, 100, 15)[:, None]  # box diagonal 100 -> ref 60
    gt[1, :, :] = 0
    pred = gt.copy()
    pred[0, :, 1] += 5  # 5/60 = 0.083: correct at 0.1 and 0.2
    pred[0, :, 2] += 9  # 9/60 = 0.15: correct only at 0.2
    pred[:, :, 0] = 1e6  # frame 0 is excluded
    out = pck([pred], [gt])
    assert out["PCK@0.1"] == pytest.approx(50.0)
    assert out["PCK@0.2"] == pytest.approx(100.0)
    pred[:, 3, 1] = -1  # a lost joint is skipped, not counted wrong
    assert pck([pred], [gt])["PCK@0.2"] == pytest.approx(100.0)


def test_vip_miou():
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 255]], dtype=np.uint8)
    pred = np.array([[0, 1, 1, 1], [2, 2, 3, 3]], dtype=np.uint8)
    hist = confusion(gt, pred)
    assert hist.sum() == 6  # 255 ignored
    mean, per_class = miou(hist)
    assert per_class[0] == pytest.approx(0.5)
    assert per_class[1] == pytest.approx(2 / 3)
    assert per_class[2] == 1.0
    assert math.isnan(per_class[5])
    assert mean == pytest.approx((0.5 + 2 / 3 + 1) / 3)
