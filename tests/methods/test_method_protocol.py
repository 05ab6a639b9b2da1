"""The Method protocol: what a method must give (forward, views, published defaults, checks) and
the optional capabilities the engine tests for (pictures, evaluation at a step interval, an
update after each step, tensors DDP leaves alone, files skipped at the start); no stub that
raises, no collective call while a method is built."""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

from siamae.engine.reporting import evaluation_due
from siamae.engine.trainer import train
from siamae.methods.base import (
    Batch,
    DrawsPictures,
    EvalRequest,
    Evaluates,
    KeepsRankLocalTensors,
    Method,
    MethodOutput,
    Picture,
    Reconstructs,
    ScalesPictures,
    SkipsAtStart,
    UpdatesAfterStep,
    encoder_from_config,
)
from siamae.recipes import load_config
from siamae.registry import METHODS, build_method

TINY = [
    "model.arch=vit_tiny",
    "model.img_size=32",
    "model.patch_size=8",
    "data.source=synthetic",
    "data.synthetic_count=16",
    "data.synthetic_size=40",
    "data.batch_size=4",
    "data.num_workers=0",
    "optim.base_lr=1e-3",
    "optim.warmup_steps=1",
    "run.log_every=1",
    "run.progress=false",
    "run.visualize=false",
    "run.tensorboard=false",
]


class Bare(Method):
    """Only what every method must give: a regression of the CLS token onto zero."""

    name = "bare"
    num_views = 1
    view_kind = "single"

    @classmethod
    def published_defaults(cls, cfg: Any) -> dict[str, Any]:
        return {"mask_ratio": 0.5, "global_scale": (0.2, 1.0)}

    @classmethod
    def from_config(cls, cfg: Any) -> Bare:
        return cls(encoder_from_config(cfg))

    def __init__(self, encoder: Any) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.embed_dim, 1)

    def forward(self, batch: Batch) -> MethodOutput:
        cls_token = self.encoder(batch["images"][:, 0])[:, 0]
        return MethodOutput(self.head(cls_token).pow(2).mean())


class Capable(Bare):
    """Every optional capability, each recording that the engine used it."""

    name = "capable"
    best_metric: str | None = "score"
    eval_every_steps: int | None = 3

    def __init__(self, encoder: Any) -> None:
        super().__init__(encoder)
        self.skipped_at_start = ["dropped-at-build.jpg\tunreadable"]
        self.picture_scales: dict[str, Any] = {}
        self.steps_seen: list[tuple[int, int]] = []
        self.evaluations: list[EvalRequest] = []

    def after_step(self, step: int, total_steps: int) -> None:
        self.steps_seen.append((step, total_steps))

    def evaluate(self, request: EvalRequest) -> dict[str, float] | None:
        self.evaluations.append(request)
        return {"score": float(request.step)}

    def picture(self, batch: Batch) -> Picture | None:
        return [("input", batch["images"][:, 0].clamp(0, 1))]


def _cfg(method: str, out: Path, *extra: str) -> Any:
    return load_config(None, [f"method={method}", *TINY, f"run.out_dir={out}", *extra])


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]


def test_a_method_with_only_the_required_members_trains_checkpoints_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(METHODS, "bare", Bare)
    torch.set_num_threads(1)
    whole = train(_cfg("bare", tmp_path / "whole", "optim.max_steps=4", "run.visualize=true"))
    assert whole["step"] == 4 and whole["skipped_at_start"] == 0 and "eval" not in whole
    # no picture of a method that draws none; the loss curve all the same
    assert (
        "reconstruction" not in whole and not (tmp_path / "whole" / "reconstruction.png").exists()
    )
    assert Path(whole["loss_curve"]).is_file()
    split = _cfg("bare", tmp_path / "split", "optim.max_steps=4")
    assert train(split, resume=False, stop_after_steps=2)["interrupted"] == "stop_after_steps"
    assert train(split, resume="auto")["step"] == 4
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_each_declared_capability_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(METHODS, "capable", Capable)
    built: list[Capable] = []

    def build(cfg: Any) -> Capable:
        built.append(Capable.from_config(cfg))
        return built[-1]

    monkeypatch.setattr("siamae.engine.setup.build_method", build)
    torch.set_num_threads(1)
    out = tmp_path / "run"
    # 16 items of batch 4: 4 steps an epoch; an evaluation every 3 steps -> at the epoch ends
    # closing an interval (4: 3 fell in it; 8: 6 did) and at the end (10)
    summary = train(_cfg("capable", out, "optim.max_steps=10", "run.visualize=true"))
    method = built[-1]
    assert method.steps_seen == [(step, 10) for step in range(1, 11)]
    assert [r.step for r in method.evaluations] == [4, 8, 10]
    assert [r.final for r in method.evaluations] == [False, False, True]
    # the run folder stays the engine's: only the last evaluation gets a folder, <run>/<name>
    assert [r.results_dir for r in method.evaluations] == [None, None, out / "capable"]
    assert summary["eval"] == {"score": 10.0} and (out / "checkpoints" / "best.pt").is_file()
    assert summary["skipped_at_start"] == 1
    assert "dropped-at-build.jpg" in (out / "skipped_files.txt").read_text()
    assert (out / "reconstruction.png").is_file()


def _stub_statements(function: Any) -> bool:
    """Whether ``function``'s body (less its docstring) is one ``raise NotImplementedError`` or
    ``raise TypeError``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    if len(body) != 1 or not isinstance(body[0], ast.Raise) or body[0].exc is None:
        return False
    exc = body[0].exc
    name = exc.func if isinstance(exc, ast.Call) else exc
    return isinstance(name, ast.Name) and name.id in {"NotImplementedError", "TypeError"}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_no_registered_method_has_a_stub_that_raises(name: str) -> None:
    cls = METHODS[name]
    stubs = [
        f"{owner.__name__}.{member}"
        for owner in cls.__mro__
        if issubclass(owner, Method)
        for member, value in vars(owner).items()
        if inspect.isfunction(value) and not getattr(value, "__isabstractmethod__", False)
        if _stub_statements(value)
    ]
    assert stubs == []


def test_capabilities_are_declared_where_they_are_real() -> None:
    # the tasks draw and reconstruct nothing; SiameseIM predicts features, not pixels
    for name in ("finetune", "segmentation", "siameseim"):
        assert not issubclass(METHODS[name], Reconstructs), name
    for name in ("finetune", "segmentation"):
        assert not issubclass(METHODS[name], DrawsPictures), name
    for name in ("mae", "cropmae", "siammae", "mixedae"):
        assert issubclass(METHODS[name], Reconstructs) and issubclass(METHODS[name], DrawsPictures)
    assert issubclass(METHODS["siameseim"], DrawsPictures)
    assert issubclass(METHODS["siameseim"], UpdatesAfterStep)
    assert issubclass(METHODS["siameseim"], KeepsRankLocalTensors)
    assert not issubclass(METHODS["segmentation"], UpdatesAfterStep)  # the engine's clock now
    for name in ("mae", "cropmae", "siammae", "siameseim"):
        assert not hasattr(METHODS[name], "evaluate"), name


def test_siameseim_declares_its_picture_scales_and_the_tasks_their_evaluation() -> None:
    cfg = load_config(None, ["method=siameseim", *TINY[:3], "data.source=synthetic"])
    method = build_method(cfg)
    assert isinstance(method, ScalesPictures) and method.picture_scales == {}
    assert not isinstance(build_method(_cfg("mae", Path("unused"))), (ScalesPictures, Evaluates))
    assert not isinstance(build_method(_cfg("mae", Path("unused"))), SkipsAtStart)


def test_the_engine_reads_no_undeclared_member_of_a_method() -> None:
    import siamae.engine

    sources = list(Path(siamae.engine.__file__).parent.glob("*.py"))
    assert len(sources) > 5
    for source in sources:
        text = source.read_text()
        assert "getattr(method" not in text and "getattr(run.method" not in text, source.name


def test_building_siameseim_makes_no_collective_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a process group of two, building the model must not broadcast (the engine copies
    rank 0's EMA target when it wraps the model in DDP)."""
    import torch.distributed as dist

    cfg = load_config(None, ["method=siameseim", *TINY[:3], "data.source=synthetic"])

    def no_collective(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a collective call while the method is built")

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "broadcast", no_collective)
    monkeypatch.setattr(dist, "all_reduce", no_collective)
    method = build_method(cfg)
    assert method.ddp_ignored_names()


def _old_segmentation_schedule(steps_per_epoch: int, interval: int, total: int) -> list[int]:
    """The steps segmentation evaluated at when it kept its own clock (a flag raised after the
    steps that are multiples of the interval, read and cleared at the next epoch's end)."""
    due, steps = False, []
    for step in range(1, total + 1):
        if step % interval == 0:
            due = True
        if step % steps_per_epoch == 0 or step == total:
            if step >= total or due:
                steps.append(step)
                due = False
    return steps


@pytest.mark.parametrize(
    ("steps_per_epoch", "interval", "total"),
    [(2, 3, 7), (4, 3, 10), (5, 5, 23), (3, 7, 40), (10, 1, 25), (1, 4, 9), (6, 16, 100)],
)
def test_evaluation_at_a_step_interval_keeps_segmentations_schedule(
    steps_per_epoch: int, interval: int, total: int
) -> None:
    class Interval:
        best_metric = None
        eval_every_steps = interval

    method: Any = Interval()
    new = [s for s in range(1, total + 1) if evaluation_due(method, s, steps_per_epoch, total)]
    assert new == _old_segmentation_schedule(steps_per_epoch, interval, total)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_no_method_reads_the_run_folder_from_its_config(name: str) -> None:
    # The engine owns the run folder: it hands a method what it needs (build_source's run_dir,
    # an EvalRequest's results folder); a method's own code never reads run.out_dir.
    source = inspect.getsource(inspect.getmodule(METHODS[name]))
    assert ".run.out_dir" not in source, f"{name} reads the run folder from its config"


def test_the_engine_hands_the_run_folder_to_build_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str | None] = []

    class Recording(Bare):
        @classmethod
        def build_source(
            cls, cfg: Any, cache_dir: str | None = None, run_dir: str | None = None
        ) -> Any:
            seen.append(run_dir)
            return super().build_source(cfg, cache_dir, run_dir)

    monkeypatch.setitem(METHODS, "bare", Recording)
    torch.set_num_threads(1)
    train(_cfg("bare", tmp_path / "run", "optim.max_steps=1"))
    assert seen == [str(tmp_path / "run")]
