"""The dense monitor (label propagation J&F while pre-training) and RankMe in a run: the figure
logged at a step is `siamae eval davis` on that step's checkpoint, the monitors change no
weight, and a resumed run logs the same monitor values at the same steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from siamae.commands.cli import main
from siamae.engine.trainer import train
from siamae.errors import ConfigError, DataError
from siamae.eval.probes.monitor import build_monitor
from siamae.eval.propagation.synthetic_videos import write_davis_layout
from siamae.recipes import load_config

PROTOCOL = "resize=native,batch_size=6"


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dense") / "davis"
    return write_davis_layout(root, videos=2, size=32, num_frames=5, images=12)


def _cfg(out: Path, videos: Path, *extra: str):
    torch.set_num_threads(1)
    return load_config(
        None,
        [
            "method=cropmae", "model.arch=vit_tiny", "model.img_size=32", "model.patch_size=8",
            "decoder.dim=64", "decoder.num_heads=2", "decoder.mlp_dim=128",
            "data.source=synthetic", "data.synthetic_count=16", "data.synthetic_size=32",
            "data.batch_size=4", "data.num_workers=0", "optim.max_steps=4", "run.device=cpu",
            "run.progress=false", "run.visualize=false", "run.tensorboard=false", "run.seed=5",
            f"monitor.davis={videos}", f"monitor.davis_set={PROTOCOL}",
            f"monitor.images={videos / 'images'}", "monitor.crop_pct=1.0",
            "monitor.every_steps=2", f"run.out_dir={out}", *extra,
        ],
    )  # fmt: skip


def _monitor_records(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in r.items() if k.startswith("monitor/") and not k.endswith("_seconds")}
        | {"step": r["step"]}
        for r in rows
        if "monitor/davis_jf" in r
    ]


def test_dense_figure_equals_eval_davis_on_the_checkpoint(
    videos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = train(
        _cfg(tmp_path / "run", videos, "optim.max_steps=2"), resume=False, monitor=build_monitor
    )
    logged = _monitor_records(tmp_path / "run")
    assert [r["step"] for r in logged] == [0, 2]  # untrained, then every 2 steps
    out = tmp_path / "eval"
    args = ["eval", "davis", "--checkpoint", summary["checkpoint"], "--data-root", str(videos)]
    args += ["--out", str(out), "--no-progress"]
    for item in PROTOCOL.split(","):
        args += ["--set", item]
    assert main(args) == 0
    later = json.loads((out / "summary.json").read_text())
    assert logged[-1]["monitor/davis_jf"] == later["J&F-Mean"]
    assert logged[-1]["monitor/davis_j"] == later["J-Mean"]


def test_monitors_resume_exactly_and_change_no_weight(videos: Path, tmp_path: Path) -> None:
    whole = train(_cfg(tmp_path / "whole", videos), resume=False, monitor=build_monitor)
    cut = _cfg(tmp_path / "cut", videos)
    train(cut, resume=False, stop_after_steps=3, monitor=build_monitor)
    resumed = train(cut, resume="auto", monitor=build_monitor)
    assert resumed["step"] == whole["step"] == 4
    a, b = _monitor_records(tmp_path / "whole"), _monitor_records(tmp_path / "cut")
    assert [r["step"] for r in a] == [0, 2, 4]
    assert a == b  # the same values at the same steps, bit for bit on CPU
    # Without monitors: the same weights.
    plain_cfg = _cfg(tmp_path / "plain", videos, "monitor.davis=null", "monitor.images=null")
    plain = train(plain_cfg, resume=False)
    wa = torch.load(whole["checkpoint"], weights_only=True)["model"]
    wp = torch.load(plain["checkpoint"], weights_only=True)["model"]
    assert all(torch.equal(wa[k], wp[k]) for k in wa)


def test_bad_monitor_options_are_refused_before_any_work(videos: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="monitor.max_frames"):
        _cfg(tmp_path / "r", videos, "monitor.max_frames=2")
    with pytest.raises(ConfigError, match="monitor.davis_set"):
        _cfg(tmp_path / "r", videos, "monitor.davis_set=topk")
    with pytest.raises(DataError, match="does not exist"):
        build_monitor(_cfg(tmp_path / "r", tmp_path / "nowhere"), "cpu")
    with pytest.raises(DataError, match="nosuch"):
        build_monitor(_cfg(tmp_path / "r", videos, "monitor.sequences=nosuch"), "cpu")
    assert not (tmp_path / "r").exists()
