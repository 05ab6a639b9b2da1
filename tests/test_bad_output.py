"""Bad inputs around storage and odd data: an output folder that cannot be written, a disk that
fills while a checkpoint is written, SiameseIM on one-pixel images, unreadable SiamMAE videos.

Each ends with one line on stderr naming the thing, exit code 2, and nothing lost."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import siamae.checkpoint as checkpoint_module
import siamae.paths as paths_module
from siamae.commands.cli import main
from siamae.data.siameseim_views import SiameseIMViews
from test_cli import CONFIGS, _error_line, _small_pretrain


def _tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# -- SiameseIM on images smaller than a crop's box ----------------------------------------------


class _OnePixel:
    def open_image(self, index: int, rng: np.random.Generator) -> Image.Image:
        return Image.new("RGB", (1, 1), (200, 40, 10))


def test_siameseim_views_of_a_one_pixel_image_are_upscaled() -> None:
    views = SiameseIMViews(out=16, patch_size=8, num_masked=2, min_block=1, photometric=False)
    flips_seen = set()
    for seed in range(12):  # both flip states of both views occur among these seeds
        sample = views(_OnePixel(), 0, np.random.default_rng(seed))
        flips_seen.add(tuple(sample.extras["flip"].tolist()))
        for view in sample.views:
            assert view.shape == (16, 16, 3)
            assert (view == np.array([200, 40, 10], dtype=np.uint8)).all()
            torch.from_numpy(view)  # no negative strides
        assert sample.extras["box"].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    assert len(flips_seen) == 4


def test_siameseim_pretrains_on_one_pixel_images(tmp_path: Path) -> None:
    images = tmp_path / "tiny"
    images.mkdir()
    for i in range(8):
        Image.new("RGB", (1, 1), (30 * i, 10, 200)).save(images / f"{i}.png")
    run = tmp_path / "run"
    args = _small_pretrain(run, "method=siameseim", "optim.max_steps=1", "data.batch_size=4")
    assert main([*args, "--data", str(images)]) == 0
    assert (run / "checkpoints" / "last.pt").is_file()


# -- an output folder that cannot be written ------------------------------------------------------


@pytest.fixture
def read_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder nothing can be written in, as on a read-only mount (root ignores chmod, so the
    file system's refusal is simulated where the check meets it)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    real = paths_module.tempfile.TemporaryFile

    def refuse(*args, dir=None, **kwargs):  # noqa: ANN002, ANN003, ANN202, A002
        if dir is not None and Path(dir).resolve() == folder.resolve():
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(paths_module.tempfile, "TemporaryFile", refuse)
    return folder


def test_every_out_option_is_checked_before_any_work(
    read_only: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_work(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the command started working")

    import siamae.commands.cli
    import siamae.commands.demo

    # The commands call train by the name they imported: the test replaces it there.
    monkeypatch.setattr(siamae.commands.cli, "train", no_work)
    monkeypatch.setattr(siamae.commands.demo, "train", no_work)
    image = read_only.parent / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    encoder = ["--random-init", "vit_tiny_patch8_32", "--train", "t", "--val", "v"]
    commands = {
        "--out": [
            ["demo", "--quick", "--out", str(read_only / "demo")],
            ["pretrain", "--config", str(CONFIGS / "demo.yaml"), "--out", str(read_only / "run")],
            ["finetune", "--config", str(CONFIGS / "demo.yaml"), "--out", str(read_only / "ft")],
            ["export", "--checkpoint", "x.pt", "--out", str(read_only / "sub" / "e.safetensors")],
            ["eval", "knn", *encoder, "--out", str(read_only / "knn.json")],
            ["eval", "davis", "--random-init", "vit_tiny_patch8_32", "--data-root", "d"]
            + ["--out", str(read_only / "davis")],
            ["visualize", "attention", "--checkpoint", "x", "--images", str(image)]
            + ["--out", str(read_only / "maps")],
        ],
        "--out-dir": [
            ["eval", "linear", *encoder, "--out-dir", str(read_only / "linear")],
            ["eval", "fewshot", *encoder, "--out-dir", str(read_only / "fewshot")],
        ],
    }
    for option, lines in commands.items():
        for argv in lines:
            assert main(argv) == 2, argv
            line = _error_line(capsys)
            assert f"{option} " in line and f"the folder {str(read_only)!r}" in line, line
            assert "read-only file system" in line
    assert list(read_only.iterdir()) == []


def test_run_out_dir_set_in_the_config_is_checked_too(
    read_only: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = read_only / "run"
    assert main(_small_pretrain(run)[:3] + ["--set", f"run.out_dir={run}"]) == 2
    line = _error_line(capsys)
    assert f"run.out_dir {str(run)!r}: cannot write in the folder {str(read_only)!r}" in line
    assert list(read_only.iterdir()) == []


# -- the disk fills while a checkpoint is written -------------------------------------------------


class _FullDisk:
    """A file whose writes fail with ENOSPC once ``room`` bytes are written."""

    def __init__(self, file, room: int) -> None:  # noqa: ANN001
        self.file, self.room = file, room

    def write(self, data) -> int:  # noqa: ANN001
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.file, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()


def _fill_disk(monkeypatch: pytest.MonkeyPatch, room: int = 4096) -> None:
    real = os.fdopen
    monkeypatch.setattr(
        checkpoint_module.os, "fdopen", lambda fd, mode: _FullDisk(real(fd, mode), room)
    )


def test_a_full_disk_keeps_the_previous_checkpoint_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    assert main(_small_pretrain(run, "optim.max_steps=1")) == 0
    capsys.readouterr()
    before = _tree(run / "checkpoints")
    with monkeypatch.context() as patch:
        _fill_disk(patch)
        assert main(_small_pretrain(run, "optim.max_steps=2")) == 2
    line = _error_line(capsys)
    assert f"no space left on the file system of {str(run / 'checkpoints')!r}" in line
    assert "while saving last.pt; the previous checkpoint is intact" in line
    assert _tree(run / "checkpoints") == before  # no partial file, last.pt unchanged
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 1
    # Space again: the same command resumes from step 1.
    assert main(_small_pretrain(run, "optim.max_steps=2")) == 0
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 2


def test_a_full_disk_at_the_first_checkpoint_leaves_no_partial_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    # The error torch raises itself when the stream fails, and an OSError from fsync.
    fsync_full = OSError(errno.ENOSPC, "No space left on device")
    for fill in ("write", "fsync"):
        with monkeypatch.context() as patch:
            if fill == "write":
                _fill_disk(patch, room=100)
            else:

                def full(fd: int) -> None:
                    raise fsync_full

                patch.setattr(checkpoint_module.os, "fsync", full)
            assert main(_small_pretrain(run, "optim.max_steps=1")) == 2
        line = _error_line(capsys)
        assert "while saving last.pt; no earlier checkpoint was there to keep" in line
        assert list((run / "checkpoints").iterdir()) == []


# -- SiamMAE with unreadable videos ------------------------------------------------------------------


def test_unreadable_videos_are_listed_in_the_run_folder(
    shared_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("av")
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("cup.mp4", "bikes.mp4"):
        shutil.copy(shared_data / "videos" / name, videos / name)
    (videos / "notes.mp4").write_text("a text file, not a video\n")
    run = tmp_path / "run"
    args = _small_pretrain(run, "method=siammae", "optim.max_steps=1", "data.batch_size=2")
    with caplog.at_level(logging.WARNING):
        assert main([*args, "--data", str(videos)]) == 0
    warning = " ".join(r.getMessage() for r in caplog.records if "unreadable" in r.getMessage())
    assert f"listed in {run / 'skipped_files.txt'}" in warning and "siamae-start" not in warning
    listed = (run / "skipped_files.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == [str(videos / "notes.mp4")]
    # A restart does not list it twice.
    assert main([*args, "--set", "optim.max_steps=2", "--data", str(videos)]) == 0
    assert len((run / "skipped_files.txt").read_text().splitlines()) == 1
