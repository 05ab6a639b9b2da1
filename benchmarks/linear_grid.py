"""What a grid of linear heads costs against one head (``siamae eval linear --grid``).

    python benchmarks/linear_grid.py --data ../shared/data/cifar10-subset --out runs/linear_grid

Runs ``siamae eval linear --grid`` once on the folder (its grid features cached in
OUT/grid/features), then trains, on those same cached features and in this one process, one
head (the protocol's: lr 0.1, last block's CLS) and a grid of ``--lrs`` x last 1/4 blocks x
CLS / CLS + mean patch token (12 heads by default), in turn, ``--repeats`` times each, and
prints the head-training seconds of each and their ratio pair by pair; a second grid of 12 learning
rates on the last block's CLS alone is timed beside it (the machine may be
shared: the median ratio is the figure to quote). Results in OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from siamae.checkpoint import load_checkpoint
from siamae.commands.cli import main as siamae
from siamae.data.image_folder import EvalTransform, ImageFolder, validation_folder
from siamae.eval.probes.grid import GRID_LRS, fit_grid, grid_specs, select_features
from siamae.eval.probes.linear import LinearConfig, fit_probe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data/cifar10-subset"))
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="test")
    p.add_argument("--out", type=Path, default=Path("runs/linear_grid"))
    p.add_argument("--random-init", default="vit_small_patch16_224")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lrs", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    source = (
        ["--checkpoint", args.checkpoint]
        if args.checkpoint
        else ["--random-init", args.random_init]
    )
    line = ["eval", "linear", *source, "--train", str(args.data / args.train_split)]
    line += ["--val", str(args.data / args.val_split), "--img-size", str(args.img_size)]
    line += ["--crop-pct", "1.0", "--epochs", str(args.epochs), "--no-progress"]
    line += ["--grid", "--grid-lrs", *map(str, args.lrs), "--out-dir", str(args.out / "grid")]
    start = time.perf_counter()
    assert siamae(line) == 0
    command_seconds = time.perf_counter() - start
    ran = json.loads((args.out / "grid" / "results.json").read_text())

    def stored(name: str) -> torch.Tensor:
        return load_checkpoint(args.out / "grid" / "features" / f"{name}.pt")["features"]

    train_x, val_x = stored("train_grid"), stored("val_grid")
    transform = EvalTransform(args.img_size, 1.0)
    train_set = ImageFolder(args.data / args.train_split, transform)
    val_set = validation_folder(args.data / args.val_split, transform, train_set.classes)
    classes = len(train_set.classes)
    cfg = LinearConfig.for_protocol("mae-sgd256", epochs=args.epochs)
    shapes = {
        "3 lrs x last 1/4 blocks x cls, cls+avg": grid_specs(tuple(args.lrs)),
        "12 lrs, last block, cls": grid_specs(tuple(GRID_LRS[1:]), (1,), ("cls",)),
    }
    single_x, single_val = select_features(train_x, 1, "cls"), select_features(val_x, 1, "cls")
    seconds: dict[str, list[float]] = {"single head": [], **{name: [] for name in shapes}}
    for _ in range(args.repeats):  # in turn, so a change of the machine's load hits all alike
        t0 = time.perf_counter()
        fit_probe(single_x, train_set.labels, single_val, val_set.labels, classes, cfg)
        seconds["single head"].append(time.perf_counter() - t0)
        for name, specs in shapes.items():
            t0 = time.perf_counter()
            fit_grid(train_x, train_set.labels, val_x, val_set.labels, classes, specs, cfg)
            seconds[name].append(time.perf_counter() - t0)
    result = {
        "train_images": len(train_set),
        "feature_dim": train_x.shape[1] // 5,
        "classes": classes,
        "epochs": args.epochs,
        "command_seconds": round(command_seconds, 1),
        "best_head": ran["best_head"],
        "seconds": {name: [round(s, 2) for s in runs] for name, runs in seconds.items()},
        "median_ratio_to_single_head": {
            name: round(
                statistics.median(
                    g / s for g, s in zip(seconds[name], seconds["single head"], strict=True)
                ),
                2,
            )
            for name in shapes
        },
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
