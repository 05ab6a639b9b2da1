"""The examples in examples/ run (each on tiny data), their encoders load in ``siamae eval
davis``, and the plain PyTorch loop trains the engine's weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import siamae

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SIZES = ["--img-size", "32", "--patch-size", "8"]


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageFolder layout, 12 PNGs of two classes (PNG: no JPEG draft to tell readers apart)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(6):
            pixels = rng.integers(0, 255, (40 + 8 * i, 56, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_every_example_has_help(script: str) -> None:
    result = _run(EXAMPLES / script, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:") and "--out" in result.stdout
    if script.startswith("train_"):
        assert "--steps" in result.stdout and "--data" in result.stdout


def test_the_plain_loop_s_encoder_is_read_by_eval_davis(
    image_folder: Path, tmp_path: Path, shared_data: Path
) -> None:
    out = tmp_path / "plain"
    result = _run(EXAMPLES / "train_plain_pytorch.py", "--data", image_folder, "--steps", "2",
                  "--out", out, "--batch-size", "4", *SIZES)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "step 2: loss" in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "siamae", "eval", "davis", "--checkpoint",
         out / "encoder.safetensors", "--data-root", shared_data / "DAVIS", "--sequences", "dog",
         "--max-frames", "3", "--set", "resize=64x112", "--out", tmp_path / "davis",
         "--no-progress"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "davis" / "summary.json").read_text())
    assert 0.0 <= summary["J&F-Mean"] <= 1.0
    assert "vit_tiny patch 8 (32px)" in summary["encoder"]


def test_the_plain_loop_trains_siammae_on_frame_folders(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for v in range(2):
        (tmp_path / "videos" / f"v{v}").mkdir(parents=True)
        for t in range(6):
            pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "videos" / f"v{v}" / f"{t:05d}.jpg")
    result = _run(EXAMPLES / "train_plain_pytorch.py", "--method", "siammae", "--data",
                  tmp_path / "videos", "--steps", "1", "--batch-size", "2", "--out",
                  tmp_path / "out", *SIZES)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert siamae.load_encoder(tmp_path / "out" / "encoder.safetensors").img_size == 32


RECIPES = {"mae": "mae_vitb16_in1k.yaml", "cropmae": "cropmae_vits16_in1k.yaml"}


@pytest.mark.parametrize("method", list(RECIPES))
def test_five_plain_steps_are_five_engine_steps(
    method: str, image_folder: Path, tmp_path: Path
) -> None:
    """The same weights after 5 steps, with the one stated difference of the schedule: the
    example's lr is constant, so the engine's warmup + cosine is set flat at the same rate
    (peak = min). Same views, order, initial weights and dropout draws."""
    lr, batch = 2.0**-13, 4  # powers of two: the engine's lr x batch / 256 is exact
    result = _run(EXAMPLES / "train_plain_pytorch.py", "--method", method, "--data", image_folder,
                  "--steps", "5", "--batch-size", str(batch), "--lr", str(lr), "--out",
                  tmp_path / "plain", *SIZES)  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = siamae.train(
        REPO / "configs" / RECIPES[method],
        [
            "model.arch=vit_tiny", "model.img_size=32", "model.patch_size=8",
            f"data.path={image_folder}", f"data.batch_size={batch}", "data.num_workers=0",
            # the recipe file rounds 4/3; the published default (and create_views) is 4/3
            "data.ratio=[0.75, 1.3333333333333333]",
            "optim.max_steps=5", "optim.warmup_steps=0",
            f"optim.base_lr={lr * 256 / batch}", f"optim.min_lr={lr}",
            f"run.out_dir={tmp_path / 'engine'}", "run.threads=1", "run.progress=false",
            "run.visualize=false", "run.precision=fp32",
        ],
    )  # fmt: skip
    assert summary["step"] == 5
    engine = torch.load(tmp_path / "engine" / "checkpoints" / "last.pt", weights_only=True)
    plain = load_file(tmp_path / "plain" / "encoder.safetensors")
    encoder = {
        k[len("encoder.vit.") :]: v
        for k, v in engine["model"].items()
        if k.startswith("encoder.vit.")
    }
    assert plain.keys() == encoder.keys()
    start = siamae.create_method(method, "vit_tiny_patch16_224", img_size=32, patch_size=8, seed=0)
    assert not torch.equal(plain["blocks.0.attn.qkv.weight"], start.encoder.vit.blocks[0].attn.qkv.weight)  # fmt: skip
    for key, value in plain.items():
        assert torch.equal(value, encoder[key]), key


def test_the_lightning_example_trains_and_writes_an_encoder(
    image_folder: Path, tmp_path: Path
) -> None:
    pytest.importorskip("lightning", reason="the [lightning] extra is not installed")
    result = _run(EXAMPLES / "train_lightning.py", "--method", "siameseim", "--data",
                  image_folder, "--steps", "2", "--batch-size", "4", "--out", tmp_path, *SIZES)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "2 steps; encoder written" in result.stdout
    encoder = siamae.load_encoder(tmp_path / "encoder.safetensors")
    assert (encoder.arch, encoder.img_size) == ("vit_tiny", 32)
