"""DAVIS semi-supervised video object segmentation by label propagation.

Layout read (official): ``JPEGImages/480p/<seq>/%05d.jpg``, ``Annotations/480p/<seq>/%05d.png``,
``ImageSets/2017/val.txt`` (or ``2016/val.txt``). Masks are DAVIS-2017 palette PNGs of object
ids (0 background, 255 void) or DAVIS-2016 grayscale PNGs (0/255, one object).

Written: ``<out>/<seq>/%05d.png`` DAVIS-palette predictions (the submission layout),
``<out>/per_sequence.csv`` (one row per object), ``<out>/summary.json``, ``<out>/overlays/``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from siamae.data.sources import DECODE_ERRORS
from siamae.errors import DataError
from siamae.eval.propagation.engine import (
    PropagationParams,
    frame_size,
    labels_to_ids,
    propagate_video,
    resize_ids,
)
from siamae.eval.propagation.metrics import (
    VOID,
    SequenceScores,
    frame_scores,
    num_objects_of,
    summarise,
)
from siamae.eval.propagation.results import (
    BenchmarkRun,
    read_frame,
    split_lines,
    video_name,
    write_summary,
    write_table,
)
from siamae.overlays import PALETTE, OverlayRecorder

RESOLUTION = "480p"


# -- files ------------------------------------------------------------------------------------


def read_mask(path: str | Path) -> np.ndarray:
    """A DAVIS annotation -> (H, W) uint8 object ids (0 background, 255 void).

    Palette PNGs (2017) hold ids directly. Grayscale PNGs holding only 0 and 255 are DAVIS-2016
    single-object masks: 255 becomes object 1. RGB PNGs are mapped back through the palette.
    """
    path = Path(path)
    try:
        img = Image.open(path)
        img.load()
    except DECODE_ERRORS as err:  # a decompression bomb too
        raise DataError(
            f"cannot read mask {path}: {err}; re-download the annotation or remove it"
        ) from None
    if img.mode == "P":
        return np.asarray(img, dtype=np.uint8).copy()
    if img.mode in ("RGB", "RGBA"):
        rgb = np.asarray(img.convert("RGB"))
        codes = (
            (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
        )
        pal = (
            (PALETTE[:, 0].astype(np.int32) << 16)
            | (PALETTE[:, 1].astype(np.int32) << 8)
            | (PALETTE[:, 2])
        )
        lookup = {int(c): i for i, c in enumerate(pal)}
        uniq, inv = np.unique(codes, return_inverse=True)
        missing = [hex(int(u)) for u in uniq if int(u) not in lookup]
        if missing:
            raise DataError(
                f"mask {path} is RGB with colours outside the DAVIS palette ({missing[:3]}); "
                "save it as a palette or grayscale PNG of object ids"
            )
        return np.array([lookup[int(u)] for u in uniq], dtype=np.uint8)[inv].reshape(codes.shape)
    arr = np.asarray(img.convert("L") if img.mode not in ("L", "I", "I;16") else img)
    if arr.max(initial=0) > 255:
        raise DataError(f"mask {path} has values above 255; expected object ids")
    arr = arr.astype(np.uint8)
    if set(np.unique(arr).tolist()) <= {0, 255}:
        return (arr == 255).astype(np.uint8)  # DAVIS-2016: one object
    return arr


def write_mask(path: str | Path, ids: np.ndarray) -> None:
    """Save (H, W) ids as a DAVIS-palette PNG (what the official evaluation reads)."""
    img = Image.fromarray(np.asarray(ids, dtype=np.uint8), mode="P")
    img.putpalette(PALETTE.flatten().tolist())
    img.save(path)


@dataclass
class DavisSequence:
    name: str
    frames: list[Path]
    masks: list[Path]

    @property
    def fully_annotated(self) -> bool:
        return len(self.masks) == len(self.frames)


def check_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"DAVIS root {root} does not exist; pass --data-root pointing at DAVIS/")
    if not (root / "JPEGImages" / RESOLUTION).is_dir():
        raise DataError(
            f"{root} has no JPEGImages/{RESOLUTION}/: not a DAVIS folder "
            "(expected JPEGImages/480p/<seq>/, Annotations/480p/<seq>/, ImageSets/)"
        )
    return root


def list_sequences(
    root: str | Path, split: str | None = None, sequences: list[str] | None = None
) -> list[str]:
    """Sequence names: ``sequences`` if given, else those of the split file.

    ``split``: a file path, ``"2017/val"``, ``"val"`` (2017 if present, else 2016), or None (val).
    """
    root = check_root(root)
    if sequences:
        return list(sequences)
    candidates: list[Path]
    if split and Path(split).is_file():
        candidates = [Path(split)]
    else:
        name = split or "val"
        if "/" in name:
            candidates = [root / "ImageSets" / f"{name}.txt"]
        else:
            candidates = [root / "ImageSets" / y / f"{name}.txt" for y in ("2017", "2016")]
    for path in candidates:
        if path.is_file():
            return [video_name(fields[0]) for fields in split_lines(path)]
    raise DataError(
        f"no split file found (looked for {', '.join(str(c) for c in candidates)}); "
        "pass --split FILE or --sequences a,b"
    )


def load_sequence(root: str | Path, name: str) -> DavisSequence:
    root = Path(root)
    img_dir = root / "JPEGImages" / RESOLUTION / name
    ann_dir = root / "Annotations" / RESOLUTION / name
    frames = sorted(img_dir.glob("*.jpg"))
    if not frames:
        raise DataError(f"sequence {name!r}: no frames in {img_dir}; check --sequences/--split")
    masks = sorted(ann_dir.glob("*.png"))
    if not masks:
        raise DataError(f"sequence {name!r}: no annotations in {ann_dir}; the first mask is needed")
    if masks[0].stem != frames[0].stem:
        raise DataError(
            f"sequence {name!r}: first annotation {masks[0].name} does not match first frame "
            f"{frames[0].name}"
        )
    return DavisSequence(name, frames, masks)


# -- evaluation -------------------------------------------------------------------------------


@dataclass
class DavisResult:
    summary: dict
    sequences: list[SequenceScores] = field(default_factory=list)


def _scored_size(params: PropagationParams, score_at: str, native: tuple[int, int], patch: int):
    prop = frame_size(params.resize, native, patch)
    return prop, (prop if score_at == "resized" else native)


PER_SEQUENCE_COLUMNS = ["sequence", "object", "J&F-Mean", "J-Mean", "J-Recall", "J-Decay",
                        "F-Mean", "F-Recall", "F-Decay", "frames"]  # fmt: skip


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
