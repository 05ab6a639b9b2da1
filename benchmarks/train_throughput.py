"""Training-step throughput and model FLOP utilisation (MFU) for every method.

For each model: FLOPs of one training step (forward + backward) are counted with
``torch.utils.flop_counter``; the step (forward, backward, AdamW) is timed; MFU is achieved
FLOP/s over the fp32 matmul peak measured in the same run (``torch.mm`` on 2048x2048).

    python benchmarks/train_throughput.py                    # CropMAE ViT-S/16 + MAE ViT-B/16, batch 32
    python benchmarks/train_throughput.py --models cropmae_vits16 --steps 5 --compile
    python benchmarks/train_throughput.py --models mae_vitb16 mixedae_vitb16   # + MixedAE's cost over MAE
    python benchmarks/train_throughput.py --models mae_vitb16 siameseim_vitb16 # + SiameseIM's
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from siamae.methods.base import UpdatesAfterStep
from siamae.optim import build_optimizer
from siamae.recipes import load_config
from siamae.registry import build_method

MODELS = {
    "cropmae_vits16": ["method=cropmae", "model.arch=vit_small", "model.patch_size=16"],
    "siammae_vits16": [
        "method=siammae",
        "model.arch=vit_small",
        "model.patch_size=16",
        "data.source=synthetic",
    ],
    "mae_vitb16": ["method=mae", "model.arch=vit_base", "model.patch_size=16"],
    # MixedAE: pairs/s counts source images (R = 4 of them make one mixed sequence).
    "mixedae_vitb16": ["method=mixedae", "model.arch=vit_base", "model.patch_size=16"],
    "mixedae_naive_vitb16": [
        "method=mixedae",
        "mixing.naive=true",
        "model.arch=vit_base",
        "model.patch_size=16",
    ],
    "cropmae_vitt16": ["method=cropmae", "model.arch=vit_tiny", "model.patch_size=16"],
    # SiameseIM: a pair is view 1 (block-masked, 118 of 196) + view 2 (the EMA target's, whole).
    "siameseim_vitb16": ["method=siameseim", "model.arch=vit_base", "model.patch_size=16"],
}


def view_extras(cfg, batch: int, device: torch.device) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """What a method's view maker adds to the batch (SiameseIM: boxes, flips, block masks)."""
    if cfg.method != "siameseim":
        return {}
    import numpy as np

    from siamae.registry import METHODS

    maker = METHODS["siameseim"].build_views(cfg)
    rng = np.random.default_rng(0)
    mask = torch.from_numpy(np.stack([maker.masker(rng).reshape(-1) for _ in range(batch)]))
    boxes = torch.tensor([[0.0, 0.0, 300.0, 300.0], [50.0, 80.0, 200.0, 180.0]]).repeat(batch, 1, 1)
    return {
        "mask": mask.to(device),
        "box": boxes.to(device),
        "flip": torch.tensor([[False, True]] * batch, device=device),
        "image_width": torch.full((batch, 1), 400.0, device=device),
    }


def matmul_peak(device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    """Median GFLOP/s of an fp32 ``size``x``size`` matmul."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * size**3 / statistics.median(times) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(
    name: str,
    overrides: list[str],
    batch: int,
    img: int,
    steps: int,
    device: torch.device,
    compile_model: bool,
    amp: torch.dtype | None,
) -> dict:
    cfg = load_config(None, ["data.source=synthetic", f"model.img_size={img}", *overrides])
    torch.manual_seed(0)
    method = build_method(cfg).to(device).train()
    model = torch.compile(method) if compile_model else method
    optimizer = build_optimizer(method.param_groups(0.05), 1e-4, (0.9, 0.95), fused=True)
    views = method.num_views
    n = method.encoder.num_patches
    batch_data = {
        "images": torch.randn(batch, views, 3, img, img, device=device),
        "mask_noise": torch.rand(batch, n, device=device),
        **view_extras(cfg, batch, device),
    }

    def step() -> None:
        with (
            torch.autocast(device.type, dtype=amp)
            if amp
            else torch.autocast(device.type, enabled=False)
        ):
            loss = model(batch_data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if isinstance(method, UpdatesAfterStep):
            method.after_step(1, 100)  # EMA targets update after every step

    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, enabled=False):
            method(batch_data).loss.backward()
    optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    for _ in range(2 if not compile_model else 3):
        step()
    times = []
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    return {
        "model": name,
        # the objective's own section holds it (cropmae.mask_ratio, mae.mask_ratio, ...)
        "mask_ratio": next(
            (s.mask_ratio for s in cfg.sections.values() if hasattr(s, "mask_ratio")), 0.0
        ),
        "batch": batch,
        "img": img,
        "step_s": seconds,
        "pairs_per_s": batch / seconds,
        "gflop_per_step": flops / 1e9,
        "gflops": flops / seconds / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", nargs="+", default=["cropmae_vits16", "mae_vitb16"], choices=sorted(MODELS)
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument(
        "--steps", type=int, default=3, help="timed steps per model (median reported)"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument(
        "--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast dtype (GPU only)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    peak = matmul_peak(device)
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(
        f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, GPU: {gpu}"
    )
    print(
        f"dtype: {'fp32' if amp is None else args.amp} | compile: {args.compile} | fp32 matmul peak (2048^2 mm): {peak:.1f} GFLOP/s"
    )
    print(
        f"{'model':16s} {'mask':>6s} {'batch':>5s} {'step s':>8s} {'pairs/s':>8s} {'GFLOP/step':>11s} {'GFLOP/s':>8s} {'MFU':>6s}"
    )
    results = {}
    for name in args.models:
        r = bench(name, MODELS[name], args.batch, args.img, args.steps, device, args.compile, amp)
        results[name] = r
        print(
            f"{r['model']:16s} {r['mask_ratio']:6.3f} {r['batch']:5d} {r['step_s']:8.2f} {r['pairs_per_s']:8.2f} "
            f"{r['gflop_per_step']:11.1f} {r['gflops']:8.1f} {r['gflops'] / peak:6.2f}"
        )
    # MixedAE's cost over MAE on the same model and batch of source images (the paper: +3 %).
    base = results.get("mae_vitb16")
    for name in ("mixedae_vitb16", "mixedae_naive_vitb16"):
        if base is not None and name in results:
            r = results[name]
            print(
                f"{name} over mae_vitb16: step time {r['step_s'] / base['step_s'] - 1:+.1%}, "
                f"FLOPs {r['gflop_per_step'] / base['gflop_per_step'] - 1:+.1%}"
            )


if __name__ == "__main__":
    main()
