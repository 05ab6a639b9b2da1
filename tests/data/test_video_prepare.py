"""``siamae data videos`` and the readers of prepared videos: same frame ids and crops as the
originals, few frames decoded per pair, resumable and deterministic preparation, bad videos
skipped and listed, torchcodec against PyAV.

The videos are tiny synthetic ones written with PyAV (x264 with its default long keyframe
interval, as downloaded clips have), a few dozen frames each.
"""

from __future__ import annotations

import json
import sys
import types
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from siamae.commands.cli import main
from siamae.data import video as V
from siamae.data import video_prepare as P
from siamae.data import views as views_module
from siamae.data.dataset import build_source
from siamae.data.torchcodec_reader import check_torchcodec
from siamae.data.video_shards import FrameShardSource
from siamae.data.views import ViewMaker
from siamae.engine.trainer import train
from siamae.errors import ConfigError, DataError
from siamae.recipes import load_config

FRAMES = 40
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SETTINGS = P.PrepareSettings(gop=4, short_side=32)


def _write_video(
    path: Path, frames: int = FRAMES, size: tuple[int, int] = (80, 48), seed: int = 0
) -> None:
    """A smooth moving pattern (x264, keyframe only at frame 0), ``size`` = (width, height)."""
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 6)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.options = {"crf": "10", "g": "250", "threads": "1"}
        for t in range(frames):
            r = 127 + 100 * np.sin(x / 15 + t / 4 + phase)
            g = 127 + 100 * np.cos(y / 12 - t / 5)
            b = 127 + 80 * np.sin((x + y) / 20 + t / 3)
            rgb = np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 25)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    (root / "a").mkdir()
    _write_video(root / "a" / "one.mp4", seed=1)
    _write_video(root / "two.mp4", frames=30, size=(48, 64), seed=2)
    return root


@pytest.fixture(scope="module")
def prepared(originals: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "out"
    P.prepare_videos(originals, out, SETTINGS, progress=False)
    return out


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _views_and_boxes(source, seeds, monkeypatch) -> tuple[list, list]:  # noqa: ANN001
    """SiamMAE views of item i for each seed, and the crop boxes drawn for them."""
    boxes = []
    real = views_module.sample_box

    def recording(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        box = real(*args, **kwargs)
        boxes.append((args[1], args[2], box))
        return box

    monkeypatch.setattr(views_module, "sample_box", recording)
    maker = ViewMaker("frames", out=24, global_scale=(0.5, 1.0))
    views = [maker(source, i, np.random.default_rng(seed)) for i, seed in seeds]
    monkeypatch.setattr(views_module, "sample_box", real)
    return views, boxes


@pytest.mark.parametrize("fmt", ["mp4", "jpeg"])
def test_prepared_gives_the_same_frame_ids_and_crops(
    originals: Path, prepared: Path, tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if fmt == "jpeg":
        out = tmp_path / "jpeg"
        P.prepare_videos(
            originals, out, P.PrepareSettings(format="jpeg", short_side=32), progress=False
        )
        cfg = load_config(None, ["method=siammae", "data.source=videos", f"data.path={out}"])
        source = build_source(cfg, "frames", cache_dir=str(tmp_path))
        assert isinstance(source, FrameShardSource)
    else:
        source = V.make_source(prepared, "videos", progress=False)
    original = V.make_source(originals, "videos", progress=False)
    assert [Path(original.name(i)).stem for i in range(2)] == ["one", "two"]
    assert [source.num_frames_of(i) for i in range(2)] == [
        original.num_frames_of(i) for i in range(2)
    ]
    # stored smaller: the short side is 32, the original's size kept for the crops
    small = source.load_frames(0, [0])[0]
    assert min(small.size) == 32 and small.info[views_module.FULL_SIZE] == (80, 48)
    seeds = [(i, seed) for i in range(2) for seed in range(4)]
    got, got_boxes = _views_and_boxes(source, seeds, monkeypatch)
    want, want_boxes = _views_and_boxes(original, seeds, monkeypatch)
    assert got_boxes == want_boxes  # same image size and box for every seed
    # same frames (the pair's ids come from the same draws), pixels within the stated PSNR
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            assert _psnr(a, b) > 25
    # each prepared frame against the original frame scaled to the same size
    with av.open(original.name(0)) as c:
        ref = [
            f.reformat(width=52, height=32, format="rgb24", interpolation="AREA").to_ndarray()
            for f in c.decode(video=0)
        ]
    for t in (0, 7, 21, FRAMES - 1):
        frame = np.asarray(source.load_frames(0, [t])[0].convert("RGB"))
        assert _psnr(frame, ref[t]) > 30, t
        assert (
            _psnr(frame, ref[t + 1 if t == 0 else t - 1]) < _psnr(frame, ref[t]) - 3
        )  # frame t, no other


def test_pairs_decode_only_their_keyframe_runs(prepared: Path, originals: Path) -> None:
    source = V.make_source(prepared, "videos", progress=False)
    entry = source.entries[0]
    assert [k for k, _ in entry["keyframes"]] == list(range(0, FRAMES, 4))  # gop 4, no scene cuts
    with av.open(source.name(0)) as c:
        full = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    V.DECODE_STATS.update(decoded=0, seeks=0, fallbacks=0)
    wanted = [2, 3, 30, 33]  # runs from keyframes 0 (frames 2, 3), 28 (30) and 32 (33)
    assert [run[0] for run in V.plan_segments(entry["keyframes"], wanted)] == [0, 28, 32]
    frames = source.load_frames(0, wanted)
    assert all(np.array_equal(np.asarray(f), full[t]) for f, t in zip(frames, wanted))
    assert V.DECODE_STATS["fallbacks"] == 0 and V.DECODE_STATS["seeks"] == 2
    assert V.DECODE_STATS["decoded"] == 4 + 3 + 2  # not the 34 frames from 0 to 33
    # the original (one keyframe) decodes from the start: the preparation is what makes it cheap
    original = V.make_source(originals, "videos", progress=False)
    V.DECODE_STATS.update(decoded=0)
    original.load_frames(0, [30, 33])
    assert V.DECODE_STATS["decoded"] >= 34


def test_preparation_is_deterministic_and_resumes_where_it_stopped(
    originals: Path, prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    real = P.prepare_one
    calls = []

    def stop_at_second(job):  # noqa: ANN001, ANN202
        calls.append(job[2])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(P, "prepare_one", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        P.prepare_videos(originals, out, SETTINGS, progress=False)
    assert [json.loads(line)["out"] for line in (out / P.DONE_FILE).read_text().splitlines()] == [
        "a/one.mp4"
    ]
    assert not list(out.rglob("*.tmp"))
    calls.clear()
    report = P.prepare_videos(originals, out, SETTINGS, progress=False)
    assert calls == ["two.mp4"] and report.already == 1 and report.prepared == 1
    for name in ("a/one.mp4", "two.mp4"):  # the same bytes as the uninterrupted preparation
        assert (out / name).read_bytes() == (prepared / name).read_bytes(), name
    # other settings on the same folder are refused, one line, exit 2
    assert (
        main(["data", "videos", "--videos", str(originals), "--out", str(out), "--gop", "8"]) == 2
    )


def test_bad_videos_are_skipped_counted_and_listed(
    originals: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "good.mp4").write_bytes((originals / "two.mp4").read_bytes())
    (videos / "broken.mp4").write_bytes(b"not a video at all" * 50)
    (videos / "cut.mp4").write_bytes((originals / "two.mp4").read_bytes()[:600])
    out = tmp_path / "out"
    assert (
        main(["data", "videos", "--videos", str(videos), "--out", str(out), "--short-side", "32"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "prepared 1 videos" in printed and "2 skipped" in printed
    listed = (out / P.SKIPPED_VIDEOS_FILE).read_text().splitlines()
    assert sorted(Path(line.split("\t")[0]).name for line in listed) == ["broken.mp4", "cut.mp4"]
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".mp4") == ["good.mp4"]
    assert not list(out.glob("*.tmp"))


def test_nothing_preparable_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "x.mp4").write_bytes(b"garbage")
    assert (
        main(["data", "videos", "--videos", str(tmp_path / "v"), "--out", str(tmp_path / "o")]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none of the 1 videos" in err[0] and "x.mp4" in err[0]
    assert (
        main(["data", "videos", "--videos", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--videos" in err[0] and "nope" in err[0]


def test_resume_on_prepared_videos_is_bit_identical(prepared: Path, tmp_path: Path) -> None:
    def cfg(run: Path):  # noqa: ANN202
        return load_config(
            None,
            [
                "method=siammae",
                "model.arch=vit_tiny",
                "model.img_size=32",
                "model.patch_size=8",
                "data.source=videos",
                f"data.path={prepared}",
                "data.batch_size=2",
                "data.num_workers=0",
                "decoder.dim=32",
                "decoder.num_heads=2",
                "decoder.mlp_dim=64",
                "decoder.depth=1",
                "optim.max_steps=3",
                f"run.out_dir={run}",
                "run.progress=false",
                "run.visualize=false",
                "run.tensorboard=false",
            ],
        )

    train(cfg(tmp_path / "whole"), resume=False)
    first = train(cfg(tmp_path / "split"), resume=False, stop_after_steps=2)
    assert first["interrupted"] == "stop_after_steps"
    train(cfg(tmp_path / "split"), resume="auto")

    def weights(run: Path) -> dict[str, torch.Tensor]:
        return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]

    a, b = weights(tmp_path / "whole"), weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _torchcodec_or_skip() -> None:
    try:
        check_torchcodec()
    except DataError as err:
        pytest.skip(f"torchcodec cannot run here: {err}")


def test_torchcodec_gives_the_same_frames_as_pyav(
    prepared: Path, originals: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _torchcodec_or_skip()
    calls = []
    real = V.torchcodec_frames
    monkeypatch.setattr(V, "torchcodec_frames", lambda *a: calls.append(a[0]) or real(*a))
    for root in (prepared, originals):
        pyav = V.make_source(root, "videos", progress=False)
        tc = V.make_source(root, "videos", progress=False, backend="torchcodec")
        for i in range(len(pyav)):
            ids = [0, 3, 9, 21, pyav.num_frames_of(i) - 1]
            for a, b in zip(pyav.load_frames(i, ids), tc.load_frames(i, ids)):
                assert a.size == b.size and a.info == b.info
                diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
                assert diff.max() <= 2, (root, i)  # decoder rounding of the colour conversion
    # prepared videos (display order, a packet a frame) go to torchcodec; x264's default
    # B-frames in the originals are left to PyAV (plain_layout)
    assert sorted(Path(c).name for c in calls) == ["one.mp4", "two.mp4"]
    assert all(str(prepared) in c for c in calls)


def _torchcodec_without_ffmpeg(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchcodec 0.17 and later as installed without FFmpeg: it imports, its flag says so."""
    package = types.ModuleType("torchcodec")
    decoders = types.ModuleType("torchcodec.decoders")
    decoders.VideoDecoder = object  # type: ignore[attr-defined]
    core = types.ModuleType("torchcodec._core")
    ops = types.ModuleType("torchcodec._core.ops")
    ops._FFMPEG_AVAILABLE = False  # type: ignore[attr-defined]
    core.ops = ops  # type: ignore[attr-defined]
    for name, module in (
        ("torchcodec", package),
        ("torchcodec.decoders", decoders),
        ("torchcodec._core", core),
        ("torchcodec._core.ops", ops),
    ):
        monkeypatch.setitem(sys.modules, name, module)


@pytest.mark.parametrize("missing", ["torchcodec", "ffmpeg"])
def test_missing_torchcodec_is_one_line_and_exit_2(
    prepared: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    missing: str,
) -> None:
    if missing == "torchcodec":  # import fails, as when not installed
        monkeypatch.setitem(sys.modules, "torchcodec", None)
        monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)
    else:  # installed, but FFmpeg's libraries are not on the machine
        _torchcodec_without_ffmpeg(monkeypatch)
        with pytest.raises(DataError, match="FFmpeg's shared libraries were not found"):
            check_torchcodec()
    args = [
        "pretrain",
        "--config",
        str(CONFIGS / "demo.yaml"),
        "--data",
        str(prepared),
        "--out",
        str(tmp_path / "run"),
    ]
    args += [
        "--set",
        "method=siammae",
        "--set",
        "data.source=videos",
        "--set",
        "data.video_backend=torchcodec",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "pip install 'siamae[torchcodec]'" in err[0] and "apt-get install ffmpeg" in err[0]
    assert not (tmp_path / "run").exists()  # nothing written


def test_cuda_decoding_needs_torchcodec() -> None:
    with pytest.raises(ConfigError, match="video_device"):
        load_config(None, ["data.video_device=cuda"])
