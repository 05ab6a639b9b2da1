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

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from siamae.errors import DataError
from siamae.eval.propagation.engine import (
    PropagationParams,
    frame_size,
    grid_size,
    propagate_labels,
)
from siamae.eval.propagation.results import (
    BenchmarkRun,
    read_frame,
    split_lines,
    write_summary,
    write_table,
)

NUM_JOINTS = 15
ALPHAS = (0.1, 0.2)


def read_joints(path: str | Path) -> np.ndarray:
    """``joint_positions.mat`` -> (2, 15, T) float64 0-based pixel coordinates (x, y)."""
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
    except (OSError, ValueError, NotImplementedError) as err:
        raise DataError(f"cannot read {path}: {err}") from None
    if "pos_img" not in mat:
        raise DataError(f"{path} has no 'pos_img' field; is it a JHMDB joint_positions.mat?")
    pos = np.asarray(mat["pos_img"], dtype=np.float64)
    if pos.ndim == 2:
        pos = pos[..., None]
    if pos.shape[0] != 2 or pos.shape[1] != NUM_JOINTS:
        raise DataError(f"{path}: pos_img has shape {pos.shape}, expected (2, 15, frames)")
    return pos - 1


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


@dataclass
class JhmdbClip:
    name: str
    frames: list[Path]
    mat: Path


def list_clips(root: str | Path, split: str | None = None) -> list[JhmdbClip]:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"JHMDB root {root} does not exist; pass --data-root pointing at JHMDB/")
    img_root, joint_root = root / "Rename_Images", root / "joint_positions"
    if not img_root.is_dir() or not joint_root.is_dir():
        raise DataError(f"{root} needs Rename_Images/ and joint_positions/ (the JHMDB layout)")
    if split:
        names = [_clip_name(fields) for fields in split_lines(split)]
    else:
        names = sorted(
            "/".join(p.parent.relative_to(joint_root).parts)
            for p in joint_root.glob("*/*/joint_positions.mat")
        )
    clips = []
    for name in names:
        frames = sorted((img_root / name).glob("*.png"))
        mat = joint_root / name / "joint_positions.mat"
        if not frames:
            raise DataError(f"clip {name!r}: no frames in {img_root / name}")
        if not mat.is_file():
            raise DataError(f"clip {name!r}: {mat} not found")
        clips.append(JhmdbClip(name, frames, mat))
    if not clips:
        raise DataError(f"no clips found under {joint_root}")
    return clips


def _clip_name(fields: list[str]) -> str:
    """A split file's line -> ``action/clip``: CRW's ``<.mat> <.../action/clip>`` or the name."""
    if len(fields) >= 2 and fields[0].endswith(".mat"):
        return "/".join(Path(fields[1]).parts[-2:])
    return fields[0].strip("/")


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
    """Propagate frame-0 joints through every clip; write ``summary.json`` and ``per_clip.csv``."""
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
