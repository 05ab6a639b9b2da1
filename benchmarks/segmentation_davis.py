"""Dense transfer at a fixed CPU budget: linear probe and UperNet fine-tuning on DAVIS as a
2-class VOC-layout set (benchmarks/davis_voc.py), a pre-trained encoder vs random init.

    python benchmarks/davis_voc.py --davis ../shared/data/DAVIS --out runs/davis_voc \\
        --every 4 --short-side 96
    python benchmarks/segmentation_davis.py --data runs/davis_voc \\
        --checkpoint runs/seg_pretrain_cropmae --out runs/seg_davis

Both encoders get the same budget: ``--probe-iters`` probe iterations and ``--finetune-steps``
fine-tuning steps at the same batch, crop and schedule. Every number comes from the project's
own commands (``siamae eval segment``, ``siamae finetune``), run in this process; the table is
printed and written to OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from siamae.commands.cli import main as siamae


def run(args: argparse.Namespace) -> dict[str, dict]:
    from siamae.loading import load_encoder

    encoder = load_encoder(args.checkpoint)
    random_name = f"{encoder.arch}_patch{encoder.patch_size}_{encoder.img_size}"
    crop, stride = str(args.crop), str(round(args.crop * 2 / 3))
    scale = [str(2 * args.crop), str(args.crop)]
    results: dict[str, dict] = {}
    for label, source in (
        ("pre-trained", ["--checkpoint", str(args.checkpoint)]),
        ("random init", ["--random-init", random_name]),
    ):
        out = args.out / f"probe_{label.replace(' ', '_')}"
        start = time.perf_counter()
        code = siamae(
            [
                "eval",
                "segment",
                *source,
                "--data",
                str(args.data),
                "--out",
                str(out),
                "--iters",
                str(args.probe_iters),
                "--lr",
                str(args.probe_lr),
                "--batch-size",
                str(args.batch_size),
                "--warmup-iters",
                str(args.probe_iters // 10),
                "--crop",
                crop,
                "--stride",
                stride,
                "--scale",
                *scale,
                "--num-workers",
                "1",
                "--no-progress",
                "--no-resume",
                "--layers",
                str(args.layers),
                "--protocol",  # the augmented crops its figures were measured with
                "dinov2",
            ]
        )
        assert code == 0, f"linear probe ({label}) failed"
        summary = json.loads((out / "summary.json").read_text())
        results[f"linear probe, {label}"] = _row(summary, time.perf_counter() - start)

        out = args.out / f"upernet_{label.replace(' ', '_')}"
        checkpoint = str(args.checkpoint) if label == "pre-trained" else "none"
        overrides = [
            f"model.arch={encoder.arch}",
            f"model.patch_size={encoder.patch_size}",
            f"model.img_size={args.crop}",
            f"data.batch_size={args.batch_size}",
            "data.num_workers=0",
            f"optim.max_steps={args.finetune_steps}",
            f"optim.warmup_steps={args.finetune_steps // 10}",
            f"optim.base_lr={args.finetune_lr * 256 / args.batch_size}",
            f"segmentation.scale=[{2 * args.crop},{args.crop}]",
            f"segmentation.eval_stride={stride}",
            f"segmentation.channels={args.channels}",
            f"segmentation.aux_channels={args.channels // 2}",
            f"segmentation.eval_every_steps={args.finetune_steps}",
            "run.device=cpu",
            "run.precision=fp32",
            "run.progress=false",
            "run.visualize=false",
            "run.tensorboard=false",
            f"run.log_every={max(1, args.finetune_steps // 10)}",
            f"run.checkpoint_every={args.finetune_steps}",
        ]
        start = time.perf_counter()
        argv = [
            "finetune",
            "--config",
            str(args.config),
            "--checkpoint",
            checkpoint,
            "--data",
            str(args.data),
            "--out",
            str(out),
            "--no-resume",
        ]
        for item in overrides:
            argv += ["--set", item]
        assert siamae(argv) == 0, f"UperNet fine-tuning ({label}) failed"
        summary = json.loads((out / "segmentation" / "summary.json").read_text())
        results[f"UperNet fine-tune, {label}"] = _row(summary, time.perf_counter() - start)
    return results


def _row(summary: dict, seconds: float) -> dict:
    return {
        "mIoU": round(summary["mIoU"], 2),
        "mAcc": round(summary["mAcc"], 2),
        "aAcc": round(summary["aAcc"], 2),
        "IoU_object": round(summary["per_class"][1]["IoU"], 2),
        "val_images": summary["num_images"],
        "seconds": round(seconds, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("runs/davis_voc"))
    p.add_argument("--checkpoint", type=Path, required=True, help="the pre-trained encoder")
    p.add_argument("--out", type=Path, default=Path("runs/seg_davis"))
    p.add_argument("--config", type=Path, default=Path("configs/upernet_vitb16_ade20k_mae.yaml"))
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--probe-iters", type=int, default=300)
    p.add_argument("--finetune-steps", type=int, default=150)
    p.add_argument(
        "--finetune-lr", type=float, default=1e-4, help="fine-tuning peak lr (recipe: 1e-4)"
    )
    p.add_argument("--probe-lr", type=float, default=1e-3, help="probe lr (recipe: 1e-3)")
    p.add_argument("--channels", type=int, default=128, help="UperNet channels (recipe: 768)")
    p.add_argument("--layers", type=int, default=1, choices=(1, 4))
    args = p.parse_args()
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n| protocol, encoder | mIoU | mAcc | aAcc | IoU object | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(
            f"| {name} | {r['mIoU']} | {r['mAcc']} | {r['aAcc']} | {r['IoU_object']} | {r['seconds']} |"
        )


if __name__ == "__main__":
    main()
