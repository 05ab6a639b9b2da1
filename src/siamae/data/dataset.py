"""The pre-training dataset and sampler: deterministic per (seed, epoch, index), resumable.

Every random choice of a sample (crops, flips, frames, the mask noise) comes from a generator
seeded by (seed, epoch, index). So a sample is the same whichever worker or process makes it:
a resumed run sees exactly the data it would have seen, and a global batch split over several
processes is the same batch as in one process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from siamae.config import Config
from siamae.data import video
from siamae.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from siamae.data.shards import image_source, is_shard_spec
from siamae.data.sources import (
    Source,
    SyntheticImageSource,
    SyntheticVideoSource,
    UnreadableSample,
    class_labels_of,
)
from siamae.data.video_shards import is_frame_shards, open_frame_shards
from siamae.data.views import Augment, MakesViews, ViewMaker, ViewSample
from siamae.errors import DataError
from siamae.options import option_error

MAX_CONSECUTIVE_BAD = 50
# Fields of a loader batch that are bookkeeping, not model inputs. ``class_label`` (the item's
# class, there only for the online linear probe) is for the trainer, never the method.
CLASS_LABEL = "class_label"
BOOKKEEPING = ("index", "skipped", "skipped_files", CLASS_LABEL)


def _split(made: list[np.ndarray] | ViewSample) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A view maker's result -> (stacked views (V, H, W, 3), extras)."""
    if isinstance(made, ViewSample):
        return np.stack(made.views), made.extras
    return np.stack(made), {}


class PretrainDataset(Dataset):
    """Index ``(epoch, i)`` -> ``{"images": uint8 (V, 3, H, W), "mask_noise": (N,), ...}``.

    A view maker that returns a :class:`ViewSample` adds its extras (boxes, masks, labels) to the
    item under their own names, as tensors.

    With ``repeats`` R > 1 (repeated sampling) an item holds R samples of one source item
    (R frame pairs from one decoded video): images (R, V, 3, H, W), mask_noise (R, N);
    :func:`collate` flattens them into the batch.

    An unreadable item is skipped (the next index is used instead), counted in ``skipped`` and
    named in ``skipped_files`` so the training loop can report it.

    With ``labels`` (one class per source item, and the class names) an item also holds
    ``class_label``, the class of the item it was made from: bookkeeping the loader batch
    carries to the trainer (the online linear probe), never among the method's inputs.
    """

    def __init__(
        self,
        source: Source,
        views: MakesViews,
        num_patches: int,
        seed: int = 0,
        repeats: int = 1,
        labels: tuple[np.ndarray, list[str]] | None = None,
    ) -> None:
        self.source = source
        self.labels, self.classes = labels if labels is not None else (None, [])
        self.views = views
        self.num_patches = num_patches
        self.seed = seed
        self.repeats = repeats

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        skipped: list[str] = []
        n = len(self.source)
        for attempt in range(MAX_CONSECUTIVE_BAD):
            i = (index + attempt) % n
            rng = np.random.default_rng([self.seed, epoch, i])
            try:
                if self.repeats == 1:
                    views, extras = _split(self.views(self.source, i, rng))
                else:
                    made = [
                        _split(v)
                        # repeats > 1 only with the crop ViewMaker: the other view makers
                        # refuse data.repeated_sampling
                        for v in self.views.repeated(self.source, i, rng, self.repeats)  # type: ignore[attr-defined]
                    ]
                    views = np.stack([v for v, _ in made])
                    extras = {k: np.stack([e[k] for _, e in made]) for k in made[0][1]}
            except UnreadableSample as bad:
                skipped.append(f"{bad.name}\t{bad.reason}")
                continue
            images = torch.from_numpy(views).movedim(-1, -3).contiguous()
            shape = (self.num_patches,) if self.repeats == 1 else (self.repeats, self.num_patches)
            noise = torch.from_numpy(rng.random(shape, dtype=np.float32))
            item = {
                **{name: torch.as_tensor(np.asarray(value)) for name, value in extras.items()},
                "images": images,
                "mask_noise": noise,
                "index": i,
                "skipped": len(skipped),
                "skipped_files": "\n".join(skipped),
            }
            if self.labels is not None:
                item[CLASS_LABEL] = int(self.labels[i])
            return item
        raise DataError(
            f"{MAX_CONSECUTIVE_BAD} consecutive unreadable items starting at {self.source.name(index)!r}; "
            f"last error: {skipped[-1] if skipped else '?'}. Check the data folder."
        )


class EpochSampler(Sampler[tuple[int, int]]):
    """Shuffled (epoch, index) pairs for one process of ``world_size``; resumable mid-epoch.

    Each epoch is a permutation seeded by (seed, epoch), cut to whole global batches. Global
    batch s is ``perm[s*B*W : (s+1)*B*W]``; process r takes its r-th slice of B. One process
    with batch B*W therefore sees exactly the union of what W processes with batch B see.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = size // self.global_batch
        if self.batches_per_epoch == 0:
            raise DataError(
                f"the data has {size} items, fewer than one global batch ({batch_size} x {world_size} processes); "
                "use more data or a smaller data.batch_size"
            )
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(self.size, generator=g).tolist()
        else:
            perm = list(range(self.size))
        for s in range(self.start_batch, self.batches_per_epoch):
            start = s * self.global_batch + self.rank * self.batch_size
            for i in perm[start : start + self.batch_size]:
                yield (self.epoch, i)


def build_source(
    cfg: Config, kind: str, cache_dir: str | None = None, run_dir: str | None = None
) -> Source:
    """The source the config names; video kinds come from :mod:`siamae.data.video`, tar shards
    from :mod:`siamae.data.shards` (their index is cached in ``cache_dir``, reused from the run
    folder ``run_dir``, by default ``run.out_dir``, when it holds one)."""
    d = cfg.data
    run_dir = run_dir if run_dir is not None else cfg.run.out_dir
    video_method = kind == "frames"
    if d.source == "synthetic":
        if video_method:
            return SyntheticVideoSource(
                d.synthetic_count, d.synthetic_size, d.synthetic_frames, cfg.run.seed
            )
        return SyntheticImageSource(d.synthetic_count, d.synthetic_size, cfg.run.seed)
    if d.source == "images":
        return image_source(d.path, cache_dir, run_dir, cfg.run.progress, d.num_workers)
    if is_shard_spec(d.path) and d.source == "videos" and is_frame_shards(d.path):
        # videos prepared as JPEG frames, one tar per video (siamae data videos --format jpeg)
        return open_frame_shards(d.path, cache_dir, run_dir, cfg.run.progress, d.num_workers)
    if is_shard_spec(d.path):
        raise DataError(
            f"data.path {d.path!r} names tar shards, which hold images; data.source "
            f"{d.source!r} reads videos (SiamMAE's frame pairs): pass video files, frame folders "
            "or the output of 'siamae data videos'"
        )
    return video.build_video_source(cfg, cache_dir, run_dir)


def loader_batch_size(cfg: Config) -> int:
    """Items per loader batch: ``data.batch_size`` counts samples (pairs); with repeated
    sampling R each item gives R of them, so a batch holds ``batch_size / R`` items."""
    d = cfg.data
    if d.batch_size % d.repeated_sampling:
        raise DataError(
            f"data.batch_size {d.batch_size} is not a multiple of data.repeated_sampling "
            f"{d.repeated_sampling}; a batch must hold whole groups of repeated samples"
        )
    return d.batch_size // d.repeated_sampling


def build_view_maker(cfg: Config, kind: str) -> ViewMaker:
    """The crop-based view maker of CropMAE (``pair``), SiamMAE (``frames``) and MAE (``single``)."""
    d = cfg.data
    augment = Augment(d.color_jitter, d.blur) if (d.color_jitter > 0 or d.blur > 0) else None
    return ViewMaker(
        kind=kind,
        out=cfg.model.img_size,
        strategy=d.views,
        global_scale=d.global_scale,
        local_scale=d.local_scale,
        ratio=d.ratio,
        hflip=d.hflip,
        frame_gap=d.frame_gap,
        augment=augment,
        sampler=d.crop_sampler,
        interpolation=d.interpolation or "bilinear",
    )


def build_dataset(
    cfg: Config,
    kind: str,
    num_patches: int,
    cache_dir: str | None = None,
    views: MakesViews | None = None,  # default: build_view_maker(cfg, kind)
    source: Source | None = None,  # default: build_source(cfg, kind, cache_dir)
) -> PretrainDataset:
    """The dataset of a run. Methods with their own views or data pass ``views``/``source``."""
    views = views if views is not None else build_view_maker(cfg, kind)
    source = source if source is not None else build_source(cfg, kind, cache_dir)
    labels = training_labels(cfg, source)
    return PretrainDataset(
        source, views, num_patches, cfg.run.seed, cfg.data.repeated_sampling, labels
    )


def training_labels(cfg: Config, source: Source) -> tuple[np.ndarray, list[str]] | None:
    """The class of each item for the online linear probe (``monitor.online_linear``), None
    when it is off; refused (one line naming the field) when the data has no classes."""
    if not cfg.monitor.online_linear:
        return None
    found = class_labels_of(source)
    if found is None or len(found[1]) < 2:
        raise option_error(
            "monitor.online_linear",
            f"the pre-training data ({cfg.data.source} {cfg.data.path or ''}".rstrip()
            + ") has no class labels: it needs an ImageFolder-layout folder (<folder>/<class>/"
            "<image>, 2 classes or more) or tar shards with a .cls member per sample; "
            "set monitor.online_linear=false or point data.path at labelled images",
        )
    return found


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch; repeated samples (images (R, V, 3, H, W)) are flattened.

    Every tensor field (images, mask_noise, a view maker's extras) is stacked under its name.
    """
    repeated = samples[0]["images"].dim() == 5
    join = torch.cat if repeated else torch.stack
    reps = samples[0]["images"].shape[0] if repeated else 1
    tensors = [k for k, v in samples[0].items() if k not in BOOKKEEPING and torch.is_tensor(v)]
    labels = (
        {CLASS_LABEL: torch.tensor([s[CLASS_LABEL] for s in samples]).repeat_interleave(reps)}
        if CLASS_LABEL in samples[0]
        else {}
    )
    return {
        **{k: join([s[k] for s in samples]) for k in tensors},
        **labels,
        "index": torch.tensor([s["index"] for s in samples]).repeat_interleave(reps),
        "skipped": sum(s["skipped"] for s in samples),
        "skipped_files": [
            f for s in samples if s["skipped_files"] for f in s["skipped_files"].split("\n")
        ],
    }


def build_loader(
    dataset: PretrainDataset, sampler: EpochSampler, num_workers: int, pin_memory: bool = False
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=sampler.batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )


@contextlib.contextmanager
def worker_batches(loader: DataLoader) -> Iterator[Iterator[Any]]:
    """``iter(loader)``, whose worker processes end with the block, however it ends.

    Left to the garbage collector, an iterator held by an error's traceback outlives the
    command; at interpreter exit multiprocessing then stops the workers with SIGTERM and joins
    them, and the training loader's workers ignore SIGTERM (a group signal must not kill them
    mid-step), so the command hung after printing its error. On an error the workers are killed
    at once: what they were loading is lost anyway, and one may be stuck in a huge decode.
    """
    iterator = iter(loader)
    try:
        yield iterator
    except BaseException:
        _kill_workers(iterator)
        raise
    finally:
        shut_down_workers(iterator)


def shut_down_workers(iterator: Iterator[Any]) -> None:
    """Stop a loader iterator's worker processes now (nothing for a loader without workers)."""
    # torch's own shutdown (private, hence the getattr): it asks idle workers to exit, joins them
    # and closes the queues and the pin-memory thread; a worker still busy is then killed.
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    _kill_workers(iterator)


def _kill_workers(iterator: Iterator[Any]) -> None:
    workers = [w for w in getattr(iterator, "_workers", []) if w.is_alive()]
    if not workers:
        return
    # torch watches its workers (a SIGCHLD handler) and raises when one dies of a signal: it
    # stops watching these first, as its own shutdown does.
    if getattr(iterator, "_worker_pids_set", False):
        torch.utils.data._utils.signal_handling._remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False  # type: ignore[attr-defined]
    for worker in workers:
        worker.kill()  # SIGKILL: the training loader's workers ignore SIGTERM
    for worker in workers:
        worker.join(timeout=5)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> ImageNet-normalised float32, on the tensor's device."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def batch_to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, torch.Tensor]:
    """A loader batch -> the method's inputs: ``images`` normalised on the device, every other
    tensor field (mask noise, boxes, masks, labels) moved there as it is."""
    inputs = {
        k: v.to(device, non_blocking=True)
        for k, v in batch.items()
        if k not in BOOKKEEPING and torch.is_tensor(v)
    }
    inputs["images"] = normalize_images(inputs["images"])
    return inputs
