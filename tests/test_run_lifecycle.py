"""A run's lifecycle and its error paths: loader workers shut down on every error, one run per
folder (the lock), out-of-memory errors in one line, nothing written before the checks pass, and
the lines a start and a resume print."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

import siamae.engine.step as step_module
from siamae.cli import main
from test_cli import _small_pretrain

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


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


def test_an_error_in_the_step_shuts_the_loader_workers_down(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise ValueError("a bug in the step")

    monkeypatch.setattr(step_module, "_forward_backward", fail)
    with pytest.raises(ValueError, match="a bug in the step"):
        main(_small_pretrain(tmp_path / "run", "data.num_workers=2"))
    # Stopped when the error left the loop, not at some later garbage collection.
    assert multiprocessing.active_children() == []
