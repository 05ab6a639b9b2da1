"""The segmentation probe on cached features (``siamae eval segment --protocol cached``): the
same logits and the same step as the probe that encodes its images live, the cache reused and
resumed, the protocol said on the first line, and the new options' one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siamae.commands.cli import main
from siamae.data.image_folder import normalize
from siamae.data.segmentation import open_segmentation
from siamae.eval.segmentation.features import (
    CachedViews,
    cache_key,
    cached_features,
    cover_starts,
    probe_features,
)
from siamae.eval.segmentation.grid import _GridRun, seg_grid_specs, train_probe_grid
from siamae.eval.segmentation.probe import (
    ProbeConfig,
    _ProbeRun,
    cached_views,
    train_linear_probe,
)
from siamae.loading import random_encoder
from siamae.overlays import PALETTE
from siamae.segmentation_scores import InferenceConfig

CPU = torch.device("cpu")


def write_voc(root: Path, counts: dict[str, int]) -> Path:
    """A VOC2012 layout of 40x48 blue images with a red box (class 1) on background (0)."""
    rng = np.random.default_rng(0)
    base = root / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for split, n in counts.items():
        names = [f"{split}{i:03d}" for i in range(n)]
        for name in names:
            image = np.zeros((40, 48, 3), np.uint8)
            image[:] = (40, 80, 170)
            label = np.zeros((40, 48), np.uint8)
            y, x = int(rng.integers(0, 26)), int(rng.integers(0, 34))
            image[y : y + 14, x : x + 14] = (220, 50, 40)
            label[y : y + 14, x : x + 14] = 1
            label[:2] = 255  # VOC's void border
            Image.fromarray(image).save(base / "JPEGImages" / f"{name}.jpg", quality=95)
            png = Image.fromarray(label, "P")
            png.putpalette(PALETTE.ravel().tolist())
            png.save(base / "SegmentationClass" / f"{name}.png")
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    (base / "class_names.txt").write_text("background\nred\n")
    return base


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_voc(tmp_path_factory.mktemp("voc"), {"train": 6, "val": 2})


def _cfg(**kw: object) -> ProbeConfig:
    values = dict(iters=4, batch_size=4, lr=1e-2, warmup_iters=1, crop=32, scale=(48, 32))
    values.update(ratio_range=(1.0, 1.0), photometric=False, num_workers=0, protocol="cached")
    values.update(cached_views="windows", copies=1)
    values.update(kw)
    return ProbeConfig(**values)  # type: ignore[arg-type]


def _features(encoder, data, cfg: ProbeConfig, directory: Path):  # noqa: ANN001, ANN202
    views = CachedViews(data, cfg.crop, cfg.scale, cfg.copies, cfg.seed, cfg.ratio_range)
    key = cache_key(encoder, views, cfg.layers, cfg.copies, {})
    return (
        views,
        key,
        cached_features(
            encoder, views, cfg.layers, directory, key, CPU, batch_size=3, progress=False
        ),
    )


def test_windows_cover_the_image_with_the_last_one_flush() -> None:
    assert cover_starts(20, 32) == [0]
    assert cover_starts(38, 32) == [0, 6]
    assert cover_starts(64, 32) == [0, 32]
    assert cover_starts(70, 32) == [0, 32, 38]


@pytest.mark.parametrize("layers", [1, 4])
def test_cached_and_live_probes_give_the_same_logits_and_the_same_step(
    voc: Path, tmp_path: Path, layers: int
) -> None:
    torch.manual_seed(0)
    encoder = random_encoder("vit_tiny_patch8_32").eval()
    data = open_segmentation(voc, "train")
    cfg = _cfg(layers=layers)
    views, _, cached = _features(encoder, data, cfg, tmp_path / "cache")
    assert len(views) == 2 * len(data)  # 40x48 -> 32x38: two 32-pixel windows each
    items = [views[j] for j in range(4)]
    images = torch.stack([image for image, _, _ in items])
    labels = torch.stack([label for _, label, _ in items]).long()
    live_feats = probe_features(encoder, normalize(images, CPU), layers)
    stored = torch.from_numpy(np.array(cached.features[:4]))
    assert torch.equal(stored, live_feats)
    assert torch.equal(labels, torch.from_numpy(cached.labels[:4].astype(np.int64)))

    # two probes from the same seed: one encodes the images, the other reads the cache
    live = _ProbeRun.build(
        encoder, data, _cfg(layers=layers, protocol="dinov2"), CPU, tmp_path / "a.pt", ""
    )
    fast = _ProbeRun.build(encoder, data, cfg, CPU, tmp_path / "b.pt", "", cached)
    live.head.eval(), fast.head.eval()
    assert torch.equal(live.head(live_feats), fast.head(stored))
    live.head.train(), fast.head.train()
    loss_live = live._step({"images": images[:, None], "label": labels}, CPU)
    loss_fast = fast._step({"features": stored, "label": labels}, CPU)
    assert loss_live == loss_fast
    for a, b in zip(live.head.state_dict().values(), fast.head.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # and the evaluation path (the encoder run live on the window) matches the cached features
    live.head.eval(), fast.head.eval()
    assert torch.equal(fast.logits(normalize(images, CPU)), live.logits(normalize(images, CPU)))


def test_the_cache_is_reused_resumed_and_keyed_by_the_weights(voc: Path, tmp_path: Path) -> None:
    encoder = random_encoder("vit_tiny_patch8_32", seed=0)
    data = open_segmentation(voc, "train")
    cfg = _cfg()
    _, key, first = _features(encoder, data, cfg, tmp_path)
    assert first.computed
    whole = np.array(first.features)
    _, _, again = _features(encoder, data, cfg, tmp_path)
    assert not again.computed and again.folder == first.folder
    # an extraction stopped after 3 views continues from there, to the same features
    meta_path = first.folder / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "done": 3}))
    arrays = np.lib.format.open_memmap(first.folder / "features.npy", "r+")
    arrays[3:] = 0
    arrays.flush()
    del arrays
    _, _, resumed = _features(encoder, data, cfg, tmp_path)
    assert resumed.computed and np.array_equal(np.array(resumed.features), whole)
    # other weights, another folder
    other = random_encoder("vit_tiny_patch8_32", seed=1)
    _, other_key, theirs = _features(other, data, cfg, tmp_path)
    assert other_key["weights"] != key["weights"] and theirs.folder != first.folder


def test_the_cached_probe_learns_a_separable_toy(voc: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    encoder = random_encoder("vit_tiny_patch8_32")
    data = open_segmentation(voc, "train")
    cfg = _cfg(iters=40, copies=2, warmup_iters=2)
    inference = InferenceConfig(scale=(48, 32), crop=32, stride=21)
    summary = train_linear_probe(
        encoder, data, data, tmp_path / "probe", cfg, inference, CPU, progress=False
    )
    assert summary["mIoU"] > 70.0, summary["per_class"]
    assert summary["cached_views"] == 3 * len(data) and not summary["features_reused"]
    assert summary["probe_protocol"] == "cached"


def _line(voc: Path, out: Path, *extra: str) -> list[str]:
    line = ["eval", "segment", "--random-init", "vit_tiny_patch8_32", "--data", str(voc)]
    line += ["--out", str(out), "--crop", "32", "--stride", "21", "--scale", "48", "32"]
    return line + [
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--pictures",
        "0",
        "--no-progress",
        *extra,
    ]


def test_the_command_says_its_protocol_first_and_reuses_the_cache(
    voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = tmp_path / "features"
    assert main(_line(voc, tmp_path / "a", "--epochs", "2", "--feature-cache", str(shared))) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("segmentation probe, protocol cached (the default on a CPU)"), out
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    # the default views: 4 augmented crops an image; an epoch is one crop of each image (6
    # images at batch 4: 1 whole batch, as the dinov2 protocol's epoch)
    assert summary["train_iters"] == 2 and summary["cached_views"] == 4 * 6
    assert summary["probe"]["cached_views"] == "crops" and summary["probe"]["copies"] == 4
    assert summary["probe"]["warmup_iters"] == 0 and not summary["features_reused"]
    # a second probe of the same encoder (another lr, another --out) reads the same features
    line = _line(voc, tmp_path / "b", "--iters", "2", "--lr", "0.1", "--feature-cache", str(shared))
    assert main(line) == 0
    again = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert again["features_reused"] and again["feature_cache"] == summary["feature_cache"]
    # windows: each image's 2 windows (40x48 -> 32x38), an epoch all of them (12 at batch 4)
    line = _line(voc, tmp_path / "d", "--epochs", "2", "--cached-views", "windows")
    assert main(line) == 0
    windows = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert windows["train_iters"] == 2 * 3 and windows["cached_views"] == 12
    assert windows["probe"]["cached_views"] == "windows" and windows["probe"]["copies"] == 1
    capsys.readouterr()
    assert main(_line(voc, tmp_path / "c", "--iters", "2", "--protocol", "dinov2")) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("segmentation probe, protocol dinov2 (as asked)")
    assert not (tmp_path / "c" / "features").exists()


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--iters", "2", "--epochs", "2"], "--iters and --epochs"),
        (["--protocol", "dinov2", "--copies", "2"], "--copies is for --protocol cached"),
        (["--protocol", "dinov2", "--feature-cache", "x"], "--feature-cache is for --protocol"),
        (["--copies", "0"], "--copies"),
        (["--protocol", "dinov2", "--cached-views", "crops"], "--cached-views is for --protocol"),
        (["--cached-views", "tiles"], "--cached-views"),
        (["--epochs", "0"], "--epochs"),
        (["--protocol", "fast"], "--protocol"),
        (["--grid", "--grid-lrs", "0"], "--grid-lrs"),
        (["--grid", "--grid-lrs", "inf"], "--grid-lrs must be finite"),
        (["--grid", "--grid-layers", "2"], "--grid-layers"),
        (["--grid-lrs", "0.1"], "--grid-lrs sets the grid of heads; add --grid"),
        (["--grid", "--protocol", "dinov2"], "--grid trains its heads on cached features"),
    ],
)
def test_bad_new_options_are_one_line_and_exit_2(
    voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], words: str
) -> None:
    out = tmp_path / "o"
    try:
        code = main(_line(voc, out, *extra))
    except SystemExit as stop:  # argparse's own check of a value's type or choice
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not out.exists()


# -- the grid of heads (--grid) ----------------------------------------------------------------


@pytest.mark.parametrize(("layers", "multi_scale"), [((1,), False), ((1, 4), True)])
def test_the_grid_head_at_the_default_lr_is_the_single_cached_probe(
    voc: Path, tmp_path: Path, layers: tuple[int, ...], multi_scale: bool
) -> None:
    encoder = random_encoder("vit_tiny_patch8_32")
    data = open_segmentation(voc, "train")
    inference = InferenceConfig(scale=(48, 32), crop=32, stride=21)
    if multi_scale:  # each head's softmax averaged over scales and flips on its own
        inference = InferenceConfig(
            scale=(48, 32), crop=32, stride=21, ratios=(1.0, 1.5), flip=True
        )
    single_cfg = _cfg(iters=5, warmup_iters=2)
    single = train_linear_probe(
        encoder, data, data, tmp_path / "one", single_cfg, inference, CPU, progress=False
    )
    specs = seg_grid_specs((1e-3, single_cfg.lr, 0.1), layers)
    grid_cfg = _cfg(iters=5, warmup_iters=2, layers=max(layers))
    grid = train_probe_grid(
        encoder, data, data, tmp_path / "grid", grid_cfg, specs, inference, CPU, progress=False
    )
    assert [h["name"] for h in grid["heads"]] == [s.name() for s in specs]
    at_lr = specs.index(seg_grid_specs((single_cfg.lr,), (1,))[0])
    for key in ("mIoU", "mAcc", "aAcc"):
        assert grid["heads"][at_lr][key] == single[key], key
    assert grid["best_head"]["mIoU"] == max(h["mIoU"] for h in grid["heads"]) == grid["mIoU"]
    # the weights too: the grid's checkpoint against the single probe's
    one = torch.load(tmp_path / "one" / "probe.pt", weights_only=False)["head"]
    heads = torch.load(tmp_path / "grid" / "grid.pt", weights_only=False)["head"]
    for name, value in one.items():
        assert torch.equal(heads[f"heads.{at_lr}.{name}"], value), name
    other = heads["heads.0.classifier.weight"]
    assert not torch.equal(other, one["classifier.weight"])  # another lr, another head


def test_the_grid_steps_every_head_as_alone(
    voc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One step of a 3-head grid (logits upsampled in chunks of one head, as on a large set)
    moves each head as its own single probe's step does."""
    encoder = random_encoder("vit_tiny_patch8_32")
    data = open_segmentation(voc, "train")
    cfg = _cfg()
    _, _, cached = _features(encoder, data, cfg, tmp_path / "cache")
    batch = next(iter(cached.batches(4, 0, 0)))
    specs = seg_grid_specs((1e-3, 1e-2, 0.1))
    grid = _GridRun.build_grid(encoder, data, cfg, specs, CPU, tmp_path / "g.pt", "", cached)
    monkeypatch.setattr("siamae.eval.segmentation.grid.CHUNK_ELEMENTS", 1)  # a head at a time
    grid._step(dict(batch), CPU)
    for i, spec in enumerate(specs):
        alone = _ProbeRun.build(encoder, data, _cfg(lr=spec.lr), CPU, tmp_path / "a.pt", "", cached)
        alone._step(dict(batch), CPU)
        for a, b in zip(alone.head.state_dict().values(), grid.head.heads[i].state_dict().values()):
            assert torch.equal(a, b), spec


def test_the_grid_command_lists_every_head_and_names_the_best(
    voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "g"
    line = _line(voc, out, "--iters", "3", "--grid", "--grid-lrs", "0.01", "0.1")
    assert main([*line, "--grid-layers", "1", "4"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("segmentation probe, protocol cached"), printed
    assert any(line.startswith("4 heads trained together: best lr ") for line in printed)
    summary = json.loads((out / "summary.json").read_text())
    assert [(h["lr"], h["layers"]) for h in summary["heads"]] == [
        (0.01, 1), (0.1, 1), (0.01, 4), (0.1, 4)
    ]  # fmt: skip
    assert summary["best_head"]["mIoU"] == max(h["mIoU"] for h in summary["heads"])
    assert summary["probe"]["layers"] == 4 and (out / "grid.pt").is_file()
    # run again: resumes from the finished checkpoint, the same figures
    assert main([*line, "--grid-layers", "1", "4"]) == 0
    assert json.loads((out / "summary.json").read_text())["heads"] == summary["heads"]


# -- cached crops (--cached-views crops) --------------------------------------------------------


def test_cached_crops_are_the_dinov2_protocols_crops_in_its_order(
    voc: Path, tmp_path: Path
) -> None:
    """Copy c of image i is the crop the dinov2 protocol draws for it in epoch c, and epoch e
    reads copy e mod copies in that protocol's batch order."""
    encoder = random_encoder("vit_tiny_patch8_32")
    data = open_segmentation(voc, "train")
    cfg = _cfg(
        cached_views="crops", copies=2, batch_size=2, ratio_range=(0.5, 2.0), photometric=True
    )
    views = cached_views(data, cfg)
    assert len(views) == 2 * len(data)
    live = _ProbeRun.build(
        encoder,
        data,
        _cfg(batch_size=2, protocol="dinov2", ratio_range=(0.5, 2.0), photometric=True),
        CPU,
        tmp_path / "a.pt",
        "",
    )
    dataset = live.loader.dataset  # type: ignore[union-attr]
    for copy in range(2):
        for i in range(len(data)):
            image, label, reason = views[copy * len(data) + i]
            item = dataset[(copy, i)]
            assert reason == ""
            assert torch.equal(image, item["images"][0])
            assert torch.equal(label, item["label"].to(torch.uint8))
    key = cache_key(encoder, views, 1, 2, {"views": "crops"})
    cached = cached_features(encoder, views, 1, tmp_path / "c", key, CPU, 3, progress=False)
    assert cached.crop_copies == 2 and cached.batches_per_epoch(2) == len(data) // 2
    labels = np.array(cached.labels)
    for epoch in range(3):  # epoch 2 reads copy 0 again, in epoch 2's order
        live.sampler.set_epoch(epoch)  # type: ignore[union-attr]
        order = [i for _, i in live.sampler]  # type: ignore[union-attr]
        got = torch.cat([b["label"] for b in cached.batches(2, cfg.seed, epoch)])
        want = labels[[epoch % 2 * len(data) + i for i in order]]
        assert torch.equal(got, torch.from_numpy(want.astype(np.int64)))


def test_as_many_cached_crops_as_epochs_is_the_dinov2_protocols_run(
    voc: Path, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    encoder = random_encoder("vit_tiny_patch8_32")
    data = open_segmentation(voc, "train")
    inference = InferenceConfig(scale=(48, 32), crop=32, stride=21)
    common = dict(iters=6, batch_size=2, warmup_iters=1, ratio_range=(0.5, 2.0), photometric=True)
    runs = {}
    for name, extra in (("dinov2", {"protocol": "dinov2"}), ("crops", {"cached_views": "crops"})):
        cfg = _cfg(**common, **extra, copies=2 if name == "crops" else 1)  # 3 batches an epoch
        runs[name] = train_linear_probe(
            encoder, data, data, tmp_path / name, cfg, inference, CPU, progress=False
        )
    assert runs["crops"]["cached_views"] == 2 * len(data)
    for key in ("mIoU", "mAcc", "aAcc", "train_iters"):
        assert runs["crops"][key] == runs["dinov2"][key], key
    heads = [torch.load(tmp_path / n / "probe.pt", weights_only=False)["head"] for n in runs]
    for name, value in heads[0].items():
        # the encoder saw the crops in other batches: float rounding, not other data
        torch.testing.assert_close(heads[1][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_an_unreadable_image_gives_its_place_to_the_next_as_in_the_dinov2_protocol(
    tmp_path: Path,
) -> None:
    base = write_voc(tmp_path / "voc", {"train": 6, "val": 2})
    (base / "JPEGImages" / "train002.jpg").write_bytes(b"not a jpeg")
    encoder = random_encoder("vit_tiny_patch8_32")
    data = open_segmentation(base, "train")
    cfg = _cfg(cached_views="crops", copies=2, batch_size=3)
    views = cached_views(data, cfg)
    key = cache_key(encoder, views, 1, 2, {"views": "crops"})
    cached = cached_features(encoder, views, 1, tmp_path / "c", key, CPU, 4, progress=False)
    assert len(cached.valid) == 2 * 5 and any("train002" in line for line in cached.skipped)
    labels = np.array(cached.labels)
    live = _ProbeRun.build(
        encoder, data, _cfg(batch_size=3, protocol="dinov2"), CPU, tmp_path / "a.pt", ""
    )
    for epoch in range(2):
        live.sampler.set_epoch(epoch)  # type: ignore[union-attr]
        order = [i for _, i in live.sampler]  # type: ignore[union-attr]
        taken = [3 if i == 2 else i for i in order]  # the dinov2 data set reads image 3 instead
        got = torch.cat([b["label"] for b in cached.batches(3, cfg.seed, epoch)])
        want = labels[[epoch * len(data) + i for i in taken]]
        assert torch.equal(got, torch.from_numpy(want.astype(np.int64)))
