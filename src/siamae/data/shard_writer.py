"""``siamae data shard``: tar shards (the WebDataset layout) written from an image folder.

The images are taken in the order the image folders read them (every image file under the
folder, sorted by path), and their bytes are copied as they are: a sample decodes from a shard
exactly as from its file, and shards of a folder give the folder's samples in the folder's order.
With class sub-folders (the ImageFolder layout) each image gets a ``<key>.cls`` member holding
its class index (sub-folders sorted by name, as ImageFolder numbers them) and the class names
go to ``classes.json`` beside the shards, so labels round-trip. An image directly in the folder
beside class sub-folders has no class and gets no ``.cls``.

Keys are the image's path relative to the folder without its extension, with any dot left in
the file name turned into ``_`` (WebDataset cuts the key at the first dot); JPEGs are stored as
``.jpg``, other extensions lower-cased. Each shard is closed before its file would pass
``--shard-size`` bytes on disk, member headers, padding and the end-of-archive blocks included
(an image larger than that gets a shard of its own); no tar "record" padding is added, which
readers do not need. Shards are named ``<prefix>-000000.tar``, ... (the prefix a plain file-name
stem) and written under a temporary name first, so the output folder only ever holds complete
shards. Member headers carry no time, owner or mode of the input files: the
same images give the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tqdm.auto import tqdm

from siamae.data.shards import CLASSES_FILE
from siamae.data.sources import IMAGE_EXTENSIONS, scan_files
from siamae.errors import DataError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``1GB`` -> 10**9, ``512MiB`` -> 2**29, ``1e9`` -> 10**9 bytes."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS or float(match.group(1)) * _UNITS[unit] < 1:
        raise DataError(
            f"--shard-size {text!r} is not a size; write e.g. 1GB, 500MB or 512MiB (bytes if no unit)"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def _member_extension(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def _sample_keys(files: list[Path], root: Path) -> list[str]:
    """One WebDataset key per file: its relative path without the extension, no dot in the file
    name, unique (``_2``, ``_3``, ... on a clash, e.g. ``a.jpg`` beside ``a.png``)."""
    keys, used = [], set()
    for path in files:
        rel = path.relative_to(root)
        stem = rel.name[: len(rel.name) - len(rel.suffix)].replace(".", "_") or "_"
        base = (rel.parent / stem).as_posix() if rel.parent != Path(".") else stem
        key, n = base, 1
        while key in used:
            n += 1
            key = f"{base}_{n}"
        used.add(key)
        keys.append(key)
    return keys


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


# Two zero blocks end a tar archive. tarfile also pads a closed archive to a whole 10 kB
# "record", which no reader needs: the members are written here so that the size is exact.
END_OF_ARCHIVE = b"\0" * (2 * tarfile.BLOCKSIZE)


def _member(name: str, data: bytes) -> list[bytes]:
    """A tar member as written: its header (a PAX header first for a long or non-ASCII name),
    its data, and the zero padding to a whole block."""
    header = _tarinfo(name, len(data)).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    return [header, data, b"\0" * (-len(data) % tarfile.BLOCKSIZE)]


def check_prefix(prefix: str) -> None:
    """A shard prefix is a plain file-name stem: a separator would write the shards into
    another folder (``a/b``: one that may not exist; ``../x``: outside ``--out``)."""
    separators = {"/", "\\", os.sep, os.altsep or "/"}
    if prefix in ("", ".", "..") or any(c in prefix for c in separators) or "\0" in prefix:
        raise DataError(
            f"--prefix {prefix!r} is not a plain file-name stem; pass a name without '/' "
            "(shards are written as PREFIX-000000.tar inside --out), e.g. --prefix train"
        )


@dataclass
class ShardsWritten:
    shards: list[Path]
    images: int
    classes: list[str] | None

    def pattern(self) -> str:
        """The brace pattern naming every shard written."""
        first, last = self.shards[0], self.shards[-1]
        if len(self.shards) == 1:
            return str(first)
        prefix = first.name[: -len("000000.tar")]
        return str(first.parent / f"{prefix}{{{first.stem[-6:]}..{last.stem[-6:]}}}.tar")


def _check_out(out: Path, root: Path) -> None:
    """Refuse an ``--out`` the shards cannot go in: a file, a folder holding other shards or
    class names, or one inside ``--images``."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {str(out)!r} is a file; pass a folder for the shards")
    if out.is_dir() and (any(out.glob("*.tar")) or any(out.glob("*.tar.tmp"))):
        raise DataError(
            f"--out {str(out)!r} already holds .tar shards; pass an empty or new folder (shards of "
            "another run would be read with these)"
        )
    if (out / CLASSES_FILE).exists():
        raise DataError(
            f"--out {str(out)!r} already holds {CLASSES_FILE} (the class names of other shards); "
            "pass an empty or new folder"
        )
    if out.resolve().is_relative_to(root.resolve()):
        raise DataError(
            f"--out {str(out)!r} lies inside --images {str(root)!r}; put the shards elsewhere"
        )


def write_shards(
    images: str | Path,
    out: str | Path,
    shard_size: int = 10**9,
    prefix: str = "shard",
    progress: bool = True,
) -> ShardsWritten:
    """Write the images under ``images`` into tar shards in ``out`` (see the module docstring)."""
    root = Path(images)
    if not root.is_dir():
        raise DataError(f"--images {str(images)!r} is not a folder; pass a folder of images")
    files = scan_files(root, IMAGE_EXTENSIONS)
    if not files:
        raise DataError(
            f"no images in {str(images)!r} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    check_prefix(prefix)
    out = Path(out)
    _check_out(out, root)
    in_folders = any(len(f.relative_to(root).parts) > 1 for f in files)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if in_folders else None
    class_index = {name: i for i, name in enumerate(classes or [])}
    out.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    shard: BinaryIO | None = None
    used = 0  # bytes written to the open shard, its end-of-archive blocks not yet

    def temporary(path: Path) -> Path:
        return path.with_name(path.name + ".tmp")

    try:
        bar = tqdm(
            zip(files, _sample_keys(files, root)),
            total=len(files),
            desc="sharding",
            unit="img",
            disable=None if progress else True,
        )
        for path, key in bar:
            try:
                data = path.read_bytes()
            except OSError as err:
                raise DataError(f"{str(path)!r} cannot be read ({err.strerror}); fix it") from None
            rel = path.relative_to(root)
            label = class_index.get(rel.parts[0]) if len(rel.parts) > 1 else None
            parts = _member(f"{key}.{_member_extension(path)}", data)
            if label is not None:
                parts += _member(f"{key}.cls", str(label).encode())
            cost = sum(len(part) for part in parts)
            if shard is None or (used and used + cost + len(END_OF_ARCHIVE) > shard_size):
                if shard is not None:
                    shard.write(END_OF_ARCHIVE)
                    shard.close()
                    temporary(shards[-1]).replace(shards[-1])
                shards.append(out / f"{prefix}-{len(shards):06d}.tar")
                shard = temporary(shards[-1]).open("wb")
                used = 0
            shard.writelines(parts)
            used += cost
        assert shard is not None  # there is at least one image
        shard.write(END_OF_ARCHIVE)
        shard.close()
        temporary(shards[-1]).replace(shards[-1])
        shard = None
    finally:
        if shard is not None:  # stopped half-way: leave no partial shard behind
            shard.close()
            temporary(shards[-1]).unlink(missing_ok=True)
    if classes is not None:
        (out / CLASSES_FILE).write_text(json.dumps(classes, indent=0) + "\n")
    return ShardsWritten(shards, len(files), classes)


def _command(args: argparse.Namespace) -> int:
    written = write_shards(
        args.images, args.out, parse_size(args.shard_size), args.prefix, progress=True
    )
    labels = f", {len(written.classes)} classes" if written.classes else ", no classes"
    print(
        f"wrote {written.images} images{labels} in {len(written.shards)} shard(s): "
        f"--data '{written.pattern()}' (or --data {args.out})"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add the top-level ``data`` command (``siamae data shard``); returns its sub-commands, for
    the other preparations (``siamae data videos``)."""
    p = subparsers.add_parser(
        "data", help="prepare data: tar shards from an image folder, videos for fast frame pairs"
    )
    sub = p.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    s = sub.add_parser(
        "shard",
        help="write WebDataset-style tar shards from an image folder (labels from sub-folders)",
        description=(
            "Copy every image under --images (sorted by path) into tar shards in --out: "
            "<key>.jpg|.png|.webp|... members, <key>.cls with the class index when the folder "
            "has class sub-folders, and classes.json with their names. Train on them with "
            "--data OUT or --data 'OUT/shard-{000000..000009}.tar'."
        ),
    )
    s.add_argument("--images", required=True, help="image folder (ImageFolder or flat)")
    s.add_argument(
        "--out",
        required=True,
        help="folder for the shards (new, or holding no .tar shards and no classes.json)",
    )
    s.add_argument(
        "--shard-size",
        default="1GB",
        help=(
            "the largest shard file, in bytes on disk (tar headers and padding included); an "
            "image larger than this gets a shard of its own. KB, MB, GB are powers of 1000, "
            "KiB, MiB, GiB powers of 1024 (default: 1GB = 10^9 bytes; e.g. 500MB, 2GiB)"
        ),
    )
    s.add_argument(
        "--prefix",
        default="shard",
        help="shard names: PREFIX-000000.tar, ... in --out (a plain name, no '/')",
    )
    s.set_defaults(func=_command)
    return sub
