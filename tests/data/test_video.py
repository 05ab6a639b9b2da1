"""Video sources on the real videos in ../shared/data/videos: counts, seeking, pairs, bad files.

Frame i is the i-th frame of a plain sequential PyAV decode; every frame the seeking reader
returns is compared pixel-exactly with that independent full decode.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from siamae.data import video as V
from siamae.data.dataset import PretrainDataset, build_dataset, collate, loader_batch_size
from siamae.data.sources import UnreadableSample
from siamae.data.views import ViewMaker, _finish, crop_resize, sample_box
from siamae.errors import DataError
from siamae.recipes import load_config

VIDEOS = ["vtest.avi", "tree.avi", "box.mp4", "cup.mp4", "bikes.mp4", "carphone_pristine.mp4"]
_COUNT: dict[str, int] = {}


@pytest.fixture(scope="session")
def videos_dir(shared_data: Path) -> Path:
    d = shared_data / "videos"
    if not all((d / v).is_file() for v in VIDEOS):
        pytest.skip(f"the six sample videos are not all in {d}")
    return d


def reference(path: Path, ids: set[int] | None = None) -> tuple[int, dict[int, np.ndarray]]:
    """A plain sequential decode from the start (the reference numbering): the frame count and
    the frames ``ids`` as RGB arrays (only those are kept)."""
    key = str(path)
    if key not in _COUNT or ids:
        frames, n = {}, 0
        with av.open(key) as c:
            for n, f in enumerate(c.decode(video=0), start=1):
                if ids and n - 1 in ids:
                    frames[n - 1] = f.to_ndarray(format="rgb24")
        _COUNT[key] = n
        return n, frames
    return _COUNT[key], {}


@pytest.fixture(scope="module")
def source(videos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> V.VideoFileSource:
    return V.make_source(videos_dir, "videos", tmp_path_factory.mktemp("idx"), progress=False)


def _by_name(src: V.VideoFileSource) -> dict[str, int]:
    return {Path(src.name(i)).name: i for i in range(len(src))}


def test_frame_counts_match_full_decode(source: V.VideoFileSource, videos_dir: Path) -> None:
    names = _by_name(source)
    assert sorted(names) == sorted(VIDEOS)
    codecs = set()
    for v in VIDEOS:
        e = source.entries[names[v]]
        codecs.add(e["codec"])
        assert e["num_frames"] == reference(videos_dir / v)[0], v
    assert source.entries[names["vtest.avi"]]["num_frames"] == 795
    assert len(codecs) >= 3  # msmpeg4, cinepak, h264
    assert not source.unreadable


def test_seeking_reader_is_pixel_exact(source: V.VideoFileSource, videos_dir: Path) -> None:
    rng = np.random.default_rng(0)
    names = _by_name(source)
    for v in VIDEOS:
        i = names[v]
        n = source.num_frames_of(i)
        keys = [k for k, _ in source.entries[i]["keyframes"]]
        ids = {0, n - 1, *keys, *(k - 1 for k in keys if k), *(min(k + 5, n - 1) for k in keys)}
        ids |= {int(t) for t in rng.integers(0, n, 4)}
        _, full = reference(videos_dir / v, ids)
        V.DECODE_STATS.update(decoded=0, seeks=0, fallbacks=0)
        for t in sorted(ids):
            (img,) = source.load_frames(i, [t])
            assert np.array_equal(np.asarray(img), full[t]), f"{v} frame {t}"
        assert V.DECODE_STATS["fallbacks"] == 0, v
        if len(keys) > 1:  # the reader seeks instead of decoding from the start every time
            assert V.DECODE_STATS["seeks"] > 0, v
            assert V.DECODE_STATS["decoded"] < len(ids) * n / 2, v


def test_pairs_are_gap_apart_with_same_crop_and_flip(
    source: V.VideoFileSource, videos_dir: Path
) -> None:
    gap = (4, 48)
    names = _by_name(source)
    for v in VIDEOS:
        i = names[v]
        n = source.num_frames_of(i)
        pairs, draws = [], []
        for seed in range(3):
            pairs.append(source.load_frame_pair(i, np.random.default_rng([seed, i]), gap))
            # The same draws, replayed: frame t and t + g with g in [4, 48) clamped to the video.
            twin = np.random.default_rng([seed, i])
            g = min(int(twin.integers(gap[0], gap[1])), n - 1)
            draws.append((int(twin.integers(0, n - g)), g))
        _, full = reference(videos_dir / v, {t + d for t, g in draws for d in (0, g)})
        for (a, b), (t, g) in zip(pairs, draws):
            assert np.array_equal(np.asarray(a), full[t]), f"{v} first frame"
            assert np.array_equal(np.asarray(b), full[t + g]), f"{v} second frame"
            assert 4 <= g < 48 or g == n - 1


def test_views_share_crop_and_flip(source: V.VideoFileSource, videos_dir: Path) -> None:
    """The two views equal the same box and flip applied to the two independently decoded frames."""
    maker = ViewMaker(kind="frames", out=32, global_scale=(0.5, 1.0), hflip=0.5)
    names = _by_name(source)
    flips = set()
    for v in ("bikes.mp4", "cup.mp4"):
        i = names[v]
        n = source.num_frames_of(i)
        seeds = range(6)
        starts = []
        for seed in seeds:
            twin = np.random.default_rng(seed)
            g = min(int(twin.integers(4, 48)), n - 1)
            starts.append((int(twin.integers(0, n - g)), g))
        _, full = reference(videos_dir / v, {t + d for t, g in starts for d in (0, g)})
        for seed in seeds:
            views = maker(source, i, np.random.default_rng(seed))
            twin = np.random.default_rng(seed)
            g = min(int(twin.integers(4, 48)), n - 1)
            t = int(twin.integers(0, n - g))
            h, w = full[t].shape[:2]
            box = sample_box(twin, w, h, (0.5, 1.0), maker.ratio)
            flip = bool(twin.random() < 0.5)
            flips.add(flip)
            for view, frame in zip(views, (full[t], full[t + g])):
                want = _finish(crop_resize(Image.fromarray(frame), box, 32), flip)
                assert np.array_equal(view, want)
    assert flips == {True, False}


def test_repeated_sampling_one_decode(source: V.VideoFileSource) -> None:
    cfg = load_config(None, ["method=siammae", "data.source=synthetic", "model.img_size=32"])
    maker = ViewMaker(kind="frames", out=32, global_scale=(0.5, 1.0))
    ds = PretrainDataset(source, maker, num_patches=4, seed=0, repeats=3)
    batch = collate([ds[(0, 0)], ds[(0, 1)]])
    assert batch["images"].shape == (6, 2, 3, 32, 32)
    assert batch["mask_noise"].shape == (6, 4)
    assert batch["index"].tolist() == [0, 0, 0, 1, 1, 1]
    again = collate([ds[(0, 0)], ds[(0, 1)]])  # deterministic given (seed, epoch, index)
    assert torch.equal(batch["images"], again["images"])
    cfg.data.batch_size, cfg.data.repeated_sampling = 8, 2
    assert loader_batch_size(cfg) == 4
    cfg.data.repeated_sampling = 3
    with pytest.raises(DataError, match="multiple"):
        loader_batch_size(cfg)


def test_open_image_is_one_random_frame(source: V.VideoFileSource, videos_dir: Path) -> None:
    i = _by_name(source)["cup.mp4"]
    img = source.open_image(i, np.random.default_rng(5))
    t = int(np.random.default_rng(5).integers(0, source.num_frames_of(i)))
    assert np.array_equal(np.asarray(img), reference(videos_dir / "cup.mp4", {t})[1][t])


def test_bad_files_are_skipped_and_counted(videos_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "videos"
    folder.mkdir()
    for v in ("bikes.mp4", "tree.avi"):
        shutil.copy(videos_dir / v, folder / v)
    data = (videos_dir / "cup.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: int(len(data) * 0.3)])
    (folder / "notes.mp4").write_text("this is a text file, not a video\n" * 20)
    src = V.make_source(folder, "videos", tmp_path / "run", progress=False)
    assert len(src) == 2
    bad = sorted(Path(p).name for p, _ in src.unreadable)
    assert bad == ["notes.mp4", "truncated.mp4"]
    index = json.loads((tmp_path / "run" / V.INDEX_FILE).read_text())
    assert sum(not e["ok"] for e in index["entries"]) == 2

    # A file that breaks after indexing is skipped and counted by the dataset, not fatal.
    (folder / "bikes.mp4").write_bytes(data[: int(len(data) * 0.3)])
    maker = ViewMaker(kind="frames", out=32, global_scale=(0.5, 1.0))
    ds = PretrainDataset(src, maker, num_patches=4)
    i = _by_name(src)["bikes.mp4"]
    with pytest.raises(UnreadableSample):
        src.load_frame_pair(i, np.random.default_rng(0), (4, 48))
    item = ds[(0, i)]
    assert item["skipped"] == 1 and "bikes.mp4" in item["skipped_files"]
    assert item["images"].shape == (2, 3, 32, 32)


def test_index_is_cached_and_reused(videos_dir: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    folder = tmp_path / "videos"
    folder.mkdir()
    for v in ("tree.avi", "carphone_pristine.mp4"):
        shutil.copy(videos_dir / v, folder / v)
    first = V.make_source(folder, "videos", tmp_path, progress=False)
    calls: list[str] = []
    real = V.probe_video
    monkeypatch.setattr(V, "probe_video", lambda p: calls.append(p) or real(p))
    again = V.make_source(folder, "videos", tmp_path, progress=False)
    assert calls == [] and again.entries == first.entries
    shutil.copy(videos_dir / "bikes.mp4", folder / "bikes.mp4")  # a new file: only it is probed
    third = V.make_source(folder, "videos", tmp_path, progress=False)
    assert [Path(c).name for c in calls] == ["bikes.mp4"] and len(third) == 3


def test_list_file_and_single_file(videos_dir: Path, tmp_path: Path) -> None:
    lst = tmp_path / "train.txt"
    lst.write_text(
        f"# K400 style list\n{videos_dir / 'tree.avi'} 0 -1\n\n{videos_dir / 'box.mp4'}\n"
    )
    src = V.make_source(lst, "videos", progress=False)
    assert [Path(src.name(i)).name for i in range(len(src))] == ["tree.avi", "box.mp4"]
    one = V.make_source(videos_dir / "cup.mp4", "videos", progress=False)
    assert len(one) == 1
    with pytest.raises(DataError, match="does not exist"):
        V.make_source(tmp_path / "nowhere", "videos", progress=False)
    with pytest.raises(DataError, match="data.source=frames"):
        (tmp_path / "f" / "a").mkdir(parents=True)
        (tmp_path / "f" / "a" / "00001.jpg").write_bytes(b"")
        V.make_source(tmp_path / "f", "videos", progress=False)


@pytest.fixture(scope="module")
def frames_root(videos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Kinetics layout: <class>/<video>/%05d.jpg, a few frames of two real videos."""
    root = tmp_path_factory.mktemp("frames")
    for cls, v, count in (("cycling", "bikes.mp4", 12), ("office", "cup.mp4", 9)):
        out = root / cls / Path(v).stem
        out.mkdir(parents=True)
        _, frames = reference(videos_dir / v, set(range(count)))
        for t, frame in frames.items():
            Image.fromarray(frame).save(out / f"{t + 1:05d}.jpg", quality=95)
    return root


def test_frame_folders(frames_root: Path) -> None:
    src = V.make_source(frames_root, "frames", progress=False)
    assert [Path(src.name(i)).name for i in range(len(src))] == ["bikes", "cup"]
    assert [src.num_frames_of(i) for i in range(2)] == [12, 9]
    rng = np.random.default_rng(1)
    a, b = src.load_frame_pair(0, rng, (4, 48))
    twin = np.random.default_rng(1)
    g = min(int(twin.integers(4, 48)), 11)
    t = int(twin.integers(0, 12 - g))
    assert Path(a.filename).name == f"{t + 1:05d}.jpg"
    assert Path(b.filename).name == f"{t + g + 1:05d}.jpg"
    # Repeated frames (and repeated sampling) get their own lazily opened image each.
    a, b = src.load_frames(1, [3, 3])
    assert a is not b
    maker = ViewMaker(kind="frames", out=32, global_scale=(0.5, 1.0))
    groups = maker.repeated(src, 1, np.random.default_rng(0), 4)
    assert len(groups) == 4 and all(v.shape == (32, 32, 3) for g in groups for v in g)
    lst = frames_root / "list.txt"
    lst.write_text("office/cup 0 9\n")
    assert len(V.make_source(lst, "frames", progress=False)) == 1


def test_natural_order() -> None:
    names = ["f10.jpg", "f9.jpg", "f100.jpg", "f1.jpg"]
    assert sorted(names, key=V.natural_key) == ["f1.jpg", "f9.jpg", "f10.jpg", "f100.jpg"]


@pytest.fixture
def one_thread():  # noqa: ANN201
    """One torch thread: on a loaded 2-core machine two threads spin against each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def test_siammae_overfits_one_batch_of_real_pairs(
    videos_dir: Path, tmp_path: Path, one_thread: None
) -> None:
    from siamae.methods.cropmae import SiamMAE

    torch.manual_seed(0)
    cfg = load_config(
        None,
        [
            "method=siammae",
            "model.arch=vit_tiny",
            "model.img_size=32",
            "model.patch_size=8",
            "data.source=videos",
            f"data.path={videos_dir}",
            "data.num_workers=0",
            "decoder.dropout=0",
            f"run.out_dir={tmp_path}",
        ],
    )
    model = SiamMAE.from_config(cfg)
    assert model.mask_ratio == 0.95
    ds = build_dataset(cfg, "frames", model.encoder.num_patches)
    batch = collate([ds[(0, i)] for i in range(len(ds))])
    batch["images"] = _normalize(batch["images"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = model(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # Halves (much of it the first steps' drop to the mean patch), then keeps falling.
    assert losses[-1] < 0.5 * losses[0], losses
    assert losses[-1] < losses[10], losses
    assert (tmp_path / V.INDEX_FILE).is_file()  # the index was cached beside the run


def test_siammae_training_steps_on_real_videos(
    videos_dir: Path, tmp_path: Path, one_thread: None
) -> None:
    trainer = pytest.importorskip("siamae.engine.trainer")
    cfg = load_config(
        None,
        [
            "method=siammae",
            "model.arch=vit_tiny",
            "model.img_size=32",
            "model.patch_size=8",
            "data.source=videos",
            f"data.path={videos_dir}",
            "data.batch_size=2",
            "data.num_workers=0",
            "decoder.dim=64",
            "decoder.num_heads=4",
            "decoder.mlp_dim=128",
            "decoder.depth=2",
            "optim.max_steps=3",
            f"run.out_dir={tmp_path / 'run'}",
            "run.progress=false",
            "run.visualize=false",
            "run.tensorboard=false",
        ],
    )
    summary = trainer.train(cfg)
    assert summary is not None
    assert (tmp_path / "run" / V.INDEX_FILE).is_file()


def test_k400_recipes() -> None:
    root = Path(__file__).resolve().parents[2] / "configs"
    siam = load_config(root / "siammae_vits16_k400.yaml", ["data.path=/data/k400"])
    crop = load_config(root / "cropmae_vits16_k400.yaml", ["data.path=/data/k400"])
    for cfg in (siam, crop):
        assert cfg.model.arch == "vit_small" and cfg.model.patch_size == 16
        assert cfg.data.source == "videos" and cfg.data.global_scale == (0.5, 1.0)
        assert cfg.optim.base_lr == 1e-4 and cfg.optim.epochs == 400
        assert cfg.optim.warmup_epochs == 20 and cfg.run.precision == "fp16"
        assert cfg.data.repeated_sampling == 1
    assert (
        siam.method == "siammae"
        and siam.siammae.mask_ratio == 0.95
        and siam.data.frame_gap == (4, 48)
    )
    assert crop.method == "cropmae" and crop.cropmae.mask_ratio == 0.985
