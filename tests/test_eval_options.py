"""Evaluation options shared by the probes and propagation: position resampling, --random-init."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from siamae.commands.cli import main
from siamae.errors import CheckpointError
from siamae.loading import describe_encoder, random_encoder


def _write_folder(root: Path, seed: int) -> Path:
    """root/<class>/<i>.png: two classes of two small noise images each."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(
                root / name / f"{i}.png"
            )
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("folders")
    return _write_folder(base / "train", 0), _write_folder(base / "val", 1)


def _knn(folders: tuple[Path, Path], out: Path, *extra: str, model: str = "vit_tiny_patch16_32"):
    return ["eval", "knn", "--random-init", model, "--train", str(folders[0]),
            "--val", str(folders[1]), "--k", "1", "--crop-pct", "1.0", "--num-workers", "0",
            "--no-progress", "--out", str(out), *extra]  # fmt: skip


def test_probe_position_resampling_is_dino_by_default_and_timm_on_request(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 48 px on a 32 px encoder: the 2x2 grid is resampled to 3x3.
    assert main(_knn(folders, tmp_path / "dino.json", "--img-size", "48")) == 0
    printed = capsys.readouterr().out
    assert "position grid at other sizes: dino" in printed
    assert "sin-cos position embedding" in printed  # the random baseline says what it has
    dino = json.loads((tmp_path / "dino.json").read_text())
    assert dino["pos_resample"] == "dino" and dino["img_size"] == 48
    code = main(_knn(folders, tmp_path / "timm.json", "--img-size", "48", "--pos-resample", "timm"))
    assert code == 0
    assert "position grid at other sizes: timm" in capsys.readouterr().out
    assert json.loads((tmp_path / "timm.json").read_text())["pos_resample"] == "timm"


def test_describe_encoder_names_weights_and_resampling() -> None:
    encoder = random_encoder("vit_tiny_patch8_32", seed=3)
    line = describe_encoder(encoder)
    assert line.startswith("random init (seed 3): vit_tiny patch 8 (32px), untrained")
    assert "(h + 0.1) / h0" in line
    encoder.pos_resample = "timm"
    assert "antialiased" in describe_encoder(encoder)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("vit_tiny_patch12", "patch size 12 is not supported"),
        ("vit_tiny_patch16_40", "image size 40 is not a multiple of the patch size 16"),
    ],
)
def test_random_init_with_an_unsupported_size_is_one_line_exit_2(
    name: str, message: str, folders: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    with pytest.raises(CheckpointError, match=message):
        random_encoder(name)
    assert main(_knn(folders, tmp_path / "x.json", model=name)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    # The propagation commands refuse it the same way, before reading any data.
    code = main(["eval", "davis", "--random-init", name, "--data-root", str(tmp_path / "none")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
