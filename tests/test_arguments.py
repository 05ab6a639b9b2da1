"""The options every evaluation command shares (siamae/arguments.py): one spelling, one help,
one reading, in every command that has them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from siamae.arguments import (
    CHECKPOINT_HELP,
    DEVICE_CHOICES,
    RANDOM_INIT_HELP,
    encoder_from_args,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    resolve_device,
    write_result_file,
)
from siamae.commands.cli import build_parser, main
from siamae.errors import SiamaeError

ENCODER_COMMANDS = ("knn", "linear", "fewshot", "davis", "jhmdb", "vip", "segment")


def _eval_commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    top = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    group = next(
        a for a in top.choices["eval"]._actions if isinstance(a, argparse._SubParsersAction)
    )
    return dict(group.choices)


def _options(command: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: a for a in command._actions for flag in a.option_strings}


def _minimal_line(name: str, command: argparse.ArgumentParser, *source: str) -> list[str]:
    """``eval NAME`` with ``source`` and a value for every other required option."""
    line = ["eval", name, *source]
    for action in command._actions:
        if action.required and action.option_strings:
            line += [action.option_strings[0], "x"]
    return line


def test_every_eval_command_has_the_shared_options_with_the_same_help() -> None:
    commands = _eval_commands()
    assert set(ENCODER_COMMANDS) | {"homology"} <= set(commands)
    helps: dict[str, set[str]] = {
        "--random-init": set(),
        "--pos-resample": set(),
        "--threads": set(),
    }
    for name, command in commands.items():
        options = _options(command)
        assert options["--checkpoint"].help.startswith(CHECKPOINT_HELP), name
        device = options["--device"]
        assert device.help == f"{DEVICE_CHOICES} (default: {device.default})", name
        helps["--threads"].add(options["--threads"].help)
        if name in ENCODER_COMMANDS:
            assert options["--random-init"].metavar == "MODEL"
            helps["--random-init"].add(options["--random-init"].help)
            helps["--pos-resample"].add(options["--pos-resample"].help)
    assert helps["--random-init"] == {RANDOM_INIT_HELP}
    assert len(helps["--pos-resample"]) == 1 and len(helps["--threads"]) == 1


@pytest.mark.parametrize("name", ENCODER_COMMANDS)
def test_each_command_reads_the_encoder_source_alike(name: str, capsys) -> None:  # noqa: ANN001
    command = _eval_commands()[name]
    parser = build_parser()
    args = parser.parse_args(_minimal_line(name, command, "--random-init", "vit_tiny_patch16_32"))
    assert (args.checkpoint, args.random_init, args.pos_resample) == (
        None,
        "vit_tiny_patch16_32",
        "dino",
    )
    assert args.device == ("cpu" if name in ("davis", "jhmdb", "vip") else "auto")
    # One source, and only one.
    both = _minimal_line(name, command, "--checkpoint", "a.pt", "--random-init", "vit_tiny_patch16")
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(both)
    assert exit_.value.code == 2
    assert "--checkpoint" in capsys.readouterr().err
    none = _minimal_line(name, command)
    if "--score-only" in command._option_string_actions:
        # No encoder is needed to score a folder of predictions: refused when the command
        # runs, in one line, before anything is read.
        assert main(none) == 2
        assert "--checkpoint or --random-init is required" in capsys.readouterr().err
    else:
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(none)
        assert exit_.value.code == 2
        assert "--checkpoint" in capsys.readouterr().err


def test_encoder_from_args_builds_the_baseline_and_names_its_source(capsys) -> None:  # noqa: ANN001
    args = argparse.Namespace(
        checkpoint=None, random_init="vit_tiny_patch8_32", seed=3, pos_resample="timm"
    )
    encoder, source = encoder_from_args(args)
    assert source == "random:vit_tiny_patch8_32:seed3"
    assert encoder.pos_resample == "timm" and encoder.patch_size == 8
    assert capsys.readouterr().out.startswith("random init (seed 3): vit_tiny patch 8 (32px)")

    def refuse(encoder: object) -> None:
        raise SiamaeError("refused")

    with pytest.raises(SiamaeError, match="refused"):
        encoder_from_args(args, check=refuse)
    assert capsys.readouterr().out == ""  # refused before it was described


def test_device_and_result_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(SiamaeError, match="use --device cpu"):
        resolve_device("cuda:1")
    path = write_result_file(tmp_path / "new" / "r.json", {"top1": 1.5})
    assert path.read_text() == '{\n  "top1": 1.5\n}\n' and json.loads(path.read_text())


def _all_commands() -> dict[str, argparse.ArgumentParser]:
    """Every command and subcommand of ``siamae``, by its full name ('eval segment', ...)."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(prefix: str, parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    found[f"{prefix} {name}".strip()] = child
                    walk(f"{prefix} {name}", child)

    walk("", build_parser())
    return found


# Numeric options whose bounds the command checks itself, with a message of its own: one
# command's option, an option of every command ("*", flag), or all of a command's (name, "*").
CHECKED_IN_THE_COMMAND = {
    ("visualize", "--keep"),
    ("eval davis", "--max-frames"),
    ("*", "--threads"),
    ("submit", "*"),
}


def _checked_in_the_command(name: str, flag: str) -> bool:
    return bool({(name, flag), ("*", flag), (name, "*")} & CHECKED_IN_THE_COMMAND)


def test_every_numeric_option_of_every_command_refuses_values_below_its_bound() -> None:
    """An ``int`` or ``float`` option is parsed by a bounded type (positive or non-negative):
    a count, a size, a rate or a seed below 0 makes no sense anywhere."""
    bounded = {positive_int, non_negative_int, positive_float, non_negative_float}
    unbounded = [
        (name, action.option_strings[0])
        for name, command in _all_commands().items()
        for action in command._actions
        if action.type in (int, float)
        and action.choices is None
        and not _checked_in_the_command(name, action.option_strings[0])
    ]
    assert unbounded == []
    commands = _all_commands()
    segment = {a.dest: a.type for a in commands["eval segment"]._actions}
    assert segment["pictures"] in bounded and segment["crop"] is positive_int


@pytest.mark.parametrize(
    ("value", "accepted"), [("-1", None), ("0", 0), ("3", 3), ("x", None), ("1.5", None)]
)
def test_pictures_minus_one_is_refused_in_one_line(
    value: str, accepted: int | None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    line = ["eval", "segment", "--random-init", "vit_tiny_patch8_32", "--data", "d"]
    line += ["--out", str(tmp_path / "out"), "--pictures", value]
    if accepted is not None:
        assert build_parser().parse_args(line).pictures == accepted
        return
    with pytest.raises(SystemExit) as exit_:
        main(line)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("siamae: error: "), err
    assert "--pictures" in err[0] and "0 or more" in err[0]
    assert not (tmp_path / "out").exists()


def test_a_missing_required_option_is_one_line_too(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "segment", "--random-init", "vit_tiny_patch8_32"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("siamae: error: siamae eval segment: "), err
    assert "--data" in err[0] and "--help" in err[0]
