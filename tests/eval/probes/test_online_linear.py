"""The online linear probe: it learns the pre-training data's classes from the training
batches, changes no weight of the encoder, resumes exactly, stays out of exports, and refuses
bad options and unlabelled data in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from siamae.commands.cli import main
from siamae.engine.trainer import train
from siamae.eval.probes.monitor import build_monitor
from siamae.eval.probes.online_linear import TOP1
from siamae.export import export_encoder
from siamae.hub import export_hub
from siamae.loading import load_encoder
from siamae.recipes import load_config

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def write_two_colours(root: Path, per_class: int = 16, size: int = 32) -> Path:
    """root/<colour>/<i>.png: noisy images of one solid colour per class (red, blue)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, rgb in {"blue": (30, 40, 220), "red": (220, 30, 30)}.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            noise = rng.integers(-25, 26, size=(size, size, 3))
            pixels = np.clip(np.array(rgb)[None, None] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_two_colours(tmp_path_factory.mktemp("online") / "colours")


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "method=mae", "model.arch=vit_tiny", "model.img_size=32", "model.patch_size=8",
        "decoder.dim=64", "decoder.num_heads=2", "decoder.mlp_dim=128", "decoder.depth=1",
        "data.source=images", f"data.path={data}", "data.batch_size=8", "data.num_workers=0",
        "optim.max_steps=6", "run.log_every=2", "run.checkpoint_every=1000", "run.device=cpu",
        "run.progress=false", "run.visualize=false", "run.tensorboard=false", "run.seed=7",
        "monitor.online_linear_every=1",  # every step here (the default, 4, would skip most)
        f"run.out_dir={out}", *extra,
    ]  # fmt: skip


def _cfg(data: Path, out: Path, *extra: str):
    torch.set_num_threads(1)  # tiny steps: one thread is faster on a busy machine
    return load_config(None, _args(data, out, *extra))


def _probe_records(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [
        {"step": r["step"], **{k: v for k, v in r.items() if k.startswith("monitor/online")}}
        for r in rows
        if TOP1 in r
    ]


def test_the_encoder_is_bitwise_that_of_a_run_without_the_probe(
    colours: Path, tmp_path: Path
) -> None:
    plain = train(_cfg(colours, tmp_path / "plain"), resume=False)
    probed = train(
        _cfg(colours, tmp_path / "probed", "monitor.online_linear=true"),
        resume=False,
        monitor=build_monitor,
    )
    a = torch.load(plain["checkpoint"], weights_only=True)
    b = torch.load(probed["checkpoint"], weights_only=True)
    assert a["step"] == b["step"] == 6
    assert a["model"].keys() == b["model"].keys()  # the head is not the method's
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    # The probe did train, and logged with every log window.
    assert [r["step"] for r in _probe_records(tmp_path / "probed")] == [2, 4, 6]
    assert "monitor_state" in b and "monitor_state" not in a


def test_the_probe_learns_separable_classes(colours: Path, tmp_path: Path) -> None:
    train(
        _cfg(colours, tmp_path / "run", "monitor.online_linear=true", "optim.max_steps=12",
             "run.log_every=4"),
        resume=False,
        monitor=build_monitor,
    )  # fmt: skip
    top1 = [r[TOP1] for r in _probe_records(tmp_path / "run")]
    assert len(top1) == 3 and all(0.0 <= t <= 100.0 for t in top1)
    assert top1[-1] >= 90.0, top1  # two colours: chance is 50 %


def test_an_interrupted_run_logs_the_same_probe_figures(colours: Path, tmp_path: Path) -> None:
    on = "monitor.online_linear=true"
    whole = train(_cfg(colours, tmp_path / "whole", on), resume=False, monitor=build_monitor)
    cut = _cfg(colours, tmp_path / "cut", on)
    # Stopped at step 3, in the middle of the log window 2..4: its open sums travel too.
    train(cut, resume=False, stop_after_steps=3, monitor=build_monitor)
    resumed = train(cut, resume="auto", monitor=build_monitor)
    assert resumed["step"] == whole["step"] == 6
    a, b = _probe_records(tmp_path / "whole"), _probe_records(tmp_path / "cut")
    assert [r["step"] for r in a] == [2, 4, 6]
    assert a == b  # bit for bit on CPU
    sa = torch.load(whole["checkpoint"], weights_only=True)["monitor_state"]
    sb = torch.load(resumed["checkpoint"], weights_only=True)["monitor_state"]
    assert torch.equal(sa["head"]["weight"], sb["head"]["weight"])


def test_the_probe_can_skip_steps(colours: Path, tmp_path: Path) -> None:
    summary = train(
        _cfg(colours, tmp_path / "run", "monitor.online_linear=true",
             "monitor.online_linear_every=3"),
        resume=False,
        monitor=build_monitor,
    )  # fmt: skip
    state = torch.load(summary["checkpoint"], weights_only=True)["monitor_state"]
    steps = [s["step"] for s in state["optimizer"]["state"].values()]
    # The batches of steps 1 and 4 of 6 (the counter reads 0 and 3): the head stepped twice.
    assert [float(s) for s in steps] == [2.0, 2.0]
    # A log window with no trained batch (steps 5-6) logs no probe figure.
    assert [r["step"] for r in _probe_records(tmp_path / "run")] == [2, 4]


def test_exports_hold_no_probe_tensor(colours: Path, tmp_path: Path) -> None:
    summary = train(
        _cfg(colours, tmp_path / "run", "monitor.online_linear=true", "optim.max_steps=2"),
        resume=False,
        monitor=build_monitor,
    )
    state = torch.load(summary["checkpoint"], weights_only=True)
    head = state["monitor_state"]["head"]["weight"]
    assert head.shape == (2, 192) and head.abs().sum() > 0  # it trained, 2 classes
    tensors, _ = export_encoder(summary["checkpoint"], tmp_path / "encoder.safetensors")
    exported = load_file(str(tensors))
    hub = export_hub(summary["checkpoint"], tmp_path / "hub")
    hub_tensors = load_file(str(next(hub.glob("*.safetensors"))))
    encoder = load_encoder(summary["checkpoint"])
    for keys in (exported, hub_tensors, encoder.state_dict(), state["model"]):
        assert not [k for k in keys if "monitor" in k or "online" in k or "probe" in k]
    # No tensor of the exports has the head's shape (classes x width).
    for tensor in (*exported.values(), *hub_tensors.values()):
        assert tuple(tensor.shape) != (2, 192)


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, never a traceback
    assert err[0].startswith("siamae: error: ")
    return err[0]


def _pretrain(data: Path, out: Path, *settings: str) -> int:
    sets = [a for item in _args(data, out, *settings) for a in ("--set", item)]
    return main(["pretrain", "--config", str(CONFIGS / "demo.yaml"), *sets])


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("monitor.online_linear_lr=-1", "monitor.online_linear_lr"),
        ("monitor.online_linear_weight_decay=-0.1", "monitor.online_linear_weight_decay"),
        ("monitor.online_linear_every=0", "monitor.online_linear_every"),
        ("monitor.online_linear=maybe", "monitor.online_linear"),
    ],
)
def test_a_bad_field_is_one_line(
    colours: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str, named: str
) -> None:
    assert _pretrain(colours, tmp_path / "run", setting) == 2
    assert f"'{named}'" in _error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_data_without_labels_is_refused_in_one_line(
    colours: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    on = "monitor.online_linear=true"
    # Synthetic images have no classes: refused with the config, before any work.
    assert _pretrain(colours, tmp_path / "a", on, "data.source=synthetic") == 2
    line = _error_line(capsys)
    assert "'monitor.online_linear'" in line and "monitor.online_linear=false" in line
    # A flat folder (images straight in it) has no ImageFolder layout to read classes from.
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted((colours / "red").iterdir())[:8] + sorted((colours / "blue").iterdir())[:8]:
        (flat / f"{path.parent.name}-{path.name}").write_bytes(path.read_bytes())
    assert _pretrain(flat, tmp_path / "b", on) == 2
    line = _error_line(capsys)
    assert "'monitor.online_linear'" in line and "no class labels" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written


def test_a_resume_on_data_with_other_classes_is_refused(colours: Path, tmp_path: Path) -> None:
    from siamae.errors import CheckpointError

    data = tmp_path / "data"
    for name in ("red", "blue"):
        (data / name).mkdir(parents=True)
        for f in sorted((colours / name).iterdir()):
            (data / name / f.name).write_bytes(f.read_bytes())
    cfg = _cfg(data, tmp_path / "run", "monitor.online_linear=true", "optim.max_steps=4")
    train(cfg, resume=False, stop_after_steps=2, monitor=build_monitor)
    (data / "green").mkdir()
    for f in sorted((colours / "red").iterdir()):
        (data / "green" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CheckpointError, match="online linear probe.*--no-resume"):
        train(cfg, resume="auto", monitor=build_monitor)
