"""siamae's DAVIS label propagation against the published CropMAE flow, side by side.

    python benchmarks/propagation_published.py --published ~/src/CropMAE \
        --python ~/venvs/cropmae/bin/python --sequences motocross-jump,drift-straight

``--published`` is a checkout of github.com/alexandre-eymael/CropMAE (not part of siamae; its
``downstreams/propagation/src/test.py`` needs OpenCV and imageio, so ``--python`` may name an
interpreter that has them beside torch and timm). Both flows get the same random-init ViT-S/16
(saved once as an MAE-style ``{"model": state_dict}`` file, which both read), the same frames and
first-frame annotations (copied into a scratch DAVIS layout: the published loader caches label
arrays next to the annotations, which must not touch the shared data), the ``cropmae`` protocol
(480x880, T 0.7, top-k 7, radius 20, queue 20) with the published defaults (feature batch 5, 4
loader workers). Each flow runs as its own process, A B A B (``--pairs``), and is timed whole:
model load, decoding, features, affinity and writing the predictions; siamae's run also scores
them (the published flow scores in a separate step, not timed), so its figure is conservative.
Peak memory is each process tree's maximum resident set (``wait4``).

Prints one JSON line per run and a summary: frames/s of each, the ratio pair by pair and its
median, peak memory, and how many mask pixels differ between the two flows' predictions (frames 1 on; frame 0 is the
given annotation, which each flow writes its own way).
``--siamae-set key=value`` passes protocol overrides to siamae only (e.g. ``batch_size=2``).

``--memory SEQ`` (no ``--published`` needed) runs siamae alone on SEQ twice, its first 25 frames
and all of them, and prints both peaks: memory bounded by the context, not the video length.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from siamae.loading import random_encoder

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DAVIS = ROOT.parent / "shared" / "data" / "DAVIS"

# Runs test.py's main() with start.py's defaults for the cropmae protocol (argv: repo, ckpt,
# filelist, out, threads).
PUBLISHED_DRIVER = """
import sys, argparse, torch
repo, ckpt, filelist, out, threads = sys.argv[1:6]
sys.path.insert(0, repo)
torch.set_num_threads(int(threads))
from downstreams.propagation.src.test import main
args = argparse.Namespace(model_type="vits16", resume=ckpt, save_path=out, temperature=0.7,
    topk=7, radius=20, video_len=20, crop_size=[480, 880], filelist=filelist, batch_size=5,
    workers=4, seed=0, no_l2=False, norm_mask=False, long_mem=[0], device="cpu")
args.img_size = args.crop_size
main(args)
"""


def scratch_davis(src: Path, dst: Path, sequences: list[str], max_frames: int) -> int:
    """A DAVIS layout under ``dst`` with the first ``max_frames`` frames (0: all) of each
    sequence: JPEGs linked, annotations copied. Returns the number of frames."""
    total = 0
    for seq in sequences:
        jpgs = sorted((src / "JPEGImages" / "480p" / seq).glob("*.jpg"))
        jpgs = jpgs[:max_frames] if max_frames else jpgs
        (dst / "JPEGImages" / "480p" / seq).mkdir(parents=True)
        (dst / "Annotations" / "480p" / seq).mkdir(parents=True)
        for jpg in jpgs:
            (dst / "JPEGImages" / "480p" / seq / jpg.name).symlink_to(jpg)
            png = src / "Annotations" / "480p" / seq / (jpg.stem + ".png")
            shutil.copy(png, dst / "Annotations" / "480p" / seq / png.name)
        total += len(jpgs)
    return total


def timed(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run ``cmd``; (wall seconds, peak resident GiB of its process tree)."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[0]} failed; see {log}")
    return seconds, usage.ru_maxrss / 2**20


def stage_fps(flow: str, log: Path, out: Path, frames: int) -> dict[str, float]:
    """Frames/s of feature extraction and of the rest (affinity, propagation, writing) of one
    run: the published flow prints its seconds per video, siamae writes them to summary.json."""
    if flow == "siamae":
        timing = json.loads((out / "summary.json").read_text())["timing"]
        return {
            "features_fps": round(timing["features_fps"], 4),
            "affinity_fps": round(timing["propagation_fps"], 4),
        }
    text = log.read_text().splitlines()
    features = sum(float(x.split()[-1]) for x in text if x.startswith("computed features"))
    took = sum(float(x.split()[-2]) for x in text if " TOOK " in x)
    return {
        "features_fps": round(frames / features, 4),
        "affinity_fps": round(frames / (took - features), 4),
    }


def published_masks(out: Path, sequences: list[str], counts: list[int]) -> list[np.ndarray]:
    masks = []
    for v, n in enumerate(counts):
        for t in range(1, n):  # frame 0 is the given annotation (written differently by each)
            arr = np.asarray(Image.open(out / f"{v}_{t}_mask.png"))
            masks.append((arr.reshape(arr.shape[0], arr.shape[1], -1) > 0).any(-1))
    return masks


def siamae_masks(out: Path, sequences: list[str], counts: list[int]) -> list[np.ndarray]:
    return [
        np.asarray(Image.open(out / seq / f"{t:05d}.png")) > 0
        for seq, n in zip(sequences, counts)
        for t in range(1, n)
    ]


def memory(args: argparse.Namespace) -> None:
    work = Path(args.work or tempfile.mkdtemp(prefix="prop-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "vit_small_random.pth"
    torch.save({"model": random_encoder("vit_small_patch16").vit.state_dict()}, ckpt)
    for max_frames in (25, 0):
        out = work / f"siamae-{max_frames}"
        cmd = [sys.executable, "-m", "siamae", "eval", "davis", "--checkpoint", str(ckpt),
               "--data-root", str(args.data_root), "--sequences", args.memory, "--threads",
               str(args.threads), "--no-progress", "--out", str(out)]  # fmt: skip
        cmd += ["--max-frames", str(max_frames)] if max_frames else []
        seconds, gib = timed(cmd, work / f"memory-{max_frames}.log")
        frames = json.loads((out / "summary.json").read_text())["timing"]["frames"]
        print(json.dumps({"sequence": args.memory, "frames": frames, "seconds": round(seconds, 1),
                          "peak_gib": round(gib, 2)}), flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--published", type=Path, help="a CropMAE checkout")
    ap.add_argument("--memory", metavar="SEQ", help="siamae's peak memory on SEQ, 25 vs all frames")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the published flow")
    ap.add_argument("--data-root", type=Path, default=DEFAULT_DAVIS)
    ap.add_argument("--sequences", default="motocross-jump,drift-straight")
    ap.add_argument("--max-frames", type=int, default=0, help="per sequence (0: all)")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--siamae-set", action="append", default=[], help="siamae protocol override")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()
    if args.memory:
        return memory(args)
    if args.published is None:
        raise SystemExit("--published CropMAE checkout (or --memory SEQ)")
    driver = args.published / "downstreams" / "propagation" / "src" / "test.py"
    if not driver.is_file():
        raise SystemExit(f"{driver} not found: --published is a CropMAE checkout")
    sequences = args.sequences.split(",")
    work = Path(args.work or tempfile.mkdtemp(prefix="prop-published-"))
    davis = work / "davis"
    frames = scratch_davis(args.data_root, davis, sequences, args.max_frames)
    counts = [len(list((davis / "JPEGImages" / "480p" / s).iterdir())) for s in sequences]
    ckpt = work / "vit_small_random.pth"
    torch.save({"model": random_encoder("vit_small_patch16").vit.state_dict()}, ckpt)
    filelist = work / "davis_vallist.txt"  # test.py names outputs by 'davis' in this name
    filelist.write_text(
        "".join(f"{davis}/JPEGImages/480p/{s} {davis}/Annotations/480p/{s}\n" for s in sequences)
    )

    def published(i: int) -> list[str]:
        out = work / f"published-{i}"
        out.mkdir(exist_ok=True)
        return [args.python, "-c", PUBLISHED_DRIVER, str(args.published), str(ckpt)] + [
            str(filelist),
            str(out),
            str(args.threads),
        ]

    def ours(i: int) -> list[str]:
        sets = [a for s in args.siamae_set for a in ("--set", s)]
        return [sys.executable, "-m", "siamae", "eval", "davis", "--checkpoint", str(ckpt),
                "--data-root", str(davis), "--sequences", args.sequences, "--threads",
                str(args.threads), "--no-progress", "--out", str(work / f"siamae-{i}"), *sets]  # fmt: skip

    rows = []
    for i in range(args.pairs):
        for flow, cmd in (("published", published(i)), ("siamae", ours(i))):
            seconds, gib = timed(cmd, work / f"{flow}-{i}.log")
            row = {"flow": flow, "pair": i, "frames": frames, "seconds": round(seconds, 2),
                   "fps": round(frames / seconds, 4), "peak_gib": round(gib, 2),
                   **stage_fps(flow, work / f"{flow}-{i}.log", work / f"{flow}-{i}", frames)}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    ratios = [rows[2 * i]["seconds"] / rows[2 * i + 1]["seconds"] for i in range(args.pairs)]
    pub = published_masks(work / "published-0", sequences, counts)
    ours_m = siamae_masks(work / "siamae-0", sequences, counts)
    differ = sum(int((a != b).sum()) for a, b in zip(pub, ours_m))
    pixels = sum(a.size for a in pub)
    summary = {
        "sequences": sequences, "frames": frames, "threads": args.threads,
        "speedup_pairs": [round(r, 3) for r in ratios],
        "speedup_median": round(statistics.median(ratios), 3),
        "published_peak_gib": max(r["peak_gib"] for r in rows if r["flow"] == "published"),
        "siamae_peak_gib": max(r["peak_gib"] for r in rows if r["flow"] == "siamae"),
        "mask_pixels_differing": differ, "mask_pixels": pixels, "work": str(work),
    }  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
