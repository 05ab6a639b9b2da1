"""Few-shot evaluation: the subset draw, the list file, the logistic regression, the command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from siamae.commands.cli import main
from siamae.data.image_folder import EvalTransform, ImageFolder
from siamae.errors import DataError
from siamae.eval.probes.fewshot import (
    draw_subset,
    fewshot_eval,
    fit_logistic,
    predict,
    preprocess,
    read_subset,
)
from siamae.models.vit import Encoder

COLOURS = {"blue": (30, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from PIL import Image

    base = tmp_path_factory.mktemp("fewshot")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3)):
        for name, rgb in COLOURS.items():
            (base / split / name).mkdir(parents=True)
            for i in range(n):
                noise = rng.integers(-25, 26, size=(32, 32, 3))
                pixels = np.clip(np.array(rgb)[None, None] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(base / split / name / f"{name}_{i}.png")
    return base / "train", base / "val"


def test_subset_draw_is_reproducible_and_class_balanced() -> None:
    labels = np.repeat(np.arange(5), [20, 30, 25, 40, 13])
    a = draw_subset(labels, 13, seed=0)
    assert np.array_equal(a, draw_subset(labels, 13, seed=0))
    assert not np.array_equal(a, draw_subset(labels, 13, seed=1))
    assert np.bincount(labels[a]).tolist() == [13] * 5
    assert len(np.unique(a)) == len(a)  # without replacement
    # class 4 has exactly 13 images: all taken; a class's draw ignores the other classes
    assert np.array_equal(a[labels[a] == 4], np.flatnonzero(labels == 4))
    other = labels.copy()
    other[other == 1] = 0  # merge classes 0 and 1: class 2's draw is unchanged
    b = draw_subset(other, 13, seed=0)
    assert np.array_equal(b[other[b] == 2], a[labels[a] == 2])
    with pytest.raises(DataError, match="fewer than --per-class"):
        draw_subset(labels, 14)


def test_list_file_names_images_by_path_or_name(folders, tmp_path: Path) -> None:  # noqa: ANN001
    dataset = ImageFolder(folders[0], EvalTransform(32, 1.0))
    listing = tmp_path / "one_percent.txt"
    listing.write_text("# labelled\nblue/blue_0.png\nred_5.png\n\ngreen_2.png  extra\n")
    chosen = read_subset(listing, dataset)
    names = sorted(dataset.samples[i][0].name for i in chosen)
    assert names == ["blue_0.png", "green_2.png", "red_5.png"]
    listing.write_text("blue_0.png\nnot_there.png\n")
    with pytest.raises(DataError, match="not_there.png"):
        read_subset(listing, dataset)


def test_logistic_regression_separates_and_is_regularised() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=gen) * 3
    labels = torch.arange(60) % 3
    feats = centres[labels] + 0.3 * torch.randn(60, 16, generator=gen)
    weak = fit_logistic(feats, labels, 3, lambd=1e-4)
    strong = fit_logistic(feats, labels, 3, lambd=1.0)
    assert (predict(weak, feats) == labels).all()
    assert strong.norm() < weak.norm()
    # at the optimum the gradient of the objective vanishes: lambd W = -grad(mean CE)
    w = strong.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(preprocess(feats) @ w.T, labels).backward()
    assert torch.allclose(w.grad, -1.0 * strong, atol=1e-6)
    assert torch.equal(strong, fit_logistic(feats, labels, 3, lambd=1.0))  # deterministic


def test_fewshot_eval_and_command_share_the_feature_cache(folders, tmp_path: Path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    encoder = Encoder("vit_tiny", 8, 32).eval()
    out = tmp_path / "probe"
    result = fewshot_eval(encoder, *folders, per_class=2, crop_pct=1.0, out_dir=out, progress=False)
    assert result.num_labelled == 6 and result.num_val == 9 and result.num_classes == 3
    assert 0.0 <= result.top1 <= 100.0
    assert (out / "features" / "val.pt").is_file()
    saved = json.loads((out / "fewshot.json").read_text())
    assert saved["top1"] == result.top1 and saved["subset"] == "2 images a class, seed 0"

    # The command, with an encoder file: same numbers; the linear probe's cached features of
    # the whole training folder are sliced for the subset when present.
    torch.save(encoder.vit.state_dict(), tmp_path / "encoder.pt")
    common = ["--checkpoint", str(tmp_path / "encoder.pt"), "--train", str(folders[0])]
    common += ["--val", str(folders[1]), "--crop-pct", "1.0", "--out-dir", str(tmp_path / "cmd")]
    common += ["--device", "cpu", "--no-progress", "--num-workers", "0"]
    assert main(["eval", "fewshot", *common, "--per-class", "2"]) == 0
    first = json.loads((tmp_path / "cmd" / "fewshot.json").read_text())
    assert first["top1"] == result.top1
    assert main(["eval", "linear", *common, "--pool", "mean", "--epochs", "1"]) == 0
    assert (tmp_path / "cmd" / "features" / "train.pt").is_file()
    (tmp_path / "cmd" / "features" / "fewshot_train.pt").unlink()
    assert main(["eval", "fewshot", *common, "--per-class", "2"]) == 0
    assert not (tmp_path / "cmd" / "features" / "fewshot_train.pt").exists()
    assert json.loads((tmp_path / "cmd" / "fewshot.json").read_text())["top1"] == first["top1"]
