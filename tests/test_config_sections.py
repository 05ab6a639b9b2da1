"""A config per method: each method and task owns its sections, a saved config.yaml holds the
common sections and the method's own, and configs/checkpoints written before keep loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from siamae.commands.cli import _finetune_config, build_parser, main
from siamae.config import COMMON_SECTIONS, Config
from siamae.loading import load_encoder
from siamae.recipes import config_from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
OLD = Path(__file__).resolve().parent / "data" / "old_configs"  # written by main before
SMALL = [
    "model.img_size=32",
    "data.synthetic_count=16",
    "data.batch_size=8",
    "data.num_workers=0",
    "run.visualize=false",
    "run.progress=false",
]


def _pretrain(out: Path, *sets: str) -> list[str]:
    args = ["pretrain", "--config", str(CONFIGS / "demo.yaml"), "--out", str(out)]
    for value in (*SMALL, *sets):
        args += ["--set", value]
    return args


def test_a_saved_cropmae_config_holds_only_its_sections_and_loads_back(tmp_path: Path) -> None:
    assert main(_pretrain(tmp_path, "optim.max_steps=1")) == 0
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert list(saved) == ["method", *COMMON_SECTIONS, "cropmae", "decoder"]
    assert saved["cropmae"] == {"mask_ratio": 0.985, "norm_pix_loss": True}
    again = load_config(tmp_path / "config.yaml")
    assert again.to_dict() == saved


def test_an_old_config_loads_with_one_note_and_the_same_values(
    capsys: pytest.CaptureFixture[str],
) -> None:
    old = yaml.safe_load((OLD / "cropmae_run.yaml").read_text())
    cfg = load_config(OLD / "cropmae_run.yaml")
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 1 and notes[0].startswith("siamae: note: config file")
    assert "mask_ratio -> cropmae.mask_ratio" in notes[0]
    new = cfg.to_dict()
    assert new["cropmae"] == {"mask_ratio": old["mask_ratio"], "norm_pix_loss": True}
    assert new["decoder"] == old["decoder"]
    defaults = Config().to_dict()
    for name in COMMON_SECTIONS:
        # The old values kept; a field added since (monitor.images, data.video_backend, ...)
        # takes its default.
        assert {k: new[name][k] for k in old[name]} == old[name]
        assert {k: v for k, v in new[name].items() if k not in old[name]} == {
            k: defaults[name][k] for k in new[name] if k not in old[name]
        }
    assert not {"mask_ratio", "mixing", "siameseim", "finetune", "segmentation"} & set(new)


def test_an_old_siameseim_config_gets_its_projector_and_predictor_fields() -> None:
    old = yaml.safe_load((OLD / "siameseim_run.yaml").read_text())
    cfg = config_from_dict(old)
    s = cfg.siameseim
    assert (s.dim, s.num_heads, s.mlp_dim, s.predictor_depth) == (768, 16, 3072, 4)
    assert s.mask_ratio == old["mask_ratio"] and s.momentum == old["siameseim"]["momentum"]
    assert "decoder" not in cfg.to_dict()


def test_siameseim_projector_fields_are_its_own() -> None:
    cfg = load_config(CONFIGS / "siameseim_vitb16_in1k.yaml", ["data.path=/x", "siameseim.dim=384"])
    assert cfg.siameseim.dim == 384 and "decoder" not in cfg.to_dict()
    with pytest.raises(Exception, match="siameseim.num_heads"):
        load_config(
            CONFIGS / "siameseim_vitb16_in1k.yaml", ["data.path=/x", "siameseim.num_heads=0"]
        )


def test_segmentation_owns_its_encoder_source_and_layer_decay(tmp_path: Path) -> None:
    recipe = CONFIGS / "upernet_vitb16_ade20k_mae.yaml"
    cfg = load_config(recipe, [f"data.path={tmp_path}", f"segmentation.checkpoint={tmp_path}"])
    assert cfg.segmentation.checkpoint == str(tmp_path) and cfg.segmentation.layer_decay == 0.65
    assert "finetune" not in cfg.to_dict()
    # --checkpoint fills the task's own field
    args = ["finetune", "--config", str(recipe), "--data", str(tmp_path)]
    flags = build_parser().parse_args([*args, "--checkpoint", str(tmp_path)])
    assert _finetune_config(flags).segmentation.checkpoint == str(tmp_path)
    # an old segmentation config: finetune.checkpoint / layer_decay move to segmentation's
    old = yaml.safe_load((OLD / "segmentation_run.yaml").read_text())
    old["finetune"]["checkpoint"] = str(tmp_path)
    old["data"]["path"] = str(tmp_path)
    upgraded = config_from_dict(old)
    assert upgraded.segmentation.checkpoint == str(tmp_path)
    assert upgraded.segmentation.layer_decay == 0.7


def test_a_classifier_carries_no_mask_ratio() -> None:
    old = yaml.safe_load((OLD / "finetune_run.yaml").read_text())
    old["finetune"]["checkpoint"] = None
    old["finetune"]["val"] = None
    old["data"]["path"] = "/x"
    saved = config_from_dict(old).to_dict()
    assert list(saved) == ["method", *COMMON_SECTIONS, "finetune"]
    assert saved["finetune"]["layer_decay"] == old["finetune"]["layer_decay"]


def test_a_checkpoint_of_the_old_layout_resumes_and_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_pretrain(tmp_path, "optim.max_steps=1")) == 0
    last = tmp_path / "checkpoints" / "last.pt"
    checkpoint = torch.load(last, weights_only=False)
    old = yaml.safe_load((OLD / "cropmae_run.yaml").read_text())
    old["run"]["out_dir"] = str(tmp_path)
    checkpoint["config"] = old  # what a checkpoint written before the change holds
    torch.save(checkpoint, last)
    capsys.readouterr()
    assert main(_pretrain(tmp_path, "optim.max_steps=2")) == 0
    assert "read as upgraded" in capsys.readouterr().err
    assert load_encoder(tmp_path).patch_size == 8
