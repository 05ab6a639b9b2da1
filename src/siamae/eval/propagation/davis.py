"""DAVIS semi-supervised video object segmentation by label propagation.

Layout read (official): ``JPEGImages/480p/<seq>/%05d.jpg``, ``Annotations/480p/<seq>/%05d.png``,
``ImageSets/2017/val.txt`` (or ``2016/val.txt``). Masks are DAVIS-2017 palette PNGs of object
ids (0 background, 255 void) or DAVIS-2016 grayscale PNGs (0/255, one object).

Written: ``<out>/<seq>/%05d.png`` DAVIS-palette predictions (the submission layout),
``<out>/per_sequence.csv`` (one row per object), ``<out>/summary.json``, ``<out>/overlays/``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

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
    RESOLUTION as RESOLUTION,
)
from siamae.eval.propagation.layouts import (
    DavisSequence as DavisSequence,
)
from siamae.eval.propagation.layouts import (
    check_root as check_root,
)
from siamae.eval.propagation.layouts import (
    list_sequences as list_sequences,
)
from siamae.eval.propagation.layouts import (
    load_sequence as load_sequence,
)
from siamae.eval.propagation.layouts import (
    read_mask as read_mask,
)
from siamae.eval.propagation.layouts import (
    write_mask as write_mask,
)
from siamae.eval.propagation.layouts import write_summary, write_table
from siamae.eval.propagation.metrics import (
    PER_SEQUENCE_COLUMNS as PER_SEQUENCE_COLUMNS,
)
from siamae.eval.propagation.metrics import (
    VOID,
    SequenceScores,
    frame_scores,
    num_objects_of,
    summarise,
)
from siamae.eval.propagation.metrics import (
    DavisResult as DavisResult,
)
from siamae.eval.propagation.results import BenchmarkRun, read_frame
from siamae.overlays import OverlayRecorder

# -- evaluation -------------------------------------------------------------------------------


def _scored_size(params: PropagationParams, score_at: str, native: tuple[int, int], patch: int):
    prop = frame_size(params.resize, native, patch)
    return prop, (prop if score_at == "resized" else native)


@torch.no_grad()
def evaluate_davis(
    encoder: torch.nn.Module,
    root: str | Path,
    out: str | Path,
    params: PropagationParams,
    sequences: list[str] | None = None,
    split: str | None = None,
    score_at: str | None = None,
    void: str = "background",
    overlays: list[str] | None = None,
    overlay_kind: str = "png",
    max_frames: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> DavisResult:
    """Propagate the first-frame masks of every sequence, write predictions, score, summarise.

    Args:
        score_at: "resized" (frames AND annotations resized to the propagation size and scored
            there: the published CropMAE figures) or "native" (predictions resized to the
            annotation size, nearest). Default: resized for a fixed-size protocol, else native.
        overlays: sequence names (or ["all"]) for which to save an overlay picture.
        max_frames: use only the first N frames of each sequence, the annotated first frame
            included (N >= 3; quick checks, not the protocol).
    """
    root = check_root(root)
    out = Path(out)
    seqs = [load_sequence(root, n) for n in list_sequences(root, split, sequences)]
    scoring = _Scoring(_score_at(score_at, params), void, _checked_max_frames(max_frames))
    want_overlay = set(overlays or [])
    run = BenchmarkRun.start(encoder, device)
    results: list[SequenceScores] = []
    unscored: list[str] = []
    sizes: set[str] = set()
    bar = tqdm(seqs, desc="DAVIS", unit="seq", disable=not progress)
    for seq in bar:
        bar.set_postfix_str(seq.name)
        overlay = overlay_kind if ("all" in want_overlay or seq.name in want_overlay) else None
        scores, size = _evaluate_sequence(run, seq, out, params, scoring, overlay, progress)
        sizes.add(size)
        if scores is None:
            unscored.append(seq.name)
        else:
            results.append(scores)
    figures = {
        "resolution": _resolution(scoring.score_at, sizes),
        "score_at": scoring.score_at,
        "void": void,
        "sequences": [s.name for s in results],
        "unscored_sequences": unscored,
        "max_frames": max_frames,
        **summarise(results),
    }
    summary = run.summary(
        "DAVIS (semi-supervised, davis2017-evaluation J&F)", params, figures, detailed_timing=True
    )
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for s in results for r in s.object_rows()]
    write_table(out / "per_sequence.csv", PER_SEQUENCE_COLUMNS, rows, float_format="{:.4f}")
    write_summary(out, summary)
    return DavisResult(summary, results)


@dataclass
class _Scoring:
    """How the predictions are scored: at which size, with which void pixels, over how many
    frames."""

    score_at: str
    void: str
    max_frames: int | None


def _score_at(score_at: str | None, params: PropagationParams) -> str:
    if score_at is None:
        return "resized" if "x" in params.resize else "native"
    if score_at not in ("resized", "native"):
        raise DataError(f"score_at must be 'resized' or 'native', got {score_at!r}")
    return score_at


def _checked_max_frames(max_frames: int | None) -> int | None:
    if max_frames is not None and max_frames < 3:
        # Frame 0 is the given annotation and the last frame is not scored (as the official
        # evaluation does): fewer than 3 frames leave nothing to score.
        raise DataError(
            f"--max-frames {max_frames}: counts frames from the annotated first one, which is "
            "given, and the last is not scored; pass 3 or more (or leave it out: every frame)"
        )
    return max_frames


def _resolution(score_at: str, sizes: set[str]) -> str:
    shown = ", ".join(sorted(sizes))
    if score_at == "resized":
        return f"resized: frames and annotations at {shown} (published CropMAE protocol)"
    return f"native: propagated at {shown}, scored at the annotations' size"


def _evaluate_sequence(
    run: BenchmarkRun,
    seq: DavisSequence,
    out: Path,
    params: PropagationParams,
    scoring: _Scoring,
    overlay_kind: str | None,
    progress: bool,
) -> tuple[SequenceScores | None, str]:
    """Propagate one sequence, write its predictions (and its overlay, with ``overlay_kind``):
    its scores (None when it is not fully annotated) and its propagation size ("HxW")."""
    frames = seq.frames[: scoring.max_frames] if scoring.max_frames is not None else seq.frames
    masks = seq.masks[: len(frames)]
    first = read_mask(masks[0])
    prop_size, score_size = _scored_size(params, scoring.score_at, first.shape, run.patch)
    n_obj = num_objects_of(first)
    scored = seq.fully_annotated and len(frames) >= 3
    (out / seq.name).mkdir(parents=True, exist_ok=True)
    recorder = OverlayRecorder(len(frames), overlay_kind) if overlay_kind else None
    j_rows, f_rows = [], []
    first_ids = np.where(first == VOID, 0, first)
    predictions = _predictions(
        run, seq.name, frames, first_ids, n_obj, params, prop_size, score_size, progress
    )
    for t, pred in predictions:
        write_mask(out / seq.name / f"{frames[t].stem}.png", pred)
        if recorder is not None and recorder.wants(t):
            truth = (
                resize_ids(read_mask(masks[t]), score_size, exact=False) if t < len(masks) else None
            )
            recorder.add(t, read_frame(frames[t]), pred, truth)
        if scored and 0 < t < len(frames) - 1:
            gt = resize_ids(read_mask(masks[t]), score_size, exact=False)
            j, f = frame_scores(gt, pred, n_obj, scoring.void)
            j_rows.append(j)
            f_rows.append(f)
    scores = None
    if scored:
        j_arr = np.stack(j_rows, axis=1) if j_rows else np.zeros((n_obj, 0))
        f_arr = np.stack(f_rows, axis=1) if f_rows else np.zeros((n_obj, 0))
        scores = SequenceScores(seq.name, j_arr, f_arr)
    if recorder is not None:
        score = f"J&F {summarise([scores])['J&F-Mean']:.3f}" if scores is not None else "not scored"
        recorder.save(
            out / "overlays" / seq.name,
            title=f"{seq.name}: propagated masks ({params.name} protocol, {score})",
        )
    return scores, f"{prop_size[0]}x{prop_size[1]}"


def _predictions(
    run: BenchmarkRun,
    name: str,
    frames: list[Path],
    first_ids: np.ndarray,
    n_obj: int,
    params: PropagationParams,
    prop_size: tuple[int, int],
    score_size: tuple[int, int],
    progress: bool,
) -> Iterator[tuple[int, np.ndarray]]:
    """(t, object ids at ``score_size``) for every frame, frame 0 being the given mask."""
    soft_iter = propagate_video(
        run.encoder,
        (read_frame(p) for p in frames),
        first_ids,
        n_obj + 1,
        params,
        prop_size,
        run.device,
        run.timer,
    )
    inner = tqdm(
        soft_iter, total=len(frames), desc=name, unit="frame", leave=False, disable=not progress
    )
    for t, soft in enumerate(inner):
        if t == 0:
            yield t, resize_ids(first_ids.astype(np.uint8), score_size, exact=False)
        else:
            ids = labels_to_ids(soft, prop_size, params.norm_mask).numpy().astype(np.uint8)
            yield t, resize_ids(ids, score_size, exact=True)


def format_summary(summary: dict) -> str:
    """A few lines for the terminal, naming the protocol and the resolution next to the numbers."""
    if not summary.get("objects"):
        return f"DAVIS [{summary['protocol']}]: nothing scored (no fully annotated sequence)"
    return (
        f"DAVIS J&F-Mean {summary['J&F-Mean']:.4f} (J {summary['J-Mean']:.4f}, "
        f"F {summary['F-Mean']:.4f}; J-recall {summary['J-Recall']:.3f}, "
        f"F-recall {summary['F-Recall']:.3f}, J-decay {summary['J-Decay']:.3f}, "
        f"F-decay {summary['F-Decay']:.3f}) over {summary['objects']} objects in "
        f"{len(summary['sequences'])} sequences\n"
        f"  protocol {summary['protocol']}; scoring {summary['resolution']}\n"
        f"  encoder: {summary['encoder']}"
    )


def score_predictions(
    root: str | Path,
    predictions: str | Path,
    sequences: list[str] | None = None,
    split: str | None = None,
    void: str = "background",
) -> tuple[dict, list[SequenceScores]]:
    """Score a folder of palette PNGs in the submission layout (``<dir>/<seq>/%05d.png``).

    Annotations are resized (nearest, as the published protocol) to the predictions' size where
    the two differ, so a 480x880 folder is scored the published way and a native one natively.
    Sequences whose folder is missing or incomplete are skipped and listed.
    """
    root = check_root(root)
    predictions = Path(predictions)
    results, skipped = [], []
    for name in list_sequences(root, split, sequences):
        seq = load_sequence(root, name)
        files = [predictions / name / f"{m.stem}.png" for m in seq.masks]
        if not seq.fully_annotated or not all(f.is_file() for f in files):
            skipped.append(name)
            continue
        preds = [read_mask(f) for f in files]
        gts = [resize_ids(read_mask(m), preds[0].shape) for m in seq.masks]
        n = num_objects_of(gts[0])
        j, f = zip(*(frame_scores(g, p, n, void) for g, p in zip(gts[1:-1], preds[1:-1])))
        results.append(SequenceScores(name, np.stack(j, axis=1), np.stack(f, axis=1)))
    summary = {**summarise(results), "sequences": [s.name for s in results], "skipped": skipped}
    return summary, results
