"""Video sources: video files decoded with PyAV, folders of extracted frames, list files of either.

Both give what :class:`~siamae.data.views.ViewMaker` needs: ``open_image`` (one random frame of
a video: CropMAE on video) and ``load_frame_pair`` / ``load_frame_pairs`` (frames ``t`` and
``t + gap``: SiamMAE). All randomness comes from the ``rng`` passed in, so a sample depends only
on (seed, epoch, index).

**Frame numbering.** Frame ``i`` of a video file is the i-th frame a plain sequential decode of
its first video stream gives (presentation order, as the decoder outputs it). Containers'
frame counts (``stream.frames``) are not trusted: an AVI with dropped-frame chunks reports its
timeline length (``tree.avi``: 444 in the header, 68 frames stored), and some MP4s lose a frame
to decoder delay. The index counts frames by demuxing packets (no decoding) and then decodes
only the last group of pictures to confirm how many frames the decoder really gives.

**Seeking.** To read frames ``[a, b]`` the reader seeks to the last keyframe at or before ``a``
(by its pts), decodes forward only to ``b``, and numbers frames from that keyframe. A keyframe's
frame number is the rank of its pts among all packets' pts (or its decode position where pts are
missing or repeated). Anything unexpected (the seek lands elsewhere, the keyframe never shows)
falls back to decoding from the start, which is correct by definition.

**Index.** Frame counts, rates and keyframes are found once, with a progress bar, and cached in
``video_index.json`` in the run folder, keyed by each file's path and stat key (size, mtime,
inode, ctime): a restart re-probes only files that changed. A video that cannot be opened or
decoded is left out of the source, counted and reported (``source.unreadable``, a warning, the
index file); one that fails later, while training, raises :class:`UnreadableSample` and the
dataset skips and counts it.
"""

from __future__ import annotations

import abc
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from siamae.data.sources import (
    FULL_SIZE,
    IMAGE_EXTENSIONS,
    UnreadableSample,
    file_stat_key,
    open_lazy,
    read_list_file,
    sample_frame_pair,
    scan_files,
)
from siamae.data.torchcodec_reader import TORCHCODEC_ERRORS, check_torchcodec, torchcodec_frames
from siamae.errors import DataError

if TYPE_CHECKING:
    from types import ModuleType

    from siamae.config import Config

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = {".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg"}
INDEX_FILE = "video_index.json"
SKIPPED_FILE = "skipped_files.txt"  # in the run folder: every item training went on without
INDEX_VERSION = 2  # 2: prepared videos' source_size
#: Container metadata of a video written by ``siamae data videos``: the original's "WxH". Its
#: frames are stored smaller; crops are drawn in the original's coordinates (views.FULL_SIZE).
SOURCE_SIZE_TAG = "siamae_source_size"
VIDEO_BACKENDS = ("pyav", "torchcodec")


def _av() -> ModuleType:  # PyAV, imported when a video is first read
    try:
        import av
    except ImportError:  # pragma: no cover - av is a dependency; this names the fix if missing
        raise DataError(
            "video sources need PyAV; install it with `pip install av` (or siamae[video])"
        ) from None
    return av


def _decode_errors() -> tuple[type[BaseException], ...]:
    av = _av()
    return (av.FFmpegError, OSError, ValueError, EOFError, IndexError, RuntimeError, KeyError)


# -- probing (index building) -------------------------------------------------------------------


def _keyframe_numbers(
    keys: list[tuple[int, int | None]], pts: list[int | None]
) -> list[tuple[int, int | None]]:
    """(decode position, pts) of each keyframe -> sorted (frame number, pts).

    With every packet's pts known and unique, a keyframe's frame number is the rank of its pts
    (right for open GOPs, whose leading B-frames follow the keyframe in decode order but show
    before it). Otherwise the decode position is used (right for closed GOPs). Frame 0 is always
    listed: it is reached by decoding from the start (pts None: no seek).
    """
    if pts and all(p is not None for p in pts) and len(set(pts)) == len(pts):
        rank = {p: r for r, p in enumerate(sorted(pts))}  # type: ignore[type-var]
        keys = [(rank[p], p) for _, p in keys]
    numbered = {n: p for n, p in keys if p is not None}
    numbered.setdefault(0, None)
    return sorted(numbered.items())


class _SeekMissed(Exception):
    """The seek did not lead to the keyframe expected; decode from the start instead."""


#: Per-process counters (tests and benchmarks read them): frames decoded, seeks, fallbacks.
DECODE_STATS = {"decoded": 0, "seeks": 0, "fallbacks": 0}


def _video_stream(container: Any, threads: int = 1) -> Any:
    """The first video stream, its decoder set to ``threads`` threads (0: FFmpeg's default;
    more than 1: frame and slice threading)."""
    stream = container.streams.video[0]
    if threads > 0:
        stream.codec_context.thread_count = threads
        stream.thread_type = "AUTO" if threads > 1 else "SLICE"
    return stream


def _frames_in(
    container: Any, stream: Any, key_number: int, key_pts: int | None
) -> Iterator[tuple[int, Any]]:
    """(frame number, av.VideoFrame) from keyframe ``key_number`` (pts ``key_pts``) on, in an
    open container (a later call seeks again: PyAV's seek flushes the decoder).

    Seeks to the keyframe (none for frame 0) and decodes forward. Frames the decoder gives
    before the keyframe (a seek that lands earlier) are dropped. Raises :class:`_SeekMissed`
    when the keyframe never shows, or shows as a frame the decoder does not call a keyframe
    (e.g. an index-less AVI whose every packet claims to be one), before yielding anything.
    """
    started = key_number == 0 or key_pts is None
    if not started:
        DECODE_STATS["seeks"] += 1
        container.seek(key_pts, stream=stream, backward=True, any_frame=False)
    else:
        key_number = 0
    number = key_number
    for packet in container.demux(stream):
        for frame in packet.decode():
            DECODE_STATS["decoded"] += 1
            if not started:
                if frame.pts != key_pts:
                    continue
                if not frame.key_frame:
                    raise _SeekMissed
                started = True
            yield number, frame
            number += 1
    if not started:
        raise _SeekMissed


def _frames_from(path: str, key_number: int, key_pts: int | None) -> Iterator[tuple[int, Any]]:
    """:func:`_frames_in` of a video file opened for this one pass."""
    with _av().open(path) as container:
        yield from _frames_in(container, _video_stream(container, 0), key_number, key_pts)


def _count_from(path: str, key_number: int, key_pts: int | None) -> tuple[int, bool]:
    """The video's frame count: ``key_number`` plus the frames the decoder gives from that
    keyframe to the end (only the last group of pictures is decoded); and whether the seek
    worked (if not, the container's keyframe flags are not to be trusted). Raises a decode
    error for a broken file."""
    try:
        return key_number + sum(1 for _ in _frames_from(path, key_number, key_pts)), True
    except _SeekMissed:
        DECODE_STATS["fallbacks"] += 1
        return sum(1 for _ in _frames_from(path, 0, None)), False


def probe_video(path: str) -> dict[str, Any]:
    """Frame count, rate, size and keyframes of a video file; raises on an unreadable one."""
    av = _av()
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        codec = stream.codec_context.name
        source_size = _source_size(container.metadata.get(SOURCE_SIZE_TAG, ""))
        keys: list[tuple[int, int | None]] = []
        pts: list[int | None] = []
        for packet in container.demux(stream):
            if packet.size == 0:  # flush packets, and AVI's empty "dropped frame" chunks
                continue
            if packet.is_keyframe:
                keys.append((len(pts), packet.pts if packet.pts is not None else packet.dts))
            pts.append(packet.pts)
    if not pts:
        raise ValueError("no video frames")
    keyframes = _keyframe_numbers(keys, pts)
    num_frames, seek_ok = _count_from(path, *keyframes[-1])
    if not seek_ok:  # e.g. an AVI without its index: every packet claims to be a keyframe
        keyframes = [(0, None)]
    if num_frames <= 0:
        raise ValueError("the decoder gives no frames")
    return {
        "num_frames": num_frames,
        "packets": len(pts),
        "fps": round(fps, 6),
        "width": width,
        "height": height,
        "codec": codec,
        "keyframes": [[n, p] for n, p in keyframes if n < num_frames],
        # B-frames: frames shown in another order than stored (see plain_layout)
        "reordered": any(a is not None and b is not None and b < a for a, b in zip(pts, pts[1:])),
        **({"source_size": list(source_size)} if source_size else {}),
    }


def _source_size(tag: str) -> tuple[int, int] | None:
    """``"854x480"`` (a prepared video's :data:`SOURCE_SIZE_TAG`) -> (854, 480); None if absent."""
    found = re.fullmatch(r"\s*(\d+)x(\d+)\s*", tag or "")
    return (int(found.group(1)), int(found.group(2))) if found else None


def natural_key(name: str) -> list[Any]:
    """'frame_10.jpg' after 'frame_9.jpg': digit runs compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_frames(folder: str) -> list[str]:
    """Image file names in ``folder``, in natural order."""
    names = [n for n in os.listdir(folder) if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(names, key=natural_key)


def probe_frames(folder: str) -> dict[str, Any]:
    names = list_frames(folder)
    if not names:
        raise ValueError("no image files")
    return {"num_frames": len(names)}


# -- decoding -----------------------------------------------------------------------------------


def _key_before(keyframes: list[list[Any]], frame: int) -> tuple[int, int | None]:
    """The last seekable keyframe (number, pts) at or before ``frame``; (0, None): the start."""
    key: tuple[int, int | None] = (0, None)
    for number, pts in keyframes:
        if number > frame:
            break
        if pts is not None:
            key = (number, pts)
    return key


def plan_segments(
    keyframes: list[list[Any]], wanted: list[int]
) -> list[tuple[int, int | None, list[int]]]:
    """Frames ``wanted`` (sorted, unique) -> decode runs (key number, key pts, frames): a frame
    joins the run before it unless a keyframe lies after that run's last frame, in which case
    seeking to that keyframe decodes fewer frames than decoding on. With short groups of
    pictures a pair (t, t + gap) is two short runs, not the whole gap."""
    runs: list[tuple[int, int | None, list[int]]] = []
    for frame in wanted:
        number, pts = _key_before(keyframes, frame)
        if runs and number <= runs[-1][2][-1]:
            runs[-1][2].append(frame)
        else:
            runs.append((number, pts, [frame]))
    return runs


def _collect(frames: Iterator[tuple[int, Any]], wanted: list[int], out: dict[int, Any]) -> None:
    """Take frames ``wanted`` from ``frames`` into ``out`` (as av.VideoFrame), up to the last."""
    want, last, number = set(wanted), wanted[-1], -1
    for number, frame in frames:
        if number in want:
            out[number] = frame
            if number == last:
                return
    raise LookupError(
        f"the decoder gave {number + 1} frames (wanted frame {last}); the file may have changed "
        "since the index was built"
    )


def _decode(
    path: str, keyframes: list[list[Any]], wanted: list[int], threads: int = 1
) -> dict[int, Any]:
    """Frames ``wanted`` (sorted) of a video file as av.VideoFrame: one open of the file, one
    seek per run of :func:`plan_segments`, each run decoded from its keyframe to its last
    frame. Raises a decode error or ``LookupError``."""
    av = _av()
    out: dict[int, Any] = {}
    try:
        with av.open(path) as container:
            stream = _video_stream(container, threads)
            for number, pts, frames in plan_segments(keyframes, wanted):
                _collect(_frames_in(container, stream, number, pts), frames, out)
        return out
    except _SeekMissed:  # decode from the start instead: slower, never wrong
        DECODE_STATS["fallbacks"] += 1
        out.clear()
        with av.open(path) as container:
            _collect(_frames_in(container, _video_stream(container, threads), 0, None), wanted, out)
        return out


#: One swscale converter per frame geometry, per process. ``VideoFrame.to_image`` /
#: ``to_ndarray("rgb24")`` set a converter up again whenever the size changes (every video
#: read in turn): 1.5-2.5 ms a frame, against 0.2-0.3 ms reused; the pixels are the same.
_CONVERTERS: dict[tuple[int, int, str], Any] = {}


def _to_image(frame: Any) -> Image.Image:
    key = (frame.width, frame.height, frame.format.name)
    converter = _CONVERTERS.get(key)
    if converter is None:
        if len(_CONVERTERS) >= 16:
            _CONVERTERS.clear()
        converter = _CONVERTERS[key] = _av().video.reformatter.VideoReformatter()
    return Image.fromarray(converter.reformat(frame, format="rgb24").to_ndarray())


# -- sources ------------------------------------------------------------------------------------


class _VideoSourceBase(abc.ABC):
    """Shared by video files and frame folders: ``entries`` are probed index records."""

    kind = ""

    def __init__(self, entries: list[dict[str, Any]], unreadable: list[tuple[str, str]]) -> None:
        self.entries = entries
        self.unreadable = unreadable

    def __len__(self) -> int:
        return len(self.entries)

    def name(self, index: int) -> str:
        return self.entries[index]["path"]

    def num_frames_of(self, index: int) -> int:
        return int(self.entries[index]["num_frames"])

    @abc.abstractmethod
    def load_frames(self, index: int, frame_ids: Iterable[int]) -> list[Image.Image]:
        """Frames ``frame_ids`` (any order, repeats allowed) of item ``index``."""

    def open_image(self, index: int, rng: np.random.Generator) -> Image.Image:
        """One random frame (CropMAE / MAE on video)."""
        t = int(rng.integers(0, self.num_frames_of(index)))
        return self.load_frames(index, [t])[0]

    def load_frame_pair(
        self, index: int, rng: np.random.Generator, gap: tuple[int, int]
    ) -> tuple[Image.Image, Image.Image]:
        """Frames t and t + g, g uniform in [gap[0], gap[1]) clamped to the video."""
        return self.load_frame_pairs(index, rng, gap, 1)[0]

    def load_frame_pairs(
        self, index: int, rng: np.random.Generator, gap: tuple[int, int], count: int
    ) -> list[tuple[Image.Image, Image.Image]]:
        """``count`` independent pairs from one decode of the video (repeated sampling)."""
        n = self.num_frames_of(index)
        pairs = [sample_frame_pair(rng, n, gap) for _ in range(count)]
        frames = self.load_frames(index, [t for pair in pairs for t in pair])
        return [(frames[2 * k], frames[2 * k + 1]) for k in range(count)]


def plain_layout(entry: dict[str, Any]) -> bool:
    """Frames stored in display order, one packet each (every video ``siamae data videos``
    writes). torchcodec's seeks are exact on those; on others they can miss (``box.mp4``, whose
    456 packets give 455 frames: frame 227 came back as frame 225), so the torchcodec backend
    leaves them to PyAV's reader, which is checked pixel-exact against a sequential decode."""
    return not entry.get("reordered", True) and entry.get("packets") == entry.get("num_frames")


class VideoFileSource(_VideoSourceBase):
    """Video files (mp4, avi, webm, mkv, ...) decoded with PyAV (or torchcodec: ``backend``),
    seeking to the frames needed; ``threads`` decoder threads (0: FFmpeg's default)."""

    kind = "videos"

    def __init__(
        self,
        entries: list[dict[str, Any]],
        unreadable: list[tuple[str, str]],
        backend: str = "pyav",
        threads: int = 1,
        device: str = "cpu",
    ) -> None:
        super().__init__(entries, unreadable)
        if backend not in VIDEO_BACKENDS:
            raise DataError(f"unknown video backend {backend!r}; use one of {VIDEO_BACKENDS}")
        self.backend, self.threads, self.device = backend, threads, device

    def load_frames(self, index: int, frame_ids: Iterable[int]) -> list[Image.Image]:
        # Each wanted frame is decoded once (repeated samples of a video share one decode).
        ids = list(frame_ids)
        got = self._read(index, sorted(set(ids)))
        size = self.entries[index].get("source_size")
        images = {}
        for i, frame in got.items():
            # the same pixels as VideoFrame.to_image, several times faster (_to_image)
            img = frame if isinstance(frame, Image.Image) else _to_image(frame)
            if size:  # a prepared video: crops are drawn in the original's coordinates
                img.info[FULL_SIZE] = tuple(size)
            images[i] = img
        return [images[i] for i in ids]  # decoded pixels: a repeated frame may be shared

    def _read(self, index: int, wanted: list[int]) -> dict[int, Any]:
        e = self.entries[index]
        if wanted[0] < 0 or wanted[-1] >= e["num_frames"]:
            raise IndexError(f"frames {wanted} outside 0..{e['num_frames'] - 1}")
        try:
            if self.backend == "torchcodec" and plain_layout(e):
                return torchcodec_frames(e["path"], wanted, self.threads, self.device)
            return _decode(e["path"], e["keyframes"], wanted, self.threads)
        except (*_decode_errors(), *TORCHCODEC_ERRORS, LookupError) as err:
            raise UnreadableSample(e["path"], f"{type(err).__name__}: {err}") from None


class FrameFolderSource(_VideoSourceBase):
    """Folders of extracted frames (Kinetics ``<class>/<video>/<frame>.jpg``), natural order."""

    kind = "frames"

    def load_frames(self, index: int, frame_ids: Iterable[int]) -> list[Image.Image]:
        # One lazily opened image per request, even for a repeated frame: cropping drafts
        # (decodes at reduced scale) the image it is given, so objects are not shared.
        ids = list(frame_ids)
        folder = self.entries[index]["path"]
        try:
            names = list_frames(folder)
        except OSError as err:
            raise UnreadableSample(folder, f"{type(err).__name__}: {err}") from None
        if ids and max(ids) >= len(names):
            raise UnreadableSample(
                folder,
                f"has {len(names)} frames, the index lists {self.entries[index]['num_frames']}; "
                "delete video_index.json to re-index",
            )
        # JPEG frames are decoded at reduced scale by the crop (views.crop_resize).
        return [open_lazy(Path(folder) / names[i]) for i in ids]


# -- finding items ------------------------------------------------------------------------------


def find_frame_folders(root: Path) -> list[Path]:
    """Every folder under ``root`` (itself included) that directly holds image files, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if any(os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS for f in filenames):
            found.append(Path(dirpath))
    return sorted(found)


def find_items(path: Path, kind: str) -> list[Path]:
    """The videos (``kind`` "videos") or frame folders ("frames") that ``path`` names: a folder
    (searched recursively), a list file (one path a line, relative to the list's folder), or for
    videos a single video file."""
    if not path.exists():
        raise DataError(
            f"data path {str(path)!r} does not exist; pass --data with a folder of "
            + ("videos" if kind == "videos" else "frame folders")
            + " or a .txt list of them"
        )
    if path.is_file():
        if kind == "videos" and path.suffix.lower() in VIDEO_EXTENSIONS:
            return [path]
        return read_list_file(path)
    if kind == "videos":
        items = scan_files(path, VIDEO_EXTENSIONS)
        if not items:
            hint = (
                "; it holds image folders: use data.source=frames"
                if find_frame_folders(path)
                else ""
            )
            raise DataError(
                f"no video files found in {str(path)!r} (looked for "
                f"{', '.join(sorted(VIDEO_EXTENSIONS))}){hint}"
            )
        return items
    items = find_frame_folders(path)
    if not items:
        raise DataError(
            f"no frame folders found in {str(path)!r} (folders holding "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))} files, e.g. <class>/<video>/00001.jpg); "
            "for video files use data.source=videos"
        )
    return items


# -- the index ----------------------------------------------------------------------------------


def _probe_one(job: tuple[str, str]) -> dict[str, Any]:
    kind, path = job
    try:
        if kind == "videos":
            if not os.path.isfile(path):
                raise FileNotFoundError("not a file")
            info = probe_video(path)
        else:
            if not os.path.isdir(path):
                raise FileNotFoundError("not a folder")
            info = probe_frames(path)
        return {"ok": True, **info}
    except Exception as err:  # noqa: BLE001 - any failure marks this one item unreadable
        return {"ok": False, "reason": f"{type(err).__name__}: {err}".strip()}


def _run_probes(
    jobs: list[tuple[str, str]], workers: int, progress: bool
) -> Iterable[dict[str, Any]]:
    from tqdm.auto import tqdm

    bar = dict(total=len(jobs), desc="indexing videos", unit="video", disable=not progress)
    if workers > 1 and len(jobs) > 8:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            yield from tqdm(pool.map(_probe_one, jobs, chunksize=4), **bar)
    else:
        yield from tqdm(map(_probe_one, jobs), **bar)


def build_index(
    items: list[Path],
    kind: str,
    cache_file: Path | None = None,
    workers: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One record per item: path, stat key, and the probe (``ok``, ``num_frames``, ...).

    Records in ``cache_file`` whose path and stat key (size, mtime, inode, ctime) still match
    are reused; only new or changed items are probed. The updated index is written back atomically.
    """
    cached: dict[str, dict[str, Any]] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            data = json.loads(cache_file.read_text())
            if data.get("version") == INDEX_VERSION and data.get("kind") == kind:
                cached = {r["path"]: r for r in data["entries"]}
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("%s is unreadable; rebuilding the video index", cache_file)
    records: list[dict[str, Any] | None] = []
    jobs: list[tuple[str, str]] = []
    todo: list[int] = []
    for p in items:
        path = str(p.resolve()) if p.exists() else str(p)
        stat = file_stat_key(p)
        old = cached.get(path)
        if old is not None and old.get("stat") == stat:
            records.append(old)
        else:
            records.append({"path": path, "stat": stat})
            jobs.append((kind, path))
            todo.append(len(records) - 1)
    for i, probe in zip(todo, _run_probes(jobs, workers, progress)):
        records[i].update(probe)  # type: ignore[union-attr]
    result = [r for r in records if r is not None]
    if cache_file is not None and (jobs or not cache_file.is_file()):
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"version": INDEX_VERSION, "kind": kind, "entries": result}))
        os.replace(tmp, cache_file)
    return result


def make_source(
    path: str | Path,
    kind: str = "videos",
    cache_dir: str | Path | None = None,
    workers: int = 0,
    progress: bool = True,
    listed_in: str | Path | None = None,
    backend: str = "pyav",
    threads: int = 1,
    device: str = "cpu",
) -> VideoFileSource | FrameFolderSource:
    """A video source for ``path`` (folder, list file or single video), index cached in
    ``cache_dir/video_index.json`` when ``cache_dir`` is given. The warning about unreadable
    items names ``listed_in`` as where they are listed (default: the index file). Video files
    are decoded by ``backend`` ("pyav" or "torchcodec") with ``threads`` decoder threads on
    ``device`` (torchcodec: "cuda" decodes with NVDEC)."""
    if kind not in ("videos", "frames"):
        raise DataError(f"unknown video source kind {kind!r}; use 'videos' or 'frames'")
    if kind == "videos" and backend == "torchcodec":
        check_torchcodec()  # before any indexing: one line naming what to install
    items = find_items(Path(path), kind)
    cache_file = Path(cache_dir) / INDEX_FILE if cache_dir is not None else None
    index = build_index(items, kind, cache_file, workers, progress)
    good = [r for r in index if r.get("ok")]
    bad = [(r["path"], r.get("reason", "unreadable")) for r in index if not r.get("ok")]
    if bad:
        shown = "; ".join(f"{p} ({why})" for p, why in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        listing = listed_in if listed_in is not None else cache_file
        where = f" (all listed in {listing})" if listing is not None else ""
        log.warning(
            "skipping %d unreadable %s of %d%s: %s%s",
            len(bad),
            "videos" if kind == "videos" else "frame folders",
            len(index),
            where,
            shown,
            more,
        )
    if not good:
        raise DataError(
            f"none of the {len(index)} items in {str(path)!r} can be read; first error: "
            f"{bad[0][0]}: {bad[0][1]}"
        )
    if kind == "videos":
        return VideoFileSource(good, bad, backend, threads, device)
    return FrameFolderSource(good, bad)


def build_video_source(
    cfg: Config, cache_dir: str | Path | None = None, run_dir: str | Path | None = None
) -> VideoFileSource | FrameFolderSource:
    """The source for ``data.source`` "videos" or "frames" at ``data.path``.

    The index is cached in ``cache_dir``; by default in the run folder (``run_dir``, by default
    ``run.out_dir``) when
    it exists, so a restart does not probe the videos again. The unreadable items are listed
    in the run folder's ``skipped_files.txt`` by the trainer (``cache_dir`` may be a staging
    folder that is gone once the run starts), so the warning points there.
    """
    run_dir = Path(run_dir if run_dir is not None else cfg.run.out_dir)
    if cache_dir is None and run_dir.is_dir():
        cache_dir = run_dir
    return make_source(
        cfg.data.path,
        cfg.data.source,
        cache_dir,
        workers=cfg.data.num_workers,
        progress=cfg.run.progress,
        listed_in=run_dir / SKIPPED_FILE,
        backend=cfg.data.video_backend,
        threads=cfg.data.video_threads,
        device=cfg.data.video_device,
    )
