"""``--score-only``: a folder of predictions scored without an encoder, as the propagation
commands score their own predictions, and its bad input in one line."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.io import savemat

from siamae.commands.cli import main
from siamae.commands.entry import main as entry_main
from siamae.data.synthetic import synthetic_video
from siamae.eval.propagation.davis import (
    load_sequence,
    read_mask,
    score_predictions,
    write_mask,
)
from siamae.eval.propagation.engine import protocol, resize_ids
from siamae.eval.propagation.jhmdb import evaluate_jhmdb
from siamae.eval.propagation.layouts import resize_nearest
from siamae.eval.propagation.score_command import score_without_torch
from siamae.eval.propagation.scoring import (
    score_davis_folder,
    score_jhmdb_folder,
    score_vip_folder,
)
from siamae.eval.propagation.vip import confusion, miou
from siamae.models.vit import Encoder

SEQUENCES = ["motocross-jump", "scooter-black"]  # the two shortest shared sequences


def write_noisy_predictions(root, folder, names, size=(480, 880), seed=0):
    """Each annotation resized to ``size``, shifted and with blocks of wrong ids: boundaries and
    regions that differ from the truth frame by frame."""
    rng = np.random.default_rng(seed)
    for name in names:
        seq = load_sequence(root, name)
        (folder / name).mkdir(parents=True)
        for t, m in enumerate(seq.masks):
            ids = resize_ids(read_mask(m), size)
            ids = np.where(ids == 255, 0, ids)
            ids = np.roll(ids, (int(rng.integers(-9, 10)), int(rng.integers(-9, 10))), (0, 1))
            y, x = rng.integers(0, size[0] - 40), rng.integers(0, size[1] - 40)
            ids[y : y + 40, x : x + 40] = rng.integers(0, ids.max() + 1)
            write_mask(
                folder / name / f"{m.stem}.png", ids if t else resize_ids(read_mask(m), size)
            )


@pytest.fixture(scope="module")
def davis_predictions(shared_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("preds")
    write_noisy_predictions(shared_data / "DAVIS", folder, SEQUENCES)
    return shared_data / "DAVIS", folder


@pytest.mark.parametrize("threads", [1, 3])
def test_score_only_equals_the_scorer_used_today(davis_predictions, threads):
    root, folder = davis_predictions
    today, per_seq = score_predictions(root, folder, sequences=SEQUENCES)
    fast = score_davis_folder(root, folder, sequences=SEQUENCES, threads=threads, progress=False)
    assert fast.summary["sequences"] == SEQUENCES and 0.2 < today["J&F-Mean"] < 0.95
    for key in ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"):
        assert fast.summary[key] == pytest.approx(today[key], abs=1e-6)
    for a, b in zip(fast.sequences, per_seq):
        np.testing.assert_allclose(a.j, b.j, atol=1e-6)
        np.testing.assert_allclose(a.f, b.f, atol=1e-6)


# davis2017-evaluation (unmodified, its own venv) on this module's predictions, written in its
# 2017 layout with the annotations resized by resize_ids to 480x880: its DAVISEvaluation's J and
# F arrays, averaged. The fast scorer gave the same floats to the last bit when recorded.
OFFICIAL = {
    "J&F-Mean": 0.8755487474188832,
    "J-Mean": 0.8158262921245564,
    "J-Recall": 1.0,
    "J-Decay": 0.009855312493566804,
    "F-Mean": 0.9352712027132101,
    "F-Recall": 1.0,
    "F-Decay": -0.010702288505818836,
}
OFFICIAL_PER_SEQUENCE = {  # (J-Mean, F-Mean)
    "motocross-jump": (0.8232457725054976, 0.9395709497292788),
    "scooter-black": (0.8084068117436152, 0.9309714556971413),
}


def test_score_only_equals_davis2017_evaluation(davis_predictions):
    root, folder = davis_predictions
    fast = score_davis_folder(root, folder, sequences=SEQUENCES, threads=2, progress=False)
    for key, value in OFFICIAL.items():
        assert fast.summary[key] == pytest.approx(value, abs=1e-6), key
    for seq in fast.sequences:
        j, f = OFFICIAL_PER_SEQUENCE[seq.name]
        assert seq.j.mean() == pytest.approx(j, abs=1e-6)
        assert seq.f.mean() == pytest.approx(f, abs=1e-6)


def test_entry_point_scores_as_the_full_command(davis_predictions, tmp_path, capsys):
    """``siamae`` answers --score-only before importing the CLI: the same files and lines."""
    root, folder = davis_predictions
    args = ["eval", "davis", "--score-only", str(folder), "--data-root", str(root),
            "--sequences", ",".join(SEQUENCES), "--threads", "2", "--no-progress"]  # fmt: skip
    assert entry_main([*args, "--out", str(tmp_path / "a")]) == 0
    fast_lines = capsys.readouterr().out.replace(str(tmp_path / "a"), "OUT")
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out.replace(str(tmp_path / "b"), "OUT") == fast_lines
    for name in ("summary.json", "per_sequence.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "davis", "--data-root", "D", "--random-init"],  # no --score-only
        ["eval", "davis", "--score-only", "P", "--data-root", "D", "--checkpoint", "c.pth"],
        ["eval", "davis", "--score-only", "P", "--data-root", "D", "-h"],
        ["eval", "davis", "--score-only", "P", "--data-root", "D", "--seq", "a"],  # abbreviated
        ["eval", "davis", "--score-only", "P"],  # no --data-root: the full parser says so
        ["eval", "vip", "--score-only", "P", "--data-root", "D", "--void", "ignore"],
        ["eval", "segment", "--score-only", "P", "--data-root", "D"],
        ["pretrain", "--score-only"],
    ],
)
def test_other_command_lines_go_to_the_full_parser(argv):
    assert score_without_torch(argv) is None


def test_score_only_imports_no_torch(tmp_path):
    root, preds = _vip_fixture(tmp_path)
    code = (
        "import sys; from siamae.commands.entry import main; "
        f"rc = main(['eval', 'vip', '--score-only', {str(preds)!r}, '--data-root', "
        f"{str(root)!r}, '--out', {str(tmp_path / 'o')!r}, '--no-progress']); "
        "print(rc, 'torch' in sys.modules, 'timm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == "0 False False", out.stderr
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["videos"] == 2


@pytest.mark.parametrize("exact", [False, True])
def test_resize_nearest_is_torchs_nearest(exact):
    """The NumPy resize (the scorer's, and the engine's resize_ids) picks torch's pixels (float32
    index arithmetic included): the published flow resizes with torch."""
    rng = np.random.default_rng(3)
    sizes = [1, 2, 3, 7, 24, 31, 240, 432, 480, 540, 613, 720, 854, 880, 1080]
    ids = rng.integers(0, 255, (1080, 1080), dtype=np.uint8)
    for h0, h1 in zip(sizes, sizes[::-1] + sizes[1:]):
        for w0, w1 in ((854, 880), (h1, h0), (480, 481)):
            src = ids[:h0, :w0]
            t = torch.from_numpy(np.ascontiguousarray(src)).float()[None, None]
            mode = "nearest-exact" if exact else "nearest"
            want = F.interpolate(t, size=(h1, w1), mode=mode)[0, 0].numpy().astype(np.uint8)
            assert np.array_equal(resize_nearest(src, (h1, w1), exact=exact), want)
            assert np.array_equal(resize_ids(src, (h1, w1), exact=exact), want)


def per_seq_jf(root, folder):
    _, per_seq = score_predictions(root, folder, sequences=SEQUENCES[:1])
    return per_seq[0].object_rows()[0]["J&F-Mean"]


def test_cli_score_only_writes_summary_and_table(davis_predictions, tmp_path, capsys):
    root, folder = davis_predictions
    out = tmp_path / "scores"
    rc = main(["eval", "davis", "--score-only", str(folder), "--data-root", str(root),
               "--sequences", ",".join(SEQUENCES), "--out", str(out), "--threads", "2",
               "--no-progress"])  # fmt: skip
    assert rc == 0
    today, _ = score_predictions(root, folder, sequences=SEQUENCES)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["J&F-Mean"] == pytest.approx(today["J&F-Mean"], abs=1e-6)
    with open(out / "per_sequence.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["sequence"] for r in rows] == SEQUENCES  # one object each (DAVIS-2016 masks)
    assert float(rows[0]["J&F-Mean"]) == pytest.approx(per_seq_jf(root, folder), abs=1e-4)
    assert f"J&F-Mean {today['J&F-Mean']:.4f}" in capsys.readouterr().out


def test_score_only_skips_an_incomplete_sequence(davis_predictions, tmp_path):
    root, folder = davis_predictions
    partial = tmp_path / "partial"
    shutil.copytree(folder, partial)
    next((partial / "scooter-black").iterdir()).unlink()
    res = score_davis_folder(root, partial, sequences=SEQUENCES, progress=False)
    assert res.summary["sequences"] == ["motocross-jump"]
    assert res.summary["skipped"] == ["scooter-black"]


@pytest.mark.parametrize("case", ["missing", "wrong layout", "flat files"])
@pytest.mark.parametrize("entry", [main, entry_main])
def test_score_only_bad_folder_is_one_line_exit_2(shared_data, tmp_path, capsys, case, entry):
    preds = tmp_path / "preds"
    if case == "wrong layout":
        (preds / "not-a-sequence").mkdir(parents=True)
    elif case == "flat files":  # frames straight in the folder, no sequence folders
        preds.mkdir()
        write_mask(preds / "00000.png", np.zeros((8, 8), np.uint8))
    out = tmp_path / "out"
    rc = entry(["eval", "davis", "--score-only", str(preds), "--data-root",
                str(shared_data / "DAVIS"), "--out", str(out), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(preds) in err
    assert not out.exists()


def test_without_score_only_an_encoder_is_still_required(tmp_path, capsys):
    rc = main(["eval", "davis", "--data-root", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--checkpoint or --random-init" in err


def _vip_fixture(tmp_path, hist=None):
    """Two VIP videos of three annotated frames and predictions at half the size; ``hist``
    gets the confusion matrix the scorer must find."""
    root = tmp_path / "VIP" / "VIP_Fine"
    rng = np.random.default_rng(1)
    for video in ("v1", "v2"):
        (root / "Images" / video).mkdir(parents=True)
        (root / "Annotations" / "Category_ids" / video).mkdir(parents=True)
        (tmp_path / "preds" / video).mkdir(parents=True)
        for t in range(3):
            gt = rng.integers(0, 6, (24, 32)).astype(np.uint8)
            pred = rng.integers(0, 6, (12, 16)).astype(np.uint8)  # at half the size
            Image.fromarray(gt).save(root / "Annotations" / "Category_ids" / video / f"{t}.png")
            Image.fromarray(pred).save(tmp_path / "preds" / video / f"{t}.png")
            if hist is not None:
                hist += confusion(gt, resize_ids(pred, gt.shape, exact=True))
    return tmp_path / "VIP", tmp_path / "preds"


def test_vip_score_only_equals_a_direct_confusion_matrix(tmp_path, capsys):
    hist = np.zeros((20, 20), np.int64)
    _vip_fixture(tmp_path, hist)
    summary = score_vip_folder(tmp_path / "VIP", tmp_path / "preds", threads=2, progress=False)
    assert summary["videos"] == 2 and summary["mIoU"] == pytest.approx(miou(hist)[0], abs=1e-12)
    rc = main(["eval", "vip", "--score-only", str(tmp_path / "preds"), "--data-root",
               str(tmp_path / "VIP"), "--out", str(tmp_path / "o"), "--no-progress"])  # fmt: skip
    assert rc == 0 and json.loads((tmp_path / "o" / "summary.json").read_text())["videos"] == 2
    assert f"{miou(hist)[0]:.4f}" in capsys.readouterr().out
    rc = main(["eval", "vip", "--score-only", str(tmp_path / "none"), "--data-root",
               str(tmp_path / "VIP"), "--no-progress"])  # fmt: skip
    assert rc == 2 and "does not exist" in capsys.readouterr().err


# -- JHMDB ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jhmdb_run(tmp_path_factory):
    """A propagation run on two JHMDB clips (official layout, joints by scipy.io.savemat): the
    data root and the run's folder (its summary and per-clip predictions)."""
    tmp = tmp_path_factory.mktemp("jhmdb")
    root, rng = tmp / "JHMDB", np.random.default_rng(4)
    for seed, clip in enumerate(("walk/clip_a", "run/clip_b")):
        frames, _ = synthetic_video(0, size=48, num_frames=5, seed=seed, width=64)
        (root / "Rename_Images" / clip).mkdir(parents=True)
        (root / "joint_positions" / clip).mkdir(parents=True)
        for i, f in enumerate(frames):
            Image.fromarray(f).save(root / "Rename_Images" / clip / f"{i + 1:05d}.png")
        start = np.stack([rng.uniform(6, 58, 15), rng.uniform(6, 42, 15)])[:, :, None]
        pos = start + np.cumsum(rng.normal(0, 2, (2, 15, 5)), axis=2)  # joints that move
        savemat(root / "joint_positions" / clip / "joint_positions.mat", {"pos_img": pos})
    torch.manual_seed(0)
    encoder = Encoder("vit_tiny", 16, 64, depth=2).eval()
    params = protocol("cropmae", "jhmdb", ["resize=64x64"])
    evaluate_jhmdb(encoder, root, tmp / "run", params, progress=False)
    return root, tmp / "run"


def test_jhmdb_score_only_equals_the_run(jhmdb_run, tmp_path, capsys):
    root, run = jhmdb_run
    summary = json.loads((run / "summary.json").read_text())
    assert 0 < summary["PCK@0.1"] < summary["PCK@0.2"] <= 100  # neither all lost nor all found
    scored = score_jhmdb_folder(root, run, threads=2, progress=False)
    assert scored["clips"] == 2 and scored["skipped"] == []
    assert (scored["PCK@0.1"], scored["PCK@0.2"]) == (summary["PCK@0.1"], summary["PCK@0.2"])
    out = tmp_path / "scores"
    rc = entry_main(["eval", "jhmdb", "--score-only", str(run), "--data-root", str(root),
                     "--out", str(out), "--no-progress"])  # fmt: skip
    assert rc == 0 and f"PCK@0.1 {summary['PCK@0.1']:.2f}" in capsys.readouterr().out
    assert (out / "per_clip.csv").read_text() == (run / "per_clip.csv").read_text()
    assert json.loads((out / "summary.json").read_text())["PCK@0.2"] == summary["PCK@0.2"]


def test_jhmdb_score_only_skips_a_clip_without_predictions(jhmdb_run, tmp_path):
    root, run = jhmdb_run
    partial = tmp_path / "partial"
    shutil.copytree(run, partial)
    (partial / "run__clip_b_joints.npy").unlink()
    scored = score_jhmdb_folder(root, partial, progress=False)
    assert scored["clips"] == 1 and scored["skipped"] == ["run/clip_b"]


@pytest.mark.parametrize("case", ["missing", "empty", "wrong shape", "not npy"])
@pytest.mark.parametrize("entry", [main, entry_main])
def test_jhmdb_score_only_bad_folder_is_one_line_exit_2(jhmdb_run, tmp_path, capsys, case, entry):
    root, run = jhmdb_run
    preds = tmp_path / "preds"
    if case != "missing":
        preds.mkdir()
    if case == "wrong shape":
        np.save(preds / "walk__clip_a_joints.npy", np.zeros((15, 2, 5)))
    elif case == "not npy":
        (preds / "walk__clip_a_joints.npy").write_text("x, y\n")
    out = tmp_path / "out"
    rc = entry(["eval", "jhmdb", "--score-only", str(preds), "--data-root", str(root),
                "--out", str(out), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(preds) in err, err
    assert not out.exists()
