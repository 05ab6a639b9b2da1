"""What a grid of segmentation probes costs against one probe (``siamae eval segment --grid``).

    python benchmarks/segmentation_grid.py --davis ../shared/data/DAVIS --out runs/seg_grid

Writes the VOC-layout, 2-class DAVIS set of ``benchmarks/segmentation_cached.py`` (the same
frames, the same held-out sequences), then runs ``siamae eval segment --protocol cached`` in
this process, in turn ``--repeats`` times: one probe (``--lr``, last block), a grid of ``--lrs``
on the last block, and a grid of ``--lrs`` x last 1 / 4 blocks, all on the same cached
features (the first run of each feature set computes them; the time is reported apart). Each
run's head-training and evaluation seconds come from its summary.json; the ratios to the single
probe are taken pair by pair (the machine may be shared: the median is the figure to quote).
Results in OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from davis_voc import convert
from siamae.commands.cli import main as siamae


def run(args: argparse.Namespace, name: str, extra: list[str]) -> dict:
    out = args.out / name
    crop = args.crop
    line = ["eval", "segment", *args.encoder, "--data", str(args.out / "voc"), "--out", str(out)]
    line += ["--protocol", "cached", "--epochs", str(args.epochs), "--lr", str(args.lr)]
    line += ["--cached-views", args.cached_views]
    line += ["--batch-size", str(args.batch_size), "--crop", str(crop)]
    line += ["--stride", str(round(crop * 2 / 3)), "--scale", str(2 * crop), str(crop)]
    line += ["--num-workers", str(args.num_workers), "--no-resume", "--no-progress"]
    line += ["--feature-cache", str(args.out / "features"), "--pictures", "0", *extra]
    start = time.perf_counter()
    assert siamae(line) == 0, f"{name} failed"
    wall = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    return {
        "heads": len(summary.get("heads", [None])),
        "mIoU": round(summary["mIoU"], 2),
        "best": summary.get("best_head", {}).get("name", f"lr {args.lr:g}, last block"),
        "every_mIoU": [round(h["mIoU"], 2) for h in summary.get("heads", [])],
        "train_iters": summary["train_iters"],
        "feature_seconds": summary["feature_seconds"],
        "features_reused": summary["features_reused"],
        "train_seconds": summary["train_seconds"],
        "eval_seconds": summary["seconds"],
        "wall_seconds": round(wall, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--davis", type=Path, default=Path("../shared/data/DAVIS"))
    p.add_argument("--out", type=Path, default=Path("runs/seg_grid"))
    p.add_argument("--every", type=int, default=2, help="keep every k-th DAVIS frame")
    p.add_argument("--short-side", type=int, default=224)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="the single probe's lr")
    p.add_argument("--lrs", nargs="+", default=["1e-4", "3e-4", "1e-3", "3e-3", "1e-2", "3e-2"])
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--random-init", default="vit_small_patch16_224", help="an untrained encoder")
    p.add_argument("--checkpoint", help="the encoder (default: --random-init's)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--cached-views",
        choices=("crops", "windows"),
        default="crops",
        help="--cached-views (the figures in docs/segmentation.md: windows, the default then)",
    )
    args = p.parse_args()
    args.encoder = (
        ["--checkpoint", args.checkpoint]
        if args.checkpoint
        else ["--random-init", args.random_init]
    )
    if not (args.out / "voc" / "VOC2012" / "class_names.txt").is_file():
        splits = convert(args.davis, args.out / "voc", args.every, 3, args.short_side)
        print({split: len(names) for split, names in splits.items()})
    grid = ["--grid", "--grid-lrs", *args.lrs]
    kinds = {
        "one probe": [],
        f"{len(args.lrs)} lrs, last block": grid,
        f"{len(args.lrs)} lrs x last 1 / 4 blocks": [*grid, "--grid-layers", "1", "4"],
    }
    runs: dict[str, list[dict]] = {name: [] for name in kinds}
    for i in range(args.repeats):  # in turn, so a change of the machine's load hits all alike
        for k, (name, extra) in enumerate(kinds.items()):
            runs[name].append(run(args, f"run{i}_{k}", extra))
            result = summarise(runs)  # after every run: a stopped benchmark keeps its pairs
            (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def summarise(runs: dict[str, list[dict]]) -> dict:
    """The runs and, over the repeats every kind finished, the median paired ratios."""
    single = runs["one probe"]
    done = min(len(r) for r in runs.values())

    def ratio(name: str, key: str) -> float | None:
        pairs = list(zip(runs[name][:done], single[:done], strict=True))
        return round(statistics.median(g[key] / s[key] for g, s in pairs), 2) if pairs else None

    return {
        "runs": runs,
        "median_train_ratio_to_one_probe": {name: ratio(name, "train_seconds") for name in runs},
        "median_eval_ratio_to_one_probe": {name: ratio(name, "eval_seconds") for name in runs},
    }


if __name__ == "__main__":
    main()
