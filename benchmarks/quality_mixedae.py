"""Quality at small scale: MAE vs naive mixing vs MixedAE vs random init, CIFAR-10 subset probes.

At a fixed CPU budget (the same steps, batch, model and decoder for every method), pre-train a
ViT-Tiny/8 at 64 pixels on ``../shared/data/imagenet-sample`` with

- ``mae``: MAE, mask ratio 0.75;
- ``naive``: MixedAE with ``mixing.naive=true`` (mixing, ordinary attention, no segment
  embeddings, no contrastive term): the paper's motivating baseline;
- ``mixedae``: MixedAE with its defaults (R = 4, top-k homologous attention in every block,
  segment embeddings, SupCon term with weight 1),

then probe each frozen encoder and the same encoder untrained on the CIFAR-10 subset (images
upsampled to 64 px, centre crop 1.0): weighted k-NN (k = 20, CLS and mean of patches) and MAE's
linear probe (BatchNorm + Linear on cached CLS features, SGD, 90 epochs). One command:

    OMP_NUM_THREADS=1 python benchmarks/quality_mixedae.py --steps 200 --seed 0 --out runs/quality_mixedae

Deviations from the recipes, for size and applied to every method alike: ViT-Tiny/8 at 64 px (an
8 x 8 grid: MixedAE mixes 16 patches from each of 4 images and keeps k = 17 keys), a 128-d decoder
of 4 pre-norm blocks, batch 32 source images, base lr 1.5e-3 with 10 % warm-up.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from siamae.data.image_folder import EvalTransform, ImageFolder, normalize
from siamae.engine.trainer import train
from siamae.eval.probes.features import decode_all, pool_tokens
from siamae.eval.probes.knn import knn_classify
from siamae.eval.probes.linear import LinearConfig, fit_probe
from siamae.loading import load_encoder, random_encoder
from siamae.recipes import load_config

IMG = 64
COMMON = [
    "model.arch=vit_tiny",
    "model.patch_size=8",
    f"model.img_size={IMG}",
    "decoder.dim=128",
    "decoder.depth=4",
    "decoder.num_heads=4",
    "decoder.mlp_dim=512",
    "decoder.norm_style=pre",
    "decoder.dropout=0",
    "data.source=images",
    "data.batch_size=32",
    "optim.base_lr=1.5e-3",
    "run.log_every=25",
    "run.checkpoint_every=100000",
    "run.tensorboard=false",
    "run.progress=false",
]
METHODS = {
    "mae": ["method=mae"],
    "naive mixing": ["method=mixedae", "mixing.naive=true"],
    "mixedae": ["method=mixedae"],
}


@torch.no_grad()
def token_features(
    encoder: torch.nn.Module, pixels: torch.Tensor, batch: int = 256
) -> torch.Tensor:
    """All tokens (CLS + patches, after the final norm) of uint8 images, once for both pools."""
    encoder.eval()
    return torch.cat(
        [encoder(normalize(pixels[i : i + batch], "cpu")) for i in range(0, len(pixels), batch)]
    )


@torch.no_grad()
def method_logs(checkpoint: str, count: int = 64) -> dict[str, float]:
    """The trained method's logged terms on the first ``count`` samples of epoch 0 (MixedAE:
    reconstruction and contrastive loss, homologous precision)."""
    from siamae.checkpoint import load_checkpoint
    from siamae.data.dataset import batch_to_device, build_dataset, collate
    from siamae.recipes import config_from_dict
    from siamae.registry import build_method

    ckpt = load_checkpoint(checkpoint)
    cfg = config_from_dict(ckpt["config"])
    method = build_method(cfg)
    method.load_state_dict(ckpt["model"])
    dataset = build_dataset(
        cfg, method.view_kind, method.encoder.num_patches, views=method.build_views(cfg)
    )
    batch = batch_to_device(collate([dataset[(0, i)] for i in range(count)]), "cpu")
    out = method.eval()(batch)
    return {"loss": out.loss.item(), **{k: v.item() for k, v in out.logs.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--linear-epochs", type=int, default=90)
    parser.add_argument("--out", type=Path, default=Path("runs/quality_mixedae"))
    parser.add_argument(
        "--reuse", action="store_true", help="evaluate finished pre-training runs in --out again"
    )
    args = parser.parse_args()
    images = args.data_root / "imagenet-sample"
    cifar = args.data_root / "cifar10-subset"
    if not images.is_dir() or not (cifar / "train").is_dir():
        raise SystemExit(
            f"no imagenet-sample or cifar10-subset under {args.data_root}; pass --data-root "
            "(the shared/data folder)"
        )

    encoders = {"random init": random_encoder(f"vit_tiny_patch8_{IMG}", seed=args.seed)}
    budget: dict[str, dict[str, float]] = {}
    for name in args.methods:
        cfg = load_config(
            None,
            [
                *COMMON,
                *METHODS[name],
                f"data.path={images}",
                f"optim.max_steps={args.steps}",
                f"optim.warmup_steps={args.steps // 10}",
                f"run.seed={args.seed}",
                f"data.num_workers={args.workers}",
                f"run.out_dir={args.out / name.replace(' ', '_')}",
            ],
        )
        run_dir = Path(cfg.run.out_dir)
        done = run_dir / "pretrain_summary.json"
        if args.reuse and done.is_file():  # evaluate a finished run again without retraining
            budget[name] = json.loads(done.read_text())
        else:
            start = time.perf_counter()
            summary = train(cfg, resume=False)
            budget[name] = {
                "seconds": time.perf_counter() - start,
                "final_loss": summary["final_loss"],
                "checkpoint": summary["checkpoint"],
            }
            budget[name]["logs"] = method_logs(summary["checkpoint"])
            done.write_text(json.dumps(budget[name], indent=2))
        encoders[name] = load_encoder(budget[name]["checkpoint"])

    transform = EvalTransform(IMG, crop_pct=1.0)
    train_set = ImageFolder(cifar / "train", transform)
    test_set = ImageFolder(cifar / "test", transform, classes=train_set.classes)
    train_px, test_px = decode_all(train_set), decode_all(test_set)
    train_y, test_y = train_set.labels, test_set.labels
    rows = []
    for name, encoder in encoders.items():
        start = time.perf_counter()
        train_tokens, test_tokens = (
            token_features(encoder, train_px),
            token_features(encoder, test_px),
        )
        feats = {
            pool: (pool_tokens(train_tokens, pool), pool_tokens(test_tokens, pool))
            for pool in ("cls", "mean")
        }
        knn = {
            pool: knn_classify(tr, train_y, te, test_y, ks=[20]).top1[20]
            for pool, (tr, te) in feats.items()
        }
        linear = fit_probe(
            feats["cls"][0],
            train_y,
            feats["cls"][1],
            test_y,
            len(train_set.classes),
            LinearConfig(epochs=args.linear_epochs, warmup_epochs=args.linear_epochs / 9),
        )
        rows.append(
            {
                "encoder": name,
                "knn20_cls": knn["cls"],
                "knn20_mean": knn["mean"],
                "linear_top1": linear.top1,
                "linear_best": linear.best_top1,
                "eval_seconds": time.perf_counter() - start,
                **budget.get(name, {}),
            }
        )

    print(
        f"\nCIFAR-10 subset ({len(train_y)} train / {len(test_y)} test, {IMG} px); ViT-Tiny/8 "
        f"pre-trained {args.steps} steps x 32 images on imagenet-sample, seed {args.seed}, "
        f"{torch.get_num_threads()} threads"
    )
    print("| encoder | k-NN k=20 CLS | k-NN k=20 mean | linear (best) | loss | train s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        loss = f"{r['final_loss']:.3f}" if r.get("final_loss") is not None else "-"
        secs = f"{r['seconds']:.0f}" if "seconds" in r else "-"
        print(
            f"| {r['encoder']} | {r['knn20_cls']:.1f} | {r['knn20_mean']:.1f} | "
            f"{r['linear_top1']:.1f} ({r['linear_best']:.1f}) | {loss} | {secs} |"
        )
    print("\nThe trained methods on 64 training samples (epoch 0 views):")
    for r in rows:
        if "logs" in r:
            print(f"  {r['encoder']}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["logs"].items()))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(
        json.dumps({"steps": args.steps, "seed": args.seed, "img": IMG, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
