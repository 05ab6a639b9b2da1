"""Where pre-training images come from: image folders, list files, synthetic scenes.

A source gives ``len(source)`` items and, for item i, an image (``load_image``); video sources
also give frame pairs (``load_frame_pair``). A file that cannot be read raises
:class:`UnreadableSample`; the dataset skips it, counts it and reports it, never crashing.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from siamae.data.synthetic import synthetic_video
from siamae.errors import DataError

#: ``Image.info`` key of a frame stored smaller than its video (``siamae data videos``): the
#: original (width, height). Crops are drawn in the original's coordinates, so a prepared
#: video gives the same crop parameters for the same seed as the original.
FULL_SIZE = "siamae_full_size"


IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif"}


class UnreadableSample(Exception):
    """A file that cannot be decoded (corrupt, truncated, not an image/video)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


class Source(Protocol):
    def __len__(self) -> int: ...

    def name(self, index: int) -> str: ...

    def open_image(self, index: int, rng: np.random.Generator) -> Image.Image:
        """An image, possibly not decoded yet (a lazily opened JPEG can still be drafted)."""
        ...


def class_labels_of(source: Source) -> tuple[np.ndarray, list[str]] | None:
    """The class of every item of ``source`` (labels 0..C-1, class names) where its data has
    them: an ImageFolder-layout folder (:meth:`ImageFileSource.class_labels`) or tar shards
    whose every sample has a ``.cls`` member; None otherwise (synthetic data, videos, a flat
    folder, a list file, shards without classes)."""
    read = getattr(source, "class_labels", None)
    if callable(read):
        found: tuple[np.ndarray, list[str]] | None = read()
        return found
    labels = getattr(source, "labels", None)  # tar shards: -1/-2 where a sample has no class
    if not isinstance(labels, np.ndarray) or not len(labels) or int(labels.min()) < 0:
        return None
    names = getattr(source, "classes", None)
    if names and len(names) > int(labels.max()):
        return labels, list(names)
    classes = [str(c) for c in range(int(labels.max()) + 1)]
    return labels, classes


class FrameSource(Source, Protocol):
    """A source of videos: two frames of item ``index`` a gap apart (SiamMAE's pairs)."""

    def load_frame_pair(
        self, index: int, rng: np.random.Generator, gap: tuple[int, int]
    ) -> tuple[Image.Image, Image.Image]: ...


def read_list_file(path: Path) -> list[Path]:
    """One path per line (relative to the list file's folder); blank lines and '#' comments skipped."""
    entries = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line.split()[0])
        entries.append(p if p.is_absolute() else path.parent / p)
    return entries


def scan_files(root: Path, extensions: set[str]) -> list[Path]:
    """Every file under ``root`` (recursively) with one of ``extensions``, sorted."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in extensions and p.is_file())


# What decoding a bad image file raises. PIL refuses, when it opens a file, an image of more
# than twice ``Image.MAX_IMAGE_PIXELS`` pixels (178,956,970 by default: a "decompression bomb",
# a small file that would take gigabytes once decoded) with DecompressionBombError, which is
# no OSError: such an image is skipped like a corrupt one, the reason naming its pixel count
# and the limit.
DECODE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    Image.DecompressionBombError,
)


def bomb_pixels(err: Image.DecompressionBombError) -> str:
    """The pixel count PIL's decompression-bomb refusal names ("Image size (N pixels) ..."),
    written with thousands separators; "too many" if the message has none."""
    found = re.search(r"\((\d+) pixels\)", str(err))
    return f"{int(found.group(1)):,}" if found else "too many"


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> an 8-bit RGB image, its values scaled by what the mode means.

    ``Image.convert("RGB")`` alone clips wide modes: a 16-bit PNG comes out white. Here:

    - ``I;16`` (16-bit, any byte order): 0..65535 scaled to 0..255 (divided by 257, rounded);
    - ``I`` (32-bit integer): values up to 255 taken as they are (8-bit data in a wide mode),
      up to 65535 divided by 257 (16-bit data, e.g. TIFF); negative or larger values have no
      defined range: the file raises :class:`UnreadableSample` (skipped and counted);
    - ``F`` (float): 0..1 when its maximum is at most 1 (scaled by 255), else taken as 0..255;
      clipped to that range, NaN read as 0;
    - alpha (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent colour) is dropped and the colour
      kept, as torchvision's and timm's loaders do (``convert("RGB")``): no background is
      composited;
    - ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``1``, ``L``, ``P``: PIL's own conversion.

    A mode PIL cannot convert raises :class:`UnreadableSample`, so the dataset skips and counts
    the file. Wire it where pixels are decoded (``views.decode``).
    """
    if img.mode == "RGB":
        return img
    name = getattr(img, "filename", "") or "image"
    try:
        if img.mode.startswith("I;16") or img.mode in ("I", "F"):
            gray = _wide_to_uint8(np.asarray(img), img.mode, name)
            return Image.fromarray(gray, "L").convert("RGB")
        if img.mode == "P" and "transparency" in img.info:
            # Through RGBA: PIL warns when a palette with transparency goes straight to RGB.
            img = img.convert("RGBA")
        return img.convert("RGB")
    except DECODE_ERRORS as err:
        raise UnreadableSample(str(name), f"{type(err).__name__}: {err}") from None


def _wide_to_uint8(values: np.ndarray, mode: str, name: str) -> np.ndarray:
    """A 16-bit, 32-bit integer or float pixel array -> uint8, by the rules of :func:`to_rgb`."""
    if mode == "F":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.max() <= 1.0:
            values = values * 255.0
        return np.rint(np.clip(values, 0.0, 255.0)).astype(np.uint8)
    values = values.astype(np.int64)
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if low < 0 or high > 65535:
        raise UnreadableSample(
            name,
            f"{mode} pixels span {low}..{high}, outside 0..65535 (no known range to scale to "
            "8 bits); save the image as 8- or 16-bit",
        )
    if mode == "I" and high <= 255:
        return values.astype(np.uint8)
    return np.rint(values / 257.0).astype(np.uint8)


def open_lazy(path: Path) -> Image.Image:
    """Open ``path``, parsing only its header; pixels are decoded later (see views.crop_resize).

    The file is read in one call: PIL's own reader pulls a JPEG in dozens of small reads.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except DECODE_ERRORS as err:
        raise UnreadableSample(str(path), f"{type(err).__name__}: {err}") from None
    return open_bytes(data, str(path))


def open_bytes(data: bytes, name: str) -> Image.Image:
    """An image file's bytes (a file's, a tar shard member's), opened lazily as :func:`open_lazy`
    does; ``name`` is what a report of a failure names."""
    try:
        img = Image.open(io.BytesIO(data))
        img.filename = name  # named in the report if decoding fails later
        return img
    except UnidentifiedImageError:
        # PIL's message names the in-memory buffer (<_io.BytesIO object at 0x...>), not the file
        raise UnreadableSample(
            name, "UnidentifiedImageError: not an image file PIL can identify"
        ) from None
    except DECODE_ERRORS as err:
        raise UnreadableSample(name, f"{type(err).__name__}: {err}") from None


class ImageFileSource:
    """Images from a folder (recursive: ImageNet ``<class>/<img>`` or flat) or a list file."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.exists():
            raise DataError(
                f"data path {str(path)!r} does not exist; pass --data with an image folder or a .txt list of images"
            )
        if path.is_dir():
            self.files = scan_files(path, IMAGE_EXTENSIONS)
        else:
            self.files = read_list_file(path)
        if not self.files:
            raise DataError(
                f"no images found in {str(path)!r} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                "point --data at a folder of images or a list file"
            )
        self.root = path

    def __len__(self) -> int:
        return len(self.files)

    def name(self, index: int) -> str:
        return str(self.files[index])

    def open_image(self, index: int, rng: np.random.Generator) -> Image.Image:
        return open_lazy(self.files[index])

    def class_labels(self) -> tuple[np.ndarray, list[str]] | None:
        """Each file's class from the ImageFolder layout (``root/<class>/**/<image>``: the
        sub-folder under the root, classes sorted by name, labels 0..C-1), or None when the
        data is a list file or some image lies directly in the root (no layout to read)."""
        if not self.root.is_dir():
            return None
        tops = [f.relative_to(self.root).parts for f in self.files]
        if any(len(parts) < 2 for parts in tops):
            return None
        classes = sorted({parts[0] for parts in tops})
        index = {name: i for i, name in enumerate(classes)}
        return np.array([index[parts[0]] for parts in tops], dtype=np.int64), classes


class SyntheticImageSource:
    """``count`` procedural images of ``size`` pixels (see :mod:`siamae.data.synthetic`)."""

    def __init__(self, count: int = 512, size: int = 128, seed: int = 0) -> None:
        self.count, self.size, self.seed = count, size, seed

    def __len__(self) -> int:
        return self.count

    def name(self, index: int) -> str:
        return f"synthetic-image-{index}"

    def open_image(self, index: int, rng: np.random.Generator) -> Image.Image:
        frames, _ = synthetic_video(index, self.size, 1, self.seed)
        return Image.fromarray(frames[0])


class SyntheticVideoSource:
    """``count`` procedural videos of ``num_frames`` frames; objects move, the background pans."""

    def __init__(
        self, count: int = 512, size: int = 128, num_frames: int = 24, seed: int = 0
    ) -> None:
        self.count, self.size, self.num_frames, self.seed = count, size, num_frames, seed

    def __len__(self) -> int:
        return self.count

    def name(self, index: int) -> str:
        return f"synthetic-video-{index}"

    def num_frames_of(self, index: int) -> int:
        return self.num_frames

    def load_frames(self, index: int, frame_ids: list[int]) -> list[Image.Image]:
        frames, _ = synthetic_video(index, self.size, max(frame_ids) + 1, self.seed)
        return [Image.fromarray(frames[i]) for i in frame_ids]

    def open_image(self, index: int, rng: np.random.Generator) -> Image.Image:
        t = int(rng.integers(0, self.num_frames))
        return self.load_frames(index, [t])[0]

    def load_frame_pair(
        self, index: int, rng: np.random.Generator, gap: tuple[int, int]
    ) -> tuple[Image.Image, Image.Image]:
        first, second = sample_frame_pair(rng, self.num_frames, gap)
        a, b = self.load_frames(index, [first, second])
        return a, b


def sample_frame_pair(
    rng: np.random.Generator, num_frames: int, gap: tuple[int, int]
) -> tuple[int, int]:
    """Frames (t, t + g): g uniform in [gap_min, gap_max) as the published ``randint``, clamped
    to the video (a video shorter than the gap gives its first and last frames)."""
    if num_frames < 2:
        return 0, 0
    g = int(rng.integers(gap[0], max(gap[0] + 1, gap[1])))
    g = min(g, num_frames - 1)
    t = int(rng.integers(0, num_frames - g))
    return t, t + g


def file_stat_key(path: Path) -> list[int] | None:
    """(size, mtime, inode, ctime; times in ns) of a file, what a cached index is keyed by
    (None: unreadable): a file changed since the index was built is indexed again.

    Size and mtime alone miss a file rewritten in place with the same size whose mtime was set
    back (``cp -p``, ``rsync -t``, ``os.utime``); its ctime still moves, as the kernel sets it on
    every write or ``utime`` and nothing can set it back, and a file replaced by another (a
    rename over it) has a new inode. Free: one ``stat``, no byte of the file read."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
