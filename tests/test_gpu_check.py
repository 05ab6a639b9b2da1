"""benchmarks/gpu_check.py on a CPU at tiny sizes: the code path the GPU check runs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from siamae.methods import CropMAE
from siamae.registry import METHODS

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


class BrokenMethod(CropMAE):
    """A registered method whose training step fails: its row must say so, the rest still run."""

    name = "broken"

    def forward(self, batch):  # noqa: ANN001, ANN201
        raise RuntimeError("boom in the training step")


@pytest.fixture
def one_thread():
    """One torch thread: two OpenMP threads crawl when other jobs share the 2 cores."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_gpu_check_tiny_on_cpu(
    one_thread: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpu_check = _load_script()
    monkeypatch.setitem(METHODS, "broken", BrokenMethod)
    small_decoder = [
        "decoder.dim=32",
        "decoder.depth=1",
        "decoder.num_heads=2",
        "decoder.mlp_dim=64",
    ]
    argv = ["--tiny", "--compile", "off", "--methods", "cropmae", "broken", "--batch", "2",
            "--steps", "2", "--window", "1", "--out", str(tmp_path), "--threads", "1"]  # fmt: skip
    for value in small_decoder:
        argv += ["--set", value]
    assert gpu_check.main(argv) == 0
    out = capsys.readouterr().out
    assert "matmul peak (float32 mm)" in out and "timm fused_attn=" in out
    table = out[out.index("method ") :].splitlines()
    assert table[0].split()[:7] == [
        "method", "compile", "pairs/s", "GFLOP/pair", "MFU", "peak", "GiB"
    ]  # fmt: skip
    cropmae = next(line for line in table if line.startswith("cropmae"))
    fields = cropmae.split()
    assert fields[1] == "off"
    pairs, gflop, mfu = float(fields[2]), float(fields[3]), float(fields[4].rstrip("%"))
    assert pairs > 0 and mfu > 0
    # FLOPs of a ViT-Tiny/8 step at 32 px: two views of 17 tokens through 12 blocks, forward and
    # backward (3x the forward), roughly 2 * 5.5M params * 34 tokens * 3 = 1.1 GFLOP per pair.
    assert 0.5 < gflop < 3.0
    assert fields[5] == "-"  # no CUDA memory figure on a CPU
    broken = next(line for line in table if line.startswith("broken"))
    assert "ERROR RuntimeError: boom in the training step" in broken
    assert (tmp_path / "cropmae-eager" / "metrics.jsonl").is_file()


def test_gpu_check_budget_and_unknown_method(capsys: pytest.CaptureFixture[str]) -> None:
    gpu_check = _load_script()
    assert gpu_check.main(["--tiny", "--methods", "nope"]) == 2
    assert "unknown methods ['nope']" in capsys.readouterr().err
    # A spent budget starts nothing: every row says so, and the exit code says nothing ran.
    code = gpu_check.main(["--tiny", "--compile", "off", "--methods", "mae", "--budget-s", "-1"])
    assert code == 1
    assert "not run: --budget-s spent" in capsys.readouterr().out
