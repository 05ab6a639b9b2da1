"""The grid of linear heads (``siamae eval linear --grid``): its head at the preset's learning
rate is the single probe's run, its features are the single probe's, and the command lists every
head and names the best; its options' one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siamae.commands.cli import main
from siamae.data.image_folder import normalize
from siamae.errors import CheckpointError
from siamae.eval.probes.features import encode_features, grid_tokens
from siamae.eval.probes.grid import HeadSpec, fit_grid, grid_specs, select_features
from siamae.eval.probes.linear import LinearConfig, fit_probe
from siamae.loading import random_encoder


def grid_separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 5 x 8) features of three classes: separable in the last block's CLS slot (3), noise
    elsewhere, uncentred and badly scaled."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    slots = torch.randn(n, 5, 8, generator=gen)
    slots[:, 3, :3] += 4.0 * torch.eye(3)[labels]
    return 5.0 * slots.flatten(1) + 3.0, labels


@pytest.mark.parametrize(
    ("protocol", "epochs"), [("mae-sgd256", 4), ("mae", 3)]
)  # SGD at batch 256 and LARS at batch 16384 (an epoch is one step here)
def test_the_grid_head_at_the_presets_lr_is_the_single_probe(protocol: str, epochs: int) -> None:
    train_x, train_y = grid_separable(300, seed=0)
    val_x, val_y = grid_separable(90, seed=1)
    cfg = LinearConfig.for_protocol(protocol, epochs=epochs, batch_size=64, warmup_epochs=1)
    cfg.base_lr = cfg.base_lr if protocol != "mae" else 25.6  # LARS needs a large lr
    specs = grid_specs((cfg.base_lr / 10, cfg.base_lr, cfg.base_lr * 2), (1, 4), ("cls", "cls+avg"))
    grid = fit_grid(train_x, train_y, val_x, val_y, 3, specs, cfg)
    single = fit_probe(select_features(train_x, 1, "cls"), train_y,
                       select_features(val_x, 1, "cls"), val_y, 3, cfg)  # fmt: skip
    at_preset = specs.index(HeadSpec(cfg.base_lr, 1, "cls"))
    head = grid["grid_model"].probes[at_preset]
    assert single.head is not None
    for (name, a), b in zip(single.head.state_dict().items(), head.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), name
    assert grid["heads"][at_preset]["top1"] == single.top1
    assert len(grid["heads"]) == 12 and grid["best_head"]["top1"] == max(
        h["top1"] for h in grid["heads"]
    )
    # the heads differ: another lr trains another head
    other = grid["grid_model"].probes[specs.index(HeadSpec(cfg.base_lr / 10, 1, "cls"))]
    assert not torch.allclose(other.fc.weight, head.fc.weight)


def test_a_checkpoint_of_the_per_head_layout_is_refused_on_resume(tmp_path: Path) -> None:
    train_x, train_y = grid_separable(60, seed=0)
    cfg = LinearConfig.for_protocol("mae-sgd256", epochs=1, batch_size=32, warmup_epochs=0)
    specs = grid_specs((0.1, 0.2), (1,), ("cls",))
    fit_grid(train_x, train_y, train_x, train_y, 3, specs, cfg, out_dir=tmp_path)
    ckpt = tmp_path / "checkpoints" / "last.pt"
    state = torch.load(ckpt, weights_only=False)
    assert state["config"]["grid_layout"] == "stacked"
    del state["config"]["grid_layout"]  # as the per-head grid wrote them
    torch.save(state, ckpt)
    with pytest.raises(CheckpointError, match="grid_layout"):
        fit_grid(train_x, train_y, train_x, train_y, 3, specs, cfg, out_dir=tmp_path, resume=True)


def test_grid_features_are_the_single_probes(tmp_path: Path) -> None:
    encoder = random_encoder("vit_tiny_patch16_32").eval()
    images = normalize(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8), "cpu")
    with torch.no_grad():
        slots = grid_tokens(encoder, images)
        assert slots.shape == (3, 5, encoder.embed_dim)
        assert torch.allclose(slots[:, 3], encode_features(encoder, images, "cls"), atol=1e-6)
        assert torch.allclose(slots[:, 4], encode_features(encoder, images, "mean"), atol=1e-6)
        flat = slots.flatten(1)
        assert torch.equal(select_features(flat, 4, "cls+avg"), flat)
        assert torch.equal(select_features(flat, 1, "cls+avg"), slots[:, 3:].flatten(1))


def _folder(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for name, rgb in {"blue": (30, 40, 220), "red": (220, 30, 30)}.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            noise = rng.integers(-25, 26, size=(32, 32, 3))
            pixels = np.clip(np.array(rgb)[None, None] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("grid")
    return _folder(base / "train", 6, seed=0), _folder(base / "val", 3, seed=1)


def _line(folders: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    line = ["eval", "linear", "--random-init", "vit_tiny_patch16_32", "--train", str(folders[0])]
    line += ["--val", str(folders[1]), "--crop-pct", "1.0", "--num-workers", "0"]
    return line + [
        "--no-progress",
        "--batch-size",
        "4",
        "--epochs",
        "2",
        "--out-dir",
        str(out),
        *extra,
    ]


def test_the_grid_command_lists_every_head_and_names_the_best(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "grid"
    assert main(_line(folders, out, "--grid", "--grid-lrs", "0.1", "1.0")) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "8 heads: best " in printed[-2], printed
    result = json.loads((out / "results.json").read_text())
    assert len(result["heads"]) == 8 and {h["blocks"] for h in result["heads"]} == {1, 4}
    assert result["best_head"]["top1"] == max(h["top1"] for h in result["heads"])
    assert result["top1"] == result["best_head"]["top1"] and result["protocol"] == "mae-sgd256"
    assert (out / "features" / "train_grid.pt").is_file()
    # run again: resumes from the finished checkpoint, the same figures
    assert main(_line(folders, out, "--grid", "--grid-lrs", "0.1", "1.0")) == 0
    assert json.loads((out / "results.json").read_text())["heads"] == result["heads"]


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--grid-lrs", "0.1"], "--grid-lrs sets the grid of heads; add --grid"),
        (["--grid", "--no-cache-features"], "drop --no-cache-features"),
        (["--grid", "--protocol", "siameseim"], "not --pool mean-ln"),
        (["--grid", "--grid-lrs", "0"], "--grid-lrs"),
        (["--grid", "--grid-blocks", "2"], "--grid-blocks"),
    ],
)
def test_bad_grid_options_are_one_line_and_exit_2(
    folders: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    words: str,
) -> None:
    out = tmp_path / "o"
    try:
        code = main(_line(folders, out, *extra))
    except SystemExit as stop:  # argparse's own check of a value's type or choice
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not out.exists()
