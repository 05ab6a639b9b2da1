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
    python benchmarks/data_throughput.py --methods --videos ../shared/data/videos  # videos only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tarfile
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


def _frame_folders(videos: Path, root: Path, frames_per_video: int) -> None:
    """The first ``frames_per_video`` frames of each video as JPEG q90 (Kinetics layout)."""
    import av

    from siamae.data import video as V

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


def _psnr(videos: Path, prepared: Path, fmt: str, step: int = 5) -> tuple[float, float]:
    """PSNR (dB) of the prepared frames against the original frames scaled to the same size
    (FFmpeg's area filter, as the preparation scales), every ``step``-th frame of every video:
    pooled over all of them, and the lowest video's."""
    import av

    from siamae.data.video_prepare import output_size
    from siamae.data.video_shards import DONE_FILE

    def psnr(mse: float) -> float:
        return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)

    errors, worst = [], float("inf")
    for line in (prepared / DONE_FILE).read_text().splitlines():
        record = json.loads(line)
        width, height = record["source_size"]
        size = output_size(width, height, 256)
        with av.open(record["source"]) as c:
            ref = [
                f.reformat(width=size[0], height=size[1], format="rgb24", interpolation="AREA")
                .to_ndarray()
                .astype(np.float64)
                for t, f in enumerate(c.decode(video=0))
                if t % step == 0
            ]
        if fmt == "mp4":
            with av.open(str(prepared / record["out"])) as c:
                got = [
                    f.to_ndarray(format="rgb24")
                    for t, f in enumerate(c.decode(video=0))
                    if t % step == 0
                ]
        else:
            with tarfile.open(prepared / record["out"]) as tar:
                members = [m for m in tar.getmembers() if m.isfile()]
                got = [
                    np.asarray(Image.open(tar.extractfile(m)).convert("RGB"))
                    for m in members[::step]
                ]
        mse = [float(np.mean((a - b) ** 2)) for a, b in zip(ref, got)]
        errors += mse
        worst = min(worst, psnr(float(np.mean(mse))))
    return psnr(float(np.mean(errors))), worst


def _rate(
    source, maker: ViewMaker, reps: int, seconds: float, seed: int
) -> tuple[float, float, int, int]:  # noqa: ANN001
    """(pairs/s wall, pairs per CPU second of this process, frames decoded, pairs) for
    ``seconds`` of SiamMAE pairs."""
    from siamae.data import video as V

    V.DECODE_STATS["decoded"] = 0
    n, i, t, cpu = 0, 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t < seconds:
        rng = np.random.default_rng([seed, i])
        if reps == 1:
            maker(source, i % len(source), rng)
        else:
            maker.repeated(source, i % len(source), rng, reps)
        n, i = n + reps, i + 1
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    return n / wall, n / cpu, V.DECODE_STATS["decoded"], n


def _video_configs(videos: Path, tmp: Path, frames_per_video: int, gop: int) -> list[tuple]:
    """(label, source, R, bytes, PSNR) rows: the originals, the two prepared routes, frame
    folders; PyAV threads and torchcodec where installed."""
    from siamae.data import video as V
    from siamae.data.torchcodec_reader import check_torchcodec
    from siamae.data.video_prepare import PrepareSettings, prepare_videos
    from siamae.data.video_shards import open_frame_shards
    from siamae.errors import DataError

    original = sum(
        p.stat().st_size for p in videos.iterdir() if p.suffix.lower() in V.VIDEO_EXTENSIONS
    )
    mp4, jpeg = tmp / "mp4", tmp / "jpeg"
    for out, fmt in ((mp4, "mp4"), (jpeg, "jpeg")):
        t = time.perf_counter()
        report = prepare_videos(videos, out, PrepareSettings(format=fmt, gop=gop), progress=False)
        print(
            f"prepared ({fmt}): {report.prepared} videos in {time.perf_counter() - t:.1f} s, {report.bytes_out / original:.2f}x the original bytes"
        )
    psnr_mp4, psnr_jpeg = _psnr(videos, mp4, "mp4"), _psnr(videos, jpeg, "jpeg")
    frames = tmp / "frames"
    _frame_folders(videos, frames, frames_per_video)
    size = {
        k: sum(
            p.stat().st_size
            for p in d.rglob("*")
            if p.is_file() and p.suffix in (".mp4", ".tar", ".jpg")
        )
        / original
        for k, d in (("mp4", mp4), ("jpeg", jpeg))
    }
    rows = [
        ("original files, PyAV", V.make_source(videos, "videos", progress=False), 1.0, None),
        (
            f"prepared mp4 (gop {gop}, 256), PyAV",
            V.make_source(mp4, "videos", progress=False),
            size["mp4"],
            psnr_mp4,
        ),
        (
            "prepared mp4, PyAV 2 threads",
            V.make_source(mp4, "videos", progress=False, threads=2),
            size["mp4"],
            psnr_mp4,
        ),
        ("prepared jpeg tars (256, q90)", open_frame_shards(jpeg), size["jpeg"], psnr_jpeg),
        (
            f"frame folders (JPEG q90 full size, {frames_per_video} fr.)",
            V.make_source(frames, "frames", progress=False),
            None,
            None,
        ),
    ]
    try:
        check_torchcodec()
        rows.insert(
            1,
            (
                "original files, torchcodec (plain layout)",
                V.make_source(videos, "videos", progress=False, backend="torchcodec"),
                1.0,
                None,
            ),
        )
        rows.insert(
            3,
            (
                "prepared mp4, torchcodec",
                V.make_source(mp4, "videos", progress=False, backend="torchcodec"),
                size["mp4"],
                psnr_mp4,
            ),
        )
    except DataError as err:
        print(f"torchcodec rows left out: {err}")
    return rows


def bench_videos(
    videos: Path, seconds: float, repeats: int, frames_per_video: int = 120, gop: int = 8
) -> None:
    """SiamMAE pairs/s per worker from the video files, from the same videos prepared by
    ``siamae data videos`` (mp4 with a short keyframe interval; JPEG frames in tars), and from
    folders of extracted JPEG frames; configurations timed in alternating rounds (median), so
    other load on the machine hits all alike."""
    maker = ViewMaker("frames", out=224, global_scale=(0.5, 1.0))
    with tempfile.TemporaryDirectory() as tmp:
        rows = _video_configs(videos, Path(tmp), frames_per_video, gop)
        print(
            f"\nvideos: {videos} (SiamMAE pairs: gap 4..47, same crop+flip, 224, uint8; median of {repeats} alternating rounds x {seconds / repeats:.1f} s)"
        )
        configs = [
            (row, reps) for row in rows for reps in ((1, 4) if "threads" not in row[0] else (1,))
        ]
        results: dict[int, list] = {k: [] for k in range(len(configs))}
        for r in range(repeats):
            for k, ((_, source, _, _), reps) in enumerate(configs):
                results[k].append(_rate(source, maker, reps, seconds / repeats, r))
        head = f"{'source':46s} {'R':>2s} {'pairs/s/worker':>15s} {'pairs/CPU-s':>12s} {'frames/pair':>12s} {'bytes':>6s} {'PSNR dB':>12s}"
        print(head)
        base = statistics.median(x[0] for x in results[0])
        for k, ((label, _source, size, psnr), reps) in enumerate(configs):
            wall = statistics.median(x[0] for x in results[k])
            cpu = statistics.median(x[1] for x in results[k])
            decoded, pairs = sum(x[2] for x in results[k]), sum(x[3] for x in results[k])
            per_pair = f"{decoded / pairs:12.1f}" if decoded else f"{'-':>12s}"
            size_text = f"{size:5.2f}x" if size else f"{'-':>6s}"
            psnr_text = f"{psnr[0]:5.1f} ({psnr[1]:4.1f})" if psnr else f"{'-':>12s}"
            print(
                f"{label:46s} {reps:2d} {wall:15.1f} {cpu:12.1f} {per_pair} {size_text} {psnr_text}   x{wall / base:.1f}"
            )
        print(
            "bytes: against the original files; PSNR: pooled over every 5th frame of all videos (lowest video's in brackets), against the original scaled to the same size"
        )


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
        "--gop",
        type=int,
        default=8,
        help="keyframe interval of the prepared mp4s (siamae data videos --gop)",
    )
    parser.add_argument(
        "--methods",
        nargs="*",
        default=["cropmae", "siameseim"],
        choices=["cropmae", "siameseim"],
        help="image pipelines to time",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # one worker process = one core
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; one process per worker, 1 thread"
    )
    if args.methods and not args.data.is_dir():
        raise SystemExit(f"no image folder at {args.data}; pass --data")
    if "cropmae" in args.methods:
        bench_images(args.data, args.count, args.repeats, args.workers)
    if "siameseim" in args.methods:
        bench_siameseim(args.data, args.count, args.repeats, args.workers)
    if args.videos.is_dir():
        bench_videos(args.videos, args.video_seconds, args.repeats, gop=args.gop)


if __name__ == "__main__":
    main()
