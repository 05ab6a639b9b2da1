"""Pictures of label maps: the DAVIS / PASCAL VOC palette, masks blended over frames, labelled
grids, PNG strips and animated GIFs. Propagation (:mod:`siamae.eval.propagation`) and
segmentation (:mod:`siamae.segmentation_scores`, :mod:`siamae.eval.segmentation`) draw
with them, so they stand below both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def davis_palette() -> np.ndarray:
    """(256, 3) uint8: the DAVIS / PASCAL VOC palette (0 black, 1 dark red, 2 green, ...)."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


PALETTE = davis_palette()


def blend(frame: np.ndarray, ids: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """(H, W, 3) uint8 frame + (H, W) ids -> (H, W, 3) uint8 with objects tinted and outlined."""
    if frame.shape[:2] != ids.shape:
        ids = np.asarray(Image.fromarray(ids.astype(np.uint8)).resize(frame.shape[1::-1], 0))
    ids = np.where(ids == 255, 0, ids).astype(np.uint8)
    colour = PALETTE[ids].astype(np.float32)
    fg = (ids > 0)[..., None]
    out = np.where(fg, frame * (1 - alpha) + colour * alpha, frame.astype(np.float32))
    edge = np.zeros(ids.shape, dtype=bool)
    edge[:-1] |= ids[:-1] != ids[1:]
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    out[edge] = 255
    return np.clip(out, 0, 255).astype(np.uint8)


def _thumb(image: np.ndarray, height: int) -> np.ndarray:
    h, w = image.shape[:2]
    if h == height:
        return image
    return np.asarray(Image.fromarray(image).resize((max(1, round(w * height / h)), height), 2))


def save_strip(
    path: str | Path,
    rows: list[list[np.ndarray]],
    height: int = 160,
    gap: int = 4,
) -> Path:
    """Save a grid of images (rows of (H, W, 3) uint8) as one PNG, each scaled to ``height``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    thumbs = [[_thumb(im, height) for im in row] for row in rows]
    width = max(sum(t.shape[1] for t in row) + gap * (len(row) - 1) for row in thumbs)
    canvas = np.full(
        (len(thumbs) * height + gap * (len(thumbs) - 1), width, 3), 255, dtype=np.uint8
    )
    y = 0
    for row in thumbs:
        x = 0
        for t in row:
            canvas[y : y + height, x : x + t.shape[1]] = t
            x += t.shape[1] + gap
        y += height + gap
    Image.fromarray(canvas).save(path)
    return path


def save_labelled_grid(
    path: str | Path,
    rows: list[list[np.ndarray]],
    row_labels: list[str],
    column_labels: list[str] | None = None,
    title: str | None = None,
    height: int = 160,
    label_rows: set[int] | None = None,
    legend: list[tuple[str, tuple[int, ...]]] | None = None,
) -> Path:
    """Save a grid of images with a title, a label left of each row and one above each column,
    and a legend of colours below it, if given.

    Args:
        rows: rows of (H, W, 3) uint8 images, each scaled to ``height`` pixels.
        row_labels: one label per row (e.g. "trained\nJ&F 0.634").
        column_labels: one label per column (e.g. "frame 5"), drawn above the rows in
            ``label_rows`` (default: the first row only), so stacked blocks each get them.
        legend: (name, RGB colour) pairs, e.g. the classes of label maps in the grid.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    if len(row_labels) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(row_labels)} row labels")
    thumbs = [[_thumb(im, height) for im in row] for row in rows]
    ncols = max(len(row) for row in thumbs)
    aspect = max(t.shape[1] for row in thumbs for t in row) / height
    cell = 1.25  # inches per image row: labels stay legible at 100 dpi
    label_rows = {0} if label_rows is None else label_rows
    fig = Figure(
        figsize=(1.6 + ncols * cell * aspect, 0.6 + len(rows) * (cell + 0.12)), layout="constrained"
    )
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for r, row in enumerate(thumbs):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(row):
                ax.imshow(row[c])
            else:
                ax.set_axis_off()
            if c == 0:
                ax.set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=9)
            if column_labels and r in label_rows and c < len(column_labels):
                ax.set_title(column_labels[c], fontsize=8, pad=2)
    if title:
        fig.suptitle(title, fontsize=10)
    if legend:
        from matplotlib.patches import Patch

        handles = [
            Patch(facecolor=np.asarray(rgb[:3]) / 255.0, edgecolor="0.5", label=name)
            for name, rgb in legend
        ]
        fig.legend(
            handles=handles, loc="outside lower center", ncols=min(6, len(handles)), fontsize=8
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def _caption(image: np.ndarray, text: str) -> np.ndarray:
    """Write ``text`` in the top-left corner (white on a dark box), for animated pictures."""
    from PIL import ImageDraw

    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    box = draw.textbbox((3, 2), text)
    draw.rectangle((box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1), fill=(0, 0, 0))
    draw.text((3, 2), text, fill=(255, 255, 255))
    return np.asarray(canvas)


def save_gif(path: str | Path, frames: list[np.ndarray], fps: int = 8, height: int = 240) -> Path:
    """Save (H, W, 3) uint8 frames as a looping animated GIF."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(_thumb(f, height)) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


class OverlayRecorder:
    """Collects blended frames of one video as they are produced, keeping only what it saves.

    ``strip``: ``count`` evenly spaced frames (first and last included); ``gif``: every frame,
    thumbnailed to ``height`` so memory stays small.
    """

    def __init__(self, num_frames: int, kind: str = "png", count: int = 6, height: int = 160):
        if kind not in ("png", "gif"):
            raise ValueError(f"overlay kind must be 'png' or 'gif', got {kind!r}")
        self.kind = kind
        self.height = height
        count = max(1, min(count, num_frames))
        self.keep = set(np.linspace(0, num_frames - 1, count).round().astype(int).tolist())
        self.frames: list[np.ndarray] = []
        self.truths: list[np.ndarray | None] = []
        self.frame_ids: list[int] = []

    def wants(self, t: int) -> bool:
        """Whether frame ``t`` goes into the picture (so a caller reads its ground truth only
        then)."""
        return self.kind == "gif" or t in self.keep

    def add(
        self, t: int, frame: np.ndarray, ids: np.ndarray, truth: np.ndarray | None = None
    ) -> None:
        """Frame ``t`` with its predicted ``ids`` and, where known, its ground-truth ids (shown
        in a row of their own above the predictions, as in the demo's picture)."""
        if not self.wants(t):
            return
        image = _thumb(blend(frame, ids), self.height)
        truth_image = _thumb(blend(frame, truth), self.height) if truth is not None else None
        if self.kind == "gif":
            image = _caption(image, f"frame {t}: prediction")
            if truth_image is not None:  # side by side: ground truth | prediction
                truth_image = _caption(truth_image, f"frame {t}: ground truth")
                gap = np.full((image.shape[0], 4, 3), 255, dtype=np.uint8)
                image = np.concatenate([truth_image, gap, image], axis=1)
        self.frames.append(image)
        self.truths.append(truth_image)
        self.frame_ids.append(t)

    def save(self, path_stem: str | Path, title: str | None = None) -> Path:
        """``<stem>.png`` (titled grid, frame numbers above: the ground-truth row where every
        shown frame has one, then the predictions) or ``<stem>.gif``."""
        stem = Path(path_stem)
        if self.kind == "gif":
            return save_gif(stem.with_suffix(".gif"), self.frames, height=self.height)
        rows, labels = [self.frames], ["prediction\n(frame 0 given)"]
        if self.truths and all(t is not None for t in self.truths):
            rows.insert(0, self.truths)  # type: ignore[arg-type]
            labels.insert(0, "ground truth")
        return save_labelled_grid(
            stem.with_suffix(".png"),
            rows,
            labels,
            [f"frame {t}" for t in self.frame_ids],
            title=title or stem.name,
            height=self.height,
        )
