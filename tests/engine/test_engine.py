"""The training loop: checkpoints, exact resume, signals, divergence, DDP equivalence."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch

from ddp_helpers import train_in_processes
from siamae.engine.trainer import train
from siamae.errors import TrainingDiverged
from siamae.methods.cropmae import CropMAE
from siamae.optim import lr_at, param_groups
from siamae.recipes import load_config
from siamae.registry import build_method

TINY = [
    "model.arch=vit_tiny",
    "model.img_size=32",
    "model.patch_size=8",
    "data.source=synthetic",
    "data.synthetic_count=32",
    "data.synthetic_size=48",
    "data.batch_size=8",
    "data.num_workers=0",
    "optim.base_lr=1e-3",
    "optim.warmup_steps=2",
    "run.log_every=1",
    "run.progress=false",
    "run.visualize=false",
    "run.tensorboard=false",
]


def _cfg(tmp: Path, *extra: str):  # noqa: ANN202
    return load_config(None, [*TINY, f"run.out_dir={tmp}", *extra])


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def test_schedule_warms_up_then_decays_to_min_lr() -> None:
    assert lr_at(0, 1.0, 0.1, 10, 100) == 0.0
    assert lr_at(5, 1.0, 0.1, 10, 100) == pytest.approx(0.5)
    assert lr_at(10, 1.0, 0.1, 10, 100) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 0.1, 10, 100) == pytest.approx(0.55)
    assert lr_at(100, 1.0, 0.1, 10, 100) == pytest.approx(0.1)


@pytest.mark.parametrize("method", ["cropmae", "siammae", "mae"])
def test_weight_decay_follows_timms_rule_for_every_method(method: str) -> None:
    """As published: every 2+ dim tensor but biases decays (CLS and mask tokens too); 1-D
    tensors do not; frozen tensors (position tables) are in no group."""
    model = build_method(load_config(None, [*TINY, f"method={method}"]))
    decay, no_decay = model.param_groups(0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | exempt == trainable and not decayed & exempt
    assert "encoder.vit.cls_token" in decayed and "decoder.mask_token" in decayed
    assert all(
        p.ndim >= 2 and not n.endswith(".bias") for n, p in model.named_parameters() if n in decayed
    )
    assert all(dict(model.named_parameters())[n].ndim == 1 for n in exempt)
    assert "encoder.vit.pos_embed" not in trainable
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    # The same split as timm's param_groups_weight_decay, which the official code calls.
    from timm.optim import param_groups_weight_decay

    timm_decay, timm_exempt = sorted(
        param_groups_weight_decay(model, 0.05), key=lambda g: -g["weight_decay"]
    )
    assert {names[id(p)] for p in timm_decay["params"]} == decayed
    assert {names[id(p)] for p in timm_exempt["params"]} == exempt
    # The option exempts the tokens, as many re-implementations do.
    decay2, no_decay2 = param_groups(model, 0.05, no_decay_tokens=True)
    exempt2 = {names[id(p)] for p in no_decay2["params"]}
    assert exempt2 - exempt == {"encoder.vit.cls_token", "decoder.mask_token"}


def test_run_folder_checkpoint_loads_with_weights_only(tmp_path: Path) -> None:
    summary = train(_cfg(tmp_path, "optim.max_steps=3"), resume=False)
    assert summary["step"] == 3 and summary["effective_batch"] == 8
    assert summary["peak_lr"] == pytest.approx(1e-3 * 8 / 256)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["format"] == "siamae-train-v1" and ckpt["step"] == 3 and ckpt["method"] == "cropmae"
    assert ckpt["config"]["model"]["arch"] == "vit_tiny"
    assert (tmp_path / "config.yaml").is_file()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0].startswith("step,epoch,loss,lr")
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_stop_and_resume_gives_bit_identical_weights(tmp_path: Path) -> None:
    # 6 steps cross an epoch boundary (4 steps an epoch); dropout stays on (0.1) so the RNG
    # state must be restored exactly too.
    extra = ["optim.max_steps=6", "decoder.dropout=0.1"]
    whole = train(_cfg(tmp_path / "whole", *extra), resume=False)
    first = train(_cfg(tmp_path / "split", *extra), resume=False, stop_after_steps=3)
    assert first["interrupted"] == "stop_after_steps" and first["step"] == 3
    second = train(_cfg(tmp_path / "split", *extra), resume="auto")
    assert second["step"] == 6 and whole["step"] == 6
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the metrics read as one run: steps 1..6 once each
    steps = [
        int(line.split(",")[0])
        for line in (tmp_path / "split" / "metrics.csv").read_text().splitlines()[1:]
    ]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_with_loader_workers_is_exact(tmp_path: Path) -> None:
    extra = ["optim.max_steps=4", "data.num_workers=2"]
    train(_cfg(tmp_path / "whole", *extra), resume=False)
    train(_cfg(tmp_path / "split", *extra), resume=False, stop_after_steps=1)
    train(_cfg(tmp_path / "split", *extra), resume=True)
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(
    tmp_path: Path,
) -> None:
    real_forward = CropMAE.forward
    calls = {"n": 0}

    def poisoned(self, batch):  # noqa: ANN001, ANN202
        calls["n"] += 1
        out = real_forward(self, batch)
        if calls["n"] == 4:
            out.loss = out.loss * float("nan")
        return out

    with mock.patch.object(CropMAE, "forward", poisoned), pytest.raises(TrainingDiverged) as err:
        train(_cfg(tmp_path, "optim.max_steps=6", "run.checkpoint_every=2"), resume=False)
    assert "nan" in str(err.value) and "step 3" in str(err.value) and "step 2" in str(err.value)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.parametrize(
    ("signum", "to_group"),
    [
        (signal.SIGTERM, False),
        (signal.SIGINT, False),
        # to every process of the group, loader workers too, as Ctrl-C in a terminal, `timeout`
        # and Slurm's signals to a job step deliver it
        (signal.SIGTERM, True),
        (signal.SIGINT, True),
    ],
    ids=["TERM", "INT", "TERM-to-group", "INT-to-group"],
)
def test_a_signal_saves_a_checkpoint_and_exits_with_128_plus_signal(
    signum: int, to_group: bool, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "siamae",
        "pretrain",
        "--config",
        str(Path(__file__).parents[2] / "configs" / "demo.yaml"),
        "--out",
        str(run),
        "--set",
        "optim.max_steps=100000",
        "--set",
        "data.num_workers=1",
        "--set",
        "model.img_size=32",
        "--set",
        "data.batch_size=4",
        "--set",
        "run.log_every=1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=to_group,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.5)
    assert (run / "metrics.jsonl").exists(), proc.communicate(timeout=30)
    if to_group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    # Saved, but not finished: 128 + the signal number, never 0 ("done") for scripts.
    assert proc.returncode == 128 + signum, err
    assert f"interrupted ({signal.Signals(signum).name})" in out
    ckpt_path = run / "checkpoints" / "last.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["step"] >= 1
    # Written with the user's umask (mkstemp alone would leave it 0600).
    umask = os.umask(0o022)
    os.umask(umask)
    assert ckpt_path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_ddp_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    # Dropout off: dropout masks are drawn per process, the one thing that cannot match.
    single = tmp_path / "single"
    train(_cfg(single, "data.batch_size=8", "optim.max_steps=3", "decoder.dropout=0"), resume=False)
    ddp = tmp_path / "ddp"
    overrides = ["data.batch_size=4", "optim.max_steps=3", "decoder.dropout=0"]
    train_in_processes([*TINY, *overrides, f"run.out_dir={ddp}"])
    a, b = _weights(single), _weights(ddp)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    loss_single = [line for line in (single / "metrics.csv").read_text().splitlines()[1:]]
    loss_ddp = [line for line in (tmp_path / "ddp" / "metrics.csv").read_text().splitlines()[1:]]
    for x, y in zip(loss_single, loss_ddp):
        assert float(x.split(",")[2]) == pytest.approx(float(y.split(",")[2]), rel=1e-4)
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=True)
    assert len(ckpt["rng"]["cpu"]) == 2  # every rank's RNG state is kept for resume


def test_gradient_accumulation_matches_the_larger_batch(tmp_path: Path) -> None:
    # Two micro-batches of 4 see the same samples (and masks) as one batch of 8; the lr follows
    # the effective batch, so the weights match up to float summation order.
    common = ["optim.max_steps=2", "decoder.dropout=0"]
    big = train(_cfg(tmp_path / "big", "data.batch_size=8", *common), resume=False)
    acc = train(
        _cfg(tmp_path / "acc", "data.batch_size=4", "optim.accum_steps=2", *common), resume=False
    )
    assert big["effective_batch"] == acc["effective_batch"] == 8
    a, b = _weights(tmp_path / "big"), _weights(tmp_path / "acc")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k


def test_method_scalars_are_logged_to_jsonl_and_their_own_csv_columns(tmp_path: Path) -> None:
    """A method's own logs (MAE: the real mask ratio) reach every metrics file; a resume keeps
    the widened CSV header and drops the rows after the resumed step."""
    import csv
    import json

    from siamae.engine.logging import MetricsLogger

    train(_cfg(tmp_path, "method=mae", "optim.max_steps=2"), resume=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["mask_ratio_real"] == pytest.approx(0.75) for r in records)
    with (tmp_path / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["mask_ratio_real"]) for r in rows] == pytest.approx([0.75, 0.75])

    logger = MetricsLogger(tmp_path, resume_step=1, tensorboard=False)
    logger.log({"step": 2, "loss": 1.0, "top1": 0.5})
    with (tmp_path / "metrics.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames[-2:] == ["mask_ratio_real", "top1"]
    assert [r["step"] for r in rows] == ["1", "2"] and rows[1]["top1"] == "0.5"
