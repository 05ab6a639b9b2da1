"""``siamae data videos``: a one-time preparation of video files for fast random frame pairs.

Kinetics-style clips carry x264's default keyframe interval (250 frames): a random frame pair
decodes half a clip. The preparation re-writes each video so that any frame is a few decoded
frames away:

- ``mp4`` (the default, chosen by measurement: docs/video.md): H.264 (libx264, which PyAV's
  wheels carry; mpeg4 where it is missing) with a keyframe every ``gop`` frames (8), no
  B-frames, no scene-cut keyframes, the short side scaled to ``short_side`` (256; 0 keeps the
  size) with FFmpeg's area filter, ``crf`` 20. The original's size is written into the file's
  metadata (``siamae_source_size``), so crops are drawn in the original's coordinates: the same
  seed gives the same frame ids and crop boxes as the original video.
- ``jpeg``: every frame at the same short side as a JPEG (``quality`` 90) in one tar per video
  (members ``000000.jpg``, ...), read through the image shards' index.

Frame i of the output is frame i of a plain sequential decode of the input (the reader's
numbering), whatever its timestamps. ``--data OUT`` then takes the output as it takes videos.

**Resumable.** Each video is written under a temporary name and renamed when complete; then its
line goes into ``OUT/prepared.jsonl`` (the done-list: source path and stat key, output name,
frames, bytes, sizes), flushed and synced. A stopped preparation run again skips the videos
listed whose source is unchanged and whose output exists. The settings are kept in
``OUT/prepare.json``: running again with other settings is refused.

**Bad videos** (unreadable, no video stream, no frames, an encode whose frame count differs)
are skipped, counted and listed with the reason in ``OUT/skipped_videos.txt``; a later run tries
them again. **Deterministic:** one encoder thread, fixed settings, timestamps 0, 1, 2, ...: the
same input and PyAV/FFmpeg version give the same bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from siamae.arguments import non_negative_int, positive_int
from siamae.data.shard_writer import END_OF_ARCHIVE, _member
from siamae.data.sources import file_stat_key
from siamae.data.video import SOURCE_SIZE_TAG, _av, _video_stream, find_items
from siamae.data.video_shards import DONE_FILE  # the done-list, one JSON line per video
from siamae.errors import DataError

SETTINGS_FILE = "prepare.json"
SKIPPED_VIDEOS_FILE = "skipped_videos.txt"
FORMATS = ("mp4", "jpeg")


@dataclass(frozen=True)
class PrepareSettings:
    """How videos are prepared (kept in ``prepare.json``; a resume must use the same)."""

    format: str = "mp4"
    gop: int = 8
    short_side: int = 256
    crf: int = 20
    quality: int = 90

    def encoder(self) -> str:
        """libx264 where PyAV's FFmpeg has it, else FFmpeg's own mpeg4."""
        if self.format != "mp4":
            return "jpeg"
        return "libx264" if "libx264" in _av().codecs_available else "mpeg4"


@dataclass
class PrepareReport:
    out: Path
    prepared: int = 0  # this run
    already: int = 0  # done by an earlier run
    skipped: list[tuple[str, str]] = field(default_factory=list)
    bytes_in: int = 0  # of every video done (this run and before)
    bytes_out: int = 0


def output_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """The prepared frame size: the short side scaled to ``short_side`` (never enlarged), the
    aspect kept, both sides even (4:2:0 chroma)."""
    if short_side and min(width, height) > short_side:
        if width <= height:
            width, height = short_side, round(height * short_side / width)
        else:
            width, height = round(width * short_side / height), short_side
    return max(2, width - width % 2), max(2, height - height % 2)


def _frames(path: str, settings: PrepareSettings) -> Any:
    """(original size, prepared size, iterator of frames already scaled) of a video file."""
    av = _av()
    container = av.open(path)
    if not container.streams.video:
        container.close()
        raise ValueError("no video stream")
    stream = _video_stream(container, 1)
    width, height = stream.codec_context.width, stream.codec_context.height
    size = output_size(width, height, settings.short_side)
    fmt = "yuv420p" if settings.format == "mp4" else "rgb24"

    def scaled() -> Any:
        with container:
            for frame in container.decode(stream):
                yield frame.reformat(
                    width=size[0], height=size[1], format=fmt, interpolation="AREA"
                )

    return (width, height), size, scaled()


def _encode_mp4(path: str, tmp: Path, settings: PrepareSettings) -> dict[str, Any]:
    av = _av()
    source_size, size, frames = _frames(path, settings)
    rate = Fraction(25)
    codec = settings.encoder()
    n = 0
    with av.open(str(tmp), "w", format="mp4", options={"movflags": "+use_metadata_tags"}) as out:
        out.metadata[SOURCE_SIZE_TAG] = f"{source_size[0]}x{source_size[1]}"
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.codec_context.time_base = 1 / rate
        stream.codec_context.gop_size = settings.gop
        stream.codec_context.thread_count = 1  # one thread: the same bytes every time
        if codec == "libx264":
            keys = f"keyint={settings.gop}:min-keyint={settings.gop}:scenecut=0:bframes=0"
            stream.options = {"crf": str(settings.crf), "preset": "veryfast", "x264-params": keys}
        else:  # mpeg4: a fixed quantiser in place of crf; no B-frames by default
            stream.options = {
                "qscale": str(max(2, settings.crf // 6)),
                "bf": "0",
                "g": str(settings.gop),
            }
        for frame in frames:
            frame.pts, frame.time_base = n, stream.codec_context.time_base
            out.mux(stream.encode(frame))
            n += 1
        out.mux(stream.encode())
    if n == 0:
        raise ValueError("the decoder gives no frames")
    with av.open(str(tmp)) as check:  # every frame made it into the file
        packets = sum(1 for p in check.demux(video=0) if p.size)
    if packets != n:
        raise ValueError(f"the encoder wrote {packets} of {n} frames")
    return {"frames": n, "source_size": list(source_size), "size": list(size)}


def _encode_jpeg(path: str, tmp: Path, settings: PrepareSettings) -> dict[str, Any]:
    source_size, size, frames = _frames(path, settings)
    n = 0
    with open(tmp, "wb") as f:
        for frame in frames:
            buffer = io.BytesIO()
            frame.to_image().save(buffer, format="JPEG", quality=settings.quality)
            f.writelines(_member(f"{n:06d}.jpg", buffer.getvalue()))
            n += 1
        f.write(END_OF_ARCHIVE)
    if n == 0:
        raise ValueError("the decoder gives no frames")
    return {"frames": n, "source_size": list(source_size), "size": list(size)}


def prepare_one(job: tuple[str, str, str, dict[str, Any]]) -> dict[str, Any]:
    """Prepare one video (``source``, output path, output name, settings): written to a
    temporary name, renamed when complete. Returns its done-list record, or ``ok`` False and
    the reason."""
    source, target, name, raw = job
    settings = PrepareSettings(**raw)
    tmp = Path(target + ".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        encode = _encode_mp4 if settings.format == "mp4" else _encode_jpeg
        info = encode(source, tmp, settings)
        os.replace(tmp, target)
    except Exception as err:  # noqa: BLE001 - any failure skips this one video, listed
        tmp.unlink(missing_ok=True)
        return {"ok": False, "source": source, "reason": f"{type(err).__name__}: {err}".strip()}
    return {
        "ok": True,
        "source": source,
        "stat": file_stat_key(Path(source)),
        "out": name,
        "bytes_in": os.path.getsize(source),
        "bytes_out": os.path.getsize(target),
        **info,
    }


def _output_names(items: list[Path], root: Path, fmt: str) -> list[str]:
    """One output name per input, unique, in the input order: the path below ``root`` (a
    folder) or the file name (a list), extension .mp4; for jpeg one flat .tar per video."""
    names, used = [], set()
    for p in items:
        try:
            rel = p.relative_to(root) if root.is_dir() else Path(p.name)
        except ValueError:
            rel = Path(p.name)
        stem = rel.with_suffix("").as_posix()
        if fmt == "jpeg":
            stem = stem.replace("/", "__")
        name, k = f"{stem}.{'mp4' if fmt == 'mp4' else 'tar'}", 1
        while name in used:
            k += 1
            name = f"{stem}_{k}.{'mp4' if fmt == 'mp4' else 'tar'}"
        used.add(name)
        names.append(name)
    return names


def _read_done(out: Path) -> dict[str, dict[str, Any]]:
    """The done-list's records by source path; a line cut short by a stop is ignored."""
    done: dict[str, dict[str, Any]] = {}
    path = out / DONE_FILE
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                done[record["source"]] = record
            except (ValueError, KeyError, TypeError):
                continue
    return done


def _check_settings(out: Path, settings: PrepareSettings, videos: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {str(out)!r} is a file; pass a folder for the prepared videos")
    if videos.is_dir() and out.resolve().is_relative_to(videos.resolve()):
        raise DataError(
            f"--out {str(out)!r} lies inside --videos {str(videos)!r}; put the prepared videos "
            "elsewhere (they would be read as input next time)"
        )
    kept = out / SETTINGS_FILE
    wanted = {**asdict(settings), "encoder": settings.encoder()}
    if kept.is_file():
        try:
            old = json.loads(kept.read_text())
        except (OSError, ValueError):
            old = None
        if old != wanted:
            raise DataError(
                f"--out {str(out)!r} was prepared with other settings ({old}); pass the same "
                "options to resume it, or a new --out"
            )


def prepare_videos(
    videos: str | Path,
    out: str | Path,
    settings: PrepareSettings = PrepareSettings(),
    workers: int = 1,
    progress: bool = True,
) -> PrepareReport:
    """Prepare every video ``videos`` names (a folder, searched recursively; a list file; one
    file) into ``out`` (see the module docstring); resumes what an earlier run left."""
    if settings.format not in FORMATS:
        raise DataError(f"--format {settings.format!r}: use one of {', '.join(FORMATS)}")
    if not 0 <= settings.crf <= 51:
        raise DataError(f"--crf {settings.crf}: x264's quality runs from 0 (lossless) to 51")
    if not 1 <= settings.quality <= 100:
        raise DataError(f"--quality {settings.quality}: JPEG quality runs from 1 to 100")
    videos, out = Path(videos), Path(out)
    if not videos.exists():
        raise DataError(
            f"--videos {str(videos)!r} does not exist; pass a folder of videos, a .txt list of "
            "them or one video file"
        )
    _check_settings(out, settings, videos)
    items = find_items(videos, "videos")
    names = _output_names(items, videos, settings.format)
    out.mkdir(parents=True, exist_ok=True)
    (out / SETTINGS_FILE).write_text(
        json.dumps({**asdict(settings), "encoder": settings.encoder()}, indent=1) + "\n"
    )
    done = _read_done(out)
    report = PrepareReport(out)
    jobs = []
    for p, name in zip(items, names):
        source = str(p.resolve()) if p.exists() else str(p)
        old = done.get(source)
        if (
            old
            and old["out"] == name
            and old["stat"] == file_stat_key(p)
            and (out / name).is_file()
        ):
            report.already += 1
            report.bytes_in, report.bytes_out = (
                report.bytes_in + old["bytes_in"],
                report.bytes_out + old["bytes_out"],
            )
            continue
        jobs.append((source, str(out / name), name, asdict(settings)))
    bar = tqdm(
        total=len(items),
        initial=report.already,
        desc="preparing videos",
        unit="video",
        disable=None if progress else True,
    )
    with open(out / DONE_FILE, "a") as done_list, bar:
        pool = ProcessPoolExecutor(workers) if workers > 1 and len(jobs) > 1 else None
        try:
            results = pool.map(prepare_one, jobs) if pool else map(prepare_one, jobs)
            for record in results:
                bar.update(1)
                if not record.pop("ok"):
                    report.skipped.append((record["source"], record["reason"]))
                    bar.set_postfix(skipped=len(report.skipped))
                    continue
                done_list.write(json.dumps(record) + "\n")
                done_list.flush()
                os.fsync(done_list.fileno())
                report.prepared += 1
                report.bytes_in += record["bytes_in"]
                report.bytes_out += record["bytes_out"]
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    skipped = "".join(f"{path}\t{why}\n" for path, why in report.skipped)
    tmp = out / (SKIPPED_VIDEOS_FILE + ".tmp")
    tmp.write_text(skipped)
    os.replace(tmp, out / SKIPPED_VIDEOS_FILE)
    if report.skipped and not (report.prepared or report.already):
        path, why = report.skipped[0]
        raise DataError(
            f"none of the {len(items)} videos in {str(videos)!r} could be prepared (listed in "
            f"{out / SKIPPED_VIDEOS_FILE}); first: {path}: {why}"
        )
    return report


def _command(args: argparse.Namespace) -> int:
    settings = PrepareSettings(args.format, args.gop, args.short_side, args.crf, args.quality)
    report = prepare_videos(args.videos, args.out, settings, args.workers, progress=True)
    ratio = (
        f", {report.bytes_out / report.bytes_in:.2f}x the original bytes" if report.bytes_in else ""
    )
    print(
        f"prepared {report.prepared} videos ({report.already} already done, {len(report.skipped)} "
        f"skipped){ratio}: train with --data {args.out}"
    )
    if report.skipped:
        print(f"  skipped videos listed in {Path(args.out) / SKIPPED_VIDEOS_FILE}")
    return 0


def register(data_commands: argparse._SubParsersAction) -> None:
    """Add ``siamae data videos`` to the ``siamae data`` command group."""
    s = data_commands.add_parser(
        "videos",
        help="prepare videos once for fast random frame pairs (short keyframe interval, short side 256)",
        description=(
            "Re-write every video under --videos (a folder, a .txt list or one file) into --out "
            "with a keyframe every --gop frames and the short side scaled to --short-side (mp4), "
            "or as JPEG frames in one tar per video (jpeg). Resumable: run it again to continue. "
            "Unreadable videos are skipped and listed in OUT/skipped_videos.txt. Train with --data OUT."
        ),
    )
    s.add_argument(
        "--videos", required=True, help="folder of videos (recursive), .txt list, or one video"
    )
    s.add_argument(
        "--out", required=True, help="folder for the prepared videos (resumed if it holds some)"
    )
    s.add_argument(
        "--format", choices=FORMATS, default="mp4", help="mp4 (default) or jpeg frames in tar files"
    )
    s.add_argument(
        "--gop", type=positive_int, default=8, help="mp4: frames between keyframes (default 8)"
    )
    s.add_argument(
        "--short-side",
        type=non_negative_int,
        default=256,
        help="scale the short side down to this many pixels (default 256; 0: keep the size)",
    )
    s.add_argument(
        "--crf",
        type=non_negative_int,
        default=20,
        help="mp4: x264 quality, lower is better (default 20)",
    )
    s.add_argument(
        "--quality", type=positive_int, default=90, help="jpeg: JPEG quality (default 90)"
    )
    s.add_argument("--workers", type=positive_int, default=1, help="processes (default 1)")
    s.set_defaults(func=_command)
