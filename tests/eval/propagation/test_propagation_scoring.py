"""``--score-only``: a folder of predictions scored without an encoder, as the propagation
commands score their own predictions, and its bad input in one line."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from siamae.commands.cli import main
from siamae.eval.propagation.davis import (
    load_sequence,
    read_mask,
    score_predictions,
    write_mask,
)
from siamae.eval.propagation.engine import resize_ids
from siamae.eval.propagation.scoring import score_davis_folder, score_vip_folder
from siamae.eval.propagation.vip import confusion, miou

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
def test_score_only_bad_folder_is_one_line_exit_2(shared_data, tmp_path, capsys, case):
    preds = tmp_path / "preds"
    if case == "wrong layout":
        (preds / "not-a-sequence").mkdir(parents=True)
    elif case == "flat files":  # frames straight in the folder, no sequence folders
        preds.mkdir()
        write_mask(preds / "00000.png", np.zeros((8, 8), np.uint8))
    out = tmp_path / "out"
    rc = main(["eval", "davis", "--score-only", str(preds), "--data-root",
               str(shared_data / "DAVIS"), "--out", str(out), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(preds) in err
    assert not out.exists()


def test_without_score_only_an_encoder_is_still_required(tmp_path, capsys):
    rc = main(["eval", "davis", "--data-root", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--checkpoint or --random-init" in err


def test_vip_score_only_equals_a_direct_confusion_matrix(tmp_path, capsys):
    root = tmp_path / "VIP" / "VIP_Fine"
    rng = np.random.default_rng(1)
    hist = np.zeros((20, 20), np.int64)
    for video in ("v1", "v2"):
        (root / "Images" / video).mkdir(parents=True)
        (root / "Annotations" / "Category_ids" / video).mkdir(parents=True)
        (tmp_path / "preds" / video).mkdir(parents=True)
        for t in range(3):
            gt = rng.integers(0, 6, (24, 32)).astype(np.uint8)
            pred = rng.integers(0, 6, (12, 16)).astype(np.uint8)  # at half the size
            Image.fromarray(gt).save(root / "Annotations" / "Category_ids" / video / f"{t}.png")
            Image.fromarray(pred).save(tmp_path / "preds" / video / f"{t}.png")
            hist += confusion(gt, resize_ids(pred, gt.shape, exact=True))
    summary = score_vip_folder(tmp_path / "VIP", tmp_path / "preds", threads=2, progress=False)
    assert summary["videos"] == 2 and summary["mIoU"] == pytest.approx(miou(hist)[0], abs=1e-12)
    rc = main(["eval", "vip", "--score-only", str(tmp_path / "preds"), "--data-root",
               str(tmp_path / "VIP"), "--out", str(tmp_path / "o"), "--no-progress"])  # fmt: skip
    assert rc == 0 and json.loads((tmp_path / "o" / "summary.json").read_text())["videos"] == 2
    assert f"{miou(hist)[0]:.4f}" in capsys.readouterr().out
    rc = main(["eval", "vip", "--score-only", str(tmp_path / "none"), "--data-root",
               str(tmp_path / "VIP"), "--no-progress"])  # fmt: skip
    assert rc == 2 and "does not exist" in capsys.readouterr().err
