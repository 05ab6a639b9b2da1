"""``siamae demo``: pre-train a tiny CropMAE on built-in synthetic scenes, then show the results.

Needs no download and runs in a few minutes on 2 CPU cores. It leaves a run folder with the
resolved config, metrics, a checkpoint, the reconstruction picture and the loss curve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from siamae.config import Config
from siamae.engine.logging import read_metrics
from siamae.engine.trainer import train
from siamae.eval.probes.monitor import build_monitor
from siamae.eval.propagation.synthetic_videos import evaluate_synthetic, write_davis_layout
from siamae.loading import load_encoder, random_encoder
from siamae.recipes import load_config
from siamae.threads import apply_thread_policy

# The same values as configs/demo.yaml (a test keeps the two in step); kept here so the demo
# works from an installed wheel without the repository's configs/ folder.
DEMO_OVERRIDES = [
    "method=cropmae",
    "model.arch=vit_tiny",
    "model.patch_size=8",
    "model.img_size=64",
    "decoder.dim=128",
    "decoder.num_heads=4",
    "decoder.mlp_dim=512",
    "data.source=synthetic",
    "data.synthetic_count=2400",
    "data.synthetic_size=96",
    "data.batch_size=16",
    "data.num_workers=1",
    "optim.base_lr=1.5e-3",
    "optim.epochs=2",
    "optim.warmup_epochs=0.2",
    "run.checkpoint_every=100",
    "run.log_every=10",
]

QUICK_OVERRIDES = [
    "data.synthetic_count=64",
    "data.batch_size=8",
    "optim.epochs=1",
    "data.num_workers=0",
]


#: The demo's monitors (docs/monitors.md): RankMe on 128 synthetic scenes and label propagation
#: J&F on the 3 synthetic videos, written as a DAVIS-layout root into the run folder
#: (``MONITOR_FOLDER``), with the protocol ``evaluate_synthetic`` uses; at the default interval
#: (every epoch, and before the first step).
MONITOR_FOLDER = "monitor_data"
MONITOR_IMAGES = 128


def monitor_overrides(out_dir: str | Path) -> list[str]:
    root = Path(out_dir) / MONITOR_FOLDER
    return [
        f"monitor.davis={root}",
        "monitor.davis_set=resize=native,batch_size=12",
        f"monitor.images={root / 'images'}",
        "monitor.crop_pct=1.0",
    ]


def demo_config(
    out_dir: str | Path = "runs/demo", quick: bool = False, monitors: bool = False
) -> Config:
    """configs/demo.yaml; with ``monitors``, the demo's monitors on the data it writes."""
    overrides = (
        DEMO_OVERRIDES
        + (QUICK_OVERRIDES if quick else [])
        + (monitor_overrides(out_dir) if monitors else [])
        + [f"run.out_dir={out_dir}"]
    )
    return load_config(None, overrides)


def run_demo(out_dir: str | Path = "runs/demo", quick: bool = False) -> dict[str, Any]:
    """Train, report, and return the training summary."""

    cfg = demo_config(out_dir, quick, monitors=True)
    print(
        f"siamae demo: CropMAE ({cfg.model.arch}, patch {cfg.model.patch_size}, {cfg.model.img_size}px views, "
        f"mask ratio {cfg.cropmae.mask_ratio}) on {cfg.data.synthetic_count} built-in synthetic scenes"
    )
    write_davis_layout(Path(out_dir) / MONITOR_FOLDER, images=MONITOR_IMAGES)
    summary = train(cfg, resume=False, monitor=build_monitor)
    run_dir = Path(summary["run_dir"])
    print()
    print(f"pre-trained {summary['step']} steps; loss {summary['final_loss']:.4f}")
    print(f"  run folder:      {run_dir}")
    print(f"  config:          {run_dir / 'config.yaml'}")
    print(f"  metrics:         {run_dir / 'metrics.csv'}")
    print(f"  checkpoint:      {summary['checkpoint']}")
    print(f"  reconstructions: {summary.get('reconstruction')}")
    print(f"  loss curve:      {summary.get('loss_curve')}")
    _monitor_lines(run_dir)
    _propagation_step(summary, cfg, run_dir)
    print()
    print("what to try next:")
    print(f"  siamae visualize --checkpoint {summary['checkpoint']}")
    print(
        f"  siamae pretrain --config configs/demo.yaml --set method=mae --out {run_dir.parent / 'demo-mae'}"
    )
    print(
        "  siamae pretrain --config configs/cropmae_vits16_in1k.yaml --data /path/to/imagenet/train"
    )
    return summary


def _monitor_lines(run_dir: Path) -> None:
    """What the monitors logged (metrics.csv), step by step: J&F and RankMe as it trained."""
    records = [r for r in read_metrics(run_dir) if "monitor/davis_jf" in r]
    if not records:
        return
    print("  monitors (metrics.csv; J&F on the synthetic videos, RankMe of the CLS token):")
    for r in records:
        print(
            f"    step {r['step']:>4}: J&F {r['monitor/davis_jf']:.3f}, "
            f"RankMe {r.get('monitor/rankme_cls', float('nan')):.1f}"
        )


def _propagation_step(summary: dict[str, Any], cfg: Config, run_dir: Path) -> None:
    """Label propagation on synthetic videos: the trained encoder vs the same one untrained."""

    # The loader workers are gone: propagation gets their cores back, as `siamae eval` would.
    apply_thread_policy(cfg.run.threads, workers=0)
    trained = load_encoder(summary["checkpoint"])
    untrained = random_encoder(
        f"{cfg.model.arch}_patch{cfg.model.patch_size}_{cfg.model.img_size}", seed=cfg.run.seed
    )
    res = evaluate_synthetic({"trained": trained, "random init": untrained}, run_dir)
    print()
    print("label propagation on 3 built-in synthetic videos (protocol cropmae, J&F as DAVIS):")
    for name in ("trained", "random init"):
        r = res[name]
        print(
            f"  {name:12s} J&F-Mean {r['J&F-Mean']:.3f} (J {r['J-Mean']:.3f}, F {r['F-Mean']:.3f})"
        )
    print(
        f"  picture: {res['picture']['path']} (every video; rows "
        f"{', '.join(res['picture']['rows'])}, each with its J&F; frame numbers above)"
    )
