"""The command line: errors exit 2 with one line naming the problem; the demo path end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from siamae.commands.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, never a traceback
    assert err[0].startswith("siamae: error: ")
    return err[0]


def test_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["pretrain", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in _error_line(capsys)


def test_bad_field_is_named(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args = [
        "pretrain",
        "--config",
        str(CONFIGS / "demo.yaml"),
        "--out",
        str(tmp_path),
        "--set",
        "optim.base_lr=abc",
    ]
    assert main(args) == 2
    assert "'optim.base_lr'" in _error_line(capsys)
    assert not (tmp_path / "checkpoints").exists()  # failed before training


def test_missing_data_path(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args = [
        "pretrain",
        "--config",
        str(CONFIGS / "cropmae_vits16_in1k.yaml"),
        "--data",
        str(tmp_path / "imagenet"),
        "--out",
        str(tmp_path / "run"),
    ]
    assert main(args) == 2  # the recipe's fp16 on a CPU is a note (test_run_lifecycle), no warning
    assert "imagenet" in _error_line(capsys)
    assert main(["pretrain", "--config", str(CONFIGS / "cropmae_vits16_in1k.yaml")]) == 2
    assert "'data.path'" in _error_line(capsys)


def test_bad_checkpoints(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["visualize", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in _error_line(capsys)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint at all")
    assert main(["visualize", "--checkpoint", str(broken)]) == 2
    assert "broken.pt" in _error_line(capsys)
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, plain)
    assert main(["visualize", "--checkpoint", str(plain)]) == 2
    assert "training checkpoint" in _error_line(capsys)


def test_demo_path_end_to_end_then_visualize(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    run = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    for name in (
        "config.yaml",
        "metrics.csv",
        "metrics.jsonl",
        "reconstruction.png",
        "loss_curve.png",
        "checkpoints/last.pt",
    ):
        assert (run / name).is_file(), name
        assert str(run) in out
    assert "what to try next" in out
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["method"] == "cropmae" and ckpt["step"] > 0
    # The demo's monitors: J&F and RankMe before the first step and at the end (every epoch).
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    watched = [r for r in rows if "monitor/davis_jf" in r]
    assert [r["step"] for r in watched] == [0, ckpt["step"]]
    assert all(0 <= r["monitor/davis_jf"] <= 1 and r["monitor/rankme_cls"] >= 1 for r in watched)
    picture = tmp_path / "rec.png"
    assert (
        main(
            [
                "visualize",
                "--checkpoint",
                str(run / "checkpoints" / "last.pt"),
                "--out",
                str(picture),
                "--count",
                "2",
            ]
        )
        == 0
    )
    assert picture.stat().st_size > 1000


def _small_pretrain(out: Path, *sets: str) -> list[str]:
    """``siamae pretrain`` of the demo config, shrunk to seconds, with extra ``--set`` values."""
    small = [
        "model.img_size=32",
        "data.synthetic_count=16",
        "data.batch_size=8",
        "data.num_workers=0",
        "run.visualize=false",
        "run.progress=false",
        *sets,
    ]
    args = ["pretrain", "--config", str(CONFIGS / "demo.yaml"), "--out", str(out)]
    for value in small:
        args += ["--set", value]
    return args


def test_pretrain_resumes_from_the_run_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(_small_pretrain(tmp_path, "optim.max_steps=2")) == 0
    assert main(_small_pretrain(tmp_path, "optim.max_steps=4")) == 0  # auto-resume at step 2
    metrics = (tmp_path / "metrics.csv").read_text().splitlines()[1:]
    # log_every is 10: each run logs its final step, and the resumed run went on at step 3
    assert [int(line.split(",")[0]) for line in metrics] == [2, 4]
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
    assert main(_small_pretrain(tmp_path, "method=mae", "optim.max_steps=6")) == 2
    assert "method" in _error_line(capsys)


def test_resume_with_a_checkpoint_of_another_shape_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(_small_pretrain(tmp_path, "optim.max_steps=1")) == 0
    assert main(_small_pretrain(tmp_path, "decoder.dim=64", "optim.max_steps=2")) == 2
    assert "do not fit" in _error_line(capsys)


def test_version_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    import siamae

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"siamae {siamae.__version__}"


def test_help_names_every_pretraining_method(capsys: pytest.CaptureFixture[str]) -> None:
    from siamae.registry import METHODS

    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    # the pre-training methods: every registered Method that is not a downstream task
    pretraining = [
        m.__name__ for m in METHODS.values() if m.__module__.startswith("siamae.methods.")
    ]
    assert set(pretraining) == {"CropMAE", "SiamMAE", "SiameseIM", "MixedAE", "MAE"}
    for name in pretraining:
        assert f" {name}," in text or f" {name} " in text, name


class _RunsCode:
    """Pickled as a call to os.system: what a crafted checkpoint holds."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["crafted", "truncated", "text"])
def test_a_refused_or_unreadable_checkpoint_is_one_line_without_unsafe_advice(
    kind: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    marker, path = tmp_path / "ran", tmp_path / f"{kind}.pt"
    torch.save({"model": _RunsCode(marker)}, path)
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:60])
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    before = path.read_bytes()
    line = [
        "eval",
        "knn",
        "--checkpoint",
        str(path),
        "--train",
        str(tmp_path),
        "--val",
        str(tmp_path),
    ]
    code = main(line)
    message = _error_line(capsys)
    assert code == 2 and str(path) in message and "could not be loaded safely" in message
    assert "weights_only" not in message and "state_dict" in message
    if kind == "crafted":
        assert "holds code or objects (posix.system)" in message or "(nt.system)" in message
    assert not marker.exists() and path.read_bytes() == before


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("model: [unclosed\n", "expected ',' or ']'"),
        ("model:\n  img_size: 32\n bad: 1\n", "line 3"),
        ("model: !!python/object/apply:os.system ['true']\n", "Python objects are not allowed"),
    ],
)
def test_a_yaml_error_is_one_line_naming_the_spot(
    text: str, words: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert main(["pretrain", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    line = _error_line(capsys)
    assert "not valid YAML" in line and words in line and "c.yaml" in line
    assert not (tmp_path / "run").exists()


def test_a_bad_set_value_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = ["pretrain", "--config", str(CONFIGS / "demo.yaml"), "--out", str(tmp_path / "run")]
    assert main([*line, "--set", "model.img_size=[32"]) == 2
    message = _error_line(capsys)
    assert "--set 'model.img_size=[32'" in message and "not valid YAML" in message
    assert "line 1, column" in message
