"""Export to timm (strict load, identical features) and load_encoder on every format."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

from siamae import load_encoder
from siamae.checkpoint import TRAIN_FORMAT, save_atomic
from siamae.commands.cli import main
from siamae.errors import CheckpointError, SiamaeError
from siamae.export import export_encoder
from siamae.hub import export_hub
from siamae.models.vit import Encoder


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    torch.manual_seed(0)
    enc = Encoder("vit_tiny", 16, 32)
    with torch.no_grad():  # make it differ from any fresh init
        for p in enc.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return enc.eval()


@pytest.fixture(scope="module")
def train_ckpt(encoder: Encoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A siamae training checkpoint: encoder under encoder.vit., a decoder, config, step."""
    model = {f"encoder.vit.{k}": v for k, v in encoder.vit.state_dict().items()}
    model["decoder.blocks.0.attn.qkv.weight"] = torch.randn(12, 4)
    model["mask_token"] = torch.zeros(1, 1, 4)
    ckpt = {
        "format": TRAIN_FORMAT,
        "method": "cropmae",
        "config": {"method": "cropmae", "model": {"arch": "vit_tiny", "patch_size": 16}},
        "model": model,
        "optimizer": {},
        "step": 123,
        "epoch": 4,
    }
    return save_atomic(ckpt, tmp_path_factory.mktemp("ckpt") / "last.pt")


def test_export_loads_strictly_in_timm_with_identical_features(
    encoder: Encoder, train_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights, sidecar = export_encoder(train_ckpt, tmp_path / "enc.safetensors")
    info = json.loads(sidecar.read_text())
    assert info["method"] == "cropmae" and info["step"] == 123 and info["epoch"] == 4
    assert info["recipe"]["model"]["arch"] == "vit_tiny"
    assert info["timm_name"] == "vit_tiny_patch16_224" and info["timm_kwargs"] == {"img_size": 32}
    assert info["mean"] == [0.485, 0.456, 0.406] and info["placeholder_head"] is True

    # Record the strict flag timm passes to load_state_dict.
    calls: list[bool] = []
    original = nn.Module.load_state_dict

    def spy(self, state_dict, strict=True, **kw):  # noqa: ANN001, ANN202
        calls.append(strict)
        return original(self, state_dict, strict=strict, **kw)

    monkeypatch.setattr(nn.Module, "load_state_dict", spy)
    # Exactly the command (plus the image size the encoder was trained at).
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(weights)),
        img_size=32,
    ).eval()
    assert calls == [True]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), encoder(x), rtol=0, atol=0)
        assert torch.count_nonzero(model(x)) == 0  # the placeholder head

    # Features only: timm drops the head; every encoder tensor is still loaded.
    bare = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=True,
        num_classes=0,
        pretrained_cfg_overlay=dict(file=str(weights)),
        img_size=32,
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(bare(x), encoder(x)[:, 0], rtol=0, atol=0)

    # Without img_size, timm resamples the position grid to 224 and still loads every key.
    monkeypatch.setattr(nn.Module, "load_state_dict", original)
    timm.create_model(
        "vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(weights))
    )

    # And back into siamae: same encoder, method and step from the sidecar.
    again = load_encoder(weights)
    assert again.load_report.method == "cropmae" and again.load_report.step == 123
    assert again.load_report.ignored == ["head.bias", "head.weight"]
    with torch.no_grad():
        torch.testing.assert_close(again(x), encoder(x), rtol=0, atol=0)


def test_export_without_timm_head_when_the_name_has_none(encoder: Encoder, tmp_path: Path) -> None:
    # vit_small_patch8_224's default weights are DINO's: no classifier, so none is written.
    torch.manual_seed(1)
    small = Encoder("vit_small", 8, 32, depth=2)
    path = tmp_path / "small.pt"
    torch.save(small.vit.state_dict(), path)
    weights, sidecar = export_encoder(path, tmp_path / "small.safetensors")
    info = json.loads(sidecar.read_text())
    assert info["timm_name"] == "vit_small_patch8_224" and info["placeholder_head"] is False
    assert info["timm_kwargs"] == {"img_size": 32, "depth": 2}
    model = timm.create_model(
        "vit_small_patch8_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(weights)),
        **info["timm_kwargs"],
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), small(x), rtol=0, atol=0)


def test_export_command_and_wrong_name(train_ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli.safetensors"
    code = main(["export", "--checkpoint", str(train_ckpt), "--out", str(out),
                 "--timm-name", "vit_tiny_patch16_224"])  # fmt: skip
    assert code == 0 and out.is_file() and out.with_suffix(".json").is_file()
    printed = capsys.readouterr().out
    assert "load with: timm.create_model('vit_tiny_patch16_224'" in printed
    # timm's keyword arguments as it takes them, not a Python dict
    assert f"wrote {out} (vit_tiny_patch16_224, img_size=32)" in printed and "{" not in printed
    code = main(["export", "--checkpoint", str(train_ckpt), "--out", str(tmp_path / "x.safetensors"),
                 "--timm-name", "vit_small_patch16_224"])  # fmt: skip
    assert code == 2
    assert "does not fit timm's 'vit_small_patch16_224'" in capsys.readouterr().err
    with pytest.raises(SiamaeError, match="not a timm model"):
        export_encoder(train_ckpt, tmp_path / "y.safetensors", timm_name="vit_nonsense_patch16")
    with pytest.raises(SiamaeError, match=".safetensors"):
        export_encoder(train_ckpt, tmp_path / "y.pt")
    # a timm model that is not a ViT: one line naming the supported models, nothing written
    for name in ("resnet50", "convnext_tiny"):
        code = main(["export", "--checkpoint", str(train_ckpt), "--out", str(tmp_path / "r.safetensors"),
                     "--timm-name", name])  # fmt: skip
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"siamae: error: --timm-name {name!r} is not a timm ViT; ")
        assert "timm.models.vision_transformer" in err[0] and "vit_tiny_patch16_224" in err[0]
        assert not (tmp_path / "r.safetensors").exists()


# -- load_encoder on every format ------------------------------------------------------------------


def _same(a: Encoder, b: Encoder) -> None:
    for (k, v), w in zip(a.vit.state_dict().items(), b.vit.state_dict().values()):
        assert torch.equal(v, w), k


def test_load_encoder_formats(encoder: Encoder, train_ckpt: Path, tmp_path: Path) -> None:
    sd = encoder.vit.state_dict()
    # siamae training checkpoint, as a file and as a run folder
    loaded = load_encoder(train_ckpt)
    _same(loaded, encoder)
    assert loaded.load_report.method == "cropmae" and loaded.load_report.step == 123
    assert not loaded.training
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(train_ckpt.read_bytes())
    _same(load_encoder(run), encoder)
    # timm state dict with a classifier
    torch.save(
        {**sd, "head.weight": torch.zeros(5, 192), "head.bias": torch.zeros(5)},
        tmp_path / "timm.pth",
    )
    _same(load_encoder(tmp_path / "timm.pth"), encoder)
    # DINO full checkpoint: teacher with backbone./head. keys and an argparse Namespace of args
    dino = {
        "student": {f"module.backbone.{k}": v + 1 for k, v in sd.items()},
        "teacher": {
            **{f"backbone.{k}": v for k, v in sd.items()},
            "head.last_layer.weight": torch.zeros(3, 4),
        },
        "epoch": 10,
        "args": argparse.Namespace(arch="vit_tiny", lr=0.1),
    }
    torch.save(dino, tmp_path / "dino.pth")
    _same(load_encoder(tmp_path / "dino.pth"), encoder)
    # MAE / CropMAE code: model with decoder and mask token, DDP prefix
    mae = {"model": {**{f"module.{k}": v for k, v in sd.items()}, "module.mask_token": torch.zeros(1, 1, 192),
                     "module.decoder_embed.weight": torch.zeros(4, 192)}, "args": argparse.Namespace(a=1)}  # fmt: skip
    torch.save(mae, tmp_path / "mae.pth")
    _same(load_encoder(tmp_path / "mae.pth"), encoder)


def test_load_encoder_fails_loudly(encoder: Encoder, tmp_path: Path) -> None:
    sd = encoder.vit.state_dict()
    finetuned = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    # A fine-tuned classifier: a trained fc_norm, or a trained head. (An fc_norm at (1, 0)
    # with no trained head is an encoder without a final norm, e.g. SiameseIM's.)
    trained_fc_norm = {
        "fc_norm.weight": 1 + 0.1 * torch.randn(192),
        "fc_norm.bias": torch.zeros(192),
    }
    trained_head = {"fc_norm.weight": torch.ones(192), "fc_norm.bias": torch.zeros(192)}
    trained_head |= {"head.weight": torch.randn(10, 192), "head.bias": torch.zeros(10)}
    for extra in (trained_fc_norm, trained_head):
        torch.save(finetuned | extra, tmp_path / "ft.pth")
        with pytest.raises(CheckpointError, match="fine-tuned"):
            load_encoder(tmp_path / "ft.pth")
    clash = {**{f"module.{k}": v for k, v in sd.items()}, "blocks.0.norm1.weight": torch.zeros(192)}
    torch.save(clash, tmp_path / "clash.pth")
    with pytest.raises(CheckpointError, match="both name the encoder tensor"):
        load_encoder(tmp_path / "clash.pth")
    save_atomic(
        {"format": "siamae-linear-v1", "config": {"encoder": "enc.pt"}, "head": {}},
        tmp_path / "lin.pt",
    )
    with pytest.raises(CheckpointError, match="linear-probe checkpoint.*'enc.pt'"):
        load_encoder(tmp_path / "lin.pt")
    bad_shape = dict(sd)
    bad_shape["blocks.0.attn.qkv.weight"] = torch.zeros(10, 192)
    torch.save(bad_shape, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="blocks.0.attn.qkv.weight"):
        load_encoder(tmp_path / "bad.pth")


def _summary(folder: Path, figures: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(figures))
    return folder


def test_hub_export_loads_in_timm_from_local_dir_with_the_same_features(
    encoder: Encoder, train_ckpt: Path, tmp_path: Path
) -> None:
    # A run folder: checkpoints/last.pt and one evaluation under eval/.
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(train_ckpt.read_bytes())
    _summary(run / "eval" / "davis", {"benchmark": "DAVIS", "J&F-Mean": 0.6123, "J-Mean": 0.6})
    extra = _summary(tmp_path / "knn", {"benchmark": "k-NN", "top1": {"20": 41.5}})

    folder = export_hub(run, tmp_path / "hub", evaluations=[extra], name="cropmae-tiny")
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hub")]  # no staging left

    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 0
    assert config["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]
    assert config["pretrained_cfg"]["tag"] == "siamae_cropmae"
    assert "license" not in config["pretrained_cfg"]  # timm's licence is for its own weights

    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), encoder(x), rtol=0, atol=0)
        torch.testing.assert_close(model(x), encoder(x)[:, 0], rtol=0, atol=0)
        again = load_encoder(folder)  # siamae reads the hub folder too
        torch.testing.assert_close(again(x), encoder(x), rtol=0, atol=0)

    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n")
    assert "**cropmae**" in card and "| steps | 123 |" in card and "| epochs | 4 |" in card
    assert "| eval/davis | DAVIS | J&F-Mean 0.6123, J-Mean 0.6 |" in card
    assert "| knn | k-NN | top1 (k=20) 41.5 |" in card
    assert "hf upload ORG/NAME FOLDER ." in card
    # A second export into the same folder replaces it.
    export_hub(train_ckpt, folder)
    assert "No evaluation was found" in (folder / "README.md").read_text()


def test_hub_export_of_a_patch8_depth2_encoder_keeps_its_shape(tmp_path: Path) -> None:
    torch.manual_seed(1)
    small = Encoder("vit_small", 8, 32, depth=2).eval()
    torch.save(small.vit.state_dict(), tmp_path / "small.pt")
    folder = export_hub(tmp_path / "small.pt", tmp_path / "hub")
    assert "No evaluation was found" in (folder / "README.md").read_text()
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert len(model.blocks) == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), small(x), rtol=0, atol=0)


def test_hub_export_command_and_bad_input(train_ckpt: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "hub"
    assert main(["export", "--checkpoint", str(train_ckpt), "--hub-dir", str(folder)]) == 0
    assert f'timm.create_model("local-dir:{folder}", pretrained=True)' in capsys.readouterr().out

    crowded = tmp_path / "crowded"
    crowded.mkdir()
    (crowded / "notes.txt").write_text("mine")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["--hub-dir", str(crowded)], "holds other files (notes.txt)"),
        (["--hub-dir", str(a_file)], "is a file"),
        (
            ["--hub-dir", str(tmp_path / "new"), "--eval", str(tmp_path / "nowhere")],
            "no summary.json",
        ),
        (
            ["--hub-dir", str(tmp_path / "new"), "--out", str(tmp_path / "x.safetensors")],
            "not allowed with",
        ),
    ]
    for extra, message in cases:
        try:
            code = main(["export", "--checkpoint", str(train_ckpt), *extra])
        except SystemExit as stop:  # argparse's own refusals
            code = stop.code
        assert code == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "Traceback" not in err, err
    assert (crowded / "notes.txt").read_text() == "mine" and sorted(crowded.iterdir()) == [
        crowded / "notes.txt"
    ]
    assert a_file.read_text() == "x" and not (tmp_path / "new").exists()
