"""A training call set up: device and precision, the model (the same on every process), the
data, the schedule and the optimizer, the resumed state, the DDP / compile wrappers, and the
reporters (metrics files, progress bar, monitors).

Every check that can fail runs before anything is written: a failed start leaves the run
folder as it was (no config of a run that never ran, no empty folders).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from siamae.config import Config, save_config
from siamae.data.dataset import EpochSampler, build_dataset, build_loader, loader_batch_size
from siamae.engine import distributed as D
from siamae.engine.checkpointing import (
    check_weights_fit,
    item_fingerprint,
    open_resume_checkpoint,
    restore,
)
from siamae.engine.logging import MetricsLogger
from siamae.engine.run_lock import RunFolder
from siamae.engine.state import (
    Monitor,
    MonitorFactory,
    Run,
    Schedule,
    TrainState,
    WatchesTraining,
)
from siamae.engine.stop import STOP_SIGNALS
from siamae.engine.tracking import WandbRun, open_tracking
from siamae.errors import CheckpointError
from siamae.methods import Method
from siamae.methods.base import KeepsRankLocalTensors, SkipsAtStart
from siamae.optim import build_optimizer
from siamae.options import option_error
from siamae.registry import build_method
from siamae.threads import (
    ThreadGovernor,
    ThreadPlan,
    apply_thread_policy,
    thread_governor,
    worker_threads,
)

THREADS_FILE = "threads.json"  # the resolved thread plan (siamae.threads.ThreadPlan)
VIDEO_INDEX_FILE = "video_index.json"  # siamae.data.video.INDEX_FILE, without importing PyAV
SKIPPED_FILE = "skipped_files.txt"  # siamae.data.video.SKIPPED_FILE


def pick_device(cfg: Config, info: D.DistInfo) -> torch.device:
    if cfg.run.device == "auto":
        return torch.device(f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
    if cfg.run.device.startswith("cuda") and not torch.cuda.is_available():
        raise option_error(
            "run.device",
            f"{cfg.run.device!r} asked for, but no CUDA device is available; use 'auto' or 'cpu'",
        )
    if cfg.run.device == "cuda" and info.enabled:
        return torch.device(f"cuda:{info.local_rank}")
    return torch.device(cfg.run.device)


def pick_precision(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32 (mixed precision only on CUDA devices)."""
    p = cfg.run.precision
    if device.type != "cuda":
        return None
    if p == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[p]


def _say_cpu_precision(cfg: Config, device: torch.device) -> None:
    """The note a run asking for fp16/bf16 off CUDA gets, once its checks have passed."""
    # The recipes ask for fp16 on GPUs; on a CPU mixed precision is slower, not faster.
    # A note, not a Python warning: no source line for the user to puzzle over.
    if device.type != "cuda" and cfg.run.precision in ("fp16", "bf16"):
        print(
            f"siamae: note: run.precision={cfg.run.precision} applies to CUDA devices; "
            f"training in fp32 on {device}",
            file=sys.stderr,
            flush=True,
        )


def make_schedule(cfg: Config, batches_per_epoch: int, world_size: int) -> Schedule:
    o = cfg.optim
    steps_per_epoch = batches_per_epoch // o.accum_steps
    if steps_per_epoch == 0:
        raise option_error(
            "optim.accum_steps",
            f"{o.accum_steps} accumulation steps exceed the {batches_per_epoch} batches of one "
            "epoch; lower it or use more data",
        )
    total = o.max_steps if o.max_steps is not None else max(1, round(o.epochs * steps_per_epoch))
    warmup = (
        o.warmup_steps if o.warmup_steps is not None else round(o.warmup_epochs * steps_per_epoch)
    )
    effective = cfg.data.batch_size * world_size * o.accum_steps
    return Schedule(
        steps_per_epoch, total, min(warmup, total), o.base_lr * effective / 256, effective
    )


def set_up(
    cfg: Config,
    info: D.DistInfo,
    resume: str | Path | bool | None,
    folder: RunFolder | None,
    monitor: MonitorFactory | None = None,
) -> Run:
    """Everything a training call needs, resumed from ``resume`` when it names a checkpoint;
    ``folder``: the main process's run lock (None elsewhere); ``monitor``: builds the monitors."""
    # Before any parallel work (building the model is some), so the whole run uses the plan.
    threads = apply_thread_policy(cfg.run.threads, cfg.data.num_workers)
    device = pick_device(cfg, info)
    amp_dtype = pick_precision(cfg, device)
    run_dir = Path(cfg.run.out_dir)
    resume_path, checkpoint = open_resume_checkpoint(cfg, run_dir, resume)
    method = _build_same_method(cfg, info, device)
    with _staging_folder(run_dir) as staging:
        dataset = build_dataset(
            cfg,
            method.view_kind,
            method.encoder.num_patches,
            views=method.build_views(cfg),
            source=method.build_source(cfg, str(staging), str(run_dir)),
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
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        state = TrainState(data_items=len(dataset), data_fingerprint=item_fingerprint(dataset))
        if checkpoint is not None:
            check_weights_fit(method, checkpoint["model"], resume_path)
            state = restore(checkpoint, resume_path, method, optimizer, scaler, info, device, state)
        # What can still fail (the monitor's data, a W&B login) runs before the first write.
        reporters = (
            _open_reporters(cfg, run_dir, device, state.step, monitor) if info.is_main else None
        )
        _begin_watching(reporters, dataset, method, checkpoint, resume_path)
        if folder is not None:
            folder.started = True
            _write_start_files(cfg, run_dir, staging, method)
    D.barrier(info)

    governor = thread_governor(threads)
    if info.is_main:
        _say_start(cfg, device, threads, governor)
        if checkpoint is not None:
            _say_resumed(state, schedule, resume_path, dataset, checkpoint)
    loader = _build_loader(dataset, sampler, cfg.data.num_workers, device)
    run = Run(
        cfg=cfg,
        info=info,
        device=device,
        run_dir=run_dir,
        method=method,
        model=_wrap(method, cfg, info, device),
        dataset=dataset,
        sampler=sampler,
        loader=loader,
        schedule=schedule,
        optimizer=optimizer,
        scaler=scaler,
        autocast=(
            torch.autocast(device.type, dtype=amp_dtype)
            if amp_dtype is not None
            else contextlib.nullcontext()
        ),
        state=state,
        threads=governor,
    )
    if reporters is not None:
        _start_reporters(run, *reporters)
    return run


def _say_start(
    cfg: Config, device: torch.device, threads: ThreadPlan, governor: ThreadGovernor | None
) -> None:
    """The run's first line (method, device, threads), the CPU precision note, and the thread
    plan in the run folder."""
    start_line = threads.describe(refitted=governor is not None)
    print(f"siamae: {cfg.method} on {device.type}, {start_line}", flush=True)
    _say_cpu_precision(cfg, device)
    (Path(cfg.run.out_dir) / THREADS_FILE).write_text(
        json.dumps(governor.to_dict() if governor else threads.to_dict()) + "\n"
    )


def _build_same_method(cfg: Config, info: D.DistInfo, device: torch.device) -> Method:
    torch.manual_seed(cfg.run.seed + info.rank)
    with torch.random.fork_rng(devices=[]):
        # Every process builds the same model: DDP broadcasts the trained weights from rank 0,
        # but not what it ignores (an EMA target), which must start equal too.
        torch.manual_seed(cfg.run.seed)
        return build_method(cfg).to(device)


@contextlib.contextmanager
def _staging_folder(run_dir: Path) -> Iterator[Path]:
    """A temporary folder for what the start writes (the video index), copied into the run
    folder once the start is sure, and removed however the start ends."""
    staging = Path(tempfile.mkdtemp(prefix="siamae-start-"))
    try:
        cached_index = run_dir / VIDEO_INDEX_FILE
        if cached_index.is_file():  # a restart does not probe the videos again
            shutil.copy2(cached_index, staging / cached_index.name)
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_start_files(cfg: Config, run_dir: Path, staging: Path, method: Method) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    for staged in staging.iterdir():
        shutil.copy2(staged, run_dir / staged.name)
    if isinstance(method, SkipsAtStart):
        _list_skipped_at_start(run_dir, method.skipped_at_start)
    # A kill during a checkpoint write leaves a temporary file; the rename never came.
    for stale in (run_dir / "checkpoints").glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def _list_skipped_at_start(run_dir: Path, lines: list[str]) -> None:
    """Add the files a method dropped while it was built (a fine-tuning run's unreadable
    validation images) to ``skipped_files.txt``, once: a resumed run finds them listed."""
    if not lines:
        return
    listing = run_dir / SKIPPED_FILE
    listed = set(listing.read_text().splitlines()) if listing.is_file() else set()
    with listing.open("a") as f:
        f.writelines(line + "\n" for line in lines if line not in listed)


def _init_worker(worker_id: int) -> None:
    # A stop signal sent to the process group (Ctrl-C in a terminal, `timeout`, Slurm's signals
    # to a job step) reaches the workers too. They keep serving, so the main process finishes
    # its step, saves and shuts them down; a worker that died of SIGTERM instead made torch raise
    # in the middle of the step, and the run ended in a traceback without its checkpoint. A
    # worker whose main process is gone exits by itself (torch's watchdog).
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    worker_threads(worker_id)


def _build_loader(
    dataset: Any, sampler: EpochSampler, num_workers: int, device: torch.device
) -> DataLoader:
    loader = build_loader(dataset, sampler, num_workers, pin_memory=device.type == "cuda")
    loader.worker_init_fn = _init_worker
    # A private generator: creating loader iterators must not consume the global RNG, or a
    # resumed run's dropout would drift from an uninterrupted one.
    loader.generator = torch.Generator()
    return loader


def _wrap(method: Method, cfg: Config, info: D.DistInfo, device: torch.device) -> nn.Module:
    """What runs the step: ``method`` in DDP with several processes, compiled on request."""
    model: nn.Module = method
    if info.enabled:
        if isinstance(method, KeepsRankLocalTensors) and method.ddp_ignored_names():
            ignored = method.ddp_ignored_names()
            # An EMA target is updated identically on every process; DDP must neither reduce
            # nor broadcast it, so it starts from rank 0's copy here (DDP copies the rest).
            D.broadcast_from_main(_named_tensors(method, ignored), info)
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(method, ignored)
        model = DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.run.compile:
        model = torch.compile(model)
    return model


def _named_tensors(method: Method, names: list[str]) -> list[torch.Tensor]:
    """The parameters and buffers of ``method`` called ``names``, in the method's order (the
    same on every process)."""
    wanted = set(names)
    return [
        tensor
        for name, tensor in (*method.named_parameters(), *method.named_buffers())
        if name in wanted
    ]


def _open_reporters(
    cfg: Config, run_dir: Path, device: torch.device, step: int, build: MonitorFactory | None
) -> tuple[Monitor | None, WandbRun | None]:
    """The monitors and the W&B run, which can fail (the monitor's data, a W&B login), and
    so start before the run's first file is written. A W&B run that did not start leaves no
    ``wandb/`` folder behind."""
    monitor = None
    if cfg.monitor.asked:
        if build is None:  # never silently without the figures the config asks for
            mo = cfg.monitor
            raise option_error(
                "monitor.knn_train"
                if mo.knn_train
                else "monitor.images"
                if mo.images
                else "monitor.davis"
                if mo.davis
                else "monitor.online_linear",
                "this train() call has no monitor to build; "
                "pass train(..., monitor=siamae.eval.probes.monitor.build_monitor)",
            )
        monitor = build(cfg, device)
    wandb_dir = run_dir / "wandb"
    had_wandb_dir = wandb_dir.exists()
    try:
        return monitor, open_tracking(cfg, run_dir, step)
    except Exception:
        if not had_wandb_dir:
            shutil.rmtree(wandb_dir, ignore_errors=True)
        raise


def _begin_watching(
    reporters: tuple[Monitor | None, WandbRun | None] | None,
    dataset: Any,
    method: Method,
    checkpoint: dict[str, Any] | None,
    resume_path: Path | None,
) -> None:
    """A monitor that learns from the training batches (the online linear probe) gets the
    data's classes and the encoder's width, and its state back from the checkpoint (main
    process: ``reporters``, the monitor and the W&B run; None on the others)."""
    monitor = reporters[0] if reporters is not None else None
    if not isinstance(monitor, WatchesTraining):
        return
    monitor.begin_training(len(getattr(dataset, "classes", [])), method.encoder.embed_dim)
    if checkpoint is None:
        return
    try:
        monitor.load_state_dict(checkpoint.get("monitor_state") or {})
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0][:200]
        raise CheckpointError(
            f"{resume_path}: its online linear probe does not fit this run's data ({first}); "
            "the data's classes changed: use another run.out_dir or --no-resume"
        ) from None


def _say_resumed(
    state: TrainState,
    schedule: Schedule,
    resume_path: Path | None,
    dataset: Any,
    checkpoint: dict[str, Any],
) -> None:
    """The resume line, and a second one when the data changed since the checkpoint."""
    print(
        f"siamae: resumed from step {state.step}/{schedule.total_steps} ({resume_path})",
        flush=True,
    )
    saved_items, saved_fingerprint = (
        checkpoint.get("data_items"),
        checkpoint.get("data_fingerprint"),
    )
    if saved_items is None or saved_fingerprint == state.data_fingerprint:
        return  # a checkpoint from before the data was recorded, or the same data
    change = len(dataset) - int(saved_items)
    if change:
        what = f"{abs(change)} item(s) {'appeared' if change > 0 else 'vanished'}"
    else:
        what = "the same number of items, but not the same ones"
    print(
        f"siamae: note: the data changed since the checkpoint: {saved_items} items then, "
        f"{len(dataset)} now ({what}); the rest of the run reads the data as it is now",
        file=sys.stderr,
        flush=True,
    )


def _start_reporters(run: Run, monitor: Monitor | None, tracker: WandbRun | None) -> None:
    """The main process's monitors, metrics files and progress bar; files the source found
    unreadable before training are listed."""
    cfg = run.cfg
    run.monitor = monitor
    run.logger = MetricsLogger(run.run_dir, run.state.step, cfg.run.tensorboard, tracker=tracker)
    if cfg.run.progress:
        from tqdm.auto import tqdm

        run.progress = tqdm(
            total=run.schedule.total_steps,
            initial=run.state.step,
            desc=run.method.progress_label(),
            unit="step",
            dynamic_ncols=True,
        )
    _list_unreadable_at_start(run.dataset, run.run_dir, run.state)


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
