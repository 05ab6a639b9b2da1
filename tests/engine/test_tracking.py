"""W&B, optional: offline mode writes a run with the CSV's scalars, the config and the pictures;
asked for and missing, it fails before any work, naming the extra to install."""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from siamae.commands import cli
from siamae.engine.trainer import train
from siamae.recipes import load_config
from wandb_records import read_run

wandb = pytest.importorskip("wandb")

TINY = [
    "model.arch=vit_tiny",
    "model.img_size=32",
    "model.patch_size=8",
    "data.source=synthetic",
    "data.synthetic_count=16",
    "data.synthetic_size=48",
    "data.batch_size=8",
    "data.num_workers=0",
    "optim.max_steps=3",
    "optim.warmup_steps=1",
    "run.log_every=1",
    "run.progress=false",
    "run.tensorboard=false",
]


@pytest.fixture(autouse=True)
def _wandb_stays_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No network, no login, nothing written outside the test's folder; each test starts W&B
    as a new process would (it reads the environment once per process)."""
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()
    yield
    wandb.teardown()


def _offline_runs(run_dir: Path) -> list[Path]:
    # W&B's service writes a finished run's file in the background; it has all of it once the
    # service stops (at the latest when the process exits, as a siamae command does).
    wandb.teardown()
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def test_offline_wandb_logs_the_csvs_scalars_the_config_and_the_pictures(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = load_config(
        None,
        [
            *TINY,
            "method=mae",  # a method scalar (mask_ratio_real) beyond the engine's columns
            f"run.out_dir={run_dir}",
            "run.wandb=true",
            "run.wandb_mode=offline",
            "run.wandb_project=tests",
        ],
    )
    train(cfg, resume=False)
    (run_file,) = _offline_runs(run_dir)
    logged = read_run(run_file)
    with (run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    history = [h for h in logged["history"] if "loss" in h]
    assert [h["step"] for h in history] == [int(r["step"]) for r in rows] == [1, 2, 3]
    for h, row in zip(history, rows):
        for key, value in row.items():
            if value != "":
                assert h[key] == pytest.approx(float(value)), key
    assert "mask_ratio_real" in history[0] and "pairs_per_s" in history[0]
    # The resolved config, as the run folder's config.yaml holds it.
    assert logged["config"]["method"] == "mae"
    assert logged["config"]["model"]["arch"] == "vit_tiny"
    assert logged["config"]["mae"]["mask_ratio"] == pytest.approx(0.75)
    # The pictures the run wrote, at the last step, as image files of the W&B run.
    pictures = next(h for h in logged["history"] if any(k.startswith("pictures/") for k in h))
    assert pictures["step"] == 3
    assert {"pictures/reconstruction/_type", "pictures/loss_curve/_type"} <= pictures.keys()
    assert len(list(run_file.parent.glob("files/media/images/pictures/*.png"))) == 2

    # A resumed run logs into the same W&B run (the id is kept in the run folder).
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    assert run_file.name == f"run-{run_id}.wandb"
    cfg.optim.max_steps = 4
    train(cfg, resume=True)
    assert {p.name for p in _offline_runs(run_dir)} == {f"run-{run_id}.wandb"}
    resumed = [h["step"] for f in _offline_runs(run_dir) for h in read_run(f)["history"]]
    assert 4 in resumed


def test_wandb_asked_for_and_missing_names_the_extra_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    config = tmp_path / "tiny.yaml"
    config.write_text("method: cropmae\n")
    run_dir = tmp_path / "run"
    sets = [item for field in [*TINY, "run.wandb=true"] for item in ("--set", field)]
    code = cli.main(["pretrain", "--config", str(config), "--out", str(run_dir), *sets])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "run.wandb" in err and 'pip install -e ".[wandb]"' in err
    assert not run_dir.exists()


def test_wandb_mode_null_follows_wandb_mode_in_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    cfg = load_config(
        None, [*TINY, "optim.max_steps=1", f"run.out_dir={run_dir}", "run.wandb=true"]
    )
    assert cfg.run.wandb_mode is None
    train(cfg, resume=False)
    (run_file,) = _offline_runs(run_dir)
    assert [h["step"] for h in read_run(run_file)["history"] if "loss" in h] == [1]
