"""JHMDB keypoint propagation, scored by PCK as the CRW / CropMAE evaluation does.

Layout read (official): ``Rename_Images/<action>/<clip>/%05d.png`` and
``joint_positions/<action>/<clip>/joint_positions.mat`` (field ``pos_img``: 2 x 15 x frames,
1-based MATLAB pixel coordinates). A split file lists clips, one per line, either as
``<action>/<clip>`` or in CRW's ``<.../joint_positions.mat> <.../Rename_Images/action/clip>``
form; without one, every clip found is used.

Protocol: the 15 joints of frame 0 become Gaussian heat-maps on the feature grid (sigma 0.5
cell, drawn as CRW's ``draw_labelmap_np``), plus a background channel where no joint is; these
soft labels are propagated; a predicted joint is the weighted mean of its 5 strongest grid
cells; it counts as correct within alpha x 0.6 x the diagonal of the ground-truth joints' box;
frame 0 is excluded; PCK is averaged over the 15 joints (each joint pooled over all frames).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from siamae.eval.propagation.engine import (
    PropagationParams,
    frame_size,
    grid_size,
    propagate_labels,
)

# Re-exported: layouts is their home (torch-free, for --score-only).
from siamae.eval.propagation.layouts import (
    NUM_JOINTS as NUM_JOINTS,
)
from siamae.eval.propagation.layouts import (
    JhmdbClip as JhmdbClip,
)
from siamae.eval.propagation.layouts import (
    list_clips as list_clips,
)
from siamae.eval.propagation.layouts import (
    read_joints as read_joints,
)
from siamae.eval.propagation.layouts import write_summary, write_table

# Re-exported: metrics is their home (torch-free, for --score-only).
from siamae.eval.propagation.metrics import (
    ALPHAS as ALPHAS,
)
from siamae.eval.propagation.metrics import (
    pck as pck,
)
from siamae.eval.propagation.results import BenchmarkRun, read_frame


def draw_gaussian(img: np.ndarray, pt: np.ndarray, sigma: float) -> None:
    """Paste an unnormalised Gaussian (peak 1) into ``img`` (h, w) in place, as CRW draws it:
    a (6 sigma + 1)-wide patch anchored at int(pt - 3 sigma)."""
    ul = [int(pt[0] - 3 * sigma), int(pt[1] - 3 * sigma)]
    br = [int(pt[0] + 3 * sigma + 1), int(pt[1] + 3 * sigma + 1)]
    if ul[0] >= img.shape[1] or ul[1] >= img.shape[0] or br[0] < 0 or br[1] < 0:
        return
    size = 6 * sigma + 1
    x = np.arange(0, size, 1, float)
    y = x[:, None]
    x0 = y0 = size // 2
    g = np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * sigma**2))
    gx = max(0, -ul[0]), min(br[0], img.shape[1]) - ul[0]
    gy = max(0, -ul[1]), min(br[1], img.shape[0]) - ul[1]
    ix = max(0, ul[0]), min(br[0], img.shape[1])
    iy = max(0, ul[1]), min(br[1], img.shape[0])
    img[iy[0] : iy[1], ix[0] : ix[1]] = g[gy[0] : gy[1], gx[0] : gx[1]]


def joint_labels(
    joints_grid: np.ndarray, grid: tuple[int, int], sigma: float = 0.5
) -> torch.Tensor:
    """(2, 15) joint positions in grid cells -> (16, h, w) labels: background, then 15 heat-maps."""
    maps = np.zeros((NUM_JOINTS, *grid))
    for j in range(NUM_JOINTS):
        draw_gaussian(maps[j], joints_grid[:, j], sigma)
    background = (maps.sum(0) == 0).astype(np.float64)[None]
    return torch.from_numpy(np.concatenate([background, maps])).float()


def decode_joints(soft: torch.Tensor, topk: int = 5) -> np.ndarray:
    """(16, h, w) soft labels -> (2, 15) joint positions in grid cells (x, y); -1 when a joint's
    map is all zero. Each joint is the weighted mean of its ``topk`` strongest cells."""
    maps = soft[1:].flatten(1).T  # (h*w, 15)
    w = soft.shape[-1]
    k = min(maps.shape[0], topk)
    vals, ids = torch.topk(maps, k, dim=0)
    vals = vals / vals.sum(0, keepdim=True)
    xx, yy = (ids % w).double(), torch.div(ids, w, rounding_mode="floor").double()
    coord = torch.stack([(xx * vals).sum(0), (yy * vals).sum(0)]).numpy()
    coord[:, (maps.sum(0) == 0).numpy()] = -1
    return coord


@torch.no_grad()
def evaluate_jhmdb(
    encoder: torch.nn.Module,
    root: str | Path,
    out: str | Path,
    params: PropagationParams,
    split: str | None = None,
    max_clips: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Propagate frame-0 joints through every clip; write ``summary.json``, ``per_clip.csv`` and
    each clip's predicted joints, ``<action>__<clip>_joints.npy``: (2, 15, T) float64 x and y in
    pixels of the clip's frames, 0-based, -1 where lost (what ``--score-only`` scores)."""
    clips = list_clips(root, split)[:max_clips]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = BenchmarkRun.start(encoder, device)
    preds, gts, rows = [], [], []
    for clip in tqdm(clips, desc="JHMDB", unit="clip", disable=not progress):
        gt = read_joints(clip.mat)
        pred = _propagate_clip(run, clip, gt, params)
        preds.append(pred)
        gts.append(gt)
        rows.append({"clip": clip.name, "frames": pred.shape[2], **pck([pred], [gt])})
        np.save(out / f"{clip.name.replace('/', '__')}_joints.npy", pred)
    figures = {"clips": len(clips), **pck(preds, gts)}
    summary = run.summary("JHMDB (keypoint propagation, PCK)", params, figures)
    columns = ["clip", "frames", *[f"PCK@{a:g}" for a in ALPHAS]]
    write_table(out / "per_clip.csv", columns, rows, line_end="\n")
    write_summary(out, summary)
    return summary


def _propagate_clip(
    run: BenchmarkRun, clip: JhmdbClip, gt: np.ndarray, params: PropagationParams
) -> np.ndarray:
    """(2, 15, T) predicted joints (pixels of the clip's frames; -1 where lost), frame 0's
    given by ``gt``."""
    native = read_frame(clip.frames[0]).shape[:2]
    size = frame_size(params.resize, native, run.patch)
    grid = grid_size(size, run.patch)
    g0 = gt[:, :, 0].copy()
    g0[0] *= grid[1] / native[1]
    g0[1] *= grid[0] / native[0]
    frames = (read_frame(p) for p in clip.frames[: gt.shape[2]])
    soft_iter = propagate_labels(
        run.encoder, frames, joint_labels(g0, grid), params, size, run.device, run.timer
    )
    coords = []
    for soft in soft_iter:
        c = decode_joints(soft)
        lost = c[0] < 0
        c[0] *= native[1] / grid[1]
        c[1] *= native[0] / grid[0]
        c[:, lost] = -1
        coords.append(c)
    return np.stack(coords, axis=-1)


def format_summary(summary: dict) -> str:
    return (
        f"JHMDB PCK@0.1 {summary['PCK@0.1']:.2f}, PCK@0.2 {summary['PCK@0.2']:.2f} over "
        f"{summary['clips']} clips\n  protocol {summary['protocol']} (resize "
        f"{summary['params']['resize']}, top-k {summary['params']['topk']})\n"
        f"  encoder: {summary['encoder']}"
    )
