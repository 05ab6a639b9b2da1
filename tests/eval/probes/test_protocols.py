"""Named probe protocols: each resolves to its paper's settings and reads the features it says
(held against a hand-built reference on a tiny encoder), and the run's JSON names it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_probes import write_folder

import siamae.eval.probes.linear as linear_module
from siamae.commands.cli import main
from siamae.data.image_folder import EvalTransform, ImageFolder, normalize
from siamae.eval.probes.features import extract_features
from siamae.eval.probes.linear import AugmentedFolder, LinearConfig, _AugmentedFeatures
from siamae.eval.probes.protocols import FEWSHOT_PROTOCOLS
from siamae.models.vit import Encoder


def test_linear_presets_resolve_to_the_published_settings() -> None:
    mae = LinearConfig.for_protocol("mae")
    sim = LinearConfig.for_protocol("siameseim")
    for cfg, pool in ((mae, "cls"), (sim, "mean-ln")):
        assert cfg.pool == pool
        assert (cfg.optimizer, cfg.base_lr, cfg.batch_size, cfg.epochs) == ("lars", 0.1, 16384, 90)
        assert (cfg.warmup_epochs, cfg.weight_decay, cfg.momentum) == (10.0, 0.0, 0.9)
        assert cfg.lr == pytest.approx(6.4)  # 0.1 x 16384 / 256
        assert cfg.deviations() == {}
    # Today's default, named: MAE's head and schedule with SGD at batch 256.
    default = LinearConfig()
    assert default == LinearConfig.for_protocol("mae-sgd256")
    assert (default.optimizer, default.batch_size, default.lr, default.pool) == (
        "sgd",
        256,
        0.1,
        "cls",
    )
    # A smaller batch follows the lr rule, and is recorded as a deviation.
    small = LinearConfig.for_protocol("siameseim", batch_size=1024, epochs=5)
    assert small.lr == pytest.approx(0.4) and small.warmup_epochs == 5
    assert small.deviations() == {"batch_size": 1024, "epochs": 5, "warmup_epochs": 5}
    assert (FEWSHOT_PROTOCOLS["siameseim"].pool, FEWSHOT_PROTOCOLS["siameseim"].lambd) == (
        "cls-raw",
        0.1,
    )
    assert FEWSHOT_PROTOCOLS["mean-pooled"].pool == "mean"


@pytest.fixture(scope="module")
def tiny() -> Encoder:
    torch.manual_seed(0)
    encoder = Encoder("vit_tiny", 16, 32, depth=2)
    with torch.no_grad():  # a final norm that is not an identity, so skipping it shows
        encoder.vit.norm.weight.uniform_(0.5, 1.5)
        encoder.vit.norm.bias.uniform_(-0.5, 0.5)
    return encoder.eval()


def _last_block(encoder: Encoder, x: torch.Tensor) -> torch.Tensor:
    """The ViT written out: patchify + positions, CLS, the blocks; no final norm."""
    vit = encoder.vit
    tokens = vit.patch_embed.proj(x).flatten(2).transpose(1, 2) + vit.pos_embed[:, 1:]
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    out = torch.cat([cls, tokens], dim=1)
    for block in vit.blocks:
        out = block(out)
    return out


def test_each_protocols_features_equal_a_hand_built_reference(tiny: Encoder) -> None:
    images = torch.randint(
        0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        raw = _last_block(tiny, normalize(images, "cpu"))
    norm = tiny.vit.norm
    expected = {
        # MAE: the CLS token after the final norm.
        "cls": F.layer_norm(raw[:, 0], (192,), norm.weight, norm.bias, eps=1e-6),
        # SiameseIM's linear probe: the mean of the last block's patch tokens (the final norm
        # deleted), then a fresh LayerNorm (fc_norm at (1, 0)).
        "mean-ln": F.layer_norm(raw[:, 1:].mean(1), (192,), eps=1e-6),
        # SiameseIM's few-shot code: forward_features(x)[:, 0], no norm.
        "cls-raw": raw[:, 0],
        "mean": F.layer_norm(raw[:, 1:], (192,), norm.weight, norm.bias, eps=1e-6).mean(1),
    }
    for pool, reference in expected.items():
        got = extract_features(tiny, images, pool=pool, batch_size=2, progress=False)
        assert torch.allclose(got, reference, atol=1e-5), pool
    assert not torch.allclose(expected["mean-ln"], expected["mean"], atol=1e-2)


def test_a_large_batch_is_exact_when_encoded_in_chunks(
    tiny: Encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The preset's batch of 16384 on a small machine: the encoder runs on chunks, the head sees
    # the whole batch. Here: batches of 7 built from chunks of 3, 18 images -> 7, 7, 4.
    write_folder(tmp_path / "train", 6, seed=0)
    base = ImageFolder(tmp_path / "train", EvalTransform(32, 1.0))
    cfg = LinearConfig.for_protocol("siameseim", batch_size=7)
    source = _AugmentedFeatures(tiny, AugmentedFolder(base, seed=0), cfg, torch.device("cpu"))
    monkeypatch.setattr(linear_module, "ENCODE_CHUNK", 3)
    batches = list(source.batches(epoch=1))
    assert [b[0].shape[0] for b in batches] == [7, 7, 4]
    monkeypatch.setattr(linear_module, "ENCODE_CHUNK", 256)
    whole = list(source.batches(epoch=1))
    for (feats, labels), (ref_feats, ref_labels) in zip(batches, whole):
        assert torch.equal(labels, ref_labels)
        assert torch.allclose(feats, ref_feats, atol=1e-5)


def test_the_commands_record_their_protocol(tmp_path: Path) -> None:
    train, val = (
        write_folder(tmp_path / "train", 4, seed=0),
        write_folder(tmp_path / "val", 2, seed=1),
    )
    common = ["--random-init", "vit_tiny_patch16_32", "--train", str(train), "--val", str(val),
              "--crop-pct", "1.0", "--num-workers", "0", "--no-progress"]  # fmt: skip
    out = tmp_path / "linear"
    assert main(["eval", "linear", *common, "--protocol", "siameseim", "--epochs", "2",
                 "--out-dir", str(out)]) == 0  # fmt: skip
    result = json.loads((out / "results.json").read_text())
    assert result["protocol"] == "siameseim"
    assert result["deviations_from_protocol"] == {"epochs": 2, "warmup_epochs": 2}
    recipe = result["recipe"]
    assert (recipe["pool"], recipe["optimizer"], recipe["batch_size"]) == ("mean-ln", "lars", 16384)
    assert result["lr"] == pytest.approx(6.4)
    assert "fresh LayerNorm" in result["features"]
    out = tmp_path / "fewshot"
    assert main(["eval", "fewshot", *common, "--protocol", "siameseim", "--per-class", "2",
                 "--out-dir", str(out)]) == 0  # fmt: skip
    info = json.loads((out / "fewshot.json").read_text())["info"]
    assert (info["protocol"], info["pool"]) == ("siameseim", "cls-raw")
