"""The segmentation probe both ways at the same number of epochs: on cached features
(``--protocol cached``) and on fresh augmented crops (``--protocol dinov2``), wall time and mIoU.

    python benchmarks/segmentation_cached.py --davis ../shared/data/DAVIS --out runs/seg_cached

Writes a VOC-layout, 2-class set from DAVIS (``benchmarks/davis_voc.py``: every ``--every``-th
frame, short side ``--short-side``, every third sequence held out for validation), then runs
``siamae eval segment`` with the same encoder, batch, lr, crop and epochs under both protocols,
and a second cached probe (another lr) that reuses the first one's features. Every number comes
from the project's own command, run in this process; the table is printed and written to
OUT/results_<which>_seed<S>_copies<C or default>[_crops].json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from davis_voc import convert
from siamae.commands.cli import main as siamae


def probe(args: argparse.Namespace, name: str, protocol: str, lr: float) -> dict:
    out = args.out / name
    crop = args.crop
    line = ["eval", "segment", *args.encoder, "--data", str(args.out / "voc"), "--out", str(out)]
    line += ["--protocol", protocol, "--epochs", str(args.epochs), "--lr", str(lr)]
    line += ["--batch-size", str(args.batch_size), "--crop", str(crop)]
    line += ["--stride", str(round(crop * 2 / 3)), "--scale", str(2 * crop), str(crop)]
    line += ["--num-workers", str(args.num_workers), "--no-resume", "--no-progress"]
    line += ["--seed", str(args.seed)]
    if protocol == "cached":
        line += ["--feature-cache", str(args.out / "features"), "--cached-views", args.cached_views]
        line += ["--copies", str(args.copies)] if args.copies is not None else []
    start = time.perf_counter()
    assert siamae(line) == 0, f"{name} failed"
    seconds = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    return {
        "protocol": protocol,
        "lr": lr,
        "seed": args.seed,
        "copies": summary["probe"]["copies"] if protocol == "cached" else None,
        "cached_views": args.cached_views if protocol == "cached" else None,
        "mIoU": round(summary["mIoU"], 2),
        "IoU_object": round(summary["per_class"][1]["IoU"], 2),
        "train_iters": summary["train_iters"],
        "feature_seconds": summary.get("feature_seconds", 0.0),
        "train_seconds": summary["train_seconds"],
        "eval_seconds": summary["seconds"],
        "wall_seconds": round(seconds, 1),
        "features_reused": summary.get("features_reused"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--davis", type=Path, default=Path("../shared/data/DAVIS"))
    p.add_argument("--out", type=Path, default=Path("runs/seg_cached"))
    p.add_argument("--every", type=int, default=2, help="keep every k-th DAVIS frame")
    p.add_argument("--short-side", type=int, default=224)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--second-lr", type=float, default=1e-2, help="lr of the reusing probe")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--checkpoint", help="the encoder (default: --random-init's)")
    p.add_argument("--random-init", default="vit_small_patch16_224", help="an untrained encoder")
    p.add_argument("--copies", type=int, default=None, help="--copies (default: the command's)")
    p.add_argument(
        "--cached-views", choices=("crops", "windows"), default="crops", help="--cached-views"
    )
    p.add_argument("--seed", type=int, default=0, help="the probe's seed (crops, head)")
    p.add_argument(
        "--only", choices=("cached", "dinov2"), default=None, help="run one protocol alone"
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
    tag = f"seed{args.seed}"
    results = {}
    if args.only != "dinov2":
        crops = "_crops" if args.cached_views == "crops" else ""
        tag_c = f"{tag}_copies{args.copies or 'default'}{crops}"
        results[f"cached {tag_c}"] = probe(args, f"cached_{tag_c}", "cached", args.lr)
        results[f"cached {tag_c}, reusing"] = probe(
            args, f"cached_again_{tag_c}", "cached", args.second_lr
        )
    if args.only != "cached":
        results[f"dinov2 {tag}"] = probe(args, f"dinov2_{tag}", "dinov2", args.lr)
    args.out.mkdir(parents=True, exist_ok=True)
    crops = "_crops" if args.cached_views == "crops" else ""
    name = f"results_{args.only or 'both'}_{tag}_copies{args.copies or 'default'}{crops}.json"
    (args.out / name).write_text(json.dumps(results, indent=2) + "\n")
    print(
        "\n| probe | lr | mIoU | IoU object | iterations | features s | train s | eval s | wall s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(
            f"| {name} | {r['lr']:g} | {r['mIoU']} | {r['IoU_object']} | {r['train_iters']} | "
            f"{r['feature_seconds']} | {r['train_seconds']} | {r['eval_seconds']} | "
            f"{r['wall_seconds']} |"
        )


if __name__ == "__main__":
    main()
