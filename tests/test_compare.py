"""``siamae compare``: one table and one picture of runs of different methods; missing figures
are blank cells; a bad path is one line and exit code 2."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch

from siamae.commands.cli import main
from siamae.engine.trainer import train
from siamae.eval.probes.monitor import build_monitor
from siamae.eval.propagation.synthetic_videos import write_davis_layout
from siamae.recipes import load_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A CropMAE run with the demo's monitors and an evaluation folder, and an MAE run without
    either: demo-like, shrunk to 2 steps."""
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("compare")
    videos = write_davis_layout(base / "davis", videos=1, size=32, num_frames=4, images=8)
    common = [
        "model.arch=vit_tiny", "model.img_size=32", "model.patch_size=8", "decoder.dim=64",
        "decoder.num_heads=2", "decoder.mlp_dim=128", "data.source=synthetic",
        "data.synthetic_count=8", "data.synthetic_size=32", "data.batch_size=4",
        "data.num_workers=0", "optim.max_steps=2", "run.device=cpu", "run.progress=false",
        "run.visualize=false", "run.tensorboard=false",
    ]  # fmt: skip
    monitors = [
        f"monitor.davis={videos}", "monitor.davis_set=resize=native,batch_size=4",
        f"monitor.images={videos / 'images'}", "monitor.crop_pct=1.0", "monitor.every_steps=2",
    ]  # fmt: skip
    crop, mae = base / "cropmae", base / "mae"
    train(
        load_config(None, ["method=cropmae", *common, *monitors, f"run.out_dir={crop}"]),
        resume=False,
        monitor=build_monitor,
    )
    train(load_config(None, ["method=mae", *common, f"run.out_dir={mae}"]), resume=False)
    (crop / "eval" / "davis-cropmae").mkdir(parents=True)
    (crop / "eval" / "davis-cropmae" / "summary.json").write_text(
        json.dumps({"J&F-Mean": 0.5, "params": {"topk": 7}, "top1": {"20": 12.5}})
    )
    return crop, mae


def test_table_and_picture_of_two_methods(
    runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    crop, mae = runs
    picture = tmp_path / "curves.png"
    assert main(["compare", str(crop), str(mae), "--out", str(picture)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:5] == ["run", "method", "recipe", "steps", "final loss"]
    assert {"monitor/davis_jf", "monitor/rankme_cls", "davis-cropmae: J&F-Mean"} <= set(header)
    assert "davis-cropmae: params" not in " ".join(header)  # parameters are not figures
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in lines[2:4]}  # fmt: skip
    assert rows["cropmae"][1] == "cropmae" and rows["mae"][1] == "mae"
    assert rows["cropmae"][3] == rows["mae"][3] == "2"
    jf = header.index("monitor/davis_jf")
    assert rows["cropmae"][jf] != "" and rows["mae"][jf] == ""  # missing: a blank cell
    assert rows["cropmae"][header.index("davis-cropmae: J&F-Mean")] == "0.5"
    assert picture.stat().st_size > 10_000


def test_csv_and_eval_pairs(
    runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    crop, mae = runs
    extra = tmp_path / "mae-evals" / "knn"
    extra.mkdir(parents=True)
    (extra / "summary.json").write_text(json.dumps({"top1": {"20": 33.0}}))
    args = [
        "compare",
        str(crop),
        str(mae),
        "--csv",
        "--eval",
        str(mae),
        str(tmp_path / "mae-evals"),
    ]
    assert main([*args, "--out", str(tmp_path / "c.png")]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    by_run = {row["run"]: row for row in table}
    assert by_run["mae"]["knn: top1@20"] == "33" and by_run["cropmae"]["knn: top1@20"] == ""
    assert float(by_run["mae"]["final loss"]) > 0


def test_bad_paths_are_one_line_exit_2(
    runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    crop, _ = runs
    out = tmp_path / "c.png"
    assert main(["compare", str(crop), str(tmp_path / "missing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0] and "not a run folder" in err[0]
    assert (
        main(["compare", str(crop), "--eval", str(tmp_path), str(tmp_path), "--out", str(out)]) == 2
    )
    assert "not one of the runs" in capsys.readouterr().err
    assert not out.exists()
