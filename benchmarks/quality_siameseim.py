"""Quality at small scale: SiameseIM vs MAE vs random init, k-NN and linear probe on CIFAR-10.

At a fixed CPU budget (the same steps, batch, encoder and view size for both methods), pre-train
a ViT-Tiny/8 on 64-pixel views of ``imagenet-sample`` with SiameseIM and with MAE, then probe
each frozen encoder, and the same encoder untrained, on ``cifar10-subset`` (5000 train / 1000
test images, upsampled to 64 pixels): k-NN top-1 (k = 20, T = 0.07) and a linear probe (MAE's
head: BatchNorm without affine + Linear, SGD, cached features). One command reproduces the
table printed at the end (also written as JSON):

    python benchmarks/quality_siameseim.py --data-root ../shared/data --steps 100 --out runs/quality_sim

"Fixed budget" is read both ways: both methods get the same steps x batch, and MAE also gets
a second run with SiameseIM's training FLOPs (``mae (same FLOPs)``: a SiameseIM step costs
about 2.4 MAE steps here; FLOPs, not seconds, because the machine is shared). Finished runs and probes are recorded in ``--out`` and reused
when the command is run again with the same settings.

Deviations from the recipes, all for size and applied equally: ViT-Tiny/8 at 64 px (an 8 x 8
grid; SiameseIM masks 39 of 64 patches in blocks of 5+), a 128-d, 4-head, 4-block decoder for
MAE and predictor for SiameseIM, batch 32, the given steps, each method's recipe lr times 10.
Features: the mean of the patch tokens after the final norm (SiameseIM trains its patch tokens
densely and its CLS token never meets the loss), for every encoder alike.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from siamae.data.image_folder import EvalTransform, ImageFolder
from siamae.engine.trainer import train
from siamae.eval.probes.features import extract_features
from siamae.eval.probes.knn import knn_classify
from siamae.eval.probes.linear import LinearConfig, fit_probe
from siamae.loading import load_encoder, random_encoder
from siamae.recipes import load_config

COMMON = [
    "model.arch=vit_tiny",
    "model.patch_size=8",
    "model.img_size=64",
    "decoder.dim=128",
    "decoder.depth=4",
    "decoder.num_heads=4",
    "decoder.mlp_dim=512",
    "decoder.dropout=0",
    "decoder.norm_style=pre",
    "data.source=images",
    "data.batch_size=32",
    "run.log_every=25",
    "run.checkpoint_every=100000",
    "run.tensorboard=false",
    "run.progress=false",
    "run.visualize=false",
]

METHODS = {
    "siameseim": ["method=siameseim", "optim.base_lr=6.25e-4", "optim.clip_grad=1.0"],
    "mae": ["method=mae", "optim.base_lr=1.5e-3"],
}


def step_flops(method: str, batch: int = 32) -> float:
    """FLOPs of one training step (forward + backward; SiameseIM's target pass included)."""
    from torch.utils.flop_counter import FlopCounterMode

    from siamae.registry import build_method

    cfg = load_config(None, [*COMMON, *METHODS[method], "data.path=unused"])
    model = build_method(cfg)
    n, size = model.encoder.num_patches, cfg.model.img_size
    inputs = {
        "images": torch.randn(batch, model.num_views, 3, size, size),
        "mask_noise": torch.rand(batch, n),
    }
    if method == "siameseim":
        masker = model.build_views(cfg).masker
        rng = np.random.default_rng(0)
        inputs |= {
            "mask": torch.from_numpy(np.stack([masker(rng).reshape(-1) for _ in range(batch)])),
            "box": torch.tensor([[0.0, 0, 300, 300], [50, 80, 200, 180]]).repeat(batch, 1, 1),
            "flip": torch.tensor([[False, True]] * batch),
            "image_width": torch.full((batch, 1), 400.0),
        }
    with FlopCounterMode(display=False) as counter:
        model(inputs).loss.backward()
    return float(counter.get_total_flops())


def pretrain(name: str, method: str, steps: int, args: argparse.Namespace) -> dict:
    """Pre-train (or reuse a finished run of the same steps): its checkpoint, seconds, loss."""
    record = args.out / name / "budget.json"
    if record.is_file():
        done = json.loads(record.read_text())
        if done["steps"] == steps and Path(done["checkpoint"]).is_file():
            return done
    cfg = load_config(
        None,
        [
            *COMMON,
            *METHODS[method],
            f"data.path={args.data_root / 'imagenet-sample'}",
            f"optim.max_steps={steps}",
            f"optim.warmup_steps={steps // 10}",
            f"run.seed={args.seed}",
            f"data.num_workers={args.workers}",
            f"run.out_dir={args.out / name}",
        ],
    )
    start = time.perf_counter()
    summary = train(cfg, resume=False)
    done = {
        "steps": steps,
        "seconds": time.perf_counter() - start,
        "final_loss": summary["final_loss"],
        "checkpoint": str(summary["checkpoint"]),
    }
    record.write_text(json.dumps(done, indent=2))
    print(f"{name}: {steps} steps in {done['seconds']:.0f} s", flush=True)
    return done


def probe(name: str, encoder, folders: tuple, args: argparse.Namespace) -> dict:  # noqa: ANN001
    """k-NN and linear top-1 of a frozen encoder (reused when already measured for this run)."""
    record = args.out / "probes" / f"{name.replace(' ', '_')}.json"
    key = {"linear_epochs": args.linear_epochs, "seed": args.seed}
    if record.is_file():
        done = json.loads(record.read_text())
        if done.get("key") == key:
            return done
    train_set, test_set = folders
    classes = len(train_set.classes)
    start = time.perf_counter()
    # Features once per encoder (mean of patch tokens), shared by k-NN and the linear head.
    feats = [
        extract_features(encoder, data, pool="mean", batch_size=128, progress=False)
        for data in (train_set, test_set)
    ]
    knn = knn_classify(
        feats[0], train_set.labels, feats[1], test_set.labels, ks=(20,), num_classes=classes
    )
    linear = fit_probe(
        feats[0],
        train_set.labels,
        feats[1],
        test_set.labels,
        classes,
        LinearConfig(
            epochs=args.linear_epochs,
            warmup_epochs=min(5.0, args.linear_epochs / 3),
            pool="mean",
            seed=args.seed,
        ),
    )
    done = {
        "key": key,
        "knn_top1": knn.top1[20],
        "linear_top1": linear.top1,
        "linear_best_top1": linear.best_top1,
        "probe_seconds": time.perf_counter() - start,
    }
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(done, indent=2))
    print(f"{name}: probes in {done['probe_seconds']:.0f} s", flush=True)
    return done


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--linear-epochs", type=int, default=30)
    parser.add_argument(
        "--no-equal-flops",
        action="store_true",
        help="skip the MAE run given SiameseIM's training FLOPs instead of its steps",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/quality_siameseim"))
    args = parser.parse_args()
    cifar = args.data_root / "cifar10-subset"
    if not (args.data_root / "imagenet-sample").is_dir() or not (cifar / "train").is_dir():
        raise SystemExit(
            f"need imagenet-sample and cifar10-subset/train, test under {args.data_root} "
            "(pass --data-root, the shared/data folder)"
        )
    runs = {name: pretrain(name, name, args.steps, args) for name in METHODS}
    if not args.no_equal_flops:
        # The same compute for MAE: as many steps as SiameseIM's steps cost in FLOPs.
        ratio = step_flops("siameseim") / step_flops("mae")
        steps = int(round(args.steps * ratio))
        runs["mae (same FLOPs)"] = pretrain("mae_same_flops", "mae", steps, args)

    transform = EvalTransform(64, crop_pct=1.0)
    train_set = ImageFolder(cifar / "train", transform)
    test_set = ImageFolder(cifar / "test", transform, classes=train_set.classes)
    encoders = {"random init": random_encoder("vit_tiny_patch8_64", seed=args.seed)}
    encoders.update({name: load_encoder(run["checkpoint"]) for name, run in runs.items()})
    rows = [
        {"encoder": name, **runs.get(name, {}), **probe(name, enc, (train_set, test_set), args)}
        for name, enc in encoders.items()
    ]
    print(
        f"\nCIFAR-10 subset (5000 train / 1000 test at 64 px, mean-pooled patch tokens); "
        f"pre-training: ViT-Tiny/8 at 64 px on imagenet-sample, batch 32, seed {args.seed}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"{'encoder':16s} {'steps':>6s} {'train s':>8s} {'loss':>7s} {'k-NN top-1':>10s} "
        f"{'linear top-1':>12s}"
    )
    for r in rows:
        loss = "-" if r.get("final_loss") is None else f"{r['final_loss']:.4f}"
        print(
            f"{r['encoder']:16s} {r.get('steps', 0):6d} {r.get('seconds', 0):8.0f} {loss:>7s} "
            f"{r['knn_top1']:10.1f} {r['linear_top1']:12.1f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(
        json.dumps({"steps": args.steps, "seed": args.seed, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
