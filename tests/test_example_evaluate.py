"""examples/evaluate_any_encoder.py end to end: a timm model siamae did not make, random or from a
local weights file, propagated through DAVIS-layout videos; nothing downloaded."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import timm
import torch
from safetensors.torch import save_file

from siamae.evaluators import propagate_davis, synthetic_davis

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "evaluate_any_encoder.py"
QUICK = ["--max-frames", "4", "--resize", "64x96", "--device", "cpu"]


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("evaluate_any_encoder", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["evaluate_any_encoder"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def davis_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_davis(tmp_path_factory.mktemp("davis") / "DAVIS", videos=2, frames=5)


def test_help(example: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        example.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--davis", "--sequences", "--out", "--model", "--weights"))


def test_weights_from_a_file_give_the_models_own_figures(
    example: ModuleType, davis_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(3)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0).eval()
    expected = propagate_davis(
        model, davis_root, tmp_path / "direct", max_frames=4, overrides={"resize": "64x96"},
        progress=False,
    )["J&F-Mean"]  # fmt: skip
    # A safetensors file, and a DINO-style checkpoint: the teacher, prefixed, with a head.
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    wrapped = {f"module.backbone.{k}": v for k, v in model.state_dict().items()}
    torch.save({"teacher": {**wrapped, "head.weight": torch.zeros(3, 3)}}, tmp_path / "dino.pth")
    for weights in ("w.safetensors", "dino.pth"):
        out = tmp_path / f"out-{weights}"
        rc = example.main(["--davis", str(davis_root), "--sequences", "synthetic0,synthetic1",
                           "--weights", str(tmp_path / weights), "--out", str(out), *QUICK])  # fmt: skip
        text = capsys.readouterr().out
        assert rc == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["J&F-Mean"] == expected
        assert f"DAVIS J&F {expected:.4f}" in text and "over 2 sequences, first 4 frames" in text
        assert len(list((out / "synthetic1").glob("*.png"))) == 4


def test_random_init_and_bad_weights(
    example: ModuleType, davis_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "random"
    rc = example.main(["--davis", str(davis_root), "--out", str(out), *QUICK])
    assert rc == 0 and "(random init, seed 0): DAVIS J&F" in capsys.readouterr().out
    torch.save({"model": {"blocks.0.attn.qkv.weight": torch.zeros(2, 2)}}, tmp_path / "bad.pth")
    torch.save({"model": {"norm.weight": torch.zeros(192)}}, tmp_path / "part.pth")
    bad_out = tmp_path / "never"
    for argv, message in (
        (["--weights", str(tmp_path / "bad.pth")], "'blocks.0.attn.qkv.weight' has shape (2, 2)"),
        (["--weights", str(tmp_path / "part.pth")], "tensors of vit_tiny_patch16_224 missing"),
        (["--weights", str(tmp_path / "none.pth")], "no such file"),
        (["--sequences", "nope"], "sequence 'nope'"),
        (["--model", "vit_nonexistent"], "--model 'vit_nonexistent'"),
    ):
        rc = example.main(["--davis", str(davis_root), "--out", str(bad_out), *QUICK, *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], (argv, err)
    assert not bad_out.exists()


def test_on_real_davis(
    example: ModuleType, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    davis = shared_data / "DAVIS"
    if not davis.is_dir():
        pytest.skip(f"no DAVIS folder in {shared_data}")
    first = (davis / "ImageSets" / "2016" / "val.txt").read_text().split()[0]
    rc = example.main(["--davis", str(davis), "--sequences", first, "--out", str(tmp_path / "o"),
                       "--max-frames", "4", "--resize", "240x432", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["sequences"] == [first] and 0 <= summary["J&F-Mean"] <= 1
    assert f"J&F {summary['J&F-Mean']:.4f}" in capsys.readouterr().out
