"""The benchmarks' files, read and written without torch: DAVIS, VIP and JHMDB layouts, split
files, ``summary.json`` and the CSV tables, and a NumPy nearest resize of id maps.

The propagation modules (:mod:`~siamae.eval.propagation.davis`, ``vip``, ``jhmdb``) use these and
keep their names; ``--score-only`` (:mod:`~siamae.eval.propagation.scoring`) imports only this
module and :mod:`~siamae.eval.propagation.metrics`, so scoring a folder never loads torch (its
import is most of a short scoring run's time).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from siamae.data.sources import DECODE_ERRORS
from siamae.errors import DataError
from siamae.overlays import PALETTE

# -- split files and results ----------------------------------------------------------------


def split_lines(split: str | Path) -> list[list[str]]:
    """The whitespace-separated fields of each non-blank line of a split file."""
    path = Path(split)
    if not path.is_file():
        raise DataError(f"split file {split} not found")
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def video_name(entry: str) -> str:
    """A split file's entry -> the video's name: its last path part (``a/b/`` -> ``b``)."""
    return entry.strip("/").split("/")[-1]


def write_summary(out: Path, summary: dict[str, Any]) -> Path:
    """``out/summary.json``: ``summary`` as indented JSON (NumPy numbers written as floats)."""
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return path


def write_table(
    path: Path,
    columns: list[str],
    rows: Iterable[dict[str, Any]],
    float_format: str | None = None,
    line_end: str = "\r\n",
) -> Path:
    """A CSV file of ``rows`` under a header of ``columns``; floats through ``float_format``
    (e.g. ``"{:.4f}"``) when given. ``line_end``: the csv module's default, or ``"\\n"``
    (JHMDB's ``per_clip.csv`` has always been written with it)."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator=line_end)
        writer.writeheader()
        for row in rows:
            if float_format is not None:
                row = {
                    k: (float_format.format(v) if isinstance(v, float) else v)
                    for k, v in row.items()
                }
            writer.writerow(row)
    return path


def resize_nearest(ids: np.ndarray, size: tuple[int, int], exact: bool = False) -> np.ndarray:
    """Nearest-neighbour resize of an id map (H, W), pixel for pixel what
    :func:`~siamae.eval.propagation.engine.resize_ids` gives (torch's ``nearest`` and
    ``nearest-exact``, float32 index arithmetic included) without loading torch."""
    if tuple(ids.shape[:2]) == tuple(size):
        return ids
    if ids.shape[0] != size[0]:
        ids = ids[_nearest_indices(ids.shape[0], size[0], exact)]
    if ids.shape[1] != size[1]:
        ids = ids[:, _nearest_indices(ids.shape[1], size[1], exact)]
    return ids


def _nearest_indices(source: int, target: int, exact: bool) -> np.ndarray:
    """Source index of each target index, as torch computes it: ``floor(i * scale)`` in float32
    (``nearest``) or ``floor((i + 0.5) * scale)`` rounded to float32 (``nearest-exact``), with
    ``scale = float32(source) / target``, clipped to the last index."""
    scale = np.float32(source) / np.float32(target)
    i = np.arange(target)
    if exact:
        pos = ((i + 0.5) * np.float64(scale)).astype(np.float32)
    else:
        pos = i.astype(np.float32) * scale
    return np.minimum(np.floor(pos).astype(np.int64), source - 1)


# -- DAVIS ------------------------------------------------------------------------------------

RESOLUTION = "480p"


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
    if img.mode in ("P", "L"):
        # One byte a pixel: the decoded bytes as they are (np.asarray(img) took as long as the
        # decoding itself on "L" masks).
        arr = np.frombuffer(img.tobytes(), dtype=np.uint8).reshape(img.height, img.width)
        if img.mode == "P":
            return arr.copy()
        return _davis_2016_or_ids(arr.copy())
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
    return _davis_2016_or_ids(arr.astype(np.uint8))


def _davis_2016_or_ids(arr: np.ndarray) -> np.ndarray:
    """A grayscale mask's uint8 values: object 1 where 255 if it holds only 0 and 255 (DAVIS
    2016), else the ids as they are."""
    if not np.any(arr - np.uint8(1) < 254):  # only 0 and 255 (1..254 wrap to 0..253)
        return (arr == 255).astype(np.uint8)
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


# -- VIP --------------------------------------------------------------------------------------

NUM_CLASSES = 20

CLASSES = (
    "background", "hat", "hair", "sun-glasses", "upper-clothes", "dress", "coat", "socks",
    "pants", "gloves", "scarf", "skirt", "torso-skin", "face", "right-arm", "left-arm",
    "right-leg", "left-leg", "right-shoe", "left-shoe",
)  # fmt: skip


def read_category_ids(path: str | Path) -> np.ndarray:
    """A VIP ``Category_ids`` PNG -> (H, W) uint8 class ids."""
    try:
        with Image.open(path) as img:
            arr = np.asarray(img)
    except DECODE_ERRORS as err:  # a decompression bomb too
        raise DataError(f"cannot read annotation {path}: {err}") from None
    if arr.ndim == 3:
        arr = arr[..., 0]
    return arr.astype(np.uint8)


def vip_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"VIP root {root} does not exist; pass --data-root pointing at VIP/")
    for cand in (root / "VIP_Fine", root):
        if (cand / "Images").is_dir() and (cand / "Annotations" / "Category_ids").is_dir():
            return cand
    raise DataError(f"{root} has no VIP_Fine/Images and VIP_Fine/Annotations/Category_ids")


def list_videos(root: Path, split: str | None = None) -> list[str]:
    if split:
        names = [video_name(fields[0]) for fields in split_lines(split)]
    else:
        names = sorted(p.name for p in (root / "Images").iterdir() if p.is_dir())
    if not names:
        raise DataError(f"no videos found in {root / 'Images'}")
    return names


# -- JHMDB ------------------------------------------------------------------------------------

NUM_JOINTS = 15


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
