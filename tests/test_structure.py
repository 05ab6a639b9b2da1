"""The package's plan (README, "Design"), measured by benchmarks/structure_figures.py: no import
circles, no room importing a room above it, siamae imports at the top of each file, and the
training loop in parts of at most 80 lines."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "structure_figures.py"


@pytest.fixture(scope="module")
def figures_of():
    spec = importlib.util.spec_from_file_location("structure_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["structure_figures"] = module  # the dataclass looks its module up there
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module.measure


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "siamae" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "siamae"


def test_the_script_finds_room_loops_circles_and_inner_imports(figures_of, tmp_path: Path) -> None:
    src = _write(
        tmp_path,
        {
            "__init__.py": "",
            "low/__init__.py": "",
            "low/a.py": "from siamae.high.b import thing\n",  # a room importing one above it
            "high/__init__.py": "",
            "high/b.py": "from siamae.low.c import other\nthing = 1\n",
            "low/c.py": "other = 2\n\ndef f():\n    from siamae.high import b\n",
            "alone.py": "from siamae.low.c import other\n",
            # two modules in one import: both are arrows (the second was once missed)
            "pair.py": "from siamae.low import a, c\n",
        },
    )
    figures = figures_of(src)
    assert figures.room_loops == [["high", "low"]]
    assert figures.room_arrows["low"]["high"] == {
        "siamae.low.a -> siamae.high.b",
        "siamae.low.c -> siamae.high.b",
    }
    assert figures.circles == [["siamae.high.b", "siamae.low.c"]]  # via c's inner import
    assert figures.inner_imports == ["siamae/low/c.py:4 -> siamae.high.b"]
    assert figures.graph["siamae.pair"] == {"siamae.low.a", "siamae.low.c"}
    assert figures.longest == (2, "siamae.low.c.f")


def test_the_package_keeps_its_plan(figures_of) -> None:
    figures = figures_of(REPO / "src" / "siamae")
    assert figures.room_loops == [], {
        room: dict(arrows) for room, arrows in figures.room_arrows.items()
    }
    assert figures.circles == []
    # The one exception: the console script imports the CLI once OMP_WAIT_POLICY is set.
    assert [line.split(":")[0] for line in figures.inner_imports] == ["siamae/commands/entry.py"]
    # The engine is handed the k-NN monitor: it imports no evaluation.
    assert "eval" not in figures.room_arrows["engine"], figures.room_arrows["engine"]
    # The command line, its entry point and the commands above the library are one room.
    assert not {"cli", "submit", "demo", "viz"} & set(figures.rooms), sorted(figures.rooms)
    # Segmentation's probe and command are one folder of eval/; its scores stand below both eval/
    # and finetune/, so eval/ reaches into finetune/ only to read a fine-tuned model back.
    assert {m for m in figures.graph if m.startswith("siamae.eval.segmentation")} == {
        "siamae.eval.segmentation.cli",
        "siamae.eval.segmentation.features",
        "siamae.eval.segmentation.grid",
        "siamae.eval.segmentation.probe",
    }
    assert {"eval/segmentation", "segmentation_scores.py"} <= set(figures.rooms)
    assert figures.room_arrows["eval"]["finetune"] == {
        "siamae.eval.segmentation.cli -> siamae.finetune.segmentation",
        "siamae.eval.segmentation.cli -> siamae.finetune.segmentation_checkpoints",
    }
    assert not {"eval", "finetune"} & set(figures.room_arrows["segmentation_scores"])
    # The evaluators for Python callers stand above eval/: only the command line (and the
    # package's face) may reach them, and they reach no command.
    callers = {room for room, arrows in figures.room_arrows.items() if "evaluators" in arrows}
    assert callers <= {"commands", "siamae"}, callers
    assert "commands" not in figures.room_arrows["evaluators"]
    assert "eval" in figures.room_arrows["evaluators"]
    engine = [(n, name) for n, name in figures.functions if name.startswith("siamae.engine.")]
    assert len(engine) > 20  # the parts are measured
    assert max(engine)[0] <= 80, max(engine)


def test_the_tests_mirror_the_rooms() -> None:
    tests = REPO / "tests"
    package = REPO / "src" / "siamae"
    folders = {
        path.relative_to(tests)
        for path in tests.rglob("*")
        if path.is_dir() and path.name != "__pycache__" and any(path.glob("test_*.py"))
    }
    # Each test folder is a room (or a folder of eval/) of the package.
    assert all((package / folder).is_dir() for folder in folders), sorted(map(str, folders))
    assert {Path(room) for room in ("data", "engine", "eval", "finetune", "methods", "models")} <= (
        folders
    )
    # pytest imports test files by their name alone (no __init__.py): names stay unique.
    names = [path.name for path in tests.rglob("*.py")]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
