"""Sources, crop samplers, view geometry of each strategy, corrupt files, the sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from image_bombs import write_bomb
from siamae.commands.cli import main
from siamae.data.dataset import EpochSampler, PretrainDataset, build_dataset, collate
from siamae.data.image_folder import EvalTransform, ImageFolder
from siamae.data.labelled import LabelledImageSource
from siamae.data.mixing import heldout_images
from siamae.data.shard_writer import write_shards
from siamae.data.shards import open_shards
from siamae.data.sources import (
    ImageFileSource,
    SyntheticImageSource,
    SyntheticVideoSource,
    UnreadableSample,
    sample_frame_pair,
)
from siamae.data.synthetic import synthetic_image, synthetic_video
from siamae.data.views import ViewMaker, sample_box
from siamae.errors import DataError
from siamae.eval.propagation.davis import read_mask
from siamae.eval.propagation.results import read_frame
from siamae.eval.propagation.vip import read_category_ids
from siamae.recipes import load_config

SIDE = 256
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class CoordinateSource:
    """One image whose red channel is x and green channel y: a view's pixels say where it came from."""

    def __init__(self, width: int = SIDE, height: int = SIDE) -> None:
        ys, xs = np.mgrid[0:height, 0:width]
        arr = np.stack(
            [xs * 255 // (width - 1), ys * 255 // (height - 1), np.zeros_like(xs)], -1
        ).astype(np.uint8)
        self.image = Image.fromarray(arr)

    def __len__(self) -> int:
        return 1

    def open_image(self, index: int, rng: np.random.Generator) -> Image.Image:
        return self.image.copy()


def _extent(view: np.ndarray) -> tuple[float, float, float, float]:
    """(x0, x1, y0, y1) in [0, 255] coordinates covered by a view (flip-proof: min/max)."""
    r, g = view[..., 0].astype(float), view[..., 1].astype(float)
    return r.min(), r.max(), g.min(), g.max()


def _area_fraction(extent: tuple[float, float, float, float]) -> float:
    x0, x1, y0, y1 = extent
    return (x1 - x0 + 1) * (y1 - y0 + 1) / 256**2


def test_sample_box_stays_inside_and_respects_area() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        top, left, h, w = sample_box(rng, 300, 200, (0.1, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 200 and 0 <= left and left + w <= 300
        assert h >= 1 and w >= 1
        assert w * h <= 300 * 200 * 1.0 + 1
    areas = [
        np.prod(sample_box(rng, 1000, 1000, (0.3, 0.6), (1.0, 1.0))[2:]) / 1e6 for _ in range(200)
    ]
    assert 0.29 <= min(areas) and max(areas) <= 0.61


def test_global_to_local_local_crop_lies_inside_global_crop() -> None:
    maker = ViewMaker(
        "pair", out=64, strategy="global_to_local", global_scale=(0.1, 1.0), local_scale=(0.3, 0.6)
    )
    source = CoordinateSource()
    for seed in range(20):
        g, loc = maker(source, 0, np.random.default_rng(seed))
        gx0, gx1, gy0, gy1 = _extent(g)
        lx0, lx1, ly0, ly1 = _extent(loc)
        tol = 3  # bilinear resampling at the borders
        assert gx0 - tol <= lx0 and lx1 <= gx1 + tol and gy0 - tol <= ly0 and ly1 <= gy1 + tol
        global_area = _area_fraction((gx0, gx1, gy0, gy1))
        assert 0.07 <= global_area <= 1.0
        local_rel = _area_fraction((lx0, lx1, ly0, ly1)) / global_area
        assert 0.2 <= local_rel <= 0.75


def test_local_to_global_swaps_the_roles() -> None:
    source = CoordinateSource()
    a = ViewMaker("pair", out=64, strategy="global_to_local")(source, 0, np.random.default_rng(3))
    b = ViewMaker("pair", out=64, strategy="local_to_global")(source, 0, np.random.default_rng(3))
    assert np.array_equal(a[0], b[1]) and np.array_equal(a[1], b[0])


def test_random_views_are_two_independent_global_crops_and_same_views_are_identical() -> None:
    source = CoordinateSource()
    contained = 0
    for seed in range(20):
        v1, v2 = ViewMaker("pair", out=64, strategy="random", global_scale=(0.1, 0.3))(
            source, 0, np.random.default_rng(seed)
        )
        e1, e2 = _extent(v1), _extent(v2)
        assert 0.05 <= _area_fraction(e1) <= 0.4 and 0.05 <= _area_fraction(e2) <= 0.4
        contained += e1[0] <= e2[0] and e2[1] <= e1[1] and e1[2] <= e2[2] and e2[3] <= e1[3]
    assert contained < 20  # not nested like global->local
    s1, s2 = ViewMaker("pair", out=64, strategy="same")(source, 0, np.random.default_rng(0))
    assert np.array_equal(s1, s2)


def test_flips_are_independent_per_view() -> None:
    source = CoordinateSource()
    maker = ViewMaker(
        "pair", out=32, strategy="same", global_scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0
    )
    view = maker(source, 0, np.random.default_rng(0))[0]
    assert view[0, 0, 0] > view[0, -1, 0]  # flipped: x decreases left to right
    flips = set()
    for seed in range(30):
        g, loc = ViewMaker("pair", out=32, hflip=0.5)(source, 0, np.random.default_rng(seed))
        flips.add((bool(g[0, 0, 0] > g[0, -1, 0]), bool(loc[0, 0, 0] > loc[0, -1, 0])))
    assert len(flips) >= 3  # every combination of the two flips occurs


def test_views_are_uint8_and_deterministic_per_index(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "data.source=synthetic",
            "data.synthetic_count=8",
            "model.img_size=32",
            "model.patch_size=8",
        ],
    )
    ds = build_dataset(cfg, "pair", 16)
    a, b = ds[(0, 3)], ds[(0, 3)]
    assert a["images"].dtype == torch.uint8 and a["images"].shape == (2, 3, 32, 32)
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["mask_noise"], b["mask_noise"])
    assert not torch.equal(ds[(1, 3)]["images"], a["images"])  # another epoch, other crops


def test_frame_pairs_share_crop_and_flip_and_respect_gap() -> None:
    source = SyntheticVideoSource(count=2, size=64, num_frames=30)
    frames, _ = synthetic_video(0, 64, 30)
    rng = np.random.default_rng(5)
    maker = ViewMaker(
        "frames", out=64, global_scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, frame_gap=(4, 48)
    )
    first, second = maker(source, 0, rng)
    # with a full-frame crop and no flip, each view equals some frame, `gap` apart
    matches = [
        [t for t in range(30) if np.abs(frames[t].astype(int) - v.astype(int)).mean() < 1.0]
        for v in (first, second)
    ]
    assert len(matches[0]) == 1 and len(matches[1]) == 1
    assert 4 <= matches[1][0] - matches[0][0] <= 29
    for seed in range(50):
        t0, t1 = sample_frame_pair(np.random.default_rng(seed), 100, (4, 48))
        assert 4 <= t1 - t0 <= 47 and 0 <= t0 and t1 < 100
    assert sample_frame_pair(np.random.default_rng(0), 10, (4, 48))[1] <= 9  # clamped to the video


def _write_images(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        p = folder / f"img{i}.jpg"
        Image.fromarray(synthetic_image(i, 48)).save(p, quality=90)
        paths.append(p)
    return paths


def test_corrupt_files_are_skipped_counted_and_named(tmp_path: Path) -> None:
    good = _write_images(tmp_path / "classA", 5)
    truncated = tmp_path / "classB" / "truncated.jpg"
    truncated.parent.mkdir()
    data = good[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    (tmp_path / "classB" / "notes.jpg").write_text("this is not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    source = ImageFileSource(tmp_path)
    assert len(source) == 8  # recursive scan found all, the bad ones included
    ds = PretrainDataset(source, ViewMaker("pair", out=32), num_patches=16)
    skipped: set[str] = set()
    for i in range(len(source)):
        sample = ds[(0, i)]
        assert sample["images"].shape == (2, 3, 32, 32)
        skipped.update(line.split("\t")[0] for line in sample["skipped_files"].split("\n") if line)
    assert {Path(s).name for s in skipped} == {"truncated.jpg", "notes.jpg", "empty.png"}


BOMB_REASON = "DecompressionBombError: Image size (196000000 pixels) exceeds limit of 178956970"


def _skipped_by(source) -> dict[str, str]:  # noqa: ANN001 - a Source
    """name -> reason of the items a pre-training dataset skips, over one pass of ``source``."""
    ds = PretrainDataset(source, ViewMaker("pair", out=32), num_patches=16)
    skipped = {}
    for i in range(len(source)):
        for line in filter(None, ds[(0, i)]["skipped_files"].split("\n")):
            name, reason = line.split("\t")
            skipped[Path(name).name] = reason
    return skipped


def test_an_image_over_the_decompression_bomb_limit_is_skipped_by_every_reader(
    tmp_path: Path,
) -> None:
    """A 196-megapixel image raised PIL's DecompressionBombError (no OSError) out of the loader
    worker. Every reader that opens images now treats it as an unreadable file, with the reason:
    its pixel count and the limit."""
    folder = tmp_path / "images"
    _write_images(folder / "cls", 5)
    bomb = write_bomb(folder / "cls" / "bomb.png")
    # pre-training: image folders and tar shards
    assert {
        k: v.startswith(BOMB_REASON) for k, v in _skipped_by(ImageFileSource(folder)).items()
    } == {"bomb.png": True}
    write_shards(folder, tmp_path / "shards", progress=False)
    assert list(_skipped_by(open_shards(tmp_path / "shards"))) == ["bomb.png"]
    # the probes' and fine-tuning's labelled folders drop it as they drop a corrupt file
    labelled = ImageFolder(folder, EvalTransform(32))
    assert labelled.samples[0][0] == bomb  # sorted first
    with pytest.raises(DataError, match=r"bomb\.png.*196000000 pixels"):
        labelled[0]
    dropped = labelled.drop_unreadable()
    assert len(dropped) == 1 and dropped[0].startswith(f"{bomb}\t{BOMB_REASON}")
    source = LabelledImageSource(folder)
    with pytest.raises(UnreadableSample, match="196000000 pixels"):
        source.open_image(0, np.random.default_rng(0))
    # MixedAE's held-out images and the propagation benchmarks' frames and masks: one line
    with pytest.raises(DataError, match="196000000 pixels"):
        heldout_images(folder, 32, 6, 2)
    for read in (read_frame, read_mask, read_category_ids):
        with pytest.raises(DataError, match=r"bomb\.png.*196000000 pixels"):
            read(bomb)


def test_pretraining_skips_and_lists_an_image_over_the_bomb_limit(tmp_path: Path) -> None:
    _write_images(tmp_path / "images", 7)
    bomb = write_bomb(tmp_path / "images" / "bomb.png")
    out = tmp_path / "run"
    assert (
        main(_pretrain_args(tmp_path / "images", out, "data.batch_size=8", "optim.max_steps=2"))
        == 0
    )
    listed = (out / "skipped_files.txt").read_text().splitlines()
    assert len(listed) == 1 and listed[0].startswith(f"{bomb}\t{BOMB_REASON}")


def _pretrain_args(data: Path, out: Path, *sets: str) -> list[str]:
    args = ["pretrain", "--config", str(CONFIGS / "demo.yaml"), "--data", str(data)]
    args += ["--out", str(out)]
    small = ["model.img_size=32", "data.num_workers=0", "run.visualize=false", "run.progress=false"]
    for value in (*small, *sets):
        args += ["--set", value]
    return args


def test_an_unreadable_file_is_listed_once_with_its_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three bad files in a row, all in one batch: the item of the first tried all three, the
    second's two, the third's one, and the last was listed three times (once per try), the
    count 6. Each is now listed and counted once; a resumed run does not list them again."""
    images = tmp_path / "images"
    _write_images(images, 5)
    bad = [images / f"a_bad{i}.jpg" for i in range(3)]  # sorted first: consecutive indices
    for path in bad:
        path.write_text("not an image")
    out = tmp_path / "run"
    assert main(_pretrain_args(images, out, "data.batch_size=8", "optim.max_steps=2")) == 0
    assert "skipped 3 unreadable files" in capsys.readouterr().out
    listed = (out / "skipped_files.txt").read_text().splitlines()
    assert sorted(listed) == [
        f"{path}\tUnidentifiedImageError: not an image file PIL can identify" for path in bad
    ]
    # A crash after the listing, before the checkpoint: the resume meets them again.
    checkpoint = out / "checkpoints" / "last.pt"
    state = torch.load(checkpoint, weights_only=False)
    state["skipped"], state["skipped_names"] = 0, []
    torch.save(state, checkpoint)
    assert main(_pretrain_args(images, out, "data.batch_size=8", "optim.max_steps=4")) == 0
    assert sorted((out / "skipped_files.txt").read_text().splitlines()) == sorted(listed)


def test_list_file_and_missing_paths(tmp_path: Path) -> None:
    paths = _write_images(tmp_path / "imgs", 3)
    listing = tmp_path / "train.txt"
    listing.write_text("# my list\n" + "\n".join(f"imgs/{p.name}" for p in paths) + "\n")
    assert len(ImageFileSource(listing)) == 3
    with pytest.raises(DataError, match="does not exist"):
        ImageFileSource(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        ImageFileSource(tmp_path / "empty")


def test_sampler_splits_global_batches_across_processes() -> None:
    single = list(EpochSampler(20, batch_size=4, seed=1))
    ranks = [list(EpochSampler(20, batch_size=2, rank=r, world_size=2, seed=1)) for r in range(2)]
    for step in range(5):
        global_batch = single[step * 4 : (step + 1) * 4]
        assert global_batch == ranks[0][step * 2 : step * 2 + 2] + ranks[1][step * 2 : step * 2 + 2]
    resumed = EpochSampler(20, batch_size=4, seed=1)
    resumed.set_epoch(0, start_batch=2)
    assert list(resumed) == single[8:]
    with pytest.raises(DataError, match="fewer than one global batch"):
        EpochSampler(3, batch_size=4)


def test_collate_stacks_uint8_views() -> None:
    ds = PretrainDataset(SyntheticImageSource(4, 48), ViewMaker("single", out=32), num_patches=16)
    batch = collate([ds[(0, i)] for i in range(4)])
    assert batch["images"].shape == (4, 1, 3, 32, 32) and batch["images"].dtype == torch.uint8
    assert batch["mask_noise"].shape == (4, 16) and batch["skipped"] == 0
