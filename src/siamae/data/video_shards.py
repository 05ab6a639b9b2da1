"""Videos prepared as JPEG frames in tar files (``siamae data videos --format jpeg``) as a
video source: one tar per video, its members ``000000.jpg``, ``000001.jpg``, ... in frame order.

The tars are indexed by the image shards' own index (:func:`siamae.data.shards.open_shards`:
byte offset and size of every member, cached in the run folder as ``shard_index.json``); frame
t of a video is then one positional read and a JPEG decoded at the smallest DCT scale the crop
allows. The original video's size comes from the preparation's done-list (``prepared.jsonl``
beside the tars), so crops are drawn in the original's coordinates as for prepared mp4s.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from siamae.data.shards import ShardSource, classes_file, open_shards
from siamae.data.sources import FULL_SIZE, open_bytes
from siamae.data.video import _VideoSourceBase

DONE_FILE = "prepared.jsonl"  # written by siamae data videos (video_prepare.DONE_FILE)


def _original_sizes(spec: str | Path) -> dict[str, list[int]]:
    """Tar file name -> the original video's (width, height), from the done-list beside them."""
    listing = classes_file(spec).with_name(DONE_FILE)
    sizes: dict[str, list[int]] = {}
    if listing.is_file():
        for line in listing.read_text().splitlines():
            try:
                record = json.loads(line)
                sizes[Path(record["out"]).name] = record["source_size"]
            except (ValueError, KeyError, TypeError):
                continue
    return sizes


def is_frame_shards(spec: str | Path) -> bool:
    """Whether the tars ``spec`` names were written by ``siamae data videos --format jpeg``
    (its done-list lies beside them); image shards are not read as videos."""
    return classes_file(spec).with_name(DONE_FILE).is_file()


class FrameShardSource(_VideoSourceBase):
    """One video per tar of JPEG frames (see the module docstring)."""

    kind = "frame shards"

    def __init__(self, shards: ShardSource, sizes: dict[str, list[int]]) -> None:
        self.shards = shards
        counts = np.bincount(shards.shard_of, minlength=len(shards.shards))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        entries = []
        for s, path in enumerate(shards.shards):
            if counts[s]:
                entry: dict[str, Any] = {
                    "path": path,
                    "num_frames": int(counts[s]),
                    "first": int(starts[s]),
                }
                size = sizes.get(Path(path).name)
                if size:
                    entry["source_size"] = tuple(size)
                entries.append(entry)
        super().__init__(entries, list(shards.unreadable))

    def load_frames(self, index: int, frame_ids: Iterable[int]) -> list[Image.Image]:
        # One lazily opened JPEG per request (the crop drafts the image it is given).
        e = self.entries[index]
        images = []
        for t in frame_ids:
            member = e["first"] + int(t)
            img = open_bytes(self.shards.read(member), self.shards.name(member))
            if "source_size" in e:
                img.info[FULL_SIZE] = e["source_size"]
            images.append(img)
        return images


def open_frame_shards(
    spec: str | Path,
    cache_dir: str | Path | None = None,
    run_dir: str | Path | None = None,
    progress: bool = False,
    workers: int = 0,
) -> FrameShardSource:
    """The JPEG-frame tars ``spec`` names (a folder, a brace pattern or a list, as for image
    shards) as a video source."""
    shards = open_shards(spec, cache_dir, run_dir, progress, workers=workers)
    return FrameShardSource(shards, _original_sizes(spec))
