"""Small-scale study: MAE vs naive mixing vs MixedAE (as it was, new defaults), several seeds.

At one fixed CPU budget (the same steps, batch, model and decoder for every method), pre-train a
ViT-Tiny/8 at 64 pixels on ``../shared/data/imagenet-sample`` minus its last 64 images (held out)
with

- ``mae``: MAE, mask ratio 0.75;
- ``naive mixing``: MixedAE with ``mixing.naive=true`` (mixing, ordinary attention, no segment
  embeddings, no recognition or contrastive term): the paper's motivating baseline;
- ``mixedae (as it was)``: the earlier defaults: top-k attention in every block, segment
  embeddings at the encoder input (std 0.02), SupCon on the final tokens (weight 1), no
  recognition loss;
- ``mixedae (new)``: the current defaults (``method=mixedae`` with nothing else set),

then measure every encoder, and the same encoder untrained:

- homologous precision and mass on the 64 held-out images (``siamae eval homology``'s code:
  fixed partitions from seed 0; the MixedAE runs as trained, the others with ordinary attention
  and the k keys a top-k would keep). All arms here have no segment embeddings at the encoder
  input except "as it was" (std 0.02, inert): every figure is content-based;
- k-NN (k = 20, CLS and mean of patches) and MAE's linear probe (CLS) on the CIFAR-10 subset
  (upsampled to 64 px, centre crop 1.0; ``--cifar-train`` images a class, the whole test split);
- DAVIS-2016 label propagation J&F (the CropMAE protocol, frames resized to ``--davis-resize``,
  the first ``--davis-frames`` frames of ``--davis-sequences`` sequences: a cut, not the
  protocol).

``--ablations`` adds precision-only runs of the first seed (no probes): the new defaults with
segment embeddings at the encoder input at the position embedding's scale (a lookup), with the
contrastive term on a projection head (weight 1), and without the CLS among the patch keys.

One command (about 35 minutes on 2 shared cores at the defaults below):

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/quality_mixedae.py --seeds 0 1 \\
        --out runs/quality_mixedae

Deviations from the recipes, for size and applied to every method alike: ViT-Tiny/8 at 64 px
(an 8 x 8 grid: MixedAE mixes 16 patches from each of 4 images and keeps k = 17 keys), a 128-d
decoder of 4 pre-norm blocks, batch 16 source images, base lr 1.5e-3 with 10 % warm-up.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from siamae.data.image_folder import EvalTransform, ImageFolder, normalize
from siamae.data.mixing import heldout_images, heldout_partitions
from siamae.engine.trainer import train
from siamae.eval.homology import method_for
from siamae.eval.probes.features import decode_all, pool_tokens
from siamae.eval.probes.knn import knn_classify
from siamae.eval.probes.linear import LinearConfig, fit_probe
from siamae.eval.propagation.davis import evaluate_davis
from siamae.eval.propagation.engine import protocol
from siamae.loading import load_encoder, random_encoder
from siamae.methods.mixedae import MixedAE
from siamae.models.decoder import MAEDecoder
from siamae.recipes import load_config

IMG = 64
HELDOUT = 64
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
    "optim.base_lr=1.5e-3",
    "run.log_every=25",
    "run.checkpoint_every=100000",
    "run.tensorboard=false",
    "run.progress=false",
    "run.visualize=false",
]
AS_IT_WAS = [
    "method=mixedae",
    "mixing.segment_embed=encoder",
    "mixing.segment_init_std=0.02",
    "mixing.contrastive_weight=1.0",
    "mixing.contrastive_features=final",
    "mixing.attention_loss_weight=0",
    "mixing.cls_key=true",
]
METHODS = {
    "mae": ["method=mae"],
    "naive mixing": ["method=mixedae", "mixing.naive=true"],
    "mixedae (as it was)": AS_IT_WAS,
    "mixedae (new)": ["method=mixedae"],
    # Not in the default set: a weaker recognition loss (run with --methods).
    "mixedae (new, recognition weight 0.1)": ["method=mixedae", "mixing.attention_loss_weight=0.1"],
}
CORE = ["mae", "naive mixing", "mixedae (as it was)", "mixedae (new)"]
ABLATIONS = {
    "new + segment embed (encoder, pos scale)": ["method=mixedae", "mixing.segment_embed=encoder"],
    "new + contrastive head (weight 1)": [
        "method=mixedae",
        "mixing.contrastive_weight=1.0",
        "mixing.contrastive_features=head",
    ],
    "new, CLS not a patch key": ["method=mixedae", "mixing.cls_key=false"],
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


def homology_of(checkpoint: str | torch.nn.Module, pixels: torch.Tensor) -> dict[str, float]:
    """Held-out homologous figures: a checkpoint as ``siamae eval homology`` runs it, or an
    untrained encoder with ordinary attention."""
    if isinstance(checkpoint, torch.nn.Module):
        encoder = checkpoint
        decoder = MAEDecoder(encoder.embed_dim, encoder.grid_size, encoder.patch_size, 16, 1, 1)
        method = MixedAE(
            encoder,
            decoder,
            topk_blocks=(),
            attention_loss_weight=0.0,
            contrastive_features="final",
        )
    else:
        method = method_for(checkpoint)
    noise = heldout_partitions(pixels.shape[0], method.encoder.num_patches, method.ratio, seed=0)
    return method.homology(pixels, noise)


def cifar_subset(folder: ImageFolder, per_class: int | None) -> ImageFolder:
    """The first ``per_class`` images of each class (sorted order)."""
    if per_class is None:
        return folder
    seen: dict[int, int] = {}
    keep = []
    for path, label in folder.samples:
        if seen.get(label, 0) < per_class:
            keep.append((path, label))
            seen[label] = seen.get(label, 0) + 1
    folder.samples = keep
    return folder


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (std with n - 1, over sqrt(n)); se 0 for one value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=16, help="source images per step")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--methods", nargs="*", default=CORE, choices=list(METHODS))
    parser.add_argument("--ablations", action="store_true", help="precision-only variants")
    parser.add_argument("--linear-epochs", type=int, default=30)
    parser.add_argument("--cifar-train", type=int, default=100, help="training images a class")
    parser.add_argument("--davis-sequences", type=int, default=3)
    parser.add_argument("--davis-frames", type=int, default=20)
    parser.add_argument("--davis-resize", default="160x288")
    parser.add_argument("--out", type=Path, default=Path("runs/quality_mixedae"))
    parser.add_argument(
        "--reuse", action="store_true", help="evaluate finished pre-training runs in --out again"
    )
    parser.add_argument(
        "--no-random-init", action="store_true", help="skip the untrained encoder's row"
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        help="only print the table of these quality.json files (or the JSON rows of these logs "
        "of runs cut short) together",
    )
    args = parser.parse_args()
    if args.merge:
        rows, setup = [], None
        for path in args.merge:
            if path.suffix == ".json":
                result = json.loads(path.read_text())
                rows += result["rows"]
                setup = setup or result
            else:
                lines = path.read_text().splitlines()
                rows += [json.loads(line) for line in lines if line.startswith("{")]
        if setup is None:
            raise SystemExit("--merge needs at least one quality.json (for the setup)")
        print_table(rows, setup)
        return
    images = args.data_root / "imagenet-sample"
    cifar = args.data_root / "cifar10-subset"
    davis = args.data_root / "DAVIS"
    if not images.is_dir() or not (cifar / "train").is_dir() or not davis.is_dir():
        raise SystemExit(
            f"no imagenet-sample, cifar10-subset or DAVIS under {args.data_root}; pass "
            "--data-root (the shared/data folder)"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    train_list, heldout_list = args.out / "train.txt", args.out / "heldout.txt"
    train_list.write_text("".join(f"{p}\n" for p in files[:-HELDOUT]))
    heldout_list.write_text("".join(f"{p}\n" for p in files[-HELDOUT:]))
    heldout = heldout_images(heldout_list, IMG, HELDOUT, 4)

    transform = EvalTransform(IMG, crop_pct=1.0)
    train_set = cifar_subset(ImageFolder(cifar / "train", transform), args.cifar_train)
    test_set = ImageFolder(cifar / "test", transform, classes=train_set.classes)
    train_px, test_px = decode_all(train_set), decode_all(test_set)
    train_y, test_y = train_set.labels, test_set.labels
    params = protocol("cropmae", "davis", [f"resize={args.davis_resize}"])
    sequences = sorted(p.name for p in (davis / "JPEGImages" / "480p").iterdir())
    sequences = sequences[: args.davis_sequences]

    def pretrain(name: str, overrides: list[str], seed: int) -> dict:
        run_dir = args.out / f"seed{seed}" / name.replace(" ", "_").replace(",", "")
        done = run_dir / "pretrain_summary.json"
        if args.reuse and done.is_file():  # evaluate a finished run again without retraining
            return json.loads(done.read_text())
        cfg = load_config(
            None,
            [
                *COMMON,
                *overrides,
                f"data.path={train_list}",
                f"data.batch_size={args.batch}",
                f"optim.max_steps={args.steps}",
                f"optim.warmup_steps={args.steps // 10}",
                f"run.seed={seed}",
                f"data.num_workers={args.workers}",
                f"run.out_dir={run_dir}",
            ],
        )
        start = time.perf_counter()
        summary = train(cfg, resume=False)
        if summary["interrupted"]:
            raise SystemExit(f"{name}: pre-training interrupted ({summary['interrupted']})")
        record = {
            "seconds": time.perf_counter() - start,
            "final_loss": summary["final_loss"],
            "checkpoint": summary["checkpoint"],
            "last_log": json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1]),
        }
        done.write_text(json.dumps(record, indent=2))
        return record

    def probe(encoder: torch.nn.Module, name: str, seed: int) -> dict[str, float]:
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
        jf = evaluate_davis(
            encoder,
            davis,
            args.out / f"seed{seed}" / "davis" / name.replace(" ", "_"),
            params,
            sequences=sequences,
            max_frames=args.davis_frames,
            progress=False,
        ).summary["J&F-Mean"]
        return {
            "knn20_cls": knn["cls"],
            "knn20_mean": knn["mean"],
            "linear_top1": linear.top1,
            "davis_jf": jf,
            "eval_seconds": time.perf_counter() - start,
        }

    rows: list[dict] = []
    for seed in args.seeds if args.methods else []:
        if not args.no_random_init:
            encoder = random_encoder(f"vit_tiny_patch8_{IMG}", seed=seed)
            rows.append(
                {
                    "encoder": "random init",
                    "seed": seed,
                    **homology_of(encoder, heldout),
                    **probe(encoder, "random init", seed),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        for name in args.methods:
            record = pretrain(name, METHODS[name], seed)
            encoder = load_encoder(record["checkpoint"])
            rows.append(
                {
                    "encoder": name,
                    "seed": seed,
                    **homology_of(record["checkpoint"], heldout),
                    **probe(encoder, name, seed),
                    "loss_recon": record["last_log"].get("loss_recon"),
                    **{k: v for k, v in record.items() if k != "last_log"},
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    if args.ablations:
        for name, overrides in ABLATIONS.items():
            record = pretrain(name, overrides, args.seeds[0])
            rows.append(
                {
                    "encoder": name,
                    "seed": args.seeds[0],
                    **homology_of(record["checkpoint"], heldout),
                    "loss_recon": record["last_log"].get("loss_recon"),
                    **{k: v for k, v in record.items() if k != "last_log"},
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    setup = {
        "steps": args.steps,
        "batch": args.batch,
        "seeds": args.seeds,
        "cifar": [len(train_y), len(test_y)],
        "davis": [len(sequences), args.davis_frames, args.davis_resize],
    }
    (args.out / "quality.json").write_text(json.dumps({**setup, "rows": rows}, indent=2))
    print_table(rows, setup)


def _value(row: dict, key: str) -> float | None:
    """A row's figure; MAE logs no separate reconstruction term: its loss is that term."""
    if key == "loss_recon" and row.get(key) is None and row["encoder"] == "mae":
        return row.get("final_loss")
    return row.get(key)


def print_table(rows: list[dict], setup: dict) -> None:
    """Mean +- standard error over seeds, one row per encoder."""
    columns = [
        ("homologous_precision", "precision", 3),
        ("homologous_mass", "mass", 3),
        ("knn20_cls", "k-NN CLS", 1),
        ("knn20_mean", "k-NN mean", 1),
        ("linear_top1", "linear", 1),
        ("davis_jf", "DAVIS J&F", 3),
        ("loss_recon", "recon", 3),
    ]
    seeds = sorted({r["seed"] for r in rows})
    cifar, davis = setup["cifar"], setup["davis"]
    print(
        f"\n{setup['steps']} steps x {setup['batch']} images, seeds {seeds}; mean +- standard "
        f"error over seeds. CIFAR-10 subset {cifar[0]} train / {cifar[1]} test at {IMG} px; "
        f"DAVIS {davis[0]} sequences x {davis[1]} frames at {davis[2]}; held-out precision on "
        f"{HELDOUT} images (chance about 0.25)"
    )
    print("| encoder | seeds | " + " | ".join(title for _, title, _ in columns) + " |")
    print("| --- " * (len(columns) + 2) + "|")
    for name in dict.fromkeys(r["encoder"] for r in rows):
        mine = [r for r in rows if r["encoder"] == name]
        cells = []
        for key, _, digits in columns:
            values = [_value(r, key) for r in mine if _value(r, key) is not None]
            if not values:
                cells.append("-")
                continue
            mean, se = mean_se(values)
            cells.append(
                f"{mean:.{digits}f} +- {se:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"
            )
        print(f"| {name} | {len(mine)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
