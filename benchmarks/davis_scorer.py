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
Time whole processes side by side (alternating runs) to compare the two on a shared machine.
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=str(DEFAULT_ROOT))
    ap.add_argument("--make", type=Path, help="write a noisy submission folder there")
    ap.add_argument("--score", type=Path, help="score this submission folder")
    ap.add_argument("--which", choices=("fast", "before"), default="fast")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    root = Path(args.data_root)
    if not root.is_dir():
        raise SystemExit(f"DAVIS not found at {root}; pass --data-root")
    if args.make:
        make(root, args.make)
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
