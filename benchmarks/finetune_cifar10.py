"""Fine-tuning at a fixed CPU budget on the CIFAR-10 subset: CropMAE vs MAE vs random init.

Pre-train a ViT-Tiny/8 at 32 px on the subset's 5000 training images with CropMAE and with MAE
(the same steps, batch and model), then fine-tune each encoder and the untrained one with the
same recipe (``configs/finetune_cifar10_subset.yaml``: the MAE protocol sized down) for the same
steps, and report top-1/top-5 on the 1000 test images. One command reproduces the table (also
written as JSON and Markdown under ``--out``):

    OMP_NUM_THREADS=1 python benchmarks/finetune_cifar10.py \
        --data ../shared/data/cifar10-subset --out runs/finetune_cifar10

Pre-training uses the demo's CropMAE recipe at 32 px (decoder 128-d x 4, mask ratio 0.985) and
MAE with the same decoder at its own ratio 0.75; both with batch 64 and one warm-up epoch.
The random-init encoder is the one the pre-training runs start from (seed 0).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from siamae.engine.trainer import train
from siamae.recipes import load_config

REPO = Path(__file__).resolve().parents[1]

PRETRAIN = [
    "model.arch=vit_tiny",
    "model.patch_size=8",
    "model.img_size=32",
    "decoder.dim=128",
    "decoder.depth=4",
    "decoder.num_heads=4",
    "decoder.mlp_dim=512",
    "data.source=images",
    "data.batch_size=64",
    "data.num_workers=1",
    "optim.base_lr=1.5e-3",
    "optim.warmup_epochs=1",
    "run.seed=0",
    "run.log_every=20",
    "run.checkpoint_every=100000",
    "run.progress=false",
    "run.visualize=false",
    "run.tensorboard=false",
]
METHODS = {
    "CropMAE": ["method=cropmae"],
    "MAE": ["method=mae", "decoder.norm_style=pre", "decoder.dropout=0"],
}


def pretrain(name: str, data: Path, out: Path, epochs: float) -> tuple[Path, float]:
    run = out / f"pretrain_{name.lower()}"
    ckpt = run / "checkpoints" / "last.pt"
    if ckpt.is_file():
        return ckpt, float("nan")  # reused: delete the folder to time it again
    cfg = load_config(
        None,
        [
            *PRETRAIN,
            *METHODS[name],
            f"data.path={data / 'train'}",
            f"optim.epochs={epochs}",
            f"run.out_dir={run}",
        ],
    )
    start = time.perf_counter()
    train(cfg, resume=False)
    return ckpt, time.perf_counter() - start


def finetune(
    init: str, checkpoint: Path | None, data: Path, out: Path, epochs: float, seed: int
) -> dict:
    name = f"finetune_{init.lower().replace(' ', '_')}" + (f"_seed{seed}" if seed else "")
    run = out / name
    cfg = load_config(
        REPO / "configs" / "finetune_cifar10_subset.yaml",
        [
            f"data.path={data / 'train'}",
            f"finetune.val={data / 'test'}",
            f"finetune.checkpoint={checkpoint if checkpoint else 'null'}",
            f"optim.epochs={epochs}",
            f"run.seed={seed}",
            "run.progress=false",
            f"run.out_dir={run}",
        ],
    )
    start = time.perf_counter()
    # A finished run is read back, not trained again (resume="auto" returns at once).
    summary = train(cfg, resume="auto")
    history = [
        json.loads(line)
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if '"top1"' in line
    ]
    return {
        "init": init,
        "seed": seed,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "steps": summary["step"],
        "seconds": time.perf_counter() - start,
        "top1": history[-1]["top1"],
        "top5": history[-1]["top5"],
        "best_top1": max(h["top1"] for h in history),
        "top1_per_epoch": [h["top1"] for h in history],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data/cifar10-subset")
    parser.add_argument("--out", type=Path, default=Path("runs/finetune_cifar10"))
    parser.add_argument("--pretrain-epochs", type=float, default=3)
    parser.add_argument("--finetune-epochs", type=float, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="fine-tuning seeds")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    encoders: dict[str, Path | None] = {"random init": None}
    pretrain_seconds = {}
    for name in METHODS:
        encoders[name], pretrain_seconds[name] = pretrain(
            name, args.data, args.out, args.pretrain_epochs
        )
    rows = [
        finetune(init, ckpt, args.data, args.out, args.finetune_epochs, seed)
        for seed in args.seeds
        for init, ckpt in encoders.items()
    ]
    result = {
        "pretrain_epochs": args.pretrain_epochs,
        "finetune_epochs": args.finetune_epochs,
        "pretrain_seconds": pretrain_seconds,
        "device": "cpu",
        "torch": torch.__version__,
        "rows": rows,
    }
    (args.out / "finetune_cifar10.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "| initialisation | seed | fine-tune steps | top-1 (last) | top-5 (last) | best top-1 "
        "| top-1 per epoch |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        per_epoch = ", ".join(f"{v:.1f}" for v in r["top1_per_epoch"])
        lines.append(
            f"| {r['init']} | {r['seed']} | {r['steps']} | {r['top1']:.1f} | {r['top5']:.1f} | "
            f"{r['best_top1']:.1f} | {per_epoch} |"
        )
    if len(args.seeds) > 1:
        lines += [
            "",
            "| initialisation | mean top-1 (last) over seeds "
            + " ".join(str(s) for s in args.seeds)
            + " |",
            "| --- | --- |",
        ]
        for init in encoders:
            values = [r["top1"] for r in rows if r["init"] == init]
            lines.append(f"| {init} | {sum(values) / len(values):.1f} |")
    table = "\n".join(lines)
    (args.out / "finetune_cifar10.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
