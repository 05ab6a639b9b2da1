"""Data-pipeline throughput: CropMAE and SiameseIM pairs/s per worker process, ours vs published.

The published pipeline (as the CropMAE code does it): decode the whole JPEG, torchvision
RandomResizedCrop(224, (0.1, 1)) for the global crop, a second RandomResizedCrop(224, (0.3, 0.6))
of the resized global crop for the local one, flips, ToTensor + Normalize to float tensors.
Ours: the same crop-parameter distribution; JPEG decoded at the smallest 1/2-1/4-1/8 scale the
crop allows, one fused crop+resize per view, uint8 out (normalisation happens on the device).
The same images are also written into tar shards (``siamae data shard``) and read from them
(one positional read per image through the shard index): the shards row.

    python benchmarks/data_throughput.py --data ../shared/data/imagenet-sample
    python benchmarks/data_throughput.py --methods siameseim --videos none   # SiameseIM's views
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from siamae.data.dataset import PretrainDataset
from siamae.data.shard_writer import write_shards
from siamae.data.shards import open_shards
from siamae.data.sources import ImageFileSource
from siamae.data.views import ViewMaker


def published_pipeline() -> callable:
    normalize = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    )
    global_crop = transforms.RandomResizedCrop(
        224, scale=(0.1, 1.0), interpolation=transforms.InterpolationMode.BILINEAR
    )
    local_crop = transforms.RandomResizedCrop(
        224, scale=(0.3, 0.6), interpolation=transforms.InterpolationMode.BILINEAR
    )
    flip = transforms.RandomHorizontalFlip()

    def make(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        img = Image.open(path).convert("RGB")
        g = global_crop(img)
        local = local_crop(g)
        return normalize(flip(g)), normalize(flip(local))

    return make


def time_per_item(fn, items: list, repeats: int) -> float:  # noqa: ANN001
    """Median over ``repeats`` passes of items/s."""
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for item in items:
            fn(item)
        rates.append(len(items) / (time.perf_counter() - t))
    return statistics.median(rates)


def loader_rate(dataset: PretrainDataset, workers: int, count: int) -> float:
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=32,
        num_workers=workers,
        sampler=[(0, i % len(dataset)) for i in range(count)],
    )
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    t = time.perf_counter()
    n = 32
    for batch in it:
        n += batch["images"].shape[0]
    return (n - 32) / (time.perf_counter() - t)


def bench_images(data: Path, count: int, repeats: int, workers: int) -> None:
    source = ImageFileSource(data)
    files = source.files[:count]
    ours = PretrainDataset(
        source, ViewMaker("pair", out=224, global_scale=(0.1, 1.0)), num_patches=196
    )
    torch.manual_seed(0)
    published = time_per_item(published_pipeline(), files, repeats)
    mine = time_per_item(lambda i: ours[(0, i)], list(range(len(files))), repeats)
    sizes = [Image.open(f).size for f in files[:50]]
    print(
        f"images: {data} ({len(files)} JPEGs, median size {int(np.median([s[0] for s in sizes]))}x{int(np.median([s[1] for s in sizes]))})"
    )
    print(f"{'pipeline':44s} {'pairs/s/worker':>15s}")
    print(f"{'published (full decode, RRC, float tensors)':44s} {published:15.1f}")
    print(
        f"{'siamae (draft decode, fused crop, uint8)':44s} {mine:15.1f}   x{mine / published:.2f}"
    )
    if workers > 0:
        print(
            f"{'siamae DataLoader, ' + str(workers) + ' workers (total)':44s} {loader_rate(ours, workers, 32 * 8):15.1f}"
        )
    bench_shards(data, ours, len(files), repeats, workers)


def bench_shards(
    data: Path, files_set: PretrainDataset, count: int, repeats: int, workers: int
) -> None:
    """The same views from tar shards of the same folder (sorted order: item i is file i), timed
    in alternating passes with the files so that other load on the machine hits both alike."""
    with tempfile.TemporaryDirectory(prefix="siamae-shards-") as tmp:
        written = write_shards(data, Path(tmp) / "shards", shard_size=64 * 2**20, progress=False)
        source = open_shards(Path(tmp) / "shards", cache_dir=tmp)
        shards = PretrainDataset(source, files_set.views, num_patches=196)
        items = list(range(count))
        files_rates, shard_rates = [], []
        for _ in range(repeats):
            files_rates.append(time_per_item(lambda i: files_set[(0, i)], items, 1))
            shard_rates.append(time_per_item(lambda i: shards[(0, i)], items, 1))
        files_rate, shard_rate = statistics.median(files_rates), statistics.median(shard_rates)
        print(f"{'files again (alternating with shards)':44s} {files_rate:15.1f}")
        label = f"tar shards ({len(written.shards)} of <= 64 MiB, same images)"
        print(f"{label:44s} {shard_rate:15.1f}   x{shard_rate / files_rate:.2f} of files")
        if workers > 0:
            print(
                f"{'shards, DataLoader, ' + str(workers) + ' workers (total)':44s} {loader_rate(shards, workers, 32 * 8):15.1f}"
            )


# -- SiameseIM (two views with boxes, photometric augments, block mask) ---------------------------


def published_siameseim_pipeline() -> callable:
    """SiameseIM's published loader, per image: each view its own flip of the whole image, own
    RandomResizedCrop(224, (0.08, 1), bicubic), colour jitter 0.8 / grayscale 0.2 / blur (1.0
    for view 1, 0.1 for view 2) / solarize 0.2 (view 2), float tensors; BEiT's block mask."""
    from PIL import ImageFilter, ImageOps

    from siamae.data.siameseim_views import BlockMaskGenerator

    def blur(img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=float(np.random.uniform(0.1, 2.0))))

    normalize = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    )
    crop = transforms.RandomResizedCrop(
        224, scale=(0.08, 1.0), interpolation=transforms.InterpolationMode.BICUBIC
    )
    jitter = transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8)
    gray = transforms.RandomGrayscale(p=0.2)
    colour = [
        transforms.Compose([jitter, gray, transforms.RandomApply([blur], p=1.0)]),
        transforms.Compose(
            [
                jitter,
                gray,
                transforms.RandomApply([blur], p=0.1),
                transforms.RandomApply([ImageOps.solarize], p=0.2),
            ]
        ),
    ]
    masker = BlockMaskGenerator(14, 14, 118, 16)
    rng = np.random.default_rng(0)

    def make(path: Path) -> tuple:
        img = Image.open(path).convert("RGB")
        views = []
        for transform in colour:
            flipped = img.transpose(Image.FLIP_LEFT_RIGHT) if np.random.rand() < 0.5 else img
            views.append(normalize(transform(crop(flipped))))
        return (*views, masker(rng))

    return make


def bench_siameseim(data: Path, count: int, repeats: int, workers: int) -> None:
    from siamae.data.siameseim_views import SiameseIMViews

    source = ImageFileSource(data)
    files = source.files[:count]
    ours = PretrainDataset(source, SiameseIMViews(), num_patches=196)
    torch.manual_seed(0)
    published = time_per_item(published_siameseim_pipeline(), files, repeats)
    mine = time_per_item(lambda i: ours[(0, i)], list(range(len(files))), repeats)
    print(f"SiameseIM ({len(files)} JPEGs): 2 views a pair, photometric augments, block mask")
    print(f"{'pipeline':44s} {'pairs/s/worker':>15s} {'views/s/worker':>15s}")
    print(
        f"{'published (full decode, RRC, float tensors)':44s} {published:15.1f} {2 * published:15.1f}"
    )
    print(
        f"{'siamae (one draft decode, fused crops, uint8)':44s} {mine:15.1f} {2 * mine:15.1f}"
        f"   x{mine / published:.2f}"
    )
    if workers > 0:
        rate = loader_rate(ours, workers, 32 * 8)
        print(
            f"{'siamae DataLoader, ' + str(workers) + ' workers (total)':44s} {rate:15.1f} {2 * rate:15.1f}"
        )


# -- video (SiamMAE frame pairs) ------------------------------------------------------------------


def bench_videos(videos: Path, seconds: float, repeats: int, frames_per_video: int = 120) -> None:
    """SiamMAE pairs/s per worker from video files (PyAV, keyframe seeking) and from folders of
    extracted JPEG frames of the same videos (Kinetics layout), with and without repeated sampling."""
    import av

    from siamae.data import video as V

    maker = ViewMaker("frames", out=224, global_scale=(0.5, 1.0))
    print(
        f"\nvideos: {videos} (SiamMAE pairs: gap 4..47, same crop+flip, 224, uint8; median of {repeats} x {seconds / repeats:.1f} s)"
    )
    print(f"{'source':44s} {'R':>2s} {'pairs/s/worker':>15s} {'frames decoded/pair':>20s}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "frames"
        for path in sorted(videos.iterdir()):
            if path.suffix.lower() not in V.VIDEO_EXTENSIONS:
                continue
            folder = root / "class" / path.stem
            folder.mkdir(parents=True)
            with av.open(str(path)) as c:
                for t, frame in enumerate(c.decode(video=0)):
                    if t >= frames_per_video:
                        break
                    frame.to_image().save(folder / f"{t + 1:05d}.jpg", quality=90)
        for label, path, kind in (
            (f"video files ({len(list(videos.iterdir()))}, PyAV seek)", videos, "videos"),
            (f"frame folders (JPEG q90, {frames_per_video} frames)", root, "frames"),
        ):
            source = V.make_source(path, kind, progress=False)
            for reps in (1, 4):
                rates, decoded, pairs = [], 0, 0
                for r in range(repeats):
                    V.DECODE_STATS["decoded"] = 0
                    n, i, t = 0, 0, time.perf_counter()
                    while time.perf_counter() - t < seconds / repeats:
                        rng = np.random.default_rng([r, i])
                        if reps == 1:
                            maker(source, i % len(source), rng)
                        else:
                            maker.repeated(source, i % len(source), rng, reps)
                        n, i = n + reps, i + 1
                    rates.append(n / (time.perf_counter() - t))
                    decoded, pairs = decoded + V.DECODE_STATS["decoded"], pairs + n
                per_pair = f"{decoded / pairs:20.1f}" if kind == "videos" else f"{'-':>20s}"
                print(f"{label:44s} {reps:2d} {statistics.median(rates):15.1f} {per_pair}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample",
    )
    parser.add_argument("--count", type=int, default=300, help="images per pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="also time a DataLoader with this many workers (0: skip)",
    )
    parser.add_argument(
        "--videos",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared" / "data" / "videos",
        help="folder of videos for the SiamMAE section (skipped if absent)",
    )
    parser.add_argument(
        "--video-seconds", type=float, default=12.0, help="seconds per video configuration"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["cropmae", "siameseim"],
        choices=["cropmae", "siameseim"],
        help="image pipelines to time",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # one worker process = one core
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; one process per worker, 1 thread"
    )
    if not args.data.is_dir():
        raise SystemExit(f"no image folder at {args.data}; pass --data")
    if "cropmae" in args.methods:
        bench_images(args.data, args.count, args.repeats, args.workers)
    if "siameseim" in args.methods:
        bench_siameseim(args.data, args.count, args.repeats, args.workers)
    if args.videos.is_dir():
        bench_videos(args.videos, args.video_seconds, args.repeats)


if __name__ == "__main__":
    main()
