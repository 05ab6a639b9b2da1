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

from siamae.data.synthetic import synthetic_video
from siamae.eval.metrics_davis import score_sequence, summarise
from siamae.eval.overlay import blend, save_strip
from siamae.eval.propagation import labels_to_ids, propagate_video, protocol


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

    The picture (``<out_dir>/propagation.png``) has one row per encoder on the first video, plus
    a ground-truth row, at evenly spaced frames.
    """
    params = replace(protocol("cropmae"), resize="native", batch_size=num_frames)
    data = [synthetic_video(i, size, num_frames, seed) for i in range(videos)]
    results: dict[str, dict] = {}
    rows: list[list[np.ndarray]] = []
    picks = np.linspace(0, num_frames - 1, 5).round().astype(int)
    frames0, masks0 = data[0]
    rows.append([blend(frames0[t], masks0[t]) for t in picks])
    for name, encoder in encoders.items():
        scores = []
        for i, (frames, masks) in enumerate(data):
            pred = predict(encoder.eval(), frames, masks, params)
            scores.append(score_sequence(f"synthetic{i}", masks, pred))
            if i == 0:
                rows.append([blend(frames[t], pred[t]) for t in picks])
        results[name] = summarise(scores)
    if out_dir is not None:
        path = save_strip(Path(out_dir) / "propagation.png", rows, height=size)
        results["picture"] = {"path": str(path), "rows": ["ground truth", *encoders]}
    return results
