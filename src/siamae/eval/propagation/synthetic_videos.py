"""Label propagation on built-in synthetic videos with known masks (the demo's evaluation).

Textured objects move over textured backgrounds (``siamae.data.synthetic.synthetic_video``);
the first frame's masks are propagated with the ``cropmae`` protocol at the videos' own size and
scored with the DAVIS J&F, exactly as on DAVIS (first and last frames excluded).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from siamae.data.synthetic import synthetic_image, synthetic_video
from siamae.eval.propagation.davis import write_mask
from siamae.eval.propagation.engine import labels_to_ids, propagate_video, protocol
from siamae.eval.propagation.metrics import score_sequence, summarise
from siamae.overlays import blend, save_labelled_grid


@torch.no_grad()
def predict(encoder: torch.nn.Module, frames: np.ndarray, masks: np.ndarray, params) -> np.ndarray:
    """(T, H, W, 3) frames and (T, H, W) masks -> (T, H, W) predicted ids (frame 0 = given)."""
    size = frames.shape[1:3]
    n = int(masks[0].max()) + 1
    out = [masks[0]]
    for t, soft in enumerate(propagate_video(encoder, iter(frames), masks[0], n, params, size)):
        if t > 0:
            out.append(labels_to_ids(soft, size, params.norm_mask).numpy().astype(np.uint8))
    return np.stack(out)


def evaluate_synthetic(
    encoders: dict[str, torch.nn.Module],
    out_dir: str | Path | None = None,
    videos: int = 3,
    size: int = 96,
    num_frames: int = 12,
    seed: int = 123,
) -> dict[str, dict]:
    """J&F of each named encoder on ``videos`` synthetic videos; optionally an overlay picture.

    The picture (``<out_dir>/propagation.png``) shows every video at evenly spaced frames
    (numbered above): a ground-truth row, then one row per encoder labelled with its J&F on that
    video; the title gives each encoder's J&F over all videos.
    """
    params = replace(protocol("cropmae"), resize="native", batch_size=num_frames)
    data = [synthetic_video(i, size, num_frames, seed) for i in range(videos)]
    picks = np.linspace(0, num_frames - 1, 5).round().astype(int)
    scores: dict[str, list] = {name: [] for name in encoders}
    blocks: list[list[tuple[str, list[np.ndarray]]]] = []
    for i, (frames, masks) in enumerate(data):
        block = [(f"video {i + 1}\nground truth", [blend(frames[t], masks[t]) for t in picks])]
        for name, encoder in encoders.items():
            pred = predict(encoder.eval(), frames, masks, params)
            score = score_sequence(f"synthetic{i}", masks, pred)
            scores[name].append(score)
            jf = summarise([score])["J&F-Mean"]
            block.append((f"{name}\nJ&F {jf:.3f}", [blend(frames[t], pred[t]) for t in picks]))
        blocks.append(block)
    results: dict[str, dict] = {name: summarise(s) for name, s in scores.items()}
    if out_dir is not None:
        overall = ", ".join(f"{name} {results[name]['J&F-Mean']:.3f}" for name in encoders)
        rows = [row for block in blocks for _, row in block]
        labels = [label for block in blocks for label, _ in block]
        per_block = 1 + len(encoders)
        path = save_labelled_grid(
            Path(out_dir) / "propagation.png",
            rows,
            labels,
            [f"frame {t}" for t in picks],
            title=(
                f"Label propagation on {videos} synthetic videos (cropmae protocol)\n"
                f"J&F-Mean over all videos: {overall}"
            ),
            height=size,
            label_rows={b * per_block for b in range(len(blocks))},
        )
        results["picture"] = {
            "path": str(path),
            "rows": ["ground truth", *encoders],
            "row_labels": [label.replace("\n", ", ") for label in labels],
        }
    return results


def write_davis_layout(
    root: str | Path,
    videos: int = 3,
    size: int = 96,
    num_frames: int = 12,
    seed: int = 123,
    images: int = 0,
    width: int | None = None,
) -> Path:
    """The synthetic videos of :func:`evaluate_synthetic` as a DAVIS-layout root
    (``JPEGImages/480p/<video>/*.jpg``, ``Annotations/480p/<video>/*.png``,
    ``ImageSets/2017/val.txt``), which ``siamae eval davis`` and the dense monitor read; with
    ``images``, also that many synthetic scenes as PNGs in ``<root>/images/`` (for RankMe).
    JPEG at quality 95: the frames read back are close to, not equal to, the generated ones.
    ``width``: frames ``size`` x ``width`` (default square). A DAVIS folder to try the
    propagation benchmark on without a download (the figures are not DAVIS's)."""
    root = Path(root)
    names = [f"synthetic{i}" for i in range(videos)]
    for i, name in enumerate(names):
        frames, masks = synthetic_video(i, size, num_frames, seed, width)
        (root / "JPEGImages" / "480p" / name).mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / "480p" / name).mkdir(parents=True, exist_ok=True)
        for t in range(num_frames):
            Image.fromarray(frames[t]).save(
                root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg", quality=95
            )
            write_mask(root / "Annotations" / "480p" / name / f"{t:05d}.png", masks[t])
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("".join(n + "\n" for n in names))
    if images:
        (root / "images").mkdir(exist_ok=True)
        for i in range(images):
            Image.fromarray(synthetic_image(i, size, seed)).save(root / "images" / f"{i:05d}.png")
    return root
