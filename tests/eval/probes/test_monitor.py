"""The online k-NN monitor: when it runs, what it returns, and that it changes nothing."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from siamae.config import MonitorConfig
from siamae.eval.probes import monitor as monitor_mod
from siamae.eval.probes.monitor import KNNMonitor, build_monitor
from siamae.models.vit import Encoder
from siamae.recipes import load_config


def write_folder(root: Path, per_class: int, seed: int, size: int = 32) -> Path:
    """root/<colour>/<i>.png: noisy images of one solid colour per class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, rgb in {"blue": (30, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            noise = rng.integers(-25, 26, size=(size, size, 3))
            pixels = np.clip(np.array(rgb)[None, None] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("monitor")
    return write_folder(base / "train", 4, seed=0), write_folder(base / "val", 2, seed=1)


def monitor_cfg(folders: tuple[Path, Path], **kw: object) -> MonitorConfig:
    return MonitorConfig(
        knn_train=str(folders[0]), knn_val=str(folders[1]), img_size=32, crop_pct=1.0, k=5, **kw
    )


def test_due_every_epochs_once_per_epoch(folders: tuple[Path, Path]) -> None:
    mon = KNNMonitor(monitor_cfg(folders, every_epochs=2), torch.device("cpu"))
    # Called after every step: epochs_done only changes at epoch ends (3 steps an epoch).
    fired = [s for s in range(1, 13) if mon.due(s // 3, s)]
    assert fired == [6, 12]


def test_due_every_steps(folders: tuple[Path, Path]) -> None:
    mon = KNNMonitor(monitor_cfg(folders, every_steps=4), torch.device("cpu"))
    assert [s for s in range(0, 13) if mon.due(s // 5, s)] == [4, 8, 12]
    assert not mon.due(3, 12)  # asked twice for the same step: once only


def _rng_snapshot() -> tuple:
    return (
        torch.get_rng_state().clone(),
        np.random.get_state()[1].copy(),
        random.getstate(),
    )


@pytest.mark.parametrize("guard", [True, False])
def test_run_leaves_rng_and_mode_untouched(
    folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, guard: bool
) -> None:
    if not guard:
        # Without the save/restore guard, the monitor must still draw no random numbers.
        monkeypatch.setattr(monitor_mod, "preserved_rng", contextlib.nullcontext)
    torch.manual_seed(0)
    encoder = Encoder("vit_tiny", 16, 32, depth=2).train()
    mon = KNNMonitor(monitor_cfg(folders), torch.device("cpu"))
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    before = _rng_snapshot()
    weights = {k: v.clone() for k, v in encoder.state_dict().items()}
    result = mon.run(encoder)
    after = _rng_snapshot()
    assert torch.equal(before[0], after[0])
    assert np.array_equal(before[1], after[1])
    assert before[2] == after[2]
    assert encoder.training
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in weights.items())
    assert set(result) == {"knn_top1", "knn_top5", "knn_seconds"}
    assert result["knn_top1"] == 100.0  # solid colours: separable even for a random encoder
    # A second run reuses the decoded images and gives the same answer.
    assert mon.run(encoder)["knn_top1"] == result["knn_top1"]
    encoder.eval()
    mon.run(encoder)
    assert not encoder.training


def test_build_monitor(folders: tuple[Path, Path], tmp_path: Path) -> None:
    cfg = load_config(None, ["model.arch=vit_tiny", "model.img_size=32", "data.source=synthetic"])
    assert build_monitor(cfg, "cpu") is None
    cfg.monitor.knn_train, cfg.monitor.knn_val = str(folders[0]), str(folders[1])
    mon = build_monitor(cfg, "cpu")
    assert mon is not None and mon.cfg.img_size == 32  # null: the model's size
    from siamae.errors import ConfigError, DataError

    cfg.monitor.knn_train = str(tmp_path / "missing")
    with pytest.raises(DataError, match="does not exist"):
        build_monitor(cfg, "cpu")
    with pytest.raises(ConfigError, match="monitor.knn_val"):
        load_config(None, ["data.source=synthetic", f"monitor.knn_train={folders[0]}"])
    with pytest.raises(ConfigError, match="monitor.img_size"):
        load_config(None, ["data.source=synthetic", "monitor.img_size=30"])


def test_pretraining_weights_are_the_same_with_and_without_the_monitor(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    from siamae.engine.trainer import train

    # Batch-4 steps of a tiny ViT: one thread is faster, and far faster on a busy machine.
    torch.set_num_threads(1)
    base = [
        "method=cropmae", "model.arch=vit_tiny", "model.img_size=32", "model.patch_size=16",
        "data.source=synthetic", "data.synthetic_count=8", "data.synthetic_size=32",
        "data.batch_size=4", "data.num_workers=0", "optim.max_steps=2", "run.device=cpu",
        "run.progress=false", "run.visualize=false", "run.tensorboard=false", "run.seed=3",
    ]  # fmt: skip
    plain = train(load_config(None, [*base, f"run.out_dir={tmp_path / 'plain'}"]), resume=False)
    watched_cfg = load_config(
        None,
        [*base, f"run.out_dir={tmp_path / 'watched'}", f"monitor.knn_train={folders[0]}",
         f"monitor.knn_val={folders[1]}", "monitor.every_steps=1", "monitor.crop_pct=1.0",
         "monitor.k=5"],
    )  # fmt: skip
    watched = train(watched_cfg, resume=False, monitor=build_monitor)
    a = torch.load(plain["checkpoint"], weights_only=True)
    b = torch.load(watched["checkpoint"], weights_only=True)
    assert a["step"] == b["step"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    # The monitor did run, and its numbers went into the metrics log.
    lines = (tmp_path / "watched" / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in lines if "knn_top1" in line]
    assert [r["step"] for r in logged] == [1, 2]
    assert all(0.0 <= r["knn_top1"] <= 100.0 for r in logged)


def test_train_without_a_monitor_refuses_a_config_that_asks_for_one(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    """The engine imports no evaluation: its caller hands the monitor in, and a config that asks
    for one is never trained silently without it."""
    from siamae.engine.trainer import train
    from siamae.errors import ConfigError

    cfg = load_config(
        None,
        ["model.arch=vit_tiny", "model.img_size=32", "model.patch_size=16",
         "data.source=synthetic", "data.synthetic_count=8", "data.batch_size=4",
         "data.num_workers=0", "optim.max_steps=1", "run.device=cpu", "run.progress=false",
         f"run.out_dir={tmp_path / 'run'}", f"monitor.knn_train={folders[0]}",
         f"monitor.knn_val={folders[1]}"],
    )  # fmt: skip
    with pytest.raises(ConfigError, match="monitor.knn_train"):
        train(cfg, resume=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
