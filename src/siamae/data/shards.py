"""Tar shards in the WebDataset layout, read with random access: a source like an image folder.

A shard is an uncompressed ``.tar`` whose members are grouped into samples by key, as
WebDataset groups them: ``<key>.<ext>``, the key being the member's name up to the first dot of
its file name, the members of one sample next to each other. A sample is one image member
(``jpg``, ``jpeg``, ``png``, ``webp``, or another extension the image folders read) and,
optionally, ``<key>.cls``: its class index as ASCII digits. Other members are ignored.

``data.path`` names shards in one of three ways (:func:`shard_paths`): a brace range
(``train-{000000..000146}.tar``; ``{a,b}`` lists too), a folder holding ``.tar`` files at its top
level (sorted by name), or a ``.txt`` list of shards (one a line, relative to the list's folder,
braces allowed). Class names, for fine-tuning and the probes, come from ``classes.json`` beside
the shards (a JSON list: label i is entry i), which ``siamae data shard`` writes.

**Index.** Each shard's headers are read once (``tarfile``; no image data is read, only the tiny
``.cls`` members) into the name, byte offset and size of every sample's image member and its
label. The index is cached in the run folder as ``shard_index.json``, keyed by each shard's
resolved path, size, modification time, inode and change time (:func:`file_stat_key`): a
restart reads it instead of the shards, and a shard that changed is indexed again, even one
rewritten with the same size and its old mtime. Sample i is then one positional read
(``os.pread``) of the shard file: items are addressed by index exactly as files are, so the
epoch sampler, DDP sharding and exact resume work unchanged, and the bytes go through the image
folders' own decoder (:func:`siamae.data.sources.open_bytes`: DCT-scaled JPEG draft, every
PIL mode).

**Corruption.** A member that cannot be decoded raises :class:`UnreadableSample` and is skipped,
counted and listed in ``skipped_files.txt``, as a corrupt file is. A shard that is not a tar, or
whose headers break off (a garbled header, data cut short), keeps the samples before the break;
the break is reported as an unreadable item (``source.unreadable``: a warning, the count, the
run folder's ``skipped_files.txt``). A shard that does not exist is an error at the start.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from siamae.data.sources import (
    IMAGE_EXTENSIONS,
    ImageFileSource,
    Source,
    UnreadableSample,
    file_stat_key,
    open_bytes,
)
from siamae.errors import DataError

log = logging.getLogger(__name__)

SHARD_INDEX_FILE = "shard_index.json"  # in the run folder, beside video_index.json
INDEX_VERSION = 1
CLASSES_FILE = "classes.json"  # beside the shards: the class names, label i = entry i
# Image members: the WebDataset names and every extension the image folders read.
SHARD_IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp"} | {e.lstrip(".") for e in IMAGE_EXTENSIONS}
NO_LABEL = -1  # the sample has no .cls member
BAD_LABEL = -2  # its .cls member holds no class index
MAX_LABEL = np.iinfo(np.int64).max
# Open shard files kept per process (one descriptor each); beyond this they are closed and
# reopened as needed, so a data set of thousands of shards never runs out of descriptors.
MAX_OPEN_SHARDS = 128

_BRACE = re.compile(r"\{([^{}]*)\}")


# -- naming the shards ----------------------------------------------------------------------


def _brace_choices(pattern: str, match: re.Match[str]) -> range | list[str]:
    """The choices of one brace group: a range of numbers (kept as a ``range``, never listed:
    a pattern may name a hundred million shards) or the words of a list."""
    body = match.group(1)
    if ".." in body:
        low, high = body.split("..", 1)
        if not (low.isdigit() and high.isdigit()) or int(low) > int(high):
            raise DataError(
                f"shard pattern {pattern!r}: {{{body}}} is not a range of whole numbers "
                "low..high; write e.g. train-{000000..000146}.tar"
            )
        return range(int(low), int(high) + 1)
    if "," in body:
        return body.split(",")
    raise DataError(
        f"shard pattern {pattern!r}: {{{body}}} is neither a range {{low..high}} nor a list {{a,b}}"
    )


def _brace_width(match: re.Match[str]) -> int:
    """Zero-padded bounds keep their width (as ``braceexpand``): ``{08..10}`` -> 08, 09, 10."""
    low, _, high = match.group(1).partition("..")
    padded = (len(low) > 1 and low.startswith("0")) or (len(high) > 1 and high.startswith("0"))
    return max(len(low), len(high)) if padded else 0


def iter_braces(pattern: str) -> Iterator[str]:
    """``a-{000..002}.tar`` -> ``a-000.tar, a-001.tar, a-002.tar``, one name at a time (lazily:
    a huge range costs nothing until its names are asked for); ``{x,y}`` lists; several groups
    expand left to right."""
    match = _BRACE.search(pattern)
    if match is None:
        yield pattern
        return
    choices = _brace_choices(pattern, match)
    width = _brace_width(match)
    head, tail = pattern[: match.start()], pattern[match.end() :]
    for choice in choices:
        text = f"{choice:0{width}d}" if isinstance(choice, int) else choice
        yield from iter_braces(head + text + tail)


def count_braces(pattern: str) -> int:
    """How many names ``pattern`` expands to, without expanding it."""
    count = 1
    for match in _BRACE.finditer(pattern):
        count *= len(_brace_choices(pattern, match))
    return count


def expand_braces(pattern: str) -> list[str]:
    """Every name of ``pattern`` (:func:`iter_braces`), as a list: for small patterns only."""
    return list(iter_braces(pattern))


def _listed_entries(path: Path) -> list[str]:
    """The entries of a list file: one per line, '#' comments and blank lines skipped."""
    entries = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            entries.append(line.split()[0])
    return entries


def is_shard_spec(path: str | Path | None) -> bool:
    """Whether ``path`` names tar shards: a ``.tar`` file, a brace pattern of them, a folder
    with ``.tar`` files at its top level, or a ``.txt`` list whose first entry is a ``.tar``."""
    if path is None:
        return False
    text = str(path)
    if text.endswith(".tar"):
        return True
    p = Path(text)
    if p.is_dir():
        return next(p.glob("*.tar"), None) is not None
    if p.suffix == ".txt" and p.is_file():
        try:
            entries = _listed_entries(p)
        except (OSError, UnicodeDecodeError):
            return False
        return bool(entries) and entries[0].endswith(".tar")
    return False


def _existing_shards(pattern: str, base: Path | None, where: str) -> Iterator[Path]:
    """The shards a (brace) pattern names, relative to ``base`` when given, checked one by one:
    the first missing one is refused at once, so a range naming far more shards than exist
    (``{000000..99999999}``) costs one failed look-up, not a list of every name."""
    for number, name in enumerate(iter_braces(pattern), 1):
        q = Path(name)
        if base is not None and not q.is_absolute():
            q = base / q
        if not q.is_file():
            total = count_braces(pattern)
            which = f" (shard {number:,} of the {total:,} {pattern!r} names)" if total > 1 else ""
            raise DataError(
                f"shard {str(q)!r}{which} of {where} does not exist; check the path and the "
                "brace range"
            )
        yield q


def shard_paths(spec: str | Path) -> list[Path]:
    """The shards ``spec`` names (see the module's docstring), in order; each must exist."""
    text = str(spec)
    p = Path(text)
    if p.is_dir():
        found = sorted(child for child in p.glob("*.tar") if child.is_file())
        where = f"the folder {text!r}"
    elif p.suffix == ".txt":
        if not p.is_file():
            raise DataError(f"shard list {text!r} does not exist; pass a .txt list of .tar shards")
        where = f"the list {text!r}"
        found = [
            q for entry in _listed_entries(p) for q in _existing_shards(entry, p.parent, where)
        ]
    else:
        where = f"{text!r}"
        found = list(_existing_shards(text, None, where))
    if not found:
        raise DataError(f"no .tar shards in {where}; pass shards made by 'siamae data shard'")
    return found


def classes_file(spec: str | Path) -> Path:
    """Where the class names of ``spec``'s shards are: ``classes.json`` in the shard folder,
    beside the list file, or beside the first shard of a pattern."""
    p = Path(str(spec))
    if p.is_dir():
        return p / CLASSES_FILE
    if p.suffix == ".txt":
        return p.parent / CLASSES_FILE
    return Path(next(iter_braces(str(spec)))).parent / CLASSES_FILE


def shard_classes(spec: str | Path) -> list[str]:
    """The class names of labelled shards, from their ``classes.json``."""
    path = classes_file(spec)
    if not path.is_file():
        raise DataError(
            f"no {CLASSES_FILE} beside the shards {str(spec)!r} (looked for {str(path)!r}); "
            "labels need class names: write one (a JSON list, label i = entry i) or make the "
            "shards with 'siamae data shard' from an ImageFolder"
        )
    try:
        names = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{str(path)!r} is not readable JSON ({err}); rewrite it") from None
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise DataError(f"{str(path)!r} must hold a JSON list of class names, one per label")
    return names


# -- the index --------------------------------------------------------------------------------


def split_key(member: str) -> tuple[str | None, str]:
    """WebDataset's split of a member name: (key, extension) at the first dot of the file name;
    (None, "") when the file name has no stem before a dot."""
    folder, _, base = member.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None, ""
    return (f"{folder}/{stem}" if folder else stem), ext


def _read_label(tar: tarfile.TarFile, member: tarfile.TarInfo) -> int:
    handle = tar.extractfile(member)
    raw = handle.read(64) if handle is not None else b""
    try:
        value = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return BAD_LABEL
    # Labels are int64 arrays: a value past that (1e23) is no class index, as "abc" is not.
    return value if 0 <= value <= MAX_LABEL else BAD_LABEL


def index_shard(path: Path) -> dict[str, Any]:
    """One shard's record: its stat key, and per sample the image member's name, offset and
    size and the label (``NO_LABEL`` without a ``.cls``); ``bad`` lists where it breaks off."""
    names: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    labels: list[int] = []
    bad: list[list[str]] = []
    record: dict[str, Any] = {"path": str(path), "stat": file_stat_key(path)}
    image: tarfile.TarInfo | None = None
    label = NO_LABEL

    def flush() -> None:
        if image is not None:
            names.append(image.name)
            offsets.append(image.offset_data)
            sizes.append(image.size)
            labels.append(label)

    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            key = None
            try:
                for member in tar:
                    if not member.isfile():
                        continue
                    member_key, ext = split_key(member.name)
                    if member_key is None:
                        continue
                    if member_key != key:  # a new sample starts
                        flush()
                        key, image, label = member_key, None, NO_LABEL
                    ext = ext.lower()
                    if ext in SHARD_IMAGE_EXTENSIONS and image is None:
                        image = member
                    elif ext == "cls":
                        label = _read_label(tar, member)
            except tarfile.ReadError as err:  # data cut short: the shard ends inside a member
                bad.append([f"{path}@{tar.offset}", f"tar data cut short ({err})"])
            flush()
            # tarfile stops quietly at a garbled header; the end of a tar is a zero block.
            f.seek(tar.offset)
            block = f.read(tarfile.BLOCKSIZE)
            if block.strip(b"\0") and not bad:
                bad.append(
                    [
                        f"{path}@{tar.offset}",
                        f"unreadable tar header at byte {tar.offset}: the members after it are left out",
                    ]
                )
    except (OSError, tarfile.TarError) as err:
        bad.append([str(path), f"not a readable tar file ({type(err).__name__}: {err})"])
    record.update(names=names, offsets=offsets, sizes=sizes, labels=labels, bad=bad)
    return record


def _load_cached(files: Iterable[Path | None]) -> dict[str, dict[str, Any]]:
    """The records of the first readable index among ``files``, by shard path."""
    for file in files:
        if file is None or not file.is_file():
            continue
        try:
            data = json.loads(file.read_text())
            if data.get("version") == INDEX_VERSION:
                return {r["path"]: r for r in data["shards"]}
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("%s is unreadable; indexing the shards again", file)
    return {}


def _index_shards(paths: list[Path], workers: int, progress: bool) -> Iterable[dict[str, Any]]:
    """:func:`index_shard` of each path, in order; in ``workers`` processes when there are
    several shards (reading headers is Python work: about 20 000 members/s a process)."""
    bar = dict(total=len(paths), desc="indexing shards", unit="shard", disable=not progress)
    if workers > 1 and len(paths) > 1:
        with ProcessPoolExecutor(min(workers, len(paths))) as pool:
            yield from tqdm(pool.map(index_shard, paths), **bar)
    else:
        yield from tqdm(map(index_shard, paths), **bar)


def build_shard_index(
    paths: list[Path],
    cache_file: Path | None = None,
    previous: Iterable[Path | None] = (),
    progress: bool = False,
    workers: int = 0,
) -> list[dict[str, Any]]:
    """One record per shard (:func:`index_shard`). Records in ``cache_file`` (or else the first
    of ``previous`` that exists) whose path and stat key (:func:`file_stat_key`) still match are
    reused; the others are indexed, in ``workers`` processes. The index is written to
    ``cache_file`` atomically."""
    cached = _load_cached([cache_file, *previous])
    records: list[dict[str, Any] | None] = []
    todo: list[int] = []
    for p in paths:
        resolved = p.resolve()
        old = cached.get(str(resolved))
        if old is not None and old.get("stat") == file_stat_key(resolved):
            records.append(old)
        else:
            records.append(None)
            todo.append(len(records) - 1)
    resolved_todo = [paths[i].resolve() for i in todo]
    for i, record in zip(todo, _index_shards(resolved_todo, workers, progress)):
        records[i] = record
    indexed = len(todo)
    if cache_file is not None and (indexed or not cache_file.is_file()):
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"version": INDEX_VERSION, "shards": records}))
        os.replace(tmp, cache_file)
    return records  # type: ignore[return-value] - every slot is filled


# -- the source -------------------------------------------------------------------------------


class ShardSource:
    """The samples of tar shards as a source: ``len``, ``name``, ``open_image`` (the image
    folders' interface) and, for labelled shards, ``label``, ``classes`` and ``num_classes``.

    Per-sample fields are flat numpy arrays (no Python object per sample), so a loader worker
    forked from the main process shares them instead of copying them page by page.
    """

    def __init__(
        self, records: list[dict[str, Any]], spec: str, classes: list[str] | None = None
    ) -> None:
        self._open: dict[int, int] = {}  # first: close() (from __del__) runs even if __init__ fails
        self.spec = spec
        self.shards = [r["path"] for r in records]
        counts = [len(r["names"]) for r in records]
        self.shard_of = np.repeat(np.arange(len(records), dtype=np.int32), counts)
        self.offsets = np.fromiter((o for r in records for o in r["offsets"]), np.int64)
        self.sizes = np.fromiter((s for r in records for s in r["sizes"]), np.int64)
        self.labels = np.fromiter((v for r in records for v in r["labels"]), np.int64)
        encoded = [n.encode() for r in records for n in r["names"]]
        self._names = b"".join(encoded)
        self._name_ends = np.cumsum([len(n) for n in encoded], dtype=np.int64)
        self.unreadable = [(name, why) for r in records for name, why in r["bad"]]
        self.classes = list(classes) if classes is not None else None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = {}  # descriptors do not travel to another process
        return state

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._open.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._open = {}

    @property
    def num_classes(self) -> int:
        return len(self.classes or [])

    def member(self, index: int) -> str:
        """The image member's name inside its shard."""
        end = int(self._name_ends[index])
        start = int(self._name_ends[index - 1]) if index > 0 else 0
        return self._names[start:end].decode()

    def shard(self, index: int) -> str:
        return self.shards[int(self.shard_of[index])]

    def name(self, index: int) -> str:
        return f"{self.shard(index)}/{self.member(index)}"

    def read(self, index: int, limit: int | None = None) -> bytes:
        """The image member's bytes (its first ``limit`` bytes when given)."""
        s = int(self.shard_of[index])
        size = int(self.sizes[index]) if limit is None else min(limit, int(self.sizes[index]))
        try:
            fd = self._open.get(s)
            if fd is None:
                if len(self._open) >= MAX_OPEN_SHARDS:
                    self.close()
                fd = self._open[s] = os.open(self.shards[s], os.O_RDONLY)
            # Positional: no shared file offset, so forked loader workers may share the fd.
            data = os.pread(fd, size, int(self.offsets[index]))
        except OSError as err:
            raise UnreadableSample(self.name(index), f"{type(err).__name__}: {err}") from None
        if len(data) < size:
            raise UnreadableSample(
                self.name(index),
                f"the shard ends {size - len(data)} bytes into the member (truncated)",
            )
        return data

    def open_image(self, index: int, rng: np.random.Generator) -> Image.Image:
        return open_bytes(self.read(index), self.name(index))

    def label(self, index: int) -> int:
        value = int(self.labels[index])
        if value == NO_LABEL:
            raise UnreadableSample(self.name(index), "no .cls member (class index) beside it")
        if value == BAD_LABEL:
            raise UnreadableSample(self.name(index), "its .cls member holds no class index")
        return value


def open_shards(
    spec: str | Path,
    cache_dir: str | Path | None = None,
    run_dir: str | Path | None = None,
    progress: bool = False,
    labelled: bool = False,
    workers: int = 0,
) -> ShardSource:
    """The shards ``spec`` names, as a source. The index is read from and written to
    ``cache_dir/shard_index.json``; a run folder's index (``run_dir``) is reused when
    ``cache_dir`` holds none (the trainer builds sources in a staging folder and moves what it
    wrote into the run folder once the start is sure). Without ``cache_dir`` the index is written
    to ``run_dir`` when that folder exists.

    ``labelled``: the class names come from ``classes.json`` and labels are checked against them.
    ``workers``: processes that index shards not in the cache.
    """
    paths = shard_paths(spec)
    run_file = Path(run_dir) / SHARD_INDEX_FILE if run_dir is not None else None
    if cache_dir is not None:
        cache_file: Path | None = Path(cache_dir) / SHARD_INDEX_FILE
    elif run_dir is not None and Path(run_dir).is_dir():
        cache_file = run_file
    else:
        cache_file = None
    records = build_shard_index(paths, cache_file, [run_file], progress, workers)
    classes = shard_classes(spec) if labelled else None
    source = ShardSource(records, str(spec), classes)
    if source.unreadable:
        shown = "; ".join(f"{n} ({why})" for n, why in source.unreadable[:3])
        log.warning(
            "%d unreadable part(s) of the shards %s: %s", len(source.unreadable), spec, shown
        )
    if len(source) == 0:
        first = (
            f"; {source.unreadable[0][0]}: {source.unreadable[0][1]}" if source.unreadable else ""
        )
        raise DataError(
            f"no images in the shards {str(spec)!r} (looked for members "
            f"<key>.{'|'.join(sorted(SHARD_IMAGE_EXTENSIONS))}){first}"
        )
    if labelled:
        known = source.labels[source.labels >= 0]
        if known.size == 0:
            raise DataError(
                f"the shards {str(spec)!r} hold no <key>.cls members (class indices); labels "
                "need them: make the shards with 'siamae data shard' from an ImageFolder"
            )
        if int(known.max()) >= len(classes or []):
            raise DataError(
                f"the shards {str(spec)!r} hold class index {int(known.max())}, but "
                f"{str(classes_file(spec))!r} names {len(classes or [])} classes; they do not "
                "belong together"
            )
    return source


def image_source(
    path: str | Path,
    cache_dir: str | Path | None = None,
    run_dir: str | Path | None = None,
    progress: bool = False,
    workers: int = 0,
) -> Source:  # an ImageFileSource or a ShardSource
    """The images at ``path``: tar shards when it names them, else an image folder or list."""
    if is_shard_spec(path):
        return open_shards(path, cache_dir, run_dir, progress, workers=workers)
    return ImageFileSource(path)
