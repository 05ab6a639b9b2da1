"""Readers on fixtures written in the official formats, end-to-end runs on them, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from siamae.data.synthetic import synthetic_video
from siamae.errors import DataError
from siamae.eval.propagation.davis import evaluate_davis, list_sequences, read_mask, write_mask
from siamae.eval.propagation.engine import protocol
from siamae.eval.propagation.jhmdb import (
    decode_joints,
    evaluate_jhmdb,
    joint_labels,
    list_clips,
    read_joints,
)
from siamae.eval.propagation.results import split_lines, video_name
from siamae.eval.propagation.vip import evaluate_vip, read_category_ids
from siamae.models.vit import Encoder
from siamae.overlays import PALETTE


@pytest.fixture(scope="module")
def tiny_encoder() -> Encoder:
    torch.manual_seed(0)
    return Encoder("vit_tiny", 16, 64, depth=2).eval()


def make_davis(root: Path, year: str = "2017", n_seq: int = 2, t: int = 5) -> Path:
    for s in range(n_seq):
        name = f"seq{s}"
        frames, masks = synthetic_video(s, size=64, num_frames=t, seed=1, width=96)
        (root / "JPEGImages/480p" / name).mkdir(parents=True)
        (root / "Annotations/480p" / name).mkdir(parents=True)
        for i in range(t):
            Image.fromarray(frames[i]).save(root / "JPEGImages/480p" / name / f"{i:05d}.jpg")
            path = root / "Annotations/480p" / name / f"{i:05d}.png"
            if year == "2017":
                write_mask(path, masks[i])
            else:
                Image.fromarray(((masks[i] > 0) * 255).astype(np.uint8), mode="L").save(path)
    (root / "ImageSets" / year).mkdir(parents=True)
    names = "\n".join(f"seq{s}" for s in range(n_seq))
    (root / "ImageSets" / year / "val.txt").write_text(names + "\n")
    return root


def test_davis_2017_palette_mask_roundtrip(tmp_path):
    ids = np.zeros((20, 30), dtype=np.uint8)
    ids[2:8, 3:9] = 1
    ids[10:15, 10:20] = 2
    ids[0, :] = 255
    write_mask(tmp_path / "m.png", ids)
    img = Image.open(tmp_path / "m.png")
    assert img.mode == "P"
    assert tuple(img.getpalette()[3:6]) == (128, 0, 0)  # DAVIS colour of object 1
    assert (read_mask(tmp_path / "m.png") == ids).all()


def test_davis_2016_grayscale_mask(tmp_path):
    arr = np.zeros((10, 12), dtype=np.uint8)
    arr[3:6, 4:9] = 255
    Image.fromarray(arr, mode="L").save(tmp_path / "g.png")
    assert (read_mask(tmp_path / "g.png") == (arr > 0)).all()


def test_davis_rgb_mask_maps_through_palette(tmp_path):
    ids = np.array([[0, 1], [2, 3]], dtype=np.uint8)
    Image.fromarray(PALETTE[ids]).save(tmp_path / "rgb.png")
    assert (read_mask(tmp_path / "rgb.png") == ids).all()


def test_davis_bad_inputs(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        read_mask(tmp_path / "broken.png")
    with pytest.raises(DataError, match="does not exist"):
        list_sequences(tmp_path / "missing")
    root = make_davis(tmp_path / "DAVIS", n_seq=1, t=3)
    with pytest.raises(DataError, match="nope"):
        evaluate_davis(
            Encoder("vit_tiny", 16, 64, depth=1), root, tmp_path / "o", protocol("cropmae"),
            sequences=["nope"], progress=False,
        )  # fmt: skip


@pytest.mark.parametrize("year", ["2017", "2016"])
def test_davis_fixture_end_to_end(tmp_path, tiny_encoder, year):
    root = make_davis(tmp_path / "DAVIS", year)
    out = tmp_path / "out"
    params = protocol("cropmae", "davis", ["resize=64x96"])
    res = evaluate_davis(tiny_encoder, root, out, params, overlays=["seq0"], progress=False)
    assert list_sequences(root) == ["seq0", "seq1"]
    for name in ("seq0", "seq1"):
        pngs = sorted((out / name).glob("*.png"))
        assert [p.name for p in pngs] == [f"{i:05d}.png" for i in range(5)]
        assert Image.open(pngs[1]).mode == "P"
    csv = (out / "per_sequence.csv").read_text().splitlines()
    assert csv[0].startswith("sequence,object,J&F-Mean")
    # The file as the csv module writes it (\r\n), the figures with 4 decimals.
    raw = (out / "per_sequence.csv").read_bytes()
    assert raw.startswith(b"sequence,object,J&F-Mean,J-Mean,J-Recall,J-Decay,F-Mean,F-Recall,"
                          b"F-Decay,frames\r\nseq0,1,")  # fmt: skip
    assert all(len(v.split(".")[1]) == 4 for v in csv[1].split(",")[2:9])
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["benchmark", "protocol", "params", "resolution", "score_at", "void",
                             "sequences", "unscored_sequences", "max_frames", "J&F-Mean",
                             "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay",
                             "objects", "encoder", "timing"]  # fmt: skip
    assert list(summary["timing"]) == ["frames", "seconds_total", "seconds_reading",
                                       "seconds_features", "seconds_propagation", "features_fps",
                                       "propagation_fps"]  # fmt: skip
    assert summary["timing"]["frames"] == 10  # 2 sequences of 5 frames
    assert summary["objects"] == len(csv) - 1 == len(res.sequences[0].j) + len(res.sequences[1].j)
    assert (out / "overlays" / "seq0.png").is_file()


def test_split_files_name_videos_by_their_last_part(tmp_path):
    split = tmp_path / "split.txt"
    split.write_text("JPEGImages/480p/bear/ extra\n\n  \nblackswan\n/abs/dog\n")
    assert [video_name(fields[0]) for fields in split_lines(split)] == ["bear", "blackswan", "dog"]
    with pytest.raises(DataError, match="split file .*none.txt not found"):
        split_lines(tmp_path / "none.txt")


def test_jhmdb_mat_reader_and_heatmaps(tmp_path):
    pos = np.zeros((2, 15, 4))
    pos[0] = np.linspace(10, 60, 15)[:, None] + np.arange(4)  # 1-based MATLAB pixels
    pos[1] = np.linspace(20, 50, 15)[:, None]
    savemat(tmp_path / "joint_positions.mat", {"pos_img": pos, "scale": np.ones(4)})
    joints = read_joints(tmp_path / "joint_positions.mat")
    assert joints.shape == (2, 15, 4)
    assert joints[0, 0, 0] == pytest.approx(9.0)  # 0-based
    labels = joint_labels(np.array([[3.2] * 15, [4.0] * 15]), (10, 10))
    assert labels.shape == (16, 10, 10)
    assert labels[1].max() == 1.0  # peak 1, unnormalised, as CRW draws it
    assert labels[0].sum() == 100 - (labels[1:].sum(0) > 0).sum()  # background where no joint
    coords = decode_joints(labels)
    assert coords.shape == (2, 15)
    assert np.all(np.abs(coords[0] - 3.5) <= 1.0) and np.all(np.abs(coords[1] - 4.5) <= 1.0)
    savemat(tmp_path / "bad.mat", {"other": pos})
    with pytest.raises(DataError, match="pos_img"):
        read_joints(tmp_path / "bad.mat")


def test_jhmdb_fixture_end_to_end(tmp_path, tiny_encoder):
    root = tmp_path / "JHMDB"
    clip = "walk/clip_a"
    frames, _ = synthetic_video(0, size=48, num_frames=4, seed=2, width=64)
    (root / "Rename_Images" / clip).mkdir(parents=True)
    (root / "joint_positions" / clip).mkdir(parents=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(root / "Rename_Images" / clip / f"{i + 1:05d}.png")
    pos = np.stack(
        [
            np.linspace(10, 50, 15)[:, None].repeat(4, 1),
            np.linspace(8, 40, 15)[:, None].repeat(4, 1),
        ]
    )
    savemat(root / "joint_positions" / clip / "joint_positions.mat", {"pos_img": pos})
    # A split file in CRW's form (.mat, then the frames' folder) or naming the clip.
    split = tmp_path / "split.txt"
    split.write_text(f"x/joint_positions/{clip}/joint_positions.mat x/Rename_Images/{clip}\n"
                     f"\n{clip}/\n")  # fmt: skip
    assert [c.name for c in list_clips(root, str(split))] == [clip, clip]
    params = protocol("cropmae", "jhmdb", ["resize=64x64"])
    summary = evaluate_jhmdb(tiny_encoder, root, tmp_path / "out", params, progress=False)
    assert summary["clips"] == 1
    assert 0 <= summary["PCK@0.1"] <= summary["PCK@0.2"] <= 100
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert list(written) == ["benchmark", "protocol", "params", "clips", "PCK@0.1", "PCK@0.2",
                             "encoder", "timing"]  # fmt: skip
    assert list(written["timing"]) == ["frames", "seconds_total", "seconds_features",
                                       "seconds_propagation"]  # fmt: skip
    assert written["timing"]["frames"] == 4
    # per_clip.csv: \n line ends, the figures as Python prints them.
    table = (tmp_path / "out" / "per_clip.csv").read_bytes().decode()
    assert table == (
        f"clip,frames,PCK@0.1,PCK@0.2\n{clip},4,{summary['PCK@0.1']},{summary['PCK@0.2']}\n"
    )


def test_vip_fixture_end_to_end(tmp_path, tiny_encoder):
    root = tmp_path / "VIP"
    video = "videos1"
    frames, masks = synthetic_video(1, size=48, num_frames=4, seed=3, width=64)
    img_dir = root / "VIP_Fine" / "Images" / video
    ann_dir = root / "VIP_Fine" / "Annotations" / "Category_ids" / video
    img_dir.mkdir(parents=True)
    ann_dir.mkdir(parents=True)
    for i, (f, m) in enumerate(zip(frames, masks)):
        Image.fromarray(f).save(img_dir / f"{i:012d}.jpg")
        Image.fromarray((m * 7).astype(np.uint8), mode="L").save(ann_dir / f"{i:012d}.png")
    assert set(np.unique(read_category_ids(ann_dir / "000000000000.png"))) <= {0, 7, 14, 21}
    params = protocol("cropmae", "vip", ["resize=long:128"])
    assert params.topk == 10
    summary = evaluate_vip(tiny_encoder, root, tmp_path / "out", params, progress=False)
    assert summary["videos"] == 1 and 0 <= summary["mIoU"] <= 1
    assert len(list((tmp_path / "out" / video).glob("*.png"))) == 4
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert list(written) == ["benchmark", "protocol", "params", "videos", "mIoU",
                             "per_class_IoU", "encoder", "timing"]  # fmt: skip
    assert written["per_class_IoU"]["hat"] is None  # a class never seen
    assert written["timing"]["frames"] == 4


def test_cli_davis_and_errors(tmp_path, capsys):
    from siamae.commands.cli import main

    root = make_davis(tmp_path / "DAVIS", n_seq=1, t=4)
    out = tmp_path / "o"
    rc = main(["eval", "davis", "--random-init", "vit_tiny_patch16", "--data-root", str(root),
               "--set", "resize=64x96", "--out", str(out), "--no-progress"])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0
    assert "J&F-Mean" in text and "protocol cropmae" in text and "resized" in text
    assert (out / "summary.json").is_file()
    rc = main(["eval", "davis", "--random-init", "vit_tiny_patch16", "--data-root",
               str(tmp_path / "none"), "--out", str(out)])  # fmt: skip
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    torch.save({"model": {"foo": torch.zeros(2)}}, bad)
    rc = main(["eval", "davis", "--checkpoint", str(bad), "--data-root", str(root)])
    assert rc == 2 and "patch_embed" in capsys.readouterr().err


def test_cli_accepts_wrapped_state_dict(tmp_path, capsys):
    from siamae.commands.cli import main

    root = make_davis(tmp_path / "DAVIS", n_seq=1, t=3)
    enc = Encoder("vit_tiny", 16, 64, depth=2)
    state = {f"module.backbone.{k}": v for k, v in enc.vit.state_dict().items()}
    torch.save({"teacher": state, "head.weight": torch.zeros(3)}, tmp_path / "dino_like.pth")
    rc = main(["eval", "davis", "--checkpoint", str(tmp_path / "dino_like.pth"), "--data-root",
               str(root), "--protocol", "dino", "--set", "resize=64x96", "--out",
               str(tmp_path / "o"), "--no-progress"])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "matched" in text and "protocol dino" in text
