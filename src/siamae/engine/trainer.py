"""The one training loop for every method.

One process or many (torchrun: gloo on CPU, NCCL on GPU); AdamW with the recipe's parameter
groups; learning rate scaled by the effective batch and set per iteration before each step;
gradient accumulation; fp16 (with scaling) or bf16 autocast on GPU, fp32 on CPU; optional
``torch.compile`` and gradient clipping. Checkpoints are atomic and resume exactly: every random
choice of the data depends on (seed, epoch, index), and the model's RNG state is saved per rank.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from siamae.checkpoint import TRAIN_FORMAT, load_checkpoint, save_atomic
from siamae.config import Config, save_config
from siamae.data.dataset import (
    EpochSampler,
    batch_to_device,
    build_dataset,
    build_loader,
    loader_batch_size,
    normalize_images,
)
from siamae.engine import distributed as D
from siamae.engine.logging import MetricsLogger
from siamae.engine.stop import StopRequest
from siamae.engine.tracking import check_tracking
from siamae.errors import CheckpointError, ConfigError, TrainingDiverged
from siamae.eval.probes.monitor import build_monitor
from siamae.methods import Method
from siamae.optim import build_optimizer, lr_at, set_lr
from siamae.paths import check_writable
from siamae.recipes import config_from_dict
from siamae.registry import build_method
from siamae.threads import apply_thread_policy, worker_threads
from siamae.viz import save_loss_curve, save_reconstruction

THREADS_FILE = "threads.json"  # the resolved thread plan (siamae.threads.ThreadPlan)
VIDEO_INDEX_FILE = "video_index.json"  # siamae.data.video.INDEX_FILE, without importing PyAV
SKIPPED_FILE = "skipped_files.txt"  # siamae.data.video.SKIPPED_FILE
__all__ = ["normalize_images", "train"]


def check_weights_fit(
    method: nn.Module, saved: dict[str, torch.Tensor], path: Path | str | None
) -> None:
    """Refuse a resume whose weights do not fit, naming the first tensor that differs."""
    own = method.state_dict()
    for name, tensor in own.items():
        if name not in saved:
            problem = f"tensor {name!r} {tuple(tensor.shape)} is missing from the checkpoint"
            break
        if tuple(saved[name].shape) != tuple(tensor.shape):
            problem = (
                f"tensor {name!r} has shape {tuple(saved[name].shape)} in the checkpoint and "
                f"{tuple(tensor.shape)} in this run's model"
            )
            break
    else:
        extra = [name for name in saved if name not in own]
        if not extra:
            return
        problem = f"the checkpoint has tensor {extra[0]!r} that this run's model lacks"
    raise CheckpointError(
        f"{path}: its weights do not fit this run's model: {problem}. The config differs from "
        "the one it was made with: use another run.out_dir or --no-resume"
    )


def pick_device(cfg: Config, info: D.DistInfo) -> torch.device:
    if cfg.run.device == "auto":
        return torch.device(f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
    if cfg.run.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"config field 'run.device': {cfg.run.device!r} asked for, but no CUDA device is available; use 'auto' or 'cpu'"
        )
    if cfg.run.device == "cuda" and info.enabled:
        return torch.device(f"cuda:{info.local_rank}")
    return torch.device(cfg.run.device)


def pick_precision(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32."""
    p = cfg.run.precision
    if device.type != "cuda":
        if p in ("fp16", "bf16"):
            # The recipes ask for fp16 on GPUs; on a CPU mixed precision is slower, not faster.
            warnings.warn(
                f"run.precision={p} applies to CUDA devices; training in fp32 on {device}",
                stacklevel=2,
            )
        return None
    if p == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[p]


@dataclass
class Schedule:
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float
    effective_batch: int


def make_schedule(cfg: Config, batches_per_epoch: int, world_size: int) -> Schedule:
    o = cfg.optim
    steps_per_epoch = batches_per_epoch // o.accum_steps
    if steps_per_epoch == 0:
        raise ConfigError(
            f"config field 'optim.accum_steps': {o.accum_steps} accumulation steps exceed the "
            f"{batches_per_epoch} batches of one epoch; lower it or use more data"
        )
    total = o.max_steps if o.max_steps is not None else max(1, round(o.epochs * steps_per_epoch))
    warmup = (
        o.warmup_steps if o.warmup_steps is not None else round(o.warmup_epochs * steps_per_epoch)
    )
    effective = cfg.data.batch_size * world_size * o.accum_steps
    return Schedule(
        steps_per_epoch, total, min(warmup, total), o.base_lr * effective / 256, effective
    )


def _list_unreadable_at_start(dataset: Any, run_dir: Path, state: TrainState) -> None:
    """Items the source found unreadable before training (videos a probe could not open) go to
    ``skipped_files.txt`` and the count, like the files skipped during training. Main process
    only: every process found the same ones."""
    unreadable = getattr(getattr(dataset, "source", None), "unreadable", None) or []
    new = [(name, why) for name, why in unreadable if name not in state.skipped_names]
    if not new:
        return
    state.skipped_names.update(name for name, _ in new)
    state.skipped += len(new)
    with (run_dir / SKIPPED_FILE).open("a") as f:
        f.writelines(f"{name}\t{why}\n" for name, why in new)


def _init_worker(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group; workers keep serving so the main process can
    # finish its step and save a checkpoint.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    worker_threads(worker_id)


@dataclass
class TrainState:
    step: int = 0
    skipped: int = 0  # unreadable files met so far (distinct names, this process)
    skipped_names: set[str] = field(default_factory=set)
    last_checkpoint_step: int | None = None
    best: float | None = None  # the best value of the method's best_metric so far
    history: list[dict[str, Any]] = field(default_factory=list)


def _list_skipped_at_start(run_dir: Path, lines: list[str]) -> None:
    """Add the files a method dropped while it was built (a fine-tuning run's unreadable
    validation images) to ``skipped_files.txt``, once: a resumed run finds them listed."""
    if not lines:
        return
    listing = run_dir / "skipped_files.txt"
    listed = set(listing.read_text().splitlines()) if listing.is_file() else set()
    with listing.open("a") as f:
        f.writelines(line + "\n" for line in lines if line not in listed)


def find_resume_checkpoint(run_dir: Path, resume: str | Path | bool | None) -> Path | None:
    """``resume``: a path, True/"auto" (run_dir/checkpoints/last.pt if present), or False/None."""
    if resume in (None, False):
        return None
    if resume in (True, "auto"):
        candidate = run_dir / "checkpoints" / "last.pt"
        return candidate if candidate.is_file() else None
    path = Path(resume)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise CheckpointError(
            f"--resume {str(resume)!r}: no checkpoint there; pass a .pt file or a run folder"
        )
    return path


def _method_of(model: nn.Module) -> Method:
    while not isinstance(model, Method):
        model = (
            model.module if hasattr(model, "module") else model._orig_mod
        )  # DDP / compile wrappers
    return model


def train(
    cfg: Config, resume: str | Path | bool | None = "auto", stop_after_steps: int | None = None
) -> dict[str, Any]:
    """Pre-train ``cfg.method`` and return a summary (run folder, steps, final loss, ...).

    ``stop_after_steps`` interrupts the run after that many optimizer steps of this call, as a
    signal would (used by tests of resume).
    """
    check_tracking(cfg)  # a missing optional tracker fails before any work
    device_kind = "cuda" if (cfg.run.device != "cpu" and torch.cuda.is_available()) else "cpu"
    info = D.init_distributed(device_kind)
    try:
        return _train(cfg, info, resume, stop_after_steps)
    finally:
        D.cleanup(info)


def _train(
    cfg: Config, info: D.DistInfo, resume: str | Path | bool | None, stop_after_steps: int | None
) -> dict[str, Any]:
    # Before any parallel work (building the model is some), so the whole run uses the plan.
    threads = apply_thread_policy(cfg.run.threads, cfg.data.num_workers)
    device = pick_device(cfg, info)
    amp_dtype = pick_precision(cfg, device)
    run_dir = Path(cfg.run.out_dir)
    if info.is_main:  # before any work (the CLI checks --out; this covers run.out_dir too)
        check_writable(run_dir, "run.out_dir")
    ckpt_dir = run_dir / "checkpoints"
    resume_path = find_resume_checkpoint(run_dir, resume)
    checkpoint = load_checkpoint(resume_path) if resume_path else None
    if checkpoint is not None and checkpoint.get("format") != TRAIN_FORMAT:
        raise CheckpointError(
            f"{resume_path}: not a siamae training checkpoint; only those can be resumed"
        )
    if checkpoint is not None:
        saved = config_from_dict(checkpoint["config"])
        if saved.method != cfg.method or saved.model != cfg.model:
            raise CheckpointError(
                f"{resume_path}: it was made for method {saved.method} / {saved.model.arch}, this run is "
                f"{cfg.method} / {cfg.model.arch}; use another run.out_dir or --no-resume"
            )

    torch.manual_seed(cfg.run.seed + info.rank)
    with torch.random.fork_rng(devices=[]):
        # Every process builds the same model: DDP broadcasts the trained weights from rank 0,
        # but not what it ignores (an EMA target), which must start equal too.
        torch.manual_seed(cfg.run.seed)
        method = build_method(cfg).to(device)
    # Every check that can fail runs before anything is written: a failed start leaves the run
    # folder as it was (no config of a run that never ran, no empty folders). The video index
    # is built in a staging folder and moved into the run folder once the start is sure.
    staging = Path(tempfile.mkdtemp(prefix="siamae-start-"))
    try:
        cached_index = run_dir / VIDEO_INDEX_FILE
        if cached_index.is_file():  # a restart does not probe the videos again
            shutil.copy2(cached_index, staging / cached_index.name)
        dataset = build_dataset(
            cfg,
            method.view_kind,
            method.encoder.num_patches,
            views=method.build_views(cfg),
            source=method.build_source(cfg, str(staging)),
        )
        # With repeated sampling one loader item holds several pairs; data.batch_size counts pairs.
        sampler = EpochSampler(
            len(dataset), loader_batch_size(cfg), info.rank, info.world_size, cfg.run.seed
        )
        schedule = make_schedule(cfg, sampler.batches_per_epoch, info.world_size)
        optimizer = build_optimizer(
            method.param_groups(cfg.optim.weight_decay, cfg.optim.no_decay_tokens),
            schedule.peak_lr,
            cfg.optim.betas,
            fused=device.type == "cuda",
        )
        if checkpoint is not None:
            check_weights_fit(method, checkpoint["model"], resume_path)
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
            for staged in staging.iterdir():
                shutil.copy2(staged, run_dir / staged.name)
            _list_skipped_at_start(run_dir, getattr(method, "skipped_at_start", []))
            # A kill during a checkpoint write leaves a temporary file; the rename never came.
            for stale in ckpt_dir.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    D.barrier(info)

    if info.is_main:
        print(f"siamae: {cfg.method} on {device.type}, {threads.describe()}", flush=True)
        (run_dir / THREADS_FILE).write_text(json.dumps(threads.to_dict()) + "\n")
    loader = build_loader(dataset, sampler, cfg.data.num_workers, pin_memory=device.type == "cuda")
    loader.worker_init_fn = _init_worker
    # A private generator: creating loader iterators must not consume the global RNG, or a
    # resumed run's dropout would drift from an uninterrupted one.
    loader.generator = torch.Generator()

    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    state = TrainState()
    if checkpoint is not None:
        try:
            method.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0][:300]
            raise CheckpointError(
                f"{resume_path}: its weights do not fit this run's model ({first}); the config differs "
                "from the one it was made with: use another run.out_dir or --no-resume"
            ) from None
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        state.step = int(checkpoint["step"])
        state.skipped = int(checkpoint.get("skipped", 0))
        state.skipped_names = set(checkpoint.get("skipped_names", []))
        state.last_checkpoint_step = state.step
        state.best = checkpoint.get("best")
        rng = checkpoint.get("rng", {})
        cpu_states = rng.get("cpu", [])
        if len(cpu_states) == info.world_size:
            torch.set_rng_state(cpu_states[info.rank])
        if device.type == "cuda" and len(rng.get("cuda", [])) == info.world_size:
            torch.cuda.set_rng_state(rng["cuda"][info.rank], device)

    model: nn.Module = method
    if info.enabled:
        ignored = method.ddp_ignored_names()
        if ignored:
            # An EMA target is updated identically on every process; DDP must neither reduce
            # nor broadcast it.
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(method, ignored)
        model = DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.run.compile:
        model = torch.compile(model)

    monitor = None
    if info.is_main and cfg.monitor.knn_train:
        monitor = build_monitor(cfg, device)

    logger = (
        MetricsLogger(run_dir, state.step, cfg.run.tensorboard, config=cfg)
        if info.is_main
        else None
    )
    progress = None
    if info.is_main and cfg.run.progress:
        from tqdm.auto import tqdm

        progress = tqdm(
            total=schedule.total_steps,
            initial=state.step,
            desc=f"{cfg.method} pre-training",
            unit="step",
            dynamic_ncols=True,
        )

    if info.is_main:
        _list_unreadable_at_start(dataset, run_dir, state)

    summary_eval: dict[str, float] = {}

    def save(tag: str = "last") -> None:
        cpu_rng = D.gather_rng_states(
            torch.get_rng_state(), info, device if device.type == "cuda" else torch.device("cpu")
        )
        cuda_rng = (
            D.gather_rng_states(torch.cuda.get_rng_state(device), info, device)
            if device.type == "cuda"
            else []
        )
        if info.is_main:
            payload = {
                "format": TRAIN_FORMAT,
                "method": cfg.method,
                "config": cfg.to_dict(),
                "model": method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "step": state.step,
                "epoch": state.step // schedule.steps_per_epoch,
                "skipped": state.skipped,
                "skipped_names": sorted(state.skipped_names),
                "rng": {"cpu": cpu_rng, "cuda": cuda_rng},
                "best": state.best,
            }
            save_atomic(payload, ckpt_dir / f"{tag}.pt")
        if tag == "last":
            state.last_checkpoint_step = state.step
        D.barrier(info)

    accum = cfg.optim.accum_steps
    autocast = (
        torch.autocast(device.type, dtype=amp_dtype)
        if amp_dtype is not None
        else contextlib.nullcontext()
    )
    steps_this_call = 0
    window_samples, window_start = 0, time.perf_counter()
    data_wait = 0.0  # seconds this log window spent waiting for the loader
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    # The method's own scalars (MethodOutput.logs), averaged like the loss over a log window.
    log_sums: dict[str, torch.Tensor] = {}
    last_loss = float("nan")
    interrupted = None
    method.train()
    with StopRequest() as stop:
        while state.step < schedule.total_steps and interrupted is None:
            epoch = state.step // schedule.steps_per_epoch
            sampler.set_epoch(epoch, (state.step % schedule.steps_per_epoch) * accum)
            micro = 0
            iterator = iter(loader)
            while state.step < schedule.total_steps:
                if stop.agreed(info, device):
                    interrupted = signal.Signals(stop.signal).name
                    break
                if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                    interrupted = "stop_after_steps"
                    break
                try:
                    wait_start = time.perf_counter()
                    batch = next(iterator)
                    data_wait += time.perf_counter() - wait_start
                except StopIteration:
                    break
                except Exception:
                    if stop.requested:
                        interrupted = signal.Signals(stop.signal).name
                        break
                    raise
                new = [
                    line
                    for line in batch["skipped_files"]
                    if line.split("\t")[0] not in state.skipped_names
                ]
                if new:
                    state.skipped_names.update(line.split("\t")[0] for line in new)
                    state.skipped += len(new)
                    with (run_dir / SKIPPED_FILE).open("a") as f:
                        f.writelines(line + "\n" for line in new)
                    if progress is not None:
                        progress.write(
                            f"skipped unreadable file {new[0]}"
                            + (f" (+{len(new) - 1} more)" if len(new) > 1 else "")
                        )
                inputs = batch_to_device(batch, device)
                sync = micro == accum - 1
                ctx = (
                    model.no_sync()
                    if (info.enabled and not sync and hasattr(model, "no_sync"))
                    else contextlib.nullcontext()
                )
                with ctx:
                    with autocast:
                        out = model(inputs)
                    loss = out.loss
                    if not torch.isfinite(loss.detach()).item():
                        raise TrainingDiverged(
                            f"the loss became {loss.item()} at step {state.step} (epoch {epoch}); training stopped. "
                            + (
                                f"The last good checkpoint is {ckpt_dir / 'last.pt'} (step {state.last_checkpoint_step}). "
                                if state.last_checkpoint_step is not None
                                else "No checkpoint had been written yet. "
                            )
                            + "Try a lower optim.base_lr, optim.clip_grad=1.0, or run.precision=bf16/fp32."
                        )
                    scaler.scale(loss / accum).backward()
                loss_sum += loss.detach()
                for key, value in out.logs.items():
                    log_sums[key] = log_sums.get(key, 0.0) + value.detach().float()
                loss_count += 1
                window_samples += batch["images"].shape[0] * info.world_size
                micro += 1
                if not sync:
                    continue
                micro = 0
                lr = lr_at(
                    state.step,
                    schedule.peak_lr,
                    cfg.optim.min_lr,
                    schedule.warmup_steps,
                    schedule.total_steps,
                    cfg.optim.schedule,
                    cfg.optim.poly_power,
                )
                set_lr(optimizer, lr)
                if cfg.optim.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(method.parameters(), cfg.optim.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                steps_this_call += 1
                method.after_step(state.step, schedule.total_steps)

                if state.step % cfg.run.log_every == 0 or state.step == schedule.total_steps:
                    mean_loss = D.all_reduce_mean(loss_sum / max(loss_count, 1), info).item()
                    skipped = int(
                        D.all_reduce_sum(
                            torch.tensor(float(state.skipped), device=device), info
                        ).item()
                    )
                    elapsed = time.perf_counter() - window_start
                    record = {
                        "step": state.step,
                        "epoch": round(state.step / schedule.steps_per_epoch, 4),
                        "loss": mean_loss,
                        "lr": lr,
                        "pairs_per_s": window_samples / max(elapsed, 1e-9),
                        # A loader that keeps up leaves this near 0.
                        "data_wait": data_wait / max(elapsed, 1e-9),
                        "skipped": skipped,
                    }
                    for key in sorted(log_sums):  # the same keys, in the same order, on every rank
                        record[key] = D.all_reduce_mean(
                            log_sums[key] / max(loss_count, 1), info
                        ).item()
                    log_sums.clear()
                    last_loss = mean_loss
                    loss_sum.zero_()
                    loss_count = 0
                    window_samples, window_start = 0, time.perf_counter()
                    data_wait = 0.0
                    if logger is not None:
                        logger.log(record)
                    if progress is not None:
                        progress.set_postfix(
                            loss=f"{mean_loss:.4f}",
                            lr=f"{lr:.2e}",
                            pairs_s=f"{record['pairs_per_s']:.1f}",
                            data_wait=f"{record['data_wait']:.0%}",
                        )
                if progress is not None:
                    progress.update(1)
                if (
                    monitor is not None
                    and monitor.due(state.step // schedule.steps_per_epoch, state.step)
                    and (state.step % schedule.steps_per_epoch == 0 or cfg.monitor.every_steps)
                ):
                    result = monitor.run(method.encoder)
                    if logger is not None and result:
                        logger.log(
                            {
                                "step": state.step,
                                "epoch": round(state.step / schedule.steps_per_epoch, 4),
                                **result,
                            }
                        )
                    if progress is not None and result:
                        progress.write(
                            f"step {state.step}: "
                            + ", ".join(f"{k} {v:.4f}" for k, v in result.items())
                        )
                end_of_epoch = (
                    state.step % schedule.steps_per_epoch == 0 or state.step == schedule.total_steps
                )
                if end_of_epoch:
                    result = method.evaluate(device)
                    if result:
                        result = {k: float(v) for k, v in result.items()}
                        if logger is not None:
                            logger.log(
                                {
                                    "step": state.step,
                                    "epoch": round(state.step / schedule.steps_per_epoch, 4),
                                    **result,
                                }
                            )
                        if progress is not None:
                            progress.write(
                                f"step {state.step}: "
                                + ", ".join(f"{k} {v:.4f}" for k, v in result.items())
                            )
                        summary_eval.update(result)
                        metric = method.best_metric
                        if metric is not None and metric in result:
                            if state.best is None or result[metric] > state.best:
                                state.best = result[metric]
                                save("best")
                if state.step % cfg.run.checkpoint_every == 0 and state.step < schedule.total_steps:
                    save()
        if interrupted is None and state.step >= schedule.total_steps:
            save()
        elif interrupted is not None and state.last_checkpoint_step != state.step:
            save()
    if progress is not None:
        progress.close()

    summary = {
        "run_dir": str(run_dir),
        "checkpoint": str(ckpt_dir / "last.pt"),
        "method": cfg.method,
        "step": state.step,
        "total_steps": schedule.total_steps,
        "epoch": state.step / schedule.steps_per_epoch,
        "final_loss": last_loss,
        "skipped": state.skipped,
        "interrupted": interrupted,
        "skipped_at_start": len(getattr(method, "skipped_at_start", [])),
        "effective_batch": schedule.effective_batch,
        "peak_lr": schedule.peak_lr,
        "device": str(device),
        "world_size": info.world_size,
        **({"eval": summary_eval} if summary_eval else {}),
    }
    if info.is_main and interrupted is None and cfg.run.visualize:
        method.eval()
        picture = save_reconstruction(
            method, dataset, run_dir / "reconstruction.png", device, step=state.step
        )
        if picture is not None:  # a classifier (fine-tuning) has nothing to reconstruct
            summary["reconstruction"] = str(picture)
        summary["loss_curve"] = str(save_loss_curve(run_dir, run_dir / "loss_curve.png"))
        method.train()
    if logger is not None:  # after the pictures: a tracker (W&B) gets them
        logger.close()
    if math.isnan(last_loss) and info.is_main:
        summary["final_loss"] = None
    return summary
