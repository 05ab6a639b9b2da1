"""siamae.evaluators: the evaluators on a user's model give what the commands give on the same
weights and features; bad input is refused in one message before anything is written."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from scipy.io import savemat

import siamae.evaluators as evaluators
from siamae.checkpoint import load_checkpoint
from siamae.commands.cli import main
from siamae.data.synthetic import synthetic_video
from siamae.errors import DataError, SiamaeError
from siamae.evaluators import (
    ProbeFeatures,
    fewshot_probe,
    knn_probe,
    linear_probe,
    probe_features,
    propagate_davis,
    propagate_jhmdb,
    propagate_vip,
    score_segmentation,
    synthetic_davis,
    timm_patch_features,
)
from siamae.loading import random_encoder

RESIZE = {"resize": "64x96"}  # 4x6 patches of 16: not the trained 4x4 grid, so it is resampled


def tiny_vit(**kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2, num_classes=0, **kw
    ).eval()


@pytest.fixture(scope="module")
def davis_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_davis(tmp_path_factory.mktemp("davis") / "DAVIS", videos=2, frames=4)


def _pngs(folder: Path) -> dict[str, np.ndarray]:
    return {
        str(p.relative_to(folder)): np.asarray(Image.open(p))
        for p in sorted(folder.glob("synthetic*/*.png"))
    }


# -- propagation ----------------------------------------------------------------------------------


def test_a_timm_model_propagates_as_siamae_eval_davis_reads_its_weights(
    tmp_path: Path, davis_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_vit()
    weights = tmp_path / "vit.safetensors"
    save_file(model.state_dict(), weights)
    cli_out, py_out = tmp_path / "cli", tmp_path / "py"
    rc = main(["eval", "davis", "--checkpoint", str(weights), "--data-root", str(davis_root),
               "--set", "resize=64x96", "--out", str(cli_out), "--no-progress"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    summary = propagate_davis(model, davis_root, py_out, overrides=RESIZE, progress=False)
    cli = json.loads((cli_out / "summary.json").read_text())
    assert json.loads((py_out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert list(summary) == list(cli)  # the same dict, field for field
    for key in ("J&F-Mean", "J-Mean", "F-Mean", "J-Recall", "F-Decay", "objects", "sequences"):
        assert summary[key] == cli[key], key
    assert summary["params"] == cli["params"]
    assert "timm vit_tiny_patch16_224, patch 16, 1 prefix token(s)" in summary["encoder"]
    cli_pngs, py_pngs = _pngs(cli_out), _pngs(py_out)
    assert len(cli_pngs) == 8 and cli_pngs.keys() == py_pngs.keys()
    assert all(np.array_equal(cli_pngs[k], py_pngs[k]) for k in cli_pngs)
    assert (py_out / "per_sequence.csv").read_text() == (cli_out / "per_sequence.csv").read_text()


def test_timm_patch_features_are_timms_own_tokens() -> None:
    # Registers and positions for the patches only (DINOv2-style): at the trained size the map
    # is forward_features' patch tokens; at another, "timm" is what dynamic_img_size computes.
    model = tiny_vit(reg_tokens=4, no_embed_class=True)
    features = timm_patch_features(model, pos_resample="timm")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.forward_features(x)[:, 5:]
        assert torch.equal(features(x), tokens.transpose(1, 2).reshape(2, 192, 4, 4))
        dynamic = timm.create_model(
            "vit_tiny_patch16_224", img_size=64, depth=2, num_classes=0, reg_tokens=4,
            no_embed_class=True, dynamic_img_size=True,
        ).eval()  # fmt: skip
        dynamic.load_state_dict(model.state_dict())
        y = torch.randn(1, 3, 48, 96)
        expected = dynamic.forward_features(y)[:, 5:].transpose(1, 2).reshape(1, 192, 3, 6)
        torch.testing.assert_close(features(y), expected)
    with pytest.raises(SiamaeError, match="not a multiple of the patch size 16"):
        features(torch.zeros(1, 3, 40, 64))
    with pytest.raises(SiamaeError, match="VisionTransformer"):
        timm_patch_features(torch.nn.Conv2d(3, 4, 1))  # type: ignore[arg-type]


def test_any_callable_its_patch_size_inferred_its_mode_restored(
    tmp_path: Path, davis_root: Path
) -> None:
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 8, stride=8), torch.nn.BatchNorm2d(16))
    network.train()
    summary = propagate_davis(
        network, davis_root, tmp_path / "o", sequences="synthetic1", overrides=RESIZE,
        max_frames=3, progress=False,
    )  # fmt: skip
    assert summary["sequences"] == ["synthetic1"] and summary["max_frames"] == 3
    assert "a feature function (Sequential), patch 8" in summary["encoder"]
    assert network.training  # run in eval mode (BatchNorm's running statistics), then restored
    assert summary["timing"]["frames"] == 3


def test_bad_input_is_refused_before_anything_is_written(tmp_path: Path, davis_root: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(DataError, match="sequence 'nope'"):
        propagate_davis(tiny_vit(), davis_root, out, sequences=["nope"], progress=False)
    with pytest.raises(SiamaeError, match=r"returned shape \(2, 7\) .*expected \(B, D, H/p, W/p\)"):
        propagate_davis(lambda x: x.mean(dim=(2, 3))[:, :1].repeat(1, 7), davis_root, out,
                        patch_size=16, progress=False)  # fmt: skip
    with pytest.raises(SiamaeError, match="cannot infer the patch size"):
        propagate_davis(lambda x: x[:, :, :5, :5], davis_root, out, progress=False)
    with pytest.raises(SiamaeError, match=r"failed on a \(2, 3, 224, 448\) batch \(RuntimeError"):
        propagate_davis(lambda x: torch.zeros(0).view(3), davis_root, out, progress=False)
    with pytest.raises(SiamaeError, match="resize '60x96' of the protocol"):
        propagate_davis(tiny_vit(), davis_root, out, overrides={"resize": "60x96"}, progress=False)
    with pytest.raises(SiamaeError, match="unknown propagation option 'top_k'"):
        propagate_davis(tiny_vit(), davis_root, out, overrides={"top_k": 3}, progress=False)
    assert not out.exists()


def _jhmdb_and_vip(root: Path) -> tuple[Path, Path]:
    jhmdb, vip = root / "JHMDB", root / "VIP"
    frames, masks = synthetic_video(0, size=48, num_frames=4, seed=2, width=64)
    clip, video = "walk/clip_a", vip / "VIP_Fine"
    (jhmdb / "Rename_Images" / clip).mkdir(parents=True)
    (jhmdb / "joint_positions" / clip).mkdir(parents=True)
    (video / "Images" / "v1").mkdir(parents=True)
    (video / "Annotations" / "Category_ids" / "v1").mkdir(parents=True)
    for i, (f, m) in enumerate(zip(frames, masks)):
        Image.fromarray(f).save(jhmdb / "Rename_Images" / clip / f"{i + 1:05d}.png")
        Image.fromarray(f).save(video / "Images" / "v1" / f"{i:012d}.jpg")
        Image.fromarray(m * 7).save(video / "Annotations" / "Category_ids" / "v1" / f"{i:012d}.png")
    pos = np.stack([np.linspace(10, 50, 15), np.linspace(8, 40, 15)])[..., None].repeat(4, 2)
    savemat(jhmdb / "joint_positions" / clip / "joint_positions.mat", {"pos_img": pos})
    return jhmdb, vip


def test_jhmdb_and_vip_give_what_the_commands_give(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jhmdb, vip = _jhmdb_and_vip(tmp_path)
    model = tiny_vit()
    weights = tmp_path / "vit.pth"
    torch.save(model.state_dict(), weights)
    for benchmark, root, resize, evaluate in (
        ("jhmdb", jhmdb, "64x64", propagate_jhmdb),
        ("vip", vip, "long:128", propagate_vip),
    ):
        rc = main(["eval", benchmark, "--checkpoint", str(weights), "--data-root", str(root),
                   "--set", f"resize={resize}", "--out", str(tmp_path / f"cli-{benchmark}"),
                   "--no-progress"])  # fmt: skip
        assert rc == 0, capsys.readouterr().err
        cli = json.loads((tmp_path / f"cli-{benchmark}" / "summary.json").read_text())
        out = tmp_path / f"py-{benchmark}"
        summary = evaluate(model, root, out, overrides={"resize": resize}, progress=False)
        assert list(summary) == list(cli)
        figures = [k for k in cli if k not in ("encoder", "timing")]
        assert {k: summary[k] for k in figures} == {k: cli[k] for k in figures}, benchmark
    assert "PCK@0.1" in figures or "mIoU" in figures


# -- probes -------------------------------------------------------------------------------------

COLOURS = {"blue": (30, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}


def _folder(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            noise = rng.integers(-60, 61, size=(32, 40, 3))
            pixels = np.clip(np.array(rgb)[None, None] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_probes_give_the_commands_figures_on_the_same_features(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train, val = _folder(tmp_path / "train", 4, seed=0), _folder(tmp_path / "val", 2, seed=1)
    common = ["--random-init", "vit_tiny_patch16_32", "--train", str(train), "--val", str(val),
              "--crop-pct", "1", "--num-workers", "0", "--no-progress"]  # fmt: skip
    knn_file, out_dir = tmp_path / "knn.json", tmp_path / "probes"
    assert main(["eval", "knn", *common, "--k", "1", "3", "--out", str(knn_file)]) == 0
    assert main(["eval", "linear", *common, "--pool", "mean", "--epochs", "3",
                 "--out-dir", str(out_dir)]) == 0  # fmt: skip
    assert main(["eval", "fewshot", *common, "--per-class", "2", "--out-dir", str(out_dir)]) == 0
    capsys.readouterr()

    # k-NN through a feature function over the folders: the CLS token of the same encoder.
    encoder = random_encoder("vit_tiny_patch16_32", seed=0)
    data = probe_features(lambda x: encoder(x)[:, 0], train, val, img_size=32, crop_pct=1.0,
                          progress=False)  # fmt: skip
    knn = knn_probe(data, ks=[1, 3])
    cli_knn = json.loads(knn_file.read_text())
    for key in ("top1", "top5", "num_train", "num_test", "num_classes", "temperature"):
        assert knn[key] == cli_knn[key], key

    # Linear and few-shot on the very features the commands cached (mean-pooled).
    labels = data.train_labels, data.val_labels  # the folders' order, as the commands read them
    cached = [
        load_checkpoint(out_dir / "features" / f"{n}.pt")["features"] for n in ("train", "val")
    ]
    given = ProbeFeatures(cached[0], labels[0], cached[1], labels[1])
    linear = linear_probe(given, epochs=3)
    cli_linear = json.loads((out_dir / "results.json").read_text())
    assert linear["top1"] == cli_linear["top1"] and linear["best_top1"] == cli_linear["best_top1"]
    assert [h["loss"] for h in linear["history"]] == [h["loss"] for h in cli_linear["history"]]
    # The recipe, but for how the command made its features (pool, image size, crop).
    made = ("pool", "img_size", "crop_pct")
    assert {k: v for k, v in linear["recipe"].items() if k not in made} == {
        k: v for k, v in cli_linear["recipe"].items() if k not in made
    }
    assert linear["features"] == "given feature tensors"
    fewshot = fewshot_probe(given, per_class=2)
    cli_fewshot = json.loads((out_dir / "fewshot.json").read_text())
    for key in ("top1", "num_labelled", "num_val", "num_classes", "lambd", "subset"):
        assert fewshot[key] == cli_fewshot[key], key


def test_probe_input_is_checked() -> None:
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(SiamaeError, match="train_labels: expected 6 integer labels"):
        ProbeFeatures(x, y[:5], x, y)
    with pytest.raises(SiamaeError, match="val_features: expected an \\(N, D\\) tensor"):
        ProbeFeatures(x, y, x[0], y)
    with pytest.raises(SiamaeError, match=r"labels must lie in \[0, 2\)"):
        ProbeFeatures(x, y, x, y, num_classes=2)
    with pytest.raises(SiamaeError, match="every k must be 1 or more"):
        knn_probe(ProbeFeatures(x, y, x, y), ks=[0])
    with pytest.raises(SiamaeError, match="subset"):
        fewshot_probe(ProbeFeatures(x, y, x, y), subset=[0, 9])


def test_a_feature_function_of_the_wrong_shape_is_named(tmp_path: Path) -> None:
    train, val = _folder(tmp_path / "train", 1, seed=0), _folder(tmp_path / "val", 1, seed=1)
    with pytest.raises(SiamaeError, match=r"returned \(3, 3, 32, 32\) .*expected \(B, D\)"):
        probe_features(lambda x: x, train, val, img_size=32, progress=False)


# -- segmentation scores ------------------------------------------------------------------------


def test_segmentation_scores_by_hand() -> None:
    truth = [np.array([[0, 0, 1], [1, 2, 255]]), np.array([[2, 2], [0, 255]])]
    pred = [np.array([[0, 1, 1], [1, 2, 0]]), np.array([[2, 0], [0, 1]])]
    scores = score_segmentation(pred, truth, 3, class_names=["sky", "road", "car"])
    # Labelled pixels (255 left out): 0 0 1 1 2 | 2 2 0 -> predicted 0 1 1 1 2 | 2 0 0.
    # TP: class 0: 2 of 3 labelled, 3 predicted; class 1: 2 of 2, 3 predicted; class 2: 2 of 3, 2.
    iou = [2 / (3 + 3 - 2), 2 / (2 + 3 - 2), 2 / (3 + 2 - 2)]
    acc = [2 / 3, 2 / 2, 2 / 3]
    assert scores["mIoU"] == pytest.approx(100 * np.mean(iou))
    assert scores["mAcc"] == pytest.approx(100 * np.mean(acc))
    assert scores["aAcc"] == pytest.approx(100 * 6 / 8)
    assert scores["num_images"] == 2 and scores["num_classes"] == 3
    assert [c["class"] for c in scores["per_class"]] == ["sky", "road", "car"]
    assert scores["per_class"][1]["IoU"] == pytest.approx(100 * 2 / 3)
    assert scores["format"] == "siamae-segmentation-v1"
    with pytest.raises(SiamaeError, match="differ in shape"):
        score_segmentation([pred[0]], [truth[1]], 3)
    with pytest.raises(SiamaeError, match="outside 0..2"):
        score_segmentation([pred[0] + 1], [truth[0]], 3)


def test_every_docstring_example_runs() -> None:
    result = doctest.testmod(evaluators, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted >= 40
