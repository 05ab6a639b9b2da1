"""Seconds to score a DAVIS submission folder: ``--score-only`` against the scorer before it.

    python benchmarks/davis_scorer.py --make /tmp/davis_preds        # once: a noisy submission
    python benchmarks/davis_scorer.py --score /tmp/davis_preds --which fast --threads 2
    python benchmarks/davis_scorer.py --score /tmp/davis_preds --which before

``--make`` writes, for every shared DAVIS sequence, each annotation resized to 480x880 (the
published protocol's scoring size), shifted by up to 9 pixels and with a 40x40 block of a wrong
id: regions and boundaries that differ from the truth on every frame, as a real prediction's do.
``--make`` also writes ``<folder>.davis2017/``: the same annotations as DAVIS-2017 palette PNGs of
object ids at 480x880 (2017's layout, which davis2017-evaluation reads; it neither resizes nor
reads 2016's grayscale masks) and ``ImageSets/2017/val.txt``, frames linked. The official scorer
on that root and this one on the shared root then score the same pixels:

    python evaluation_method.py --task semi-supervised --davis_path /tmp/davis_preds.davis2017 \
        --results_path /tmp/davis_preds          # in a clone of davis2017-evaluation

``--score`` prints one JSON line: the scorer, the seconds it took, J&F-Mean and the frames.

``--compare`` times the two as whole processes, in turn (siamae, official, siamae, official ...,
``--pairs`` of each), each run's wall seconds and the ratio pair by pair, then the medians:

    python benchmarks/davis_scorer.py --compare /tmp/davis_preds \
        --official /path/to/davis2017-evaluation --official-python /path/to/its/venv/bin/python

siamae runs as ``python -m siamae eval davis --score-only`` (its own process, its import
included); the official's cached ``global_results-val.csv`` is removed before each of its runs
(it would otherwise read it back instead of scoring).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from siamae.eval.propagation.davis import (
    list_sequences,
    load_sequence,
    read_mask,
    score_predictions,
    write_mask,
)
from siamae.eval.propagation.engine import resize_ids
from siamae.eval.propagation.scoring import score_davis_folder

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "DAVIS"


def make(root: Path, folder: Path, size: tuple[int, int] = (480, 880), seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    official = folder.with_name(folder.name + ".davis2017")
    names = list_sequences(root)
    (official / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (official / "ImageSets" / "2017" / "val.txt").write_text("\n".join(names) + "\n")
    (official / "JPEGImages").mkdir(exist_ok=True)
    if not (official / "JPEGImages" / "480p").exists():
        (official / "JPEGImages" / "480p").symlink_to((root / "JPEGImages" / "480p").resolve())
    for name in names:
        seq = load_sequence(root, name)
        (folder / name).mkdir(parents=True, exist_ok=True)
        (official / "Annotations" / "480p" / name).mkdir(parents=True, exist_ok=True)
        for t, m in enumerate(seq.masks):
            ids = resize_ids(read_mask(m), size)
            write_mask(official / "Annotations" / "480p" / name / f"{m.stem}.png", ids)
            ids = np.where(ids == 255, 0, ids)
            if t:
                shift = (int(rng.integers(-9, 10)), int(rng.integers(-9, 10)))
                ids = np.roll(ids, shift, (0, 1))
                y, x = rng.integers(0, size[0] - 40), rng.integers(0, size[1] - 40)
                ids[y : y + 40, x : x + 40] = rng.integers(0, ids.max() + 1)
            write_mask(folder / name / f"{m.stem}.png", ids)


def _timed(cmd: list[str], cwd: str | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def compare(root: Path, folder: Path, official: Path, python: str, pairs: int, threads: int):
    """Whole-process seconds of ``--score-only`` and of davis2017-evaluation, in turn."""
    out = Path(tempfile.mkdtemp(prefix="davis_scorer_"))
    ours = [sys.executable, "-m", "siamae", "eval", "davis", "--score-only", str(folder),
            "--data-root", str(root), "--out", str(out), "--threads", str(threads),
            "--no-progress"]  # fmt: skip
    theirs = [python, "evaluation_method.py", "--task", "semi-supervised", "--davis_path",
              str(folder.with_name(folder.name + ".davis2017")), "--results_path", str(folder)]  # fmt: skip
    rows = []
    for i in range(pairs + 1):  # the first pair warms the file cache, not counted
        for cached in folder.glob("*results-val.csv"):
            cached.unlink()
        a = _timed(ours)
        for cached in folder.glob("*results-val.csv"):
            cached.unlink()
        b = _timed(theirs, cwd=str(official))
        if i:
            rows.append((a, b))
            print(f"pair {i}: siamae {a:.2f} s, official {b:.2f} s, ratio {a / b:.3f}")
    ratios = [a / b for a, b in rows]
    ours_jf = json.loads((out / "summary.json").read_text())["J&F-Mean"]
    official_jf = (folder / "global_results-val.csv").read_text().splitlines()[1].split(",")[0]
    print(
        json.dumps(
            {
                "siamae_median_s": round(statistics.median(a for a, _ in rows), 2),
                "official_median_s": round(statistics.median(b for _, b in rows), 2),
                "ratio_median": round(statistics.median(ratios), 3),
                "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
                "speed_up_median": round(1 / statistics.median(ratios), 1),
                "siamae_J&F-Mean": ours_jf,
                "official_J&F-Mean (3 decimals)": float(official_jf),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=str(DEFAULT_ROOT))
    ap.add_argument("--make", type=Path, help="write a noisy submission folder there")
    ap.add_argument("--score", type=Path, help="score this submission folder")
    ap.add_argument("--which", choices=("fast", "before"), default="fast")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compare", type=Path, help="time this folder's scoring against the official")
    ap.add_argument("--official", type=Path, help="a davis2017-evaluation checkout (--compare)")
    ap.add_argument("--official-python", default="python", help="the official's interpreter")
    ap.add_argument("--pairs", type=int, default=5)
    args = ap.parse_args()
    root = Path(args.data_root)
    if not root.is_dir():
        raise SystemExit(f"DAVIS not found at {root}; pass --data-root")
    if args.make:
        make(root, args.make)
    if args.compare:
        if args.official is None or not (args.official / "evaluation_method.py").is_file():
            raise SystemExit("--compare needs --official pointing at a davis2017-evaluation clone")
        compare(root, args.compare, args.official, args.official_python, args.pairs, args.threads)
    if args.score:
        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        if args.which == "fast":
            summary = score_davis_folder(root, args.score, threads=args.threads, progress=False)
            summary = summary.summary
        else:
            summary, _ = score_predictions(root, args.score)
        seconds = time.perf_counter() - t0
        frames = sum(len(load_sequence(root, s).masks) - 2 for s in summary["sequences"])
        print(
            json.dumps(
                {
                    "scorer": args.which,
                    "threads": args.threads,
                    "seconds": round(seconds, 2),
                    "J&F-Mean": summary["J&F-Mean"],
                    "frames": frames,
                }
            )
        )


if __name__ == "__main__":
    main()
