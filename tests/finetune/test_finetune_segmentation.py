"""Semantic segmentation: the three readers on fixtures in their official formats, the scores
against a hand-computed confusion matrix, the neck's strides, layer decay, the linear probe,
a tiny UperNet fine-tune on the engine (overfits, resumes bit-identically, DDP == one process),
the predicted PNGs in the data set's label space, the export and the command line."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from ddp_helpers import train_in_processes
from siamae.commands.cli import main
from siamae.data.segmentation import (
    IGNORE_INDEX,
    SegmentationViews,
    detect_layout,
    open_segmentation,
    photometric_distortion,
)
from siamae.data.sources import UnreadableSample
from siamae.engine.logging import read_metrics
from siamae.engine.trainer import train
from siamae.errors import DataError
from siamae.eval.segmentation.probe import ProbeConfig, train_linear_probe
from siamae.finetune.segmentation import SyncBatchNorm2d
from siamae.finetune.segmentation_checkpoints import (
    export_segmentation,
    load_segmentation_export,
    load_segmentation_model,
)
from siamae.loading import load_encoder, random_encoder
from siamae.models.upernet import UperNet, block_features, default_out_indices
from siamae.models.vit import Encoder
from siamae.optim import lr_at
from siamae.overlays import PALETTE
from siamae.recipes import load_config
from siamae.registry import build_method
from siamae.segmentation_scores import (
    InferenceConfig,
    confusion_matrix,
    evaluate_segmentation,
    predict,
    segmentation_scores,
    slide_logits,
)

# -- fixtures in the official formats ------------------------------------------------------------


def scene(rng: np.random.Generator, h: int = 40, w: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """A blue image with a red box (class 1) and a green box (class 2) on background (0)."""
    image = np.zeros((h, w, 3), np.uint8)
    image[:] = (40, 80, 170)
    label = np.zeros((h, w), np.uint8)
    for cls, colour in ((1, (220, 50, 40)), (2, (40, 200, 60))):
        y, x = int(rng.integers(0, h - 14)), int(rng.integers(0, w - 14))
        image[y : y + 14, x : x + 14] = colour
        label[y : y + 14, x : x + 14] = cls
    noise = rng.integers(-12, 13, size=image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8), label


def palette_png(label: np.ndarray, path: Path) -> None:
    img = Image.fromarray(label, "P")
    img.putpalette(PALETTE.ravel().tolist())
    img.save(path)


def write_voc(root: Path, counts: dict[str, int], seed: int = 0, classes: int | None = 3) -> Path:
    """VOC2012 layout: JPEGImages, palette PNGs with a 255 border, ImageSets/Segmentation."""
    rng = np.random.default_rng(seed)
    base = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for split, n in counts.items():
        names = [f"2007_{split}{i:03d}" for i in range(n)]
        for name in names:
            image, label = scene(rng)
            label[:2] = 255  # VOC's void border
            Image.fromarray(image).save(base / "JPEGImages" / f"{name}.jpg", quality=95)
            palette_png(label, base / "SegmentationClass" / f"{name}.png")
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    if classes is not None:
        (base / "class_names.txt").write_text("\n".join(["background", "red", "green"][:classes]))
    return base


def write_ade(root: Path, n: int = 3) -> Path:
    """ADEChallengeData2016: JPEG images, grey PNG annotations 0 (other) .. 150."""
    base = root / "ADEChallengeData2016"
    rng = np.random.default_rng(1)
    for split in ("training", "validation"):
        (base / "images" / split).mkdir(parents=True)
        (base / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            image, _ = scene(rng)
            label = np.zeros(image.shape[:2], np.uint8)
            label[:10] = 1
            label[10:20] = 150
            label[20:25] = 7  # rows 25.. stay 0: "other"
            stem = f"ADE_{split[:5]}_{i:08d}"
            Image.fromarray(image).save(base / "images" / split / f"{stem}.jpg")
            Image.fromarray(label, "L").save(base / "annotations" / split / f"{stem}.png")
    rows = ["Idx\tRatio\tTrain\tVal\tName"] + [
        f"{i}\t0.01\t10\t1\t{'wall' if i == 1 else f'thing{i}'};synonym" for i in range(1, 151)
    ]
    (base / "objectInfo150.txt").write_text("\n".join(rows) + "\n")
    return base


def write_plain(root: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(2)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        image, label = scene(rng)
        label[-1] = IGNORE_INDEX
        Image.fromarray(image).save(root / "images" / f"img{i}.png")
        Image.fromarray(label, "L").save(root / "masks" / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_voc(tmp_path_factory.mktemp("voc"), {"train": 8, "val": 3})


# -- scores ---------------------------------------------------------------------------------------


def test_scores_equal_a_hand_computed_confusion_matrix() -> None:
    # 4 classes: class 2 is predicted once but never labelled (IoU 0, no Acc), class 3 is
    # neither labelled nor predicted (left out of both means); column 3 is ignored pixels.
    label = torch.tensor([[0, 0, 1, 255], [1, 1, 0, 255]])
    pred = torch.tensor([[0, 1, 1, 2], [1, 2, 0, 3]])
    matrix = confusion_matrix(pred, label, 4)
    expected = torch.tensor([[2, 1, 0, 0], [0, 2, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert torch.equal(matrix, expected)
    scores = segmentation_scores(matrix, ["a", "b", "c", "d"])
    # IoU: a 2/(3+2-2), b 2/(3+3-2), c 0/(0+1-0); Acc: a 2/3, b 2/3; aAcc 4/6
    assert scores["mIoU"] == pytest.approx(100 * (2 / 3 + 1 / 2 + 0) / 3)
    assert scores["mAcc"] == pytest.approx(100 * 2 / 3)
    assert scores["aAcc"] == pytest.approx(100 * 4 / 6)
    table = {row["class"]: row for row in scores["per_class"]}
    assert table["c"]["IoU"] == 0.0 and table["c"]["Acc"] is None
    assert table["d"]["IoU"] is None and table["d"]["gt_pixels"] == 0
    assert table["b"]["pred_pixels"] == 3 and table["a"]["gt_pixels"] == 3


def test_scores_accumulate_over_the_set_not_per_image() -> None:
    # Image 1: class 1 all right on 1 pixel; image 2: class 1 wrong on 3 pixels. Per image the
    # IoUs would average to 0.5; over the set class 1 has IoU 1 / 4.
    first = confusion_matrix(torch.tensor([1, 0, 0, 0]), torch.tensor([1, 0, 0, 0]), 2)
    second = confusion_matrix(torch.tensor([0, 0, 0, 0]), torch.tensor([1, 1, 1, 0]), 2)
    table = segmentation_scores(first + second, ["bg", "fg"])["per_class"]
    assert table[1]["IoU"] == pytest.approx(25.0)


def test_slide_windows_cover_the_image_and_average_overlaps() -> None:
    calls = []

    def model(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape[-2:]))
        return x[:, :1].expand(-1, 2, -1, -1) * 0 + 1.0

    out = slide_logits(model, torch.zeros(1, 3, 40, 50), 2, crop=32, stride=21, multiple=8)
    assert out.shape == (1, 2, 40, 50) and torch.allclose(out, torch.ones_like(out))
    assert calls == [(32, 32)] * 4  # 2 rows x 2 columns, the last ones flush with the border


def test_multi_scale_flip_test_averages_softmax_at_the_image_size() -> None:
    # A per-pixel classifier (a 1x1 conv on colour) is scale- and flip-equivariant, so the
    # multi-scale flipped test must agree with the single-scale one away from edges.
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 1)
    image = np.zeros((40, 48, 3), np.uint8)
    image[:, :24] = (200, 30, 30)
    image[:, 24:] = (30, 30, 200)
    single = InferenceConfig(scale=(48, 40), mode="whole")
    multi = InferenceConfig(scale=(48, 40), mode="whole", ratios=(0.5, 1.0, 1.5), flip=True)
    with torch.no_grad():
        one = predict(conv, image, 3, single, torch.device("cpu"), 8)
        many = predict(conv, image, 3, multi, torch.device("cpu"), 8)
    assert one.shape == many.shape == (3, 40, 48)
    assert torch.allclose(many.sum(0), torch.ones(40, 48), atol=1e-5)  # a mean of softmaxes
    agree = (one.argmax(0) == many.argmax(0))[:, list(range(20)) + list(range(28, 48))]
    assert agree.all()


# -- readers ----------------------------------------------------------------------------------------


def test_ade20k_reduces_the_zero_label_and_reads_the_class_names(tmp_path: Path) -> None:
    write_ade(tmp_path)
    layout, base = detect_layout(tmp_path)
    assert layout == "ade20k" and base.name == "ADEChallengeData2016"
    train_set = open_segmentation(tmp_path, "train")
    assert train_set.split == "training" and len(train_set) == 3 and train_set.num_classes == 150
    assert train_set.class_names[0] == "wall" and train_set.class_names[149] == "thing150"
    image, label = train_set.read(0)
    assert image.shape == (40, 48, 3) and label.dtype == np.uint8
    assert (label[:10] == 0).all() and (label[10:20] == 149).all() and (label[20:25] == 6).all()
    assert (label[25:] == IGNORE_INDEX).all()  # "other" ignored
    back = train_set.to_dataset_labels(label, label)
    raw = np.asarray(Image.open(train_set.pairs[0].label))
    assert np.array_equal(back, raw)  # 1..150, 0 where ignored
    bad = np.zeros((40, 48), np.uint8)
    bad[0, 0] = 151
    Image.fromarray(bad, "L").save(train_set.pairs[1].label)
    with pytest.raises(UnreadableSample, match="151"):
        train_set.read(1)


def test_voc_reads_palette_indices_with_255_void_and_refuses_colour_masks(voc: Path) -> None:
    val = open_segmentation(voc.parents[1], "val")  # the folder holding VOCdevkit
    assert val.layout == "voc" and val.class_names == ["background", "red", "green"]
    _, label = val.read(0)
    raw = np.asarray(Image.open(val.pairs[0].label))
    assert Image.open(val.pairs[0].label).mode == "P"
    assert np.array_equal(label, raw) and (label[:2] == IGNORE_INDEX).all()
    assert set(np.unique(label)) == {0, 1, 2, 255}
    # 21 classes without class_names.txt; a listed but missing file is counted, not fatal
    plain_voc = write_voc(voc.parents[2] / "voc21", {"val": 2}, classes=None)
    listing = plain_voc / "ImageSets" / "Segmentation" / "val.txt"
    listing.write_text(listing.read_text() + "2007_missing\n")
    full = open_segmentation(plain_voc, "val")
    assert full.num_classes == 21 and len(full) == 2 and len(full.unpaired) == 1
    Image.open(full.pairs[0].label).convert("RGB").save(full.pairs[0].label)
    with pytest.raises(UnreadableSample, match="not a palette PNG"):
        full.read(0)


def test_plain_layout_needs_a_class_count_and_checks_every_file(tmp_path: Path) -> None:
    root = write_plain(tmp_path / "plain")
    with pytest.raises(DataError, match="--num-classes"):
        open_segmentation(root)
    (root / "images" / "lonely.png").write_bytes((root / "images" / "img0.png").read_bytes())
    data = open_segmentation(root, num_classes=3)
    assert data.layout == "plain" and len(data) == 3
    assert len(data.unpaired) == 1 and "lonely" in data.unpaired[0]
    _, label = data.read(0)
    assert (label[-1] == IGNORE_INDEX).all() and set(np.unique(label)) <= {0, 1, 2, 255}
    with pytest.raises(UnreadableSample, match="no class"):
        open_segmentation(root, num_classes=2).read(0)  # class 2 does not exist with 2 classes
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(data.pairs[1].label)
    with pytest.raises(UnreadableSample, match="mask is 8x8"):
        data.read(1)
    (data.pairs[2].image).write_bytes(b"not an image")
    with pytest.raises(UnreadableSample):
        data.read(2)
    with pytest.raises(DataError, match="no segmentation layout"):
        detect_layout(tmp_path)


def test_training_views_are_seeded_padded_and_keep_labels_aligned(voc: Path) -> None:
    data = open_segmentation(voc, "train")
    views = SegmentationViews(64, scale=(64, 32), ratio_range=(0.5, 2.0))
    one = views(data, 0, np.random.default_rng([0, 0, 0]))
    two = views(data, 0, np.random.default_rng([0, 0, 0]))
    assert np.array_equal(one.views[0], two.views[0])
    assert np.array_equal(one.extras["label"], two.extras["label"])
    image, label = one.views[0], one.extras["label"]
    assert image.shape == (64, 64, 3) and label.shape == (64, 64)
    # a 40x48 image resized into (64r, 32r) bounds never fills a 64 crop: padding is ignored
    assert (label == IGNORE_INDEX).any() and (image[label == IGNORE_INDEX] == 0).mean() > 0.5
    plain = SegmentationViews(
        64, scale=(48, 40), ratio_range=(1.0, 1.0), hflip=0.0, photometric=False
    )
    exact = plain(data, 0, np.random.default_rng(0))
    original, original_label = data.read(0)
    assert np.array_equal(exact.views[0][:40, :48], original)
    assert np.array_equal(exact.extras["label"][:40, :48], original_label)
    distorted = photometric_distortion(original, np.random.default_rng(3))
    assert distorted.shape == original.shape and distorted.dtype == np.uint8


def test_poly_schedule_warms_up_then_decays_linearly() -> None:
    assert lr_at(0, 1e-4, 0.0, 10, 100, "poly") == 0.0
    assert lr_at(5, 1e-4, 0.0, 10, 100, "poly") == pytest.approx(1e-4 * 0.95 * 0.5)
    assert lr_at(50, 1e-4, 0.0, 10, 100, "poly") == pytest.approx(0.5e-4)
    assert lr_at(100, 1e-4, 0.0, 10, 100, "poly") == 0.0


# -- the model --------------------------------------------------------------------------------------


def test_neck_strides_and_head_outputs() -> None:
    assert default_out_indices(12) == (3, 5, 7, 11)
    assert default_out_indices(24) == (7, 11, 15, 23)
    encoder = Encoder("vit_tiny", 16, 64, depth=4)
    features = block_features(encoder, torch.randn(2, 3, 64, 96), default_out_indices(4))
    assert [tuple(f.shape) for f in features] == [(2, 192, 4, 6)] * 4
    head = UperNet(192, 5, channels=16, aux_channels=8).eval()
    levels = head.neck(features)
    assert [tuple(x.shape[-2:]) for x in levels] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    strides = [64 // x.shape[-2] for x in levels]
    assert strides == [4, 8, 16, 32]
    decode, aux = head(features)
    assert decode.shape == (2, 5, 16, 24) and aux.shape == (2, 5, 4, 6)


def test_sync_batch_norm_equals_batch_norm_in_one_process() -> None:
    x = torch.randn(3, 4, 5, 6)
    ours, torch_bn = SyncBatchNorm2d(4), nn.BatchNorm2d(4)
    assert set(ours.state_dict()) == set(torch_bn.state_dict())
    assert torch.allclose(ours(x), torch_bn(x), atol=1e-5)
    assert torch.allclose(ours.running_var, torch_bn.running_var, atol=1e-6)
    ours.eval(), torch_bn.eval()
    assert torch.allclose(ours(x), torch_bn(x), atol=1e-5)


def tiny(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "method=segmentation",
        "model.arch=vit_tiny",
        "model.patch_size=8",
        "model.img_size=32",
        "data.source=images",
        f"data.path={data}",
        "data.batch_size=4",
        "data.num_workers=0",
        "optim.base_lr=0.3",
        "optim.betas=[0.9,0.999]",
        "optim.warmup_steps=2",
        "optim.schedule=poly",
        "segmentation.scale=[48,32]",
        "segmentation.channels=32",
        "segmentation.aux_channels=16",
        "segmentation.eval_stride=21",
        "run.device=cpu",
        "run.log_every=1",
        "run.progress=false",
        "run.visualize=false",
        "run.tensorboard=false",
        f"run.out_dir={out}",
        *extra,
    ]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def test_layer_decay_groups_of_encoder_and_heads(voc: Path) -> None:
    cfg = load_config(None, tiny(voc, Path("unused"), "finetune.layer_decay=0.65"))
    method = build_method(cfg)
    groups = method.param_groups(0.05)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    vit = dict(method.encoder.vit.named_parameters())
    assert scale_of[id(vit["patch_embed.proj.weight"])] == pytest.approx(0.65**13)
    assert scale_of[id(vit["pos_embed"])] == pytest.approx(0.65**13)
    for i in range(12):
        assert scale_of[id(vit[f"blocks.{i}.mlp.fc2.weight"])] == pytest.approx(0.65 ** (12 - i))
    head = dict(method.head.named_parameters())
    assert all(scale_of[id(p)] == 1.0 for p in head.values())
    assert decay_of[id(head["decode.fpn_bottleneck.0.weight"])] == 0.05
    assert decay_of[id(head["decode.fpn_bottleneck.1.weight"])] == 0.0  # a norm
    assert (
        decay_of[id(vit["pos_embed"])] == 0.0 and decay_of[id(vit["blocks.0.attn.qkv.bias"])] == 0.0
    )
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert sorted(scale_of) == sorted(id(p) for p in trainable) and len(scale_of) == len(trainable)
    assert id(vit["norm.weight"]) not in scale_of  # the unused final norm is frozen


@pytest.fixture(scope="module")
def overfit_run(voc: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("seg_overfit")
    # The validation split is the training split: the model must fit what it saw.
    cfg = load_config(
        None,
        tiny(
            voc,
            out,
            "optim.max_steps=40",
            "segmentation.val_split=train",
            "segmentation.photometric=false",
            "segmentation.ratio_range=[1.0,1.0]",
            "segmentation.pictures=2",
        ),
    )
    return out, train(cfg, resume=False)


def test_tiny_upernet_overfits_and_writes_its_results(overfit_run, voc: Path) -> None:  # noqa: ANN001
    out, summary = overfit_run
    assert summary["eval"]["mIoU"] > 75.0, summary["eval"]  # 3 classes, 8-pixel patches
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert losses[-1] < 0.4 * losses[0]
    assert {"decode_loss", "aux_loss", "train_pixel_acc"} <= set(lines[0])
    results = json.loads((out / "segmentation" / "summary.json").read_text())
    assert {"mIoU", "mAcc", "aAcc", "per_class"} <= set(results)
    assert results["mIoU"] == pytest.approx(summary["eval"]["mIoU"])
    assert [row["class"] for row in results["per_class"]] == ["background", "red", "green"]
    # The PNGs alone give the same scores: the data set's values, 255 where it is void.
    data = open_segmentation(voc, "train")
    matrix = torch.zeros(3, 3, dtype=torch.int64)
    for pair in data.pairs:
        pred = np.array(Image.open(out / "segmentation" / "pred" / f"{pair.stem}.png"))
        truth = np.array(Image.open(pair.label))
        assert (pred[truth == 255] == 255).all()
        matrix += confusion_matrix(torch.from_numpy(pred), torch.from_numpy(truth), 3)
    assert segmentation_scores(matrix, data.class_names)["mIoU"] == pytest.approx(results["mIoU"])
    assert (out / "segmentation" / "pictures.png").is_file()
    assert (out / "checkpoints" / "best.pt").is_file()


def test_resume_is_bit_identical(voc: Path, tmp_path: Path) -> None:
    # drop-path and dropout on: the saved RNG states must bring back the same masks.
    torch.set_num_threads(1)
    extra = ["optim.max_steps=5", "model.drop_path=0.1", "segmentation.eval_every_steps=3"]
    train(load_config(None, tiny(voc, tmp_path / "whole", *extra)), resume=False)
    split = load_config(None, tiny(voc, tmp_path / "split", *extra))
    first = train(split, resume=False, stop_after_steps=3)
    assert first["interrupted"] == "stop_after_steps"
    train(split, resume="auto")
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "split")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def _evaluated_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir) if "mIoU" in r]


def test_evaluation_steps_and_a_checkpoint_from_before_the_engine_kept_the_clock(
    voc: Path, tmp_path: Path
) -> None:
    """8 images of batch 4: 2 steps an epoch. Every 3 steps -> at the epoch ends closing an
    interval (4, 6) and at the end (7), as when segmentation kept its own clock in buffers;
    a checkpoint written then (with those buffers) still loads and resumes, to the same steps."""
    torch.set_num_threads(1)
    extra = ["optim.max_steps=7", "segmentation.eval_every_steps=3"]
    train(load_config(None, tiny(voc, tmp_path / "whole", *extra)), resume=False)
    assert _evaluated_steps(tmp_path / "whole") == [4, 6, 7]
    split = load_config(None, tiny(voc, tmp_path / "split", *extra))
    train(split, resume=False, stop_after_steps=3)
    last = tmp_path / "split" / "checkpoints" / "last.pt"
    old = torch.load(last, weights_only=True)
    # what the model saved before: its step counters and the evaluation flag raised at step 3
    old["model"].update(
        steps_done=torch.tensor(3),
        total_steps=torch.tensor(7),
        eval_due=torch.tensor(True),
    )
    torch.save(old, last)
    model, _ = load_segmentation_model(tmp_path / "split")
    assert "eval_due" not in model.state_dict()
    assert train(split, resume="auto")["step"] == 7
    assert _evaluated_steps(tmp_path / "split") == [4, 6, 7]


def test_ddp_two_gloo_processes_match_one_process(voc: Path, tmp_path: Path) -> None:
    # Drop-path and dropout off (drawn per process); the batch norms are synchronised.
    torch.set_num_threads(1)
    extra = ["optim.max_steps=2", "segmentation.dropout=0.0", "segmentation.eval_every_steps=100"]
    train(load_config(None, tiny(voc, tmp_path / "one", *extra)), resume=False)
    train_in_processes(tiny(voc, tmp_path / "ddp", *extra, "data.batch_size=2"))
    a, b = weights(tmp_path / "one"), weights(tmp_path / "ddp")
    # The neck's transposed-convolution biases feed batch norms, so their gradient is zero up to
    # rounding, and Adam turns rounding into whole steps: they cannot match, and need not.
    redundant = {"head.neck.fpn1.0.bias", "head.neck.fpn1.3.bias", "head.neck.fpn2.bias"}
    for k in a:
        if k not in redundant:
            assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5, rtol=1e-4), k
    one = json.loads((tmp_path / "one" / "segmentation" / "summary.json").read_text())
    two = json.loads((tmp_path / "ddp" / "segmentation" / "summary.json").read_text())
    assert one["mIoU"] == pytest.approx(two["mIoU"], abs=1e-6)


def test_export_whole_model_and_encoder(overfit_run, voc: Path, tmp_path: Path) -> None:  # noqa: ANN001
    import timm
    from safetensors.torch import load_file

    out, _ = overfit_run
    model, _ = load_segmentation_model(out)
    weights_path, sidecar_path = export_segmentation(out, tmp_path / "seg.safetensors")
    again = load_segmentation_export(weights_path)
    # the sidecar's usage line names a function that exists where it says
    dotted = json.loads(sidecar_path.read_text())["usage"].split("(")[0]
    module_name, function_name = dotted.rsplit(".", 1)
    assert getattr(importlib.import_module(module_name), function_name) is load_segmentation_export
    images = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        assert torch.allclose(model.segment(images), again.segment(images), atol=1e-6)
    backbone = {
        k[len("backbone.") :]: v
        for k, v in load_file(weights_path).items()
        if k.startswith("backbone.")
    }
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8)
    vit.load_state_dict(backbone, strict=True)
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(out),
                "--out",
                str(tmp_path / "enc.safetensors"),
                "--encoder-only",
            ]
        )
        == 0
    )
    encoder = load_encoder(tmp_path / "enc.safetensors")
    assert torch.equal(
        encoder.vit.blocks[0].attn.qkv.weight, model.encoder.vit.blocks[0].attn.qkv.weight
    )
    # `eval segment` scores the fine-tuned export (no probe) exactly as the run's last evaluation
    args = ["--data", str(voc), "--val-split", "train", "--crop", "32", "--stride", "21"]
    args += ["--scale", "48", "32", "--no-progress", "--out", str(tmp_path / "scored")]
    assert main(["eval", "segment", "--checkpoint", str(weights_path), *args]) == 0
    scored = json.loads((tmp_path / "scored" / "summary.json").read_text())
    ran = json.loads((out / "segmentation" / "summary.json").read_text())
    assert scored["mIoU"] == pytest.approx(ran["mIoU"]) and "probe" not in scored


# -- the linear probe --------------------------------------------------------------------------------


def test_linear_probe_learns_a_separable_toy(voc: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    encoder = random_encoder("vit_tiny_patch8_32")
    data = open_segmentation(voc, "train")
    cfg = ProbeConfig(
        iters=40,
        batch_size=4,
        lr=1e-2,
        warmup_iters=2,
        crop=32,
        scale=(48, 32),
        ratio_range=(1.0, 1.0),
        photometric=False,
        num_workers=0,
    )
    inference = InferenceConfig(scale=(48, 32), crop=32, stride=21)
    summary = train_linear_probe(
        encoder,
        data,
        data,
        tmp_path / "probe",
        cfg,
        inference,
        torch.device("cpu"),
        progress=False,
    )
    assert summary["mIoU"] > 70.0, summary["per_class"]
    assert summary["final_train_loss"] < 0.5
    untrained = evaluate_segmentation(
        lambda x: torch.zeros(x.shape[0], 3, *x.shape[-2:]), data, torch.device("cpu"), inference, 8
    )
    assert summary["mIoU"] > untrained["mIoU"] + 30
    # a second call resumes from probe.pt at the last iteration: nothing more to train
    again = train_linear_probe(
        encoder,
        data,
        data,
        tmp_path / "probe",
        cfg,
        inference,
        torch.device("cpu"),
        progress=False,
    )
    assert again["mIoU"] == pytest.approx(summary["mIoU"])


def test_eval_segment_command_writes_summary_and_label_space_pngs(
    voc: Path, tmp_path: Path, capsys
) -> None:  # noqa: ANN001
    out = tmp_path / "probe"
    code = main(
        [
            "eval",
            "segment",
            "--random-init",
            "vit_tiny_patch8_32",
            "--data",
            str(voc),
            "--out",
            str(out),
            "--iters",
            "3",
            "--batch-size",
            "2",
            "--crop",
            "32",
            "--stride",
            "21",
            "--scale",
            "48",
            "32",
            "--warmup-iters",
            "1",
            "--layers",
            "4",
            "--num-workers",
            "0",
            "--no-progress",
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_images"] == 3 and summary["probe"]["layers"] == 4
    pngs = sorted((out / "pred").glob("*.png"))
    assert [p.stem for p in pngs] == [p.stem for p in open_segmentation(voc, "val").pairs]
    assert set(np.unique(np.asarray(Image.open(pngs[0])))) <= {0, 1, 2, 255}
    assert "mIoU" in capsys.readouterr().out


def test_bad_input_is_one_line_and_exit_code_2(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    root = write_plain(tmp_path / "plain")
    code = main(
        [
            "eval",
            "segment",
            "--random-init",
            "vit_tiny_patch8_32",
            "--data",
            str(root),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--num-classes" in err and len(err.strip().splitlines()) == 1
    config = tmp_path / "seg.yaml"
    config.write_text(
        "method: segmentation\nmodel: {arch: vit_tiny, patch_size: 8, img_size: 32}\n"
    )
    code = main(
        [
            "finetune",
            "--config",
            str(config),
            "--data",
            str(tmp_path / "nowhere"),
            "--checkpoint",
            "none",
            "--out",
            str(tmp_path / "r"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "nowhere" in err and len(err.strip().splitlines()) == 1


def test_a_crop_out_of_whole_patches_is_one_line_before_any_work(
    voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "probe"
    line = ["eval", "segment", "--random-init", "vit_tiny_patch8_32", "--data", str(voc)]
    line += ["--out", str(out), "--crop", "30", "--iters", "2", "--num-workers", "0"]
    assert main(line) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("siamae: error: "), err
    assert "--crop 30" in err[0] and "patch size 8" in err[0] and "--crop 24" in err[0], err
    assert not (out / "probe.pt").exists() and not (out / "summary.json").exists()


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["crafted", "garbage", "foreign"])
def test_a_probe_pt_that_is_not_a_probe_is_one_line_and_left_as_it_is(
    kind: str, voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, marker = tmp_path / "probe", tmp_path / "ran"
    out.mkdir()
    probe = out / "probe.pt"
    if kind == "crafted":
        torch.save({"head": _RunsCode(marker)}, probe)
    elif kind == "garbage":
        probe.write_bytes(b"\x00garbage" * 10)
    else:
        torch.save({"state_dict": {"w": torch.zeros(2)}}, probe)
    before = probe.read_bytes()
    line = ["eval", "segment", "--random-init", "vit_tiny_patch8_32", "--data", str(voc)]
    line += ["--out", str(out), "--crop", "32", "--iters", "2", "--num-workers", "0"]
    assert main([*line, "--batch-size", "2", "--scale", "48", "32", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("siamae: error: "), err
    assert str(probe) in err[0]
    words = "not a segmentation probe" if kind == "foreign" else "could not be loaded safely"
    assert words in err[0] and "weights_only" not in err[0]
    assert probe.read_bytes() == before and not marker.exists()
    assert not (out / "summary.json").exists()


def _voc_with_unpaired_training_files(root: Path) -> tuple[Path, set[str]]:
    """A VOC set whose train.txt lists a name with no files and an image whose mask is gone."""
    base = write_voc(root, {"train": 8, "val": 3})
    listing = base / "ImageSets" / "Segmentation" / "train.txt"
    listing.write_text(listing.read_text() + "2007_gone\n")
    (base / "SegmentationClass" / "2007_train000.png").unlink()
    return base, {"2007_gone.jpg", "2007_train000.png"}


def test_unpaired_training_files_are_counted_and_listed_by_eval_segment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, missing = _voc_with_unpaired_training_files(tmp_path / "voc")
    out = tmp_path / "probe"
    line = ["eval", "segment", "--random-init", "vit_tiny_patch8_32", "--data", str(data)]
    line += ["--out", str(out), "--crop", "32", "--iters", "2", "--batch-size", "2"]
    line += ["--scale", "48", "32", "--num-workers", "0", "--pictures", "0", "--no-progress"]
    assert main(line) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {Path(u.split("\t")[0]).name for u in summary["train_unpaired"]} == missing
    assert "training split: skipped 0 unreadable and 2 unpaired" in capsys.readouterr().out


def test_unpaired_training_files_are_listed_in_skipped_files_by_finetune(
    tmp_path: Path,
) -> None:
    data, missing = _voc_with_unpaired_training_files(tmp_path / "voc")
    out = tmp_path / "run"
    cfg = load_config(None, tiny(data, out, "optim.max_steps=2", "segmentation.pictures=0"))
    summary = train(cfg, resume=False)
    listed = (out / "skipped_files.txt").read_text().splitlines()
    assert {Path(row.split("\t")[0]).name for row in listed} == missing
    assert all("listed in train.txt but missing" in row for row in listed)
    assert summary["skipped_at_start"] == 2


def test_segmentation_pictures_have_a_legend_of_the_classes_shown(
    voc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import siamae.segmentation_scores as seg_eval

    drawn: dict = {}
    real = seg_eval.save_labelled_grid

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        drawn.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(seg_eval, "save_labelled_grid", spy)
    dataset = open_segmentation(voc, "val")

    def all_red(images: torch.Tensor) -> torch.Tensor:  # predicts class 1 everywhere
        logits = torch.zeros(images.shape[0], 3, *images.shape[-2:])
        logits[:, 1] = 1.0
        return logits

    inference = InferenceConfig(scale=(48, 32), mode="whole", crop=32, stride=21)
    evaluate_segmentation(all_red, dataset, torch.device("cpu"), inference, 8, tmp_path, 2)
    names = [name for name, _ in drawn["legend"]]
    assert names == ["background", "red", "green", "ignored"]  # the scenes hold all three
    colours = dict(drawn["legend"])
    assert colours["red"] == tuple(PALETTE[1]) and colours["ignored"] == (255, 255, 255)
    assert (tmp_path / "pictures.png").is_file()


def test_recipes_resolve_to_the_published_protocol(voc: Path) -> None:
    root = Path(__file__).resolve().parents[2] / "configs"
    for name in (
        "upernet_vitb16_ade20k_mae",
        "upernet_vitb16_ade20k_siameseim",
        "upernet_vitb16_ade20k_mixedae",
    ):
        cfg = load_config(root / f"{name}.yaml", [f"data.path={voc}", "finetune.checkpoint=null"])
        assert cfg.method == "segmentation" and cfg.model.img_size == 512
        assert cfg.optim.max_steps == 160000 and cfg.optim.warmup_steps == 1500
        assert cfg.optim.schedule == "poly" and cfg.optim.weight_decay == 0.05
        assert cfg.data.batch_size * 8 == 16 and cfg.model.drop_path == 0.1
        assert cfg.optim.base_lr * 16 / 256 == pytest.approx(1e-4)  # lr 1e-4 at batch 16
        assert cfg.segmentation.layer_decay == 0.65 and cfg.segmentation.aux_weight == 0.4
        assert (cfg.segmentation.eval_mode, cfg.segmentation.eval_stride) == ("slide", 341)
