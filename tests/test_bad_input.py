"""Fidelity around the models and bad input: the crop sampler the published runs executed, the
resampling filter, configs that cannot learn, and starts that fail without touching anything."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp
from torchvision.transforms import RandomResizedCrop

from siamae.commands.cli import main
from siamae.data.dataset import build_view_maker
from siamae.data.views import sample_box
from siamae.recipes import load_config
from test_cli import _error_line, _small_pretrain

DRAWS = 5000
WIDTH, HEIGHT = 500, 375  # an ImageNet-sized image
SCALE, RATIO = (0.1, 1.0), (3 / 4, 4 / 3)


def _stats(boxes: np.ndarray) -> dict[str, np.ndarray]:
    top, left, h, w = boxes.T
    return {
        "area": h * w / (WIDTH * HEIGHT),
        "aspect": w / h,
        "centre_x": (left + w / 2) / WIDTH,
        "centre_y": (top + h / 2) / HEIGHT,
    }


@pytest.fixture(scope="module")
def torchvision_boxes() -> np.ndarray:
    torch.manual_seed(0)
    image = torch.empty(3, HEIGHT, WIDTH)
    return np.array(
        [RandomResizedCrop.get_params(image, list(SCALE), list(RATIO)) for _ in range(DRAWS)],
        dtype=float,
    )


def test_crop_sampler_follows_torchvision_random_resized_crop(
    torchvision_boxes: np.ndarray,
) -> None:
    rng = np.random.default_rng(0)
    ours = np.array([sample_box(rng, WIDTH, HEIGHT, SCALE, RATIO) for _ in range(DRAWS)])
    theirs, mine = _stats(torchvision_boxes), _stats(ours)
    for name in theirs:
        p = ks_2samp(theirs[name], mine[name]).pvalue
        assert p > 0.01, f"{name}: KS p={p:.2g}"
    # The clamp sampler (an option) is a different distribution: larger, often full-height crops.
    clamp = np.array([sample_box(rng, WIDTH, HEIGHT, SCALE, RATIO, "clamp") for _ in range(DRAWS)])
    clamped = _stats(clamp)
    assert ks_2samp(theirs["area"], clamped["area"]).pvalue < 1e-6
    assert clamped["area"].mean() > theirs["area"].mean() + 0.04
    full_height = lambda boxes: np.mean(boxes[:, 2] == HEIGHT)  # noqa: E731
    assert full_height(clamp) > 0.15 > 0.02 > full_height(ours)


def test_crop_sampler_falls_back_to_a_clamped_centre_crop() -> None:
    # No area in (0.99, 1) with aspect 3 fits a square image: ten failures, then the centre crop.
    top, left, h, w = sample_box(np.random.default_rng(0), 100, 100, (0.99, 1.0), (3.0, 4.0))
    assert (w, h) == (100, 33) and (top, left) == (33, 0)


def test_recipes_use_the_published_filter_and_sampler() -> None:
    base = ["data.source=synthetic"]
    mae = build_view_maker(load_config(None, [*base, "method=mae"]), "single")
    crop = build_view_maker(load_config(None, base), "pair")
    siam = build_view_maker(load_config(None, [*base, "method=siammae"]), "frames")
    assert mae.interpolation == "bicubic"
    assert crop.interpolation == siam.interpolation == "bilinear"
    assert mae.sampler == crop.sampler == siam.sampler == "torchvision"
    option = load_config(None, [*base, "data.crop_sampler=clamp", "data.interpolation=bicubic"])
    assert build_view_maker(option, "pair").sampler == "clamp"
    assert build_view_maker(option, "pair").interpolation == "bicubic"


def test_bicubic_views_differ_from_bilinear_views() -> None:
    cfg = load_config(None, ["data.source=synthetic", "method=mae", "model.img_size=64"])
    bicubic = build_view_maker(cfg, "single")
    cfg.data.interpolation = "bilinear"
    bilinear = build_view_maker(cfg, "single")
    from siamae.data.sources import SyntheticImageSource

    source = SyntheticImageSource(4, 160, 0)
    a = bicubic(source, 0, np.random.default_rng(1))[0]
    b = bilinear(source, 0, np.random.default_rng(1))[0]
    assert a.dtype == np.uint8 and a.shape == b.shape == (64, 64, 3)
    diff = np.abs(a.astype(int) - b.astype(int))
    assert 0 < diff.mean() < 8  # the same crop, another filter


@pytest.mark.parametrize("method", ["cropmae", "siammae", "mae"])
@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_a_mask_ratio_that_cannot_learn_is_refused(
    method: str, ratio: float, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # 0.0 masks no patch (nothing to reconstruct); 1.0 leaves none visible.
    args = _small_pretrain(tmp_path / "run", "model.patch_size=8", f"{method}.mask_ratio={ratio}")
    args += ["--set", f"method={method}"]
    assert main(args) == 2
    line = _error_line(capsys)
    assert f"'{method}.mask_ratio'" in line and str(ratio) in line
    assert not (tmp_path / "run").exists()


def _tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_failed_start_leaves_the_run_folder_untouched(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    assert main(_small_pretrain(run, "optim.max_steps=1")) == 0
    before = _tree(run)
    # A batch larger than the data, and a resume whose weights do not fit: both refused.
    assert main(_small_pretrain(run, "data.batch_size=64", "optim.max_steps=2")) == 2
    assert "fewer than one global batch" in _error_line(capsys)
    assert _tree(run) == before
    assert main(_small_pretrain(run, "decoder.dim=64", "optim.max_steps=2")) == 2
    line = _error_line(capsys)
    # The first tensor that differs, with both shapes.
    assert "tensor 'decoder.mask_token' has shape (1, 1, 128)" in line and "(1, 1, 64)" in line
    assert _tree(run) == before
    # A fresh run folder that fails its checks is not even created.
    fresh = tmp_path / "fresh"
    assert main(_small_pretrain(fresh, "data.batch_size=64")) == 2
    capsys.readouterr()
    assert not fresh.exists()


def test_stale_checkpoint_temporaries_are_removed_at_the_next_start(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(_small_pretrain(run, "optim.max_steps=1")) == 0
    stale = run / "checkpoints" / ".last.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert main(_small_pretrain(run, "optim.max_steps=2")) == 0
    assert not stale.exists()
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 2


def test_path_like_values_stay_strings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.source=synthetic", "run.out_dir=1e5", "data.path=007"])
    assert cfg.run.out_dir == "1e5" and cfg.data.path == "007"
    assert main(_small_pretrain(Path("1e5"), "optim.max_steps=1")) == 0
    assert (tmp_path / "1e5" / "checkpoints" / "last.pt").is_file()
    # Numbers still read as numbers where a number is expected.
    assert load_config(None, ["data.source=synthetic", "optim.base_lr=1e-3"]).optim.base_lr == 1e-3
    assert math.isclose(
        load_config(None, ["data.source=synthetic", "cropmae.mask_ratio=0.9"]).cropmae.mask_ratio,
        0.9,
    )
