"""Typed configs: recipes load, method defaults resolve, every bad field is named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from siamae.commands.demo import demo_config
from siamae.config import Config, from_dict
from siamae.errors import ConfigError
from siamae.eval import attention
from siamae.recipes import load_config
from siamae.sizes import MAX_PATCHES, size_problem

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_recipes_hold_the_published_values() -> None:
    crop = load_config(CONFIGS / "cropmae_vits16_in1k.yaml", ["data.path=/data"])
    assert (crop.method, crop.cropmae.mask_ratio, crop.model.arch, crop.model.patch_size) == (
        "cropmae",
        0.985,
        "vit_small",
        16,
    )
    assert (crop.decoder.dim, crop.decoder.depth, crop.decoder.num_heads, crop.decoder.mlp_dim) == (
        256,
        4,
        8,
        2048,
    )
    assert (crop.decoder.dropout, crop.decoder.norm_style) == (0.1, "post")
    assert crop.data.global_scale == (0.1, 1.0) and crop.data.local_scale == (0.3, 0.6)
    assert (crop.optim.base_lr, crop.optim.epochs, crop.optim.warmup_epochs) == (1e-4, 400, 20)
    assert crop.optim.clip_grad is None and crop.run.precision == "fp16"
    mae = load_config(CONFIGS / "mae_vitb16_in1k.yaml", ["data.path=/data"])
    assert (mae.method, mae.mae.mask_ratio, mae.model.arch) == ("mae", 0.75, "vit_base")
    assert (mae.decoder.dim, mae.decoder.depth, mae.decoder.num_heads) == (512, 8, 16)
    assert mae.optim.base_lr == 1.5e-4 and mae.data.global_scale == (0.2, 1.0)


def test_method_defaults_follow_the_method() -> None:
    assert load_config(None, ["data.source=synthetic"]).cropmae.mask_ratio == 0.985
    siam = load_config(None, ["data.source=synthetic", "method=siammae"])
    assert siam.siammae.mask_ratio == 0.95 and siam.data.global_scale == (0.5, 1.0)
    assert load_config(None, ["data.source=synthetic", "method=mae"]).mae.mask_ratio == 0.75
    video_crop = load_config(None, ["data.source=videos", "data.path=/v"])
    assert video_crop.data.global_scale == (0.5, 1.0)  # one frame per video: global area 0.5-1
    cfg = load_config(None, ["data.source=synthetic", "cropmae.mask_ratio=0.9"])
    assert cfg.cropmae.mask_ratio == 0.9


def test_demo_yaml_matches_the_built_in_demo() -> None:
    from_file = load_config(CONFIGS / "demo.yaml", ["run.out_dir=runs/demo"])
    assert from_file.to_dict() == demo_config("runs/demo").to_dict()


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["optim.base_lr=abc"], "optim.base_lr"),
        (["optim.base_lr=-1"], "optim.base_lr"),
        (["optim.bse_lr=1"], "optim.bse_lr"),
        (["model.arch=vit_huge"], "model.arch"),
        (["model.img_size=100"], "model.img_size"),
        (["cropmae.mask_ratio=1.5"], "cropmae.mask_ratio"),
        (["method=cropmea"], "method"),
        (["data.batch_size=0"], "data.batch_size"),
        (["data.source=images"], "data.path"),
        (["data.global_scale=[0.5, 0.1]"], "data.global_scale"),
        (["data.views=sideways"], "data.views"),
        (["run.compile=yes please"], "run.compile"),
        (["decoder.num_heads=3"], "decoder.dim"),
        (["method=siammae", "data.source=images", "data.path=/x"], "data.source"),
        (["optim.warmup_epochs=500"], "optim.warmup_epochs"),
        (["monitor.knn_train=/a"], "monitor.knn_val"),
    ],
)
def test_bad_fields_are_rejected_by_name(overrides: list[str], field: str) -> None:
    base = [] if any(o.startswith("data.source") for o in overrides) else ["data.source=synthetic"]
    with pytest.raises(ConfigError) as err:
        load_config(None, base + overrides)
    assert f"'{field}'" in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["model.patch_size=8", "model.img_size=8192"], "model.img_size"),  # a million patches
        (["monitor.img_size=8192"], "monitor.img_size"),
    ],
)
def test_a_size_beyond_the_patch_count_limit_is_refused_before_any_table_is_built(
    overrides: list[str], field: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.source=synthetic", *overrides])
    message = str(err.value)
    assert f"'{field}'" in message and f"{MAX_PATCHES:,}" in message and "8192" in message
    # the limit itself is the one the attention command applies
    assert attention.MAX_PATCHES == MAX_PATCHES
    load_config(None, ["data.source=synthetic", "model.patch_size=16", "model.img_size=2048"])


def test_unknown_field_suggests_the_right_one(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": 1.0}}))
    with pytest.raises(ConfigError, match="unknown config field 'optim.lr'"):
        load_config(path)
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        from_dict(Config, {"data": {"batch_sise": 3}})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_resolved_config_round_trips_through_plain_data() -> None:
    cfg = load_config(None, ["data.source=synthetic", "optim.max_steps=7"])
    again = load_config(None, [f"{k}={v}" for k, v in _flatten(cfg.to_dict())])
    assert again == cfg


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flatten(v, key + ".")
        else:
            out.append(
                (key, "null" if v is None else (str(v).lower() if isinstance(v, bool) else v))
            )
    return out


@pytest.mark.parametrize(
    ("height", "width", "patch", "words"),
    [
        (30, 30, 8, "30 is not a multiple of the patch size 8"),
        (0, 0, 8, "positive"),
        (2048, 2056, 16, "not a multiple"),
        (8192, 8192, 8, "1,048,576 patches"),
        (1032, 1024, 8, "16,512 patches"),  # just above the limit
        (1024, 1024, 8, None),  # at the limit
        (480, 880, 8, None),
    ],
)
def test_size_problem_names_whole_patches_and_the_limit(
    height: int, width: int, patch: int, words: str | None
) -> None:
    problem = size_problem(height, width, patch)
    assert problem is None if words is None else words in problem
