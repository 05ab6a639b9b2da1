"""One order of overrides for every command, lowest first: the recipe file, the method's published
defaults, the command's own flags (--data, --val, --checkpoint, --out), --set. The file is read
once, and siamae finetune picks its task from the resolved method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from siamae import recipes
from siamae.commands import cli, submit
from siamae.config import Config
from siamae.eval.propagation.engine import protocol

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"  # CropMAE on synthetic data
SIAMMAE = REPO / "configs" / "siammae_vits16_k400.yaml"
CLASSIFICATION = REPO / "configs" / "finetune_cifar10_subset.yaml"
SEGMENTATION = REPO / "configs" / "upernet_vitb16_ade20k_mae.yaml"


def _config(argv: list[str]) -> Config:
    """The config a command resolves, as it would before its run (nothing trained)."""
    args = cli.build_parser().parse_args(argv)
    build = {"pretrain": cli._pretrain_config, "finetune": cli._finetune_config}
    return build[args.command](args)


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    """A data folder with train/ and val/ splits, and two other folders."""
    names = {"data": "data", "train": "data/train", "val": "data/val", "a": "a", "b": "b"}
    made = {key: tmp_path / name for key, name in names.items()}
    for path in made.values():
        path.mkdir(parents=True, exist_ok=True)
    return made


@pytest.mark.parametrize("with_data", [False, True])
def test_pretrain_set_wins_over_the_flags(folders: dict[str, Path], with_data: bool) -> None:
    data = ["--data", str(folders["data"])] if with_data else []
    cfg = _config(
        ["pretrain", "--config", str(DEMO), "--out", str(folders["a"]), *data]
        + ["--set", f"run.out_dir={folders['b']}", "--set", f"data.path={folders['b']}"]
    )
    assert cfg.run.out_dir == str(folders["b"])
    assert cfg.data.path == str(folders["b"])


def test_pretrain_data_reads_a_synthetic_recipe_as_real_data_unless_set_says(
    folders: dict[str, Path],
) -> None:
    base = ["pretrain", "--config", str(DEMO), "--data", str(folders["data"])]
    assert _config(base).data.source == "images"
    # the method chosen by --set decides the kind (frame pairs read videos)
    assert _config(base + ["--set", "method=siammae"]).data.source == "videos"
    assert _config(base + ["--set", "data.source=synthetic"]).data.source == "synthetic"
    # a recipe of real data keeps its own source
    assert _config(["pretrain", "--config", str(SIAMMAE), "--data", "x"]).data.source == "videos"


@pytest.mark.parametrize("with_data", [False, True])
def test_finetune_set_wins_over_the_flags(folders: dict[str, Path], with_data: bool) -> None:
    data = ["--data", str(folders["data"])] if with_data else []
    cfg = _config(
        ["finetune", "--config", str(CLASSIFICATION), *data, "--val", str(folders["a"])]
        + ["--checkpoint", "none", "--out", str(folders["a"])]
        + ["--set", f"finetune.val={folders['b']}", "--set", f"run.out_dir={folders['b']}"]
        + ["--set", f"finetune.checkpoint={folders['b']}", "--set", f"data.path={folders['b']}"]
    )
    assert cfg.finetune.val == str(folders["b"])
    assert cfg.run.out_dir == str(folders["b"])
    assert cfg.finetune.checkpoint == str(folders["b"])
    assert cfg.data.path == str(folders["b"])


def test_finetune_flags_win_over_the_file(folders: dict[str, Path]) -> None:
    cfg = _config(
        ["finetune", "--config", str(CLASSIFICATION), "--data", str(folders["data"])]
        + ["--out", str(folders["a"])]
    )
    assert cfg.data.path == str(folders["train"])
    assert cfg.finetune.val == str(folders["val"])  # the split --data holds
    assert cfg.run.out_dir == str(folders["a"])


@pytest.mark.parametrize("with_data", [False, True])
def test_segmentation_set_wins_over_the_flags(folders: dict[str, Path], with_data: bool) -> None:
    data = ["--data", str(folders["data"])] if with_data else []
    cfg = _config(
        ["finetune", "--config", str(SEGMENTATION), *data, "--val", str(folders["a"])]
        + ["--set", f"segmentation.val={folders['b']}", "--set", f"data.path={folders['b']}"]
    )
    assert cfg.method == "segmentation"
    assert cfg.segmentation.val == str(folders["b"])
    assert cfg.data.path == str(folders["b"])


@pytest.mark.parametrize("how", ["file", "set"])
def test_the_segmentation_task_is_chosen_from_the_resolved_method(
    folders: dict[str, Path], how: str
) -> None:
    recipe = SEGMENTATION if how == "file" else CLASSIFICATION
    sets = ["--set", "method=segmentation"] if how == "set" else []
    cfg = _config(
        ["finetune", "--config", str(recipe), "--data", str(folders["data"])]
        + ["--val", str(folders["a"]), *sets]
    )
    assert cfg.method == "segmentation"
    assert cfg.segmentation.val == str(folders["a"])  # the flag went to the task's own field
    assert cfg.data.path == str(folders["data"])  # segmentation's --data is the data set folder


def test_a_set_method_away_from_segmentation_picks_classification(
    folders: dict[str, Path],
) -> None:
    cfg = _config(
        ["finetune", "--config", str(SEGMENTATION), "--val", str(folders["a"])]
        + ["--set", "method=finetune", "--set", f"data.path={folders['data']}"]
    )
    assert cfg.method == "finetune" and cfg.finetune.val == str(folders["a"])


@pytest.mark.parametrize(
    "argv",
    [
        ["pretrain", "--config", str(DEMO), "--data", "somewhere", "--out", "o"],
        ["pretrain", "--config", str(DEMO)],
        ["finetune", "--config", str(CLASSIFICATION), "--val", str(REPO), "--set", "data.path=d"],
        ["finetune", "--config", str(SEGMENTATION), "--val", str(REPO), "--set", "data.path=d"],
        ["finetune", "--config", str(CLASSIFICATION), "--set", "method=segmentation"]
        + ["--set", "data.path=d"],
    ],
)
def test_the_config_file_is_read_once(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    reads: list[str] = []
    read = recipes.load_yaml

    def counting(path: Any) -> dict[str, Any]:
        reads.append(str(path))
        return read(path)

    monkeypatch.setattr(recipes, "load_yaml", counting)
    _config(argv)
    assert len(reads) == 1, reads


def _plan(argv: list[str]) -> submit.JobPlan:
    parser = cli.build_parser()
    args = parser.parse_args(["submit", "--executor", "local", "--gpus-per-node", "0"] + argv)
    configs = {"pretrain": cli._pretrain_config, "finetune": cli._finetune_config}
    return submit.plan_from_args(args, parser, configs)


@pytest.mark.parametrize("with_data", [False, True])
@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_submit_resolves_the_job_in_the_same_order(
    folders: dict[str, Path], with_data: bool, command: str
) -> None:
    recipe = DEMO if command == "pretrain" else CLASSIFICATION
    data = ["--data", str(folders["data"])] if with_data else []
    if command == "finetune" and not with_data:
        data = ["--set", f"data.path={folders['train']}"]
    plan = _plan(
        ["--time", "10", "--", command, "--config", str(recipe), *data]
        + ["--out", str(folders["a"]), "--set", f"run.out_dir={folders['b']}"]
    )
    assert plan.run_dir == folders["b"].resolve()


def test_propagation_set_wins_over_the_protocol_preset() -> None:
    """eval davis/jhmdb/vip: no flag names a protocol field; --set beats the preset."""
    assert protocol("cropmae", "vip").topk == 10
    assert protocol("cropmae", "vip", ["topk=3"]).topk == 3


def test_the_command_layer_is_below_set_in_load_config() -> None:
    cfg = recipes.load_config(
        DEMO, ["optim.base_lr=0.5"], flags=["optim.base_lr=0.25", "run.seed=7"]
    )
    assert cfg.optim.base_lr == 0.5 and cfg.run.seed == 7


def test_the_flag_layer_sees_the_recipe_as_set_leaves_it() -> None:
    seen: list[Any] = []

    def flags(recipe: dict[str, Any]) -> list[str]:
        seen.append(recipes.recipe_value(recipe, "method"))
        seen.append(recipes.recipe_value(recipe, "data.source"))
        seen.append(recipes.recipe_value(recipe, "run.seed"))  # absent: the default
        return []

    recipes.load_config(DEMO, ["method=mae"], flags=flags)
    assert seen == ["mae", "synthetic", Config().run.seed]


def test_an_unknown_method_with_data_is_still_the_one_line_error(
    capsys: pytest.CaptureFixture[str], folders: dict[str, Path]
) -> None:
    code = cli.main(
        ["pretrain", "--config", str(DEMO), "--data", str(folders["data"])]
        + ["--set", "method=cropmea"]
    )
    assert code == 2
    assert "unknown method 'cropmea'" in capsys.readouterr().err
