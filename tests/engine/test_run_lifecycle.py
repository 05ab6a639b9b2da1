"""A run's lifecycle and its error paths: loader workers shut down on every error, one run per
folder (the lock), out-of-memory errors in one line, nothing written before the checks pass, and
the lines a start and a resume print."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import siamae.engine.step as step_module
import siamae.eval.probes.cli as probe_cli
from siamae.commands.cli import main
from siamae.engine.run_lock import LOCK_FILE, LockHolder
from siamae.finetune.classification import FineTune
from siamae.finetune.segmentation import SegmentationFineTune
from siamae.methods.cropmae import CropMAE
from test_cli import _error_line, _small_pretrain


def _unreadable_images(folder: Path, count: int = 60) -> Path:
    folder.mkdir()
    for i in range(1, count + 1):
        (folder / f"{i}.jpg").write_text("x\n")
    return folder


def test_an_error_in_the_loader_workers_exits_at_once(tmp_path: Path) -> None:
    """The workers ignore SIGTERM (a group signal must not kill them mid-step); left to the
    interpreter's exit they were never stopped and the command hung after its error line."""
    data = _unreadable_images(tmp_path / "allbad")
    cmd = [sys.executable, "-m", "siamae", *_small_pretrain(tmp_path / "run")]
    cmd += ["--data", str(data), "--set", "data.batch_size=4", "--set", "data.num_workers=2"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("siamae: error: 50 consecutive unreadable")


def test_out_of_memory_in_the_step_exits_at_once_with_loader_workers(tmp_path: Path) -> None:
    """An error in the step (here an allocation that fails) with workers running: the line and
    exit code 2 within seconds, not a hang at interpreter exit."""
    args = _small_pretrain(tmp_path / "run", "data.num_workers=2", "data.synthetic_count=64")
    code = (
        "import sys, siamae.engine.step as step\n"
        "def fail(*args, **kwargs):\n"
        "    raise MemoryError()\n"
        "step._forward_backward = fail\n"
        "from siamae.commands.cli import main\n"
        f"sys.exit(main({args!r}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("siamae: error: out of memory")


# -- one run per folder (row 1b) ------------------------------------------------------------


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_second_run_on_a_folder_in_use_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    assert main(_small_pretrain(run, "optim.max_steps=1")) == 0
    assert not (run / LOCK_FILE).exists()  # released at the end
    capsys.readouterr()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / LOCK_FILE).write_text(LockHolder(holder.pid, socket.gethostname(), "").to_text())
        before = _tree(run)
        assert main(_small_pretrain(run, "optim.max_steps=2", "method=mae")) == 2
        line = _error_line(capsys)
        assert f"in use by another run (process {holder.pid} on" in line
        assert _tree(run) == before  # config.yaml, metrics, checkpoint: as they were
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / LOCK_FILE).write_text(LockHolder(dead.pid, socket.gethostname(), "").to_text())
    assert main(_small_pretrain(run, "optim.max_steps=1")) == 0
    assert (run / "checkpoints" / "last.pt").is_file()
    assert not (run / LOCK_FILE).exists()


# -- out of memory (row 10) ------------------------------------------------------------------

CPU_ALLOCATOR = (
    "[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: you "
    "tried to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)"
)


@pytest.mark.parametrize(
    ("error", "asked"),
    [
        (RuntimeError(CPU_ALLOCATOR), "1024.00 GiB"),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB."), "20.00 GiB"),
        (MemoryError(), "more memory than there is"),
    ],
    ids=["cpu-allocator", "torch-oom", "MemoryError"],
)
def test_out_of_memory_in_a_step_is_one_line_and_keeps_the_checkpoint(
    error: BaseException,
    asked: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = tmp_path / "run"
    assert main(_small_pretrain(run, "optim.max_steps=1")) == 0
    checkpoint = (run / "checkpoints" / "last.pt").read_bytes()
    capsys.readouterr()

    def fail(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(step_module, "_forward_backward", fail)
    assert main(_small_pretrain(run, "optim.max_steps=3")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    line = err[-1]  # after the resume note
    assert line.startswith("siamae: error: out of") and "Traceback" not in "".join(err)
    assert f"asked for {asked}" in line and "data.batch_size" in line
    assert (run / "checkpoints" / "last.pt").read_bytes() == checkpoint


def test_out_of_memory_in_an_eval_command_names_its_own_options(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(args: object) -> int:
        raise RuntimeError(CPU_ALLOCATOR)

    monkeypatch.setattr(probe_cli, "_run_knn", fail)
    parser_args = [
        "eval",
        "knn",
        "--random-init",
        "vit_tiny_patch8_224",
        "--train",
        str(tmp_path),
        "--val",
        str(tmp_path),
    ]
    assert main(parser_args) == 2
    line = _error_line(capsys)
    assert "asked for 1024.00 GiB" in line and "--batch-size or --img-size" in line


# -- nothing written before the checks pass (row 19) ------------------------------------------


class _NotLoggedIn(Exception):
    pass


def _wandb_without_login(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in for the wandb package whose init fails as it does without credentials."""
    fake = types.ModuleType("wandb")
    fake.errors = types.SimpleNamespace(Error=_NotLoggedIn)  # type: ignore[attr-defined]
    fake.Settings = lambda **kwargs: kwargs  # type: ignore[attr-defined]

    def init(**kwargs: object) -> None:
        Path(str(kwargs["dir"]), "wandb").mkdir()  # W&B's debug folder, before the login
        raise _NotLoggedIn("api_key not configured (no-tty). call wandb.login(key=...)")

    fake.init = init  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", fake)


@pytest.mark.parametrize(
    "bad",
    [
        ["run.wandb=true"],  # W&B not logged in
        ["data.batch_size=64"],  # more than the data holds
        ["monitor.knn_train=/no/such/folder"],  # the monitor's data
    ],
    ids=["wandb-login", "batch", "monitor"],
)
def test_an_early_error_writes_nothing(
    bad: list[str],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _wandb_without_login(monkeypatch)
    fresh = tmp_path / "fresh"
    assert main(_small_pretrain(fresh, *bad)) == 2
    _error_line(capsys)
    assert not fresh.exists()
    # A run folder that exists keeps its contents as they were.
    run = tmp_path / "run"
    assert main(_small_pretrain(run, "optim.max_steps=1")) == 0
    capsys.readouterr()
    before = _tree(run)
    assert main(_small_pretrain(run, "optim.max_steps=2", *bad)) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("siamae: error: ")
    assert _tree(run) == before and not (run / "wandb").exists()


# -- what a start and a resume say (rows 16, 21) ----------------------------------------------


def test_a_resume_says_its_step_and_how_the_data_changed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(data / f"{i}.png")
    run = tmp_path / "run"
    args = [*_small_pretrain(run, "optim.max_steps=1"), "--data", str(data)]
    assert main(args) == 0
    capsys.readouterr()
    for name in ("0.png", "1.png", "2.png"):
        (data / name).unlink()
    assert main([*_small_pretrain(run, "optim.max_steps=2"), "--data", str(data)]) == 0
    out, err = capsys.readouterr()
    assert f"siamae: resumed from step 1/2 ({run / 'checkpoints' / 'last.pt'})" in out
    assert (
        "the data changed since the checkpoint: 20 items then, 17 now (3 item(s) vanished)" in err
    )
    # The same data: no note.
    assert main([*_small_pretrain(run, "optim.max_steps=3"), "--data", str(data)]) == 0
    out, err = capsys.readouterr()
    assert "resumed from step 2/3" in out and "data changed" not in err


def test_an_old_checkpoint_without_the_data_record_resumes_silently(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    assert main(_small_pretrain(run, "optim.max_steps=1")) == 0
    last = run / "checkpoints" / "last.pt"
    old = torch.load(last, weights_only=True)
    del old["data_items"], old["data_fingerprint"]
    torch.save(old, last)
    capsys.readouterr()
    assert main(_small_pretrain(run, "optim.max_steps=2", "data.synthetic_count=24")) == 0
    out, err = capsys.readouterr()
    assert "resumed from step 1/2" in out and "data changed" not in err


def test_fp16_on_a_cpu_is_a_one_line_note(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a Python warning would fail here
        assert (
            main(_small_pretrain(tmp_path / "run", "optim.max_steps=1", "run.precision=fp16")) == 0
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "siamae: note: run.precision=fp16 applies to CUDA devices; training in fp32 on cpu"
    ]


def test_the_progress_bar_says_what_the_run_does() -> None:
    assert CropMAE.progress_label() == "cropmae pre-training"
    assert SegmentationFineTune.progress_label() == "segmentation fine-tuning"
    assert FineTune.progress_label() == "classification fine-tuning"
