"""k-NN and linear probes: known answers on toy features, and the commands on a tiny folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from siamae.checkpoint import load_checkpoint
from siamae.commands.cli import main
from siamae.data.image_folder import EvalTransform, ImageFolder
from siamae.errors import DataError
from siamae.eval.probes import features as features_module
from siamae.eval.probes.features import extract_features
from siamae.eval.probes.fewshot import fewshot_eval
from siamae.eval.probes.knn import knn_classify, knn_eval
from siamae.eval.probes.linear import LinearConfig, fit_probe, train_linear
from siamae.models.vit import Encoder
from siamae.optim import lr_at

COLOURS = {"blue": (30, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}


def write_folder(root: Path, per_class: int, seed: int, size: int = 32) -> Path:
    """root/<colour>/<i>.png: noisy images of one colour per class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            noise = rng.integers(-25, 26, size=(size, size + 8, 3))
            pixels = np.clip(np.array(rgb)[None, None] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("folders")
    return write_folder(base / "train", 6, seed=0), write_folder(base / "val", 3, seed=1)


# -- k-NN ---------------------------------------------------------------------------------------


def two_clusters(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    centres = torch.zeros(2, 16)
    centres[0, 0], centres[1, 1] = 5.0, 5.0
    return centres[labels] + 0.1 * torch.randn(n, 16, generator=gen), labels


def test_knn_two_separated_clusters_is_perfect(capsys: pytest.CaptureFixture[str]) -> None:
    train_x, train_y = two_clusters(60, seed=0)
    test_x, test_y = two_clusters(20, seed=1)
    result = knn_classify(train_x, train_y, test_x, test_y, ks=(10, 20, 100, 200))
    # k beyond the training set: one plain note (no UserWarning with torch's file and line)
    err = capsys.readouterr().err
    assert err.strip() == (
        "siamae: note: k=100, 200 is larger than the 60 training images; those rows use all "
        "60 (k=60)"
    )
    assert list(result.top1) == [10, 20, 100, 200]
    assert all(v == 100.0 for v in result.top1.values())
    assert all(v == 100.0 for v in result.top5.values())


def test_knn_votes_are_weighted_by_exp_sim_over_t() -> None:
    # Two class-0 neighbours at cosine 0.8 and one class-1 neighbour at cosine 0.99.
    q = torch.tensor([[1.0, 0.0, 0.0]])

    def at(cos: float, side: float) -> list[float]:
        return [cos, side * (1 - cos**2) ** 0.5, 0.0]

    train = torch.tensor([at(0.8, 1.0), at(0.8, -1.0), at(0.99, 1.0)])
    labels = torch.tensor([0, 0, 1])
    # T=0.07: 2 exp(0.8/0.07) < exp(0.99/0.07): the close neighbour wins.
    sharp = knn_classify(train, labels, q, torch.tensor([1]), ks=[3], temperature=0.07)
    assert sharp.top1[3] == 100.0
    # T=1: 2 exp(0.8) > exp(0.99): the majority wins.
    flat = knn_classify(train, labels, q, torch.tensor([1]), ks=[3], temperature=1.0)
    assert flat.top1[3] == 0.0
    assert flat.top5[3] == 100.0  # two classes: the true one is always in the top 5


def test_knn_top5_counts_ranks_below_first() -> None:
    train = torch.eye(6)
    labels = torch.arange(6)
    query = torch.tensor([[1.0, 0.9, 0.8, 0.7, 0.6, 0.0]])
    r = knn_classify(train, labels, query, torch.tensor([4]), ks=[6], num_classes=6)
    assert r.top1[6] == 0.0 and r.top5[6] == 100.0
    r = knn_classify(train, labels, query, torch.tensor([5]), ks=[6], num_classes=6)
    assert r.top5[6] == 0.0


# -- linear probe -------------------------------------------------------------------------------


def separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three linearly separable classes in 12-D: blobs around fixed centres, offset and scaled."""
    centres = torch.tensor([[4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0]]).repeat(1, 4)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    x = centres[labels] + torch.randn(n, 12, generator=gen)
    return 5.0 * x + 3.0, labels  # uncentred and badly scaled: the BatchNorm's job


@pytest.mark.parametrize(
    ("optimizer", "base_lr"), [("sgd", 0.1), ("lars", 0.1 * 16384 / 64)]
)  # LARS at MAE's lr (blr 0.1 x 16384/256): its steps are a 1e-3 fraction of the weights
def test_linear_probe_learns_a_separable_set(optimizer: str, base_lr: float) -> None:
    train_x, train_y = separable(400, seed=0)
    val_x, val_y = separable(200, seed=1)
    cfg = LinearConfig(
        epochs=30, batch_size=64, optimizer=optimizer, base_lr=base_lr, warmup_epochs=2
    )
    result = fit_probe(train_x, train_y, val_x, val_y, num_classes=3, cfg=cfg)
    assert result.top1 >= 97.0, result.history[-1]
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.head is not None and not result.head.norm.affine


def test_linear_schedule_warms_up_then_decays_to_min() -> None:
    assert lr_at(0, 1.0, 0.0, 10, 100) == 0.0
    assert lr_at(5, 1.0, 0.0, 10, 100) == pytest.approx(0.5)
    assert lr_at(10, 1.0, 0.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 0.0, 10, 100) == pytest.approx(0.5)
    assert lr_at(100, 1.0, 0.01, 10, 100) == pytest.approx(0.01)


def test_linear_probe_resume_is_exact(tmp_path: Path) -> None:
    train_x, train_y = separable(200, seed=0)
    val_x, val_y = separable(50, seed=1)
    cfg = LinearConfig(epochs=4, batch_size=32, warmup_epochs=1)
    whole = fit_probe(train_x, train_y, val_x, val_y, 3, cfg, out_dir=tmp_path / "a")
    fit_probe(train_x, train_y, val_x, val_y, 3, cfg, out_dir=tmp_path / "b", stop_after_epochs=2)
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["epoch"] == 2
    resumed = fit_probe(train_x, train_y, val_x, val_y, 3, cfg, out_dir=tmp_path / "b", resume=True)
    assert whole.head is not None and resumed.head is not None
    for (name, a), b in zip(whole.head.state_dict().items(), resumed.head.state_dict().values()):
        assert torch.equal(a, b), name
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    # A changed recipe cannot silently continue someone else's run.
    other = LinearConfig(epochs=4, batch_size=32, warmup_epochs=1, base_lr=0.2)
    with pytest.raises(Exception, match="base_lr"):
        fit_probe(train_x, train_y, val_x, val_y, 3, other, out_dir=tmp_path / "b", resume=True)


# -- features and the commands --------------------------------------------------------------------


def test_eval_transform_resizes_short_side_and_centre_crops() -> None:
    from PIL import Image

    image = Image.new("RGB", (80, 40), (10, 20, 30))
    out = EvalTransform(32, 0.875)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    assert EvalTransform(224).resize == 256


def test_features_cls_and_mean_pool(folders: tuple[Path, Path]) -> None:
    torch.manual_seed(0)
    encoder = Encoder("vit_tiny", 16, 32, depth=2)
    data = ImageFolder(folders[1], EvalTransform(32, 1.0))
    assert data.classes == sorted(COLOURS) and len(data) == 9
    encoder.train()
    cls = extract_features(encoder, data, pool="cls", batch_size=4, progress=False)
    mean = extract_features(encoder, data, pool="mean", batch_size=4, progress=False)
    assert encoder.training  # mode restored
    images = torch.stack([data[i][0] for i in range(len(data))])
    from siamae.data.image_folder import normalize

    with torch.no_grad():
        tokens = encoder.eval()(normalize(images, "cpu"))
    torch.testing.assert_close(cls, tokens[:, 0])
    torch.testing.assert_close(mean, tokens[:, 1:].mean(1))


def test_one_feature_cache_serves_the_knn_linear_and_fewshot_probes(
    folders: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    encoder = Encoder("vit_tiny", 8, 32, depth=2).eval()
    weights = tmp_path / "encoder.pt"
    torch.save(encoder.vit.state_dict(), weights)
    out = tmp_path / "probe"
    shared = dict(crop_pct=1.0, source=str(weights), progress=False)
    knn = knn_eval(encoder, *folders, ks=(1,), cache_dir=out / "features", **shared)  # type: ignore[arg-type]
    assert sorted(p.name for p in (out / "features").iterdir()) == ["train.pt", "val.pt"]

    computed: list[str] = []

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        computed.append(kwargs["desc"])
        return extract_features(*args, **kwargs)

    monkeypatch.setattr(features_module, "extract_features", counting)
    # The linear probe and the few-shot subset read the k-NN's features: nothing is encoded.
    cfg = LinearConfig(epochs=1, batch_size=8, warmup_epochs=0, crop_pct=1.0)
    train_linear(encoder, *folders, out_dir=out, cfg=cfg, source=str(weights), progress=False)
    few = fewshot_eval(encoder, *folders, per_class=2, pool="cls", out_dir=out, **shared)  # type: ignore[arg-type]
    again = knn_eval(encoder, *folders, ks=(1,), cache_dir=out / "features", **shared)  # type: ignore[arg-type]
    assert computed == [] and again.top1 == knn.top1 and few.num_labelled == 6
    # Another pooling is another key: computed, and the file replaced.
    knn_eval(encoder, *folders, ks=(1,), pool="mean", cache_dir=out / "features", **shared)  # type: ignore[arg-type]
    assert computed == ["train features", "val features"]
    assert load_checkpoint(out / "features" / "val.pt")["key"]["pool"] == "mean"
    # Other weights in the same file are another key too (its size and time are in it).
    torch.save(Encoder("vit_tiny", 8, 32, depth=1).vit.state_dict(), weights)
    knn_eval(encoder, *folders, ks=(1,), pool="mean", cache_dir=out / "features", **shared)  # type: ignore[arg-type]
    assert len(computed) == 4


def test_image_folder_errors_name_the_problem(tmp_path: Path, folders: tuple[Path, Path]) -> None:
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "nope", EvalTransform(32))
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        ImageFolder(tmp_path / "empty", EvalTransform(32))
    with pytest.raises(DataError, match="classes the training folder lacks"):
        ImageFolder(folders[1], EvalTransform(32), classes=["red"])


def test_knn_command(folders: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "knn.json"
    code = main(
        ["eval", "knn", "--random-init", "vit_tiny_patch16_32", "--train", str(folders[0]),
         "--val", str(folders[1]), "--k", "1", "5", "--crop-pct", "1.0", "--num-workers", "0",
         "--no-progress", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "weighted cosine, T=0.07" in printed and "top-1" in printed
    result = json.loads(out.read_text())
    assert result["num_train"] == 18 and result["num_test"] == 9 and result["num_classes"] == 3
    assert set(result["top1"]) == {"1", "5"}
    # Solid colours are far apart even for a random ViT.
    assert result["top1"]["1"] == 100.0


def with_unreadable_val(folders: tuple[Path, Path], root: Path) -> tuple[Path, Path]:
    """A copy of ``folders`` whose val folder has a zero-byte image and a text file named .jpg."""
    import shutil

    train, val = (
        shutil.copytree(folders[0], root / "train"),
        shutil.copytree(folders[1], root / "val"),
    )
    (val / "red" / "empty.png").write_bytes(b"")
    (val / "blue" / "notes.jpg").write_text("not an image")
    return train, val


@pytest.mark.parametrize("command", ["knn", "linear"])
def test_unreadable_validation_images_are_skipped_counted_and_named(
    command: str, folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train, val = with_unreadable_val(folders, tmp_path / "data")
    argv = ["eval", command, "--random-init", "vit_tiny_patch16_32", "--train", str(train)]
    argv += ["--val", str(val), "--crop-pct", "1.0", "--num-workers", "1", "--no-progress"]
    if command == "knn":
        argv += ["--k", "1", "--out", str(tmp_path / "knn.json")]
    else:
        argv += ["--out-dir", str(tmp_path / "lin"), "--epochs", "1", "--batch-size", "18"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if "unreadable" in line]
    assert len(notes) == 1 and "Traceback" not in captured.err, captured.err
    assert "skipped 2 unreadable file(s), evaluating the other 9" in notes[0]
    assert str(val / "blue" / "notes.jpg") in notes[0]
    if command == "knn":
        result = json.loads((tmp_path / "knn.json").read_text())
        assert result["num_test"] == 9 and result["val_skipped"] == 2
    else:
        result = json.loads((tmp_path / "lin" / "results.json").read_text())
        assert sorted(result["val_skipped"]) == sorted(
            [str(val / "blue" / "notes.jpg"), str(val / "red" / "empty.png")]
        )


def test_an_unreadable_training_image_in_a_worker_is_one_line(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    train = shutil.copytree(folders[0], tmp_path / "train")
    (train / "red" / "empty.png").write_bytes(b"")
    code = main(
        ["eval", "knn", "--random-init", "vit_tiny_patch16_32", "--train", str(train),
         "--val", str(folders[1]), "--num-workers", "1", "--no-progress"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("siamae: error: image ") and "empty.png" in err[0]


def test_knn_command_bad_folder_exits_2(tmp_path: Path, capsys) -> None:
    code = main(
        ["eval", "knn", "--random-init", "vit_tiny_patch16_32", "--train", str(tmp_path / "x"),
         "--val", str(tmp_path / "y"), "--no-progress"]
    )  # fmt: skip
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_knn_img_size_out_of_whole_patches_is_one_line(
    folders: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["eval", "knn", "--random-init", "vit_tiny_patch16_32", "--train", str(folders[0]),
         "--val", str(folders[1]), "--img-size", "36", "--num-workers", "0", "--no-progress"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "--img-size 36" in err[0] and "multiple of the patch size 16" in err[0]


def test_linear_command_checkpoints_and_resumes(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["eval", "linear", "--random-init", "vit_tiny_patch16_32", "--train", str(folders[0]),
            "--val", str(folders[1]), "--crop-pct", "1.0", "--num-workers", "0", "--no-progress",
            "--batch-size", "8", "--epochs", "3", "--warmup-epochs", "1"]  # fmt: skip
    assert main([*args, "--out-dir", str(tmp_path / "a")]) == 0
    # the settings that differ from the protocol's, as words, not a Python dict
    summary_line = capsys.readouterr().out.splitlines()[-2]
    assert "with batch_size 8, epochs 3, warmup_epochs 1 (" in summary_line, summary_line
    assert "{" not in summary_line
    ckpt = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["format"] == "siamae-linear-v1" and ckpt["epoch"] == 3
    assert (tmp_path / "a" / "features" / "train.pt").is_file()
    first = json.loads((tmp_path / "a" / "results.json").read_text())
    assert 0.0 <= first["top1"] <= 100.0 and first["recipe"]["optimizer"] == "sgd"
    # Again: resumes from the finished checkpoint, trains nothing, same answer.
    assert main([*args, "--out-dir", str(tmp_path / "a")]) == 0
    again = json.loads((tmp_path / "a" / "results.json").read_text())
    assert again["top1"] == first["top1"] and len(again["history"]) == 3
    # On-the-fly random crops instead of cached features, with LARS.
    assert (
        main(
            [
                *args,
                "--out-dir",
                str(tmp_path / "b"),
                "--no-cache-features",
                "--optimizer",
                "lars",
                "--epochs",
                "1",
            ]
        )  # fmt: skip
        == 0
    )
    assert not (tmp_path / "b" / "features" / "train.pt").exists()


# Figures of today's probe before it used timm's Lars and the engine's schedule (main at 973ab42,
# hand-written LARS and lr schedule), same data, recipe and seed. With weight decay 0 timm's trust
# ratio differs from the old one only by its 1e-8 in the denominator, so the curves agree to float
# rounding; 1e-4 relative leaves room for that over 48 steps and nothing for a changed step.
BEFORE = {
    "lars": (68.75, [1.290884, 1.32383, 1.5226, 1.398729, 1.390621, 1.239955]),
    "sgd": (96.25, [1.134042, 0.307847, 0.12059, 0.062634, 0.117384, 0.045811]),
}


@pytest.mark.parametrize("optimizer", sorted(BEFORE))
def test_the_probe_gives_the_figures_it_gave_before_timm_lars(optimizer: str) -> None:
    generator = torch.Generator().manual_seed(0)
    means = torch.randn(4, 24, generator=generator)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % 4
        return means[labels] + 1.5 * torch.randn(n, 24, generator=generator), labels

    train, train_labels = draw(120)
    val, val_labels = draw(80)
    cfg = LinearConfig(
        optimizer=optimizer,
        epochs=6,
        batch_size=16,
        warmup_epochs=2,
        base_lr=1.6 if optimizer == "sgd" else 40.0,
    )
    result = fit_probe(train, train_labels, val, val_labels, 4, cfg)
    top1, losses = BEFORE[optimizer]
    assert result.top1 == top1
    assert [h["loss"] for h in result.history] == pytest.approx(losses, rel=1e-4, abs=1e-6)
