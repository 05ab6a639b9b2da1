"""One GPU check: every registered method trained a few steps through the real trainer.

For each method in ``siamae.registry.METHODS`` (read at run time, so new methods are included),
with ``torch.compile`` off and on: a short run of ``siamae.engine.trainer.train`` on built-in
synthetic data (a generated labelled folder for methods that need one, e.g. finetune), bf16
autocast on CUDA, PyTorch's fused attention (scaled_dot_product_attention: flash /
memory-efficient kernels on CUDA, used by timm's blocks and the decoders). One table:

- pairs/s and data_wait: from the trainer's last log window (the first one holds compilation
  and loader start-up), as it logs them in metrics.jsonl;
- MFU: model FLOPs per pair (``torch.utils.flop_counter`` over one training step, forward and
  backward) x pairs/s, over the matmul peak measured here (bf16 ``torch.mm`` on CUDA; fp32 on a
  CPU, where the trainer runs fp32);
- peak memory: ``torch.cuda.max_memory_allocated`` over the run (CUDA only).

A method that fails prints its error in its row; the others still run.

    python benchmarks/gpu_check.py                       # CUDA: ViT-S/16 at 224, batch 128
    python benchmarks/gpu_check.py --methods cropmae mae --compile off
    python benchmarks/gpu_check.py --tiny                # CPU-sized smoke run (the tests use it)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Sizes of the full check (one H100, under 8 minutes for every method, compile off and on)
# and of the CPU smoke run.
FULL = {"arch": "vit_small", "patch": 16, "img": 224, "batch": 128, "steps": 30, "window": 10}
TINY = {"arch": "vit_tiny", "patch": 8, "img": 32, "batch": 4, "steps": 4, "window": 2}
FLOP_BATCH = 4  # FLOPs are counted on a small batch and scaled per pair


@dataclass
class Row:
    method: str
    compile: bool
    pairs_per_s: float | None = None
    mfu: float | None = None
    gflop_per_pair: float | None = None
    peak_mem_gib: float | None = None
    data_wait: float | None = None
    seconds: float = 0.0
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """Median FLOP/s of a ``size`` x ``size`` matmul in ``dtype``."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def labelled_folder(root: Path, size: int, classes: int = 4, per_class: int = 16) -> Path:
    """``root/<class>/<i>.jpg``: noise images, for methods that train on labelled folders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size + size // 4, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def data_choices(sizes: dict, workdir: Path) -> list[list[str]]:
    """Data settings to try in order: built-in synthetic data, then a generated labelled folder."""
    synthetic = [
        "data.source=synthetic",
        f"data.synthetic_count={max(64, sizes['batch'] * 4)}",
        f"data.synthetic_size={max(64, sizes['img'] + sizes['img'] // 4)}",
    ]
    folder = workdir / "labelled"
    if not folder.is_dir():
        labelled_folder(folder, max(64, sizes["img"] + sizes["img"] // 8), per_class=sizes["batch"])
    return [synthetic, ["data.source=images", f"data.path={folder}"]]


def base_overrides(method: str, sizes: dict, device: torch.device, workers: int) -> list[str]:
    """The run's settings; ``sizes["extra"]`` (``--set``) come last and win."""
    return [
        f"method={method}",
        f"model.arch={sizes['arch']}",
        f"model.patch_size={sizes['patch']}",
        f"model.img_size={sizes['img']}",
        f"data.batch_size={sizes['batch']}",
        f"data.num_workers={workers}",
        f"run.device={device.type}",
        "run.precision=bf16" if device.type == "cuda" else "run.precision=fp32",
        "run.visualize=false",
        "run.tensorboard=false",
        "run.progress=false",
        "run.checkpoint_every=1000000",
        "optim.warmup_steps=1",
        *sizes.get("extra", []),
    ]


def resolve_config(method: str, sizes: dict, device: torch.device, workers: int, workdir: Path):
    """The first data setting the method accepts (``check_config`` refuses the others)."""
    from siamae.errors import ConfigError
    from siamae.recipes import load_config
    from siamae.registry import METHODS

    refusals = []
    for data in data_choices(sizes, workdir):
        overrides = data + base_overrides(method, sizes, device, workers)
        try:
            cfg = load_config(None, overrides)
            METHODS[method].check_config(cfg)
            return cfg, overrides
        except ConfigError as err:
            refusals.append(str(err))
    raise ConfigError("; ".join(refusals))


def count_flops_per_pair(overrides: list[str], workdir: Path) -> float:
    """FLOPs of one training step (forward + backward) per pair, fp32, no compile."""
    from torch.utils.flop_counter import FlopCounterMode

    from siamae.engine.trainer import train
    from siamae.recipes import load_config

    cfg = load_config(
        None,
        [
            *overrides,
            f"data.batch_size={FLOP_BATCH}",
            "data.num_workers=0",  # forked loader workers would inherit the counting mode
            "run.precision=fp32",
            "run.compile=false",
            "optim.max_steps=1",
            "run.log_every=1",
            f"run.out_dir={workdir / 'flops'}",
        ],
    )
    with FlopCounterMode(display=False) as counter:
        train(cfg, resume=False)
    return counter.get_total_flops() / FLOP_BATCH


def run_one(
    method: str,
    compile_model: bool,
    sizes: dict,
    device: torch.device,
    workers: int,
    peak_flops: float,
    workdir: Path,
    flops_cache: dict[str, float],
) -> Row:
    from siamae.engine.logging import read_metrics
    from siamae.engine.trainer import train
    from siamae.recipes import load_config

    row = Row(method, compile_model)
    start = time.perf_counter()
    try:
        _, overrides = resolve_config(method, sizes, device, workers, workdir)
        if method not in flops_cache:
            flops_cache[method] = count_flops_per_pair(overrides, workdir / method)
        row.gflop_per_pair = flops_cache[method] / 1e9
        out = workdir / f"{method}-{'compiled' if compile_model else 'eager'}"
        cfg = load_config(
            None,
            [
                *overrides,
                f"run.compile={str(compile_model).lower()}",
                f"optim.max_steps={sizes['steps']}",
                f"run.log_every={sizes['window']}",
                f"run.out_dir={out}",
            ],
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        torch._dynamo.reset()  # every run compiles afresh, within the recompile limits
        train(cfg, resume=False)
        if device.type == "cuda":
            row.peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2**30
        windows = [r for r in read_metrics(out) if "pairs_per_s" in r]
        if not windows:
            raise RuntimeError(f"the trainer logged no throughput in {out}")
        last = windows[-1]  # steady state: the first window holds compilation and start-up
        row.pairs_per_s = float(last["pairs_per_s"])
        row.data_wait = float(last["data_wait"])
        row.mfu = flops_cache[method] * row.pairs_per_s / peak_flops
        if len(windows) < 2:
            row.notes.append("one log window: includes start-up")
    except Exception as err:  # noqa: BLE001 - the row reports it, the next method runs
        row.error = f"{type(err).__name__}: {err}".splitlines()[0][:160]
        if os.environ.get("SIAMAE_GPU_CHECK_TRACEBACK"):
            traceback.print_exc()
    row.seconds = time.perf_counter() - start
    return row


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[Row]) -> str:
    header = (
        f"{'method':10s} {'compile':>7s} {'pairs/s':>9s} {'GFLOP/pair':>10s} {'MFU':>6s} "
        f"{'peak GiB':>8s} {'data_wait':>9s} {'run s':>6s}  notes"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        notes = f"ERROR {r.error}" if r.error else "; ".join(r.notes)
        lines.append(
            f"{r.method:10s} {'on' if r.compile else 'off':>7s} {_fmt(r.pairs_per_s, '9.1f')} "
            f"{_fmt(r.gflop_per_pair, '10.2f')} {_fmt(r.mfu, '6.1%')} "
            f"{_fmt(r.peak_mem_gib, '8.2f')} {_fmt(r.data_wait, '9.0%')} {r.seconds:6.1f}  {notes}"
        )
    return "\n".join(lines)


def attention_backends(device: torch.device) -> str:
    from timm.layers import use_fused_attn

    timm_fused = f"timm fused_attn={use_fused_attn()}"
    if device.type != "cuda":
        return f"{timm_fused}; SDPA on CPU (math/flash-CPU kernels)"
    cuda = torch.backends.cuda
    return (
        f"{timm_fused}; SDPA flash={cuda.flash_sdp_enabled()} "
        f"mem_efficient={cuda.mem_efficient_sdp_enabled()} math={cuda.math_sdp_enabled()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", help="default: every method in METHODS")
    parser.add_argument("--compile", choices=("both", "off", "on"), default="both")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized models and batches")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, help="pairs per step (default 128; tiny 4)")
    parser.add_argument("--steps", type=int, help="steps per run (default 30; tiny 4)")
    parser.add_argument("--window", type=int, help="steps per log window (default 10; tiny 2)")
    parser.add_argument(
        "--workers", type=int, help="loader workers (default: min(8, cores - 2); tiny 0)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's; 1 is fastest on a CPU shared with other jobs)",
    )
    parser.add_argument("--out", help="keep the run folders here (default: a temporary folder)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for every run, e.g. --set decoder.depth=2",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="start no new run after this many seconds, so the table comes out in time "
        "(default 420: the whole check under 8 minutes on one H100)",
    )
    args = parser.parse_args(argv)

    from siamae.registry import METHODS

    sizes = dict(TINY if args.tiny else FULL)
    for key in ("batch", "steps", "window"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    sizes["window"] = max(1, min(sizes["window"], sizes["steps"]))
    sizes["extra"] = list(args.set)
    workers = args.workers
    if workers is None:
        workers = 0 if args.tiny else max(0, min(8, (os.cpu_count() or 2) - 2))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    methods = args.methods or list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"unknown methods {unknown}; registered: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    compile_modes = {"both": [False, True], "off": [False], "on": [True]}[args.compile]

    peak_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak(device, peak_dtype, 8192 if device.type == "cuda" else 512)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"GPU: {gpu}"
    )
    print(
        f"model {sizes['arch']}/{sizes['patch']} at {sizes['img']}px, batch {sizes['batch']}, "
        f"{sizes['steps']} steps (last {sizes['window']} timed), {workers} loader workers, "
        f"precision {'bf16 autocast' if device.type == 'cuda' else 'fp32'}"
    )
    print(f"attention: {attention_backends(device)}")
    print(f"matmul peak ({str(peak_dtype).removeprefix('torch.')} mm): {peak / 1e12:.2f} TFLOP/s")
    rows: list[Row] = []
    flops_cache: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        if args.out:
            workdir = Path(args.out)
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check_")))
        began = time.perf_counter()
        for method in methods:
            for compile_model in compile_modes:
                if time.perf_counter() - began > args.budget_s:
                    rows.append(Row(method, compile_model, notes=["not run: --budget-s spent"]))
                    continue
                row = run_one(
                    method, compile_model, sizes, device, workers, peak, workdir, flops_cache
                )
                rows.append(row)
                state = "failed" if row.error else f"{row.pairs_per_s:.1f} pairs/s"
                print(
                    f"  {method} compile {'on' if compile_model else 'off'}: {state} "
                    f"({row.seconds:.0f} s)",
                    flush=True,
                )
    print()
    print(format_table(rows))
    return 0 if any(r.pairs_per_s is not None for r in rows) else 1  # 1: nothing was measured


if __name__ == "__main__":
    sys.exit(main())
