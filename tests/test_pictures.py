"""Pictures a researcher reads without the console: titles, row labels, frame numbers, legends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siamae.overlays import OverlayRecorder, save_labelled_grid


def _ink(region: np.ndarray) -> int:
    """Dark pixels (text, lines) in an RGB(A) region of a white-background picture."""
    return int((region[..., :3].min(axis=-1) < 100).sum())


def _left_margin(picture: np.ndarray) -> np.ndarray:
    """What lies left of the first image's frame (the first column mostly dark)."""
    dark = picture[..., :3].min(axis=-1) < 100
    border = int(np.argmax(dark.mean(axis=0) > 0.5))
    return picture[:, : max(0, border - 2)]


def _top_margin(picture: np.ndarray) -> np.ndarray:
    """What lies above the first image's frame (the first row mostly dark)."""
    dark = picture[..., :3].min(axis=-1) < 100
    border = int(np.argmax(dark.mean(axis=1) > 0.5))
    return picture[: max(0, border - 2)]


def _grid(tmp_path: Path, name: str, **labels) -> np.ndarray:
    rows = [[np.full((32, 48, 3), 230, np.uint8)] * 3 for _ in range(2)]
    row_labels = labels.pop("row_labels", ["", ""])
    path = save_labelled_grid(tmp_path / name, rows, row_labels, height=32, **labels)
    return np.asarray(Image.open(path))


def test_labelled_grid_draws_title_row_and_column_labels(tmp_path: Path) -> None:
    bare = _grid(tmp_path, "bare.png")
    labelled = _grid(
        tmp_path,
        "labelled.png",
        row_labels=["ground truth", "trained\nJ&F 0.512"],
        column_labels=["frame 0", "frame 5", "frame 9"],
        title="Label propagation",
    )
    # The margins left of and above the images hold text only when there are labels.
    assert _ink(_left_margin(bare)) == 0 and _ink(_top_margin(bare)) == 0
    assert _ink(_left_margin(labelled)) > 50  # row labels
    assert _ink(_top_margin(labelled)) > 50  # title and frame numbers
    with pytest.raises(ValueError, match="row labels"):
        save_labelled_grid(tmp_path / "x.png", [[bare[:8, :8, :3]]], ["a", "b"])


def test_labelled_grid_draws_a_legend_of_colours_below_the_images(tmp_path: Path) -> None:
    bare = _grid(tmp_path, "bare.png")
    colour = (12, 200, 90)  # in no image of the grid
    with_legend = _grid(tmp_path, "legend.png", legend=[("grass", colour), ("sky", (0, 0, 250))])
    assert with_legend.shape[0] > bare.shape[0]  # a band below the images
    swatch = (with_legend[..., :3] == colour).all(axis=-1)
    assert swatch.sum() > 20 and not (bare[..., :3] == colour).all(axis=-1).any()
    below = int(np.argwhere(swatch)[:, 0].min())
    assert below > bare.shape[0] * 0.6  # the legend lies under the rows


def test_overlay_png_has_frame_numbers_and_gif_frames_are_captioned(tmp_path: Path) -> None:
    frame = np.full((40, 60, 3), 200, np.uint8)
    ids = np.zeros((40, 60), np.uint8)
    ids[10:30, 20:40] = 1
    png = OverlayRecorder(10, "png", count=3, height=40)
    for t in range(10):
        png.add(t, frame, ids)
    assert png.frame_ids == [0, 4, 9]  # evenly spaced, first and last included: the labels
    path = png.save(tmp_path / "dog", title="dog: propagated masks (J&F 0.700)")
    picture = np.asarray(Image.open(path))
    assert _ink(_top_margin(picture)) > 50 and _ink(_left_margin(picture)) > 20
    gif = OverlayRecorder(3, "gif", height=40)
    for t in range(3):
        gif.add(t, frame, ids)
    assert _ink(gif.frames[0][:14, :50]) > 10  # "frame 0" written in the corner
    assert not np.array_equal(gif.frames[0], gif.frames[1])  # each frame its own number
    assert gif.save(tmp_path / "dog").suffix == ".gif"


def test_overlay_shows_a_ground_truth_row_above_the_predictions(tmp_path: Path) -> None:
    frame = np.full((40, 60, 3), 200, np.uint8)
    truth, pred = np.zeros((40, 60), np.uint8), np.zeros((40, 60), np.uint8)
    truth[5:35, 5:30] = 1
    pred[10:30, 30:55] = 1
    pictures = {}
    for kind in ("with", "without"):
        png = OverlayRecorder(4, "png", count=2, height=40)
        for t in range(4):
            png.add(t, frame, pred, truth if kind == "with" else None)
        pictures[kind] = np.asarray(Image.open(png.save(tmp_path / kind, title="dog")))
    assert [t is not None for t in png.truths] == [False, False]
    # one image row more, the truth's tint where the truth is (left) and not the prediction's
    assert pictures["with"].shape[0] > pictures["without"].shape[0] + 30
    assert png.frame_ids == [0, 3]
    gif = OverlayRecorder(2, "gif", height=40)
    gif.add(0, frame, pred, truth)
    assert gif.frames[0].shape[1] == 2 * 60 + 4  # ground truth | prediction, side by side
    tinted = gif.frames[0][20, 10].astype(int)  # inside the truth, outside the prediction
    assert tinted[0] > tinted[1] + 40  # the DAVIS red of object 1


def test_synthetic_propagation_picture_shows_every_video_with_scores(
    tmp_path: Path, one_thread: None
) -> None:
    from siamae.eval.propagation.synthetic_videos import evaluate_synthetic
    from siamae.loading import random_encoder

    encoders = {
        "trained": random_encoder("vit_tiny_patch8_32", seed=0),
        "random init": random_encoder("vit_tiny_patch8_32", seed=1),
    }
    res = evaluate_synthetic(encoders, tmp_path, videos=2, size=32, num_frames=4)
    labels = res["picture"]["row_labels"]
    assert len(labels) == 2 * 3  # every video: ground truth, trained, random init
    assert labels[0] == "video 1, ground truth" and labels[3] == "video 2, ground truth"
    assert labels[1].startswith("trained, J&F 0.") or labels[1] == "trained, J&F 1.000"
    assert labels[5].startswith("random init, J&F ")
    picture = np.asarray(Image.open(res["picture"]["path"]))
    assert _ink(_top_margin(picture)) > 50 and _ink(_left_margin(picture)) > 50


def _small_run(run: Path, method: str = "cropmae") -> dict:
    from siamae.engine.trainer import train
    from siamae.recipes import load_config

    cfg = load_config(
        None,
        [f"method={method}", "model.arch=vit_tiny", "model.patch_size=8", "model.img_size=32",
         "decoder.dim=32", "decoder.depth=1", "decoder.num_heads=2", "decoder.mlp_dim=64",
         "data.source=synthetic", "data.synthetic_count=8", "data.synthetic_size=48",
         "data.batch_size=4", "data.num_workers=0", "optim.max_steps=3", "optim.warmup_steps=1",
         "run.log_every=1", "run.progress=false", "run.tensorboard=false", "run.visualize=false",
         f"run.out_dir={run}"],
    )  # fmt: skip
    return train(cfg, resume=False)


@pytest.fixture
def one_thread():
    """One torch thread: two OpenMP threads crawl when other jobs share the 2 cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_reconstruction_draws_the_methods_picture_with_name_and_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    import torch

    from siamae.checkpoint import load_checkpoint
    from siamae.commands.viz import visualize_checkpoint
    from siamae.data.dataset import build_dataset
    from siamae.engine.pictures import save_loss_curve, save_reconstruction
    from siamae.recipes import config_from_dict
    from siamae.registry import build_method

    run = tmp_path / "run"
    summary = _small_run(run)
    ckpt = load_checkpoint(summary["checkpoint"])
    cfg = config_from_dict(ckpt["config"])
    method = build_method(cfg)
    method.load_state_dict(ckpt["model"])
    dataset = build_dataset(cfg, method.view_kind, method.encoder.num_patches)
    seen: dict[str, object] = {}

    def picture(batch):  # noqa: ANN001, ANN202 - two columns of the method's own choosing
        seen["batch"] = batch
        images = batch["images"][:, 0]
        return [("left", torch.zeros_like(images)), ("right", torch.ones_like(images))]

    monkeypatch.setattr(method, "picture", picture)
    path = save_reconstruction(method, dataset, tmp_path / "custom.png", count=2, step=7)
    assert path is not None and seen["batch"]["images"].shape[0] == 2
    drawn = np.asarray(Image.open(path))[..., :3]
    # two columns: black on the left half, white on the right, titled above
    middle = drawn.shape[0] // 2
    row = drawn[middle, :, 0]
    assert (row[: len(row) // 2] < 20).sum() > 50 and (row[len(row) // 2 :] > 235).sum() > 50
    assert _ink(_top_margin(drawn)) > 50
    monkeypatch.setattr(method, "picture", lambda batch: None)  # a method without a picture
    assert save_reconstruction(method, dataset, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()

    # The default picture from the checkpoint: four columns, step in the name and the title.
    out = visualize_checkpoint(run, count=2)
    assert out.name == f"reconstruction_step{ckpt['step']}.png" and out.is_file()

    curve = np.asarray(Image.open(save_loss_curve(run, tmp_path / "loss.png")))[..., :3]
    # the legend: a box of both line colours (blue loss, orange lr) inside the axes
    blue = (curve[..., 2] > 150) & (curve[..., 0] < 80)
    orange = (curve[..., 0] > 200) & (curve[..., 1] > 100) & (curve[..., 2] < 80)
    assert blue.sum() > 20 and orange.sum() > 20


def test_the_reconstruction_picture_titles_its_last_column_for_what_it_is() -> None:
    """The batch holds the views only: the last column is the target view before masking (a
    crop or a frame), not the original image, and is titled so."""
    from types import SimpleNamespace

    from siamae.methods.base import Reconstruction, reconstruction_picture

    views = [torch.full((2, 3, 8, 8), float(k)) for k in range(4)]
    stub = SimpleNamespace(reconstruct=lambda batch: Reconstruction(*views))
    columns = reconstruction_picture(stub, {})  # type: ignore[arg-type]
    titles = [title for title, _ in columns]
    assert titles == ["reference view", "masked view", "prediction", "target view (unmasked)"]
    assert "original" not in " ".join(titles)
