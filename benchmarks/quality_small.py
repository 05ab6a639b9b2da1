"""Quality at small scale: CropMAE vs MAE vs SiamMAE vs random init, DAVIS J&F by propagation.

At a fixed CPU budget (the same number of steps, batch and model for every method), pre-train a
ViT-Tiny/16 on the real data in ``../shared/data`` (CropMAE and MAE on ``imagenet-sample``,
SiamMAE on ``videos``), then propagate DAVIS masks with each frozen encoder and with the same
encoder untrained. One command reproduces the table printed at the end (also written as JSON):

    python benchmarks/quality_small.py --data-root ../shared/data --steps 300 --out runs/quality

Deviations from the recipes, all for size and applied equally to every method: ViT-Tiny/16 on
112-pixel views, a 128-d decoder of 4 blocks for all three methods, batch 16, the given steps,
and DAVIS propagated at half the published size (240x432) with the ``cropmae`` protocol otherwise.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from siamae.engine.trainer import train
from siamae.eval.propagation.davis import evaluate_davis
from siamae.eval.propagation.engine import protocol
from siamae.loading import load_encoder, random_encoder
from siamae.recipes import load_config

COMMON = [
    "model.arch=vit_tiny",
    "model.patch_size=16",
    "model.img_size=112",
    "decoder.dim=128",
    "decoder.depth=4",
    "decoder.num_heads=4",
    "decoder.mlp_dim=512",
    "decoder.dropout=0.1",
    "data.batch_size=16",
    "optim.base_lr=1.5e-3",
    "run.log_every=25",
    "run.checkpoint_every=100000",
    "run.tensorboard=false",
]


def methods(root: Path) -> dict[str, list[str]]:
    images, videos = root / "imagenet-sample", root / "videos"
    return {
        "cropmae": ["method=cropmae", "data.source=images", f"data.path={images}"],
        "mae": [
            "method=mae",
            "data.source=images",
            f"data.path={images}",
            "decoder.norm_style=pre",
            "decoder.dropout=0",
        ],
        "siammae": [
            "method=siammae",
            "data.source=videos",
            f"data.path={videos}",
            "data.repeated_sampling=8",
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=["cropmae", "mae", "siammae"])
    parser.add_argument(
        "--max-frames",
        type=int,
        default=None,
        help="first N frames per DAVIS sequence (quick checks)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    args = parser.parse_args()
    if not (args.data_root / "DAVIS").is_dir():
        raise SystemExit(
            f"no DAVIS folder under {args.data_root}; pass --data-root (the shared/data folder)"
        )
    params = protocol("cropmae", "davis", ["resize=240x432"])
    rows = []
    encoders = {"random init": random_encoder("vit_tiny_patch16_112", seed=args.seed)}
    budget = {}
    for name in args.methods:
        cfg = load_config(
            None,
            [
                *COMMON,
                *methods(args.data_root)[name],
                f"optim.max_steps={args.steps}",
                f"optim.warmup_steps={args.steps // 10}",
                f"run.seed={args.seed}",
                f"data.num_workers={args.workers}",
                f"run.out_dir={args.out / name}",
            ],
        )
        start = time.perf_counter()
        summary = train(cfg, resume=False)
        budget[name] = {"seconds": time.perf_counter() - start, "final_loss": summary["final_loss"]}
        encoders[name] = load_encoder(summary["checkpoint"])
    for name, encoder in encoders.items():
        result = evaluate_davis(
            encoder,
            args.data_root / "DAVIS",
            args.out / "davis" / name.replace(" ", "_"),
            params,
            max_frames=args.max_frames,
            progress=False,
        )
        s = result.summary
        rows.append(
            {
                "encoder": name,
                "J&F-Mean": s["J&F-Mean"],
                "J-Mean": s["J-Mean"],
                "F-Mean": s["F-Mean"],
                **budget.get(name, {}),
            }
        )
    print(
        f"\nDAVIS ({len(result.sequences)} sequences), "
        f"{params.describe()}; ViT-Tiny/16, {args.steps} steps x batch 16, seed {args.seed}, {torch.get_num_threads()} threads"
    )
    print(f"{'encoder':12s} {'J&F':>6s} {'J':>6s} {'F':>6s} {'train s':>8s}")
    for r in rows:
        print(
            f"{r['encoder']:12s} {r['J&F-Mean']:6.3f} {r['J-Mean']:6.3f} {r['F-Mean']:6.3f} {r.get('seconds', 0):8.0f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(
        json.dumps(
            {"steps": args.steps, "seed": args.seed, "protocol": params.to_dict(), "rows": rows},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
