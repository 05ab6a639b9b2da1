"""One way to read and check options (siamae.options): the --set parser's table, the config and
propagation reading a --set alike, and every options object naming its bad field the same way."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from siamae.config import Config, apply_overrides, from_dict
from siamae.errors import ConfigError
from siamae.eval.probes.linear import LinearConfig
from siamae.eval.propagation.engine import PropagationParams, protocol
from siamae.options import parse_value

SRC = Path(__file__).resolve().parents[1] / "src" / "siamae"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("true", True),
        ("false", False),
        ("yes", True),
        ("no", False),
        ("on", True),
        ("off", False),
        ("1", 1),
        ("0", 0),
        ("-3", -3),
        ("0.5", 0.5),
        ("1e-3", 1e-3),  # YAML wants 1.0e-3; a user means the number
        ("2E4", 2e4),
        ("null", None),
        ("None", None),  # Python's spelling
        ("~", None),
        ("", None),
        ("[1, 2]", [1, 2]),
        ("[0.3, 1e-1]", [0.3, "1e-1"]),  # inside a list YAML's own reading stands
        ("480x880", "480x880"),
        ("long:440", "long:440"),
        ("runs/a", "runs/a"),
    ],
)
def test_the_set_parser_table(text: str, value: object) -> None:
    assert parse_value(text) == value


def _config(*overrides: str) -> Config:
    return from_dict(Config, apply_overrides({}, list(overrides)))


@pytest.mark.parametrize(("text", "value"), [("1", True), ("0", False), ("no", False)])
def test_a_boolean_field_reads_1_0_yes_no_in_config_and_propagation(text: str, value: bool) -> None:
    assert _config(f"run.progress={text}").run.progress is value
    assert protocol("cropmae", "davis", [f"pad_queue={text}"]).pad_queue is value


def test_a_bad_boolean_is_the_same_error_in_config_and_propagation() -> None:
    with pytest.raises(ConfigError) as config_err:
        _config("run.progress=maybe")
    with pytest.raises(ConfigError) as propagation_err:
        protocol("cropmae", "davis", ["pad_queue=maybe"])
    assert (
        str(config_err.value) == "config field 'run.progress': expected true or false, got 'maybe'"
    )
    assert str(propagation_err.value) == (
        "propagation option 'pad_queue': expected true or false, got 'maybe'"
    )


def test_numbers_and_null_read_alike_in_config_and_propagation() -> None:
    assert _config("optim.max_steps=None").optim.max_steps is None
    assert _config("optim.max_steps=5.0").optim.max_steps == 5
    params = protocol("cropmae", "davis", ["topk=5.0", "temperature=1e-1", "radius=12"])
    assert (params.topk, params.temperature, params.radius) == (5, 0.1, 12.0)
    with pytest.raises(ConfigError, match="^propagation option 'topk': expected an integer"):
        protocol("cropmae", "davis", ["topk=x"])
    with pytest.raises(
        ConfigError, match="^unknown propagation option 'tpok'; did you mean 'topk'"
    ):
        protocol("cropmae", "davis", ["tpok=3"])


def test_every_options_object_names_its_bad_field() -> None:
    with pytest.raises(ConfigError, match="^linear probe option 'epochs': expected 1 or more"):
        LinearConfig(epochs=0).check()
    with pytest.raises(ConfigError, match="^propagation option 'chunk': expected 1 or more"):
        PropagationParams(chunk=0).validate()
    with pytest.raises(ConfigError, match="^propagation option 'topk': expected 1 or more, got 0"):
        protocol("cropmae", "davis", ["topk=0"])
    with pytest.raises(ConfigError, match="^propagation option 'neighbourhood': expected one of"):
        PropagationParams(neighbourhood="round").validate()  # type: ignore[arg-type]


# A check helper of its own, or a field error spelled by hand: what the one helper replaced.
_OWN_DIALECT = re.compile(
    r"def (_check|fail|check|bad)\(ok|def fail\(|config field '\{|\"config field '"
)


def test_methods_tasks_and_evaluations_check_through_the_one_helper() -> None:
    rooms = [SRC / "methods", SRC / "finetune", SRC / "eval", SRC / "config.py"]
    files = [
        p for room in rooms for p in ([room] if room.is_file() else sorted(room.rglob("*.py")))
    ]
    assert len(files) > 20
    offenders = [
        f"{p.relative_to(SRC)}:{n}"
        for p in files
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if _OWN_DIALECT.search(line)
    ]
    assert offenders == []


def test_no_module_spells_the_field_error_by_hand() -> None:
    # Every "config field 'x': ..." line comes from options.option_error, so the form is one.
    offenders = [
        f"{p.relative_to(SRC)}:{n}"
        for p in sorted(SRC.rglob("*.py"))
        if p.name != "options.py"
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if "config field '" in line
    ]
    assert offenders == []
