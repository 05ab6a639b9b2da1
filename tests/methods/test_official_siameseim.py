"""Published SiameseIM checkpoints, and each method's position table against its official formula.

The official code saves ``{model, optimizer, epoch, scaler, args}`` (``args`` an
``argparse.Namespace``); ``model`` holds the online encoder (no final norm), the EMA target
(``mm_*``), the projector and the predictor. The helper below writes a file in that layout with
online and target weights that differ.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from siamae import load_encoder
from siamae.export import export_encoder
from siamae.finetune.heads import make_classifier
from siamae.models.pos_embed import sincos_2d
from siamae.recipes import load_config
from siamae.registry import build_method

DIM, DEPTH, HEADS, PATCH, IMG = 192, 2, 3, 16, 32


def official_sincos(dim: int, grid: int, row_first: bool) -> np.ndarray:
    """The official ``get_2d_sincos_pos_embed`` written out: per axis, sin then cos of the
    position times 1 / 10000^(2i / (dim/2)); MAE's code puts the column's half first (its
    "emb_h" reads the column grid), SiameseIM's the row's. A zero row for CLS first."""
    half = dim // 2
    omega = 1.0 / 10000 ** (np.arange(half // 2) / (half / 2))
    rows = []
    for r in range(grid):
        for c in range(grid):
            row = np.concatenate([np.sin(r * omega), np.cos(r * omega)])
            col = np.concatenate([np.sin(c * omega), np.cos(c * omega)])
            rows.append(np.concatenate([row, col] if row_first else [col, row]))
    return np.concatenate([np.zeros((1, dim)), np.stack(rows)])


def _block_tensors(prefix: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    shapes = {
        "norm1.weight": (DIM,),
        "norm1.bias": (DIM,),
        "attn.qkv.weight": (3 * DIM, DIM),
        "attn.qkv.bias": (3 * DIM,),
        "attn.proj.weight": (DIM, DIM),
        "attn.proj.bias": (DIM,),
        "norm2.weight": (DIM,),
        "norm2.bias": (DIM,),
        "mlp.fc1.weight": (4 * DIM, DIM),
        "mlp.fc1.bias": (4 * DIM,),
        "mlp.fc2.weight": (DIM, 4 * DIM),
        "mlp.fc2.bias": (DIM,),
    }
    out = {}
    for name, shape in shapes.items():
        base = torch.ones(shape) if name.endswith("norm1.weight") or "norm2.w" in name else 0
        out[f"{prefix}{name}"] = base + 0.05 * torch.randn(shape, generator=gen)
    return out


def official_checkpoint(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a SiameseIM checkpoint in the official layout; returns the online encoder's tensors."""
    gen = torch.Generator().manual_seed(seed)
    grid = IMG // PATCH
    online = {
        "patch_embed.proj.weight": 0.05 * torch.randn(DIM, 3, PATCH, PATCH, generator=gen),
        "patch_embed.proj.bias": 0.05 * torch.randn(DIM, generator=gen),
        "cls_token": 0.02 * torch.randn(1, 1, DIM, generator=gen),
        "pos_embed": torch.from_numpy(official_sincos(DIM, grid, row_first=True))
        .float()
        .unsqueeze(0),
    }
    for i in range(DEPTH):
        online.update(_block_tensors(f"blocks.{i}.", gen))
    model = dict(online)
    # The EMA target: the same names under mm_, other values.
    for name, tensor in online.items():
        if name != "pos_embed":
            model[f"mm_{name}"] = tensor + 0.1 * torch.randn(tensor.shape, generator=gen)
    model["decoder_embed.weight"] = torch.randn(DIM, DIM, generator=gen)
    model["decoder_embed.bias"] = torch.zeros(DIM)
    model["mm_decoder_embed.weight"] = torch.randn(DIM, DIM, generator=gen)
    model["mm_decoder_embed.bias"] = torch.zeros(DIM)
    model["mask_token"] = torch.randn(1, 1, DIM, generator=gen)
    model["decoder_pos_embed"] = online["pos_embed"].clone()
    model["decoder_pos_mlp.weight"] = torch.randn(DIM, 2 * DIM, generator=gen)
    model["decoder_pred.weight"] = torch.randn(DIM, DIM, generator=gen)
    model.update(_block_tensors("projector_decoder_blocks.0.", gen))
    model.update(_block_tensors("mm_projector_decoder_blocks.0.", gen))
    model.update(_block_tensors("predictor_decoder_blocks.0.", gen))
    torch.save(
        {
            "model": model,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
            "epoch": 1599,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 7},
            "args": argparse.Namespace(model="sim_vit_base_patch16", mm=0.995, epochs=1600),
        },
        path,
    )
    return online


def _official_forward(online: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """The official encoder's forward: patch embedding + positions, CLS, the blocks, no norm
    (timm's blocks, fed the online tensors)."""
    reference = VisionTransformer(
        img_size=IMG,
        patch_size=PATCH,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=HEADS,
        num_classes=0,
        global_pool="avg",
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    ).eval()
    reference.load_state_dict(online, strict=False)
    with torch.no_grad():
        x = reference.patch_embed(images)
        x = torch.cat([reference.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + online["pos_embed"]
        for block in reference.blocks:
            x = block(x)
    return x


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("official") / "sim_base_1600ep_pretrain.pth"
    return path, official_checkpoint(path)


def test_the_official_file_pickles_a_namespace_that_weights_only_refuses(
    official: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    # Why load_encoder allows argparse.Namespace (and nothing else) on top of weights_only.
    with pytest.raises(Exception, match="Namespace"):
        torch.load(official[0], weights_only=True)


def test_official_checkpoint_loads_the_online_encoder(
    official: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    path, online = official
    encoder = load_encoder(path)
    report = encoder.load_report
    state = encoder.vit.state_dict()
    for name, tensor in online.items():
        assert torch.equal(state[name], tensor), name  # the online weights, not mm_*
    assert not encoder.final_norm and isinstance(encoder.vit.norm, nn.Identity)
    assert torch.equal(state["fc_norm.weight"], torch.ones(DIM))
    assert torch.equal(state["fc_norm.bias"], torch.zeros(DIM))
    mm = sorted(k for k in report.ignored if k.startswith("mm_"))
    assert len(mm) == 3 + 12 * DEPTH + 2 + 12  # encoder, Linear, projector of the target
    summary = report.summary()
    assert (
        f"the online encoder was taken, the EMA target's {len(mm)} mm_* tensors were ignored"
        in summary
    )
    assert "no final norm" in summary
    assert len(report.matched) == len(online)  # the fresh fc_norm is not counted as matched

    images = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = encoder(images)
    assert torch.allclose(tokens, _official_forward(online, images), atol=1e-6)
    # Propagation's patch features and the attention maps read the same (unnormalised) tokens.
    with torch.no_grad():
        patches = encoder.patch_features(images)
    assert torch.allclose(patches.flatten(2).transpose(1, 2), tokens[:, 1:], atol=1e-6)


def test_official_checkpoint_exports_to_timm_with_the_same_features(
    official: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    path, online = official
    weights, sidecar = export_encoder(path, tmp_path / "sim.safetensors")
    info = json.loads(sidecar.read_text())
    assert info["timm_kwargs"] == {"global_pool": "avg", "img_size": IMG, "depth": DEPTH}
    model = timm.create_model(
        info["timm_name"],
        pretrained=True,
        num_classes=0,
        pretrained_cfg_overlay=dict(file=str(weights)),
        **info["timm_kwargs"],
    ).eval()
    images = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))
    reference = _official_forward(online, images)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(images), reference, atol=1e-6)
        # timm's head: the mean of the patch tokens, then the fresh fc_norm: SiameseIM's probe
        # feature before its BatchNorm.
        pooled = F.layer_norm(reference[:, 1:].mean(1), (DIM,), eps=1e-6)
        assert torch.allclose(model(images), pooled, atol=1e-5)
    # The export loads back, still without a final norm.
    again = load_encoder(weights)
    assert not again.final_norm
    assert torch.equal(
        again.vit.state_dict()["blocks.1.mlp.fc2.weight"], online["blocks.1.mlp.fc2.weight"]
    )


def test_official_checkpoint_fine_tunes_with_a_fresh_fc_norm(
    official: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    path, online = official
    encoder = load_encoder(path)
    make_classifier(encoder, num_classes=3)
    images = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = encoder.vit.forward_head(encoder(images))
        pooled = F.layer_norm(_official_forward(online, images)[:, 1:].mean(1), (DIM,), eps=1e-6)
        assert torch.allclose(logits, encoder.vit.head(pooled), atol=1e-5)


def test_layer_scale_blocks_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "ls.pth"
    official_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    ckpt["model"]["blocks.0.ls1.gamma"] = torch.ones(DIM)
    torch.save(ckpt, path)
    with pytest.raises(Exception, match="layer scale"):
        load_encoder(path)


# -- position tables against the official formulas --------------------------------------------


@pytest.mark.parametrize(
    ("method", "row_first"),
    [("mae", False), ("cropmae", False), ("siammae", False), ("siameseim", True)],
)
def test_each_methods_position_tables_follow_its_official_formula(
    method: str, row_first: bool
) -> None:
    cfg = load_config(
        None,
        [
            f"method={method}",
            "data.source=synthetic",
            "model.arch=vit_tiny",
            "model.img_size=64",
            "model.patch_size=16",
        ],
    )
    model = build_method(cfg)
    grid = 64 // 16
    expected = torch.from_numpy(official_sincos(192, grid, row_first)).float()
    assert torch.allclose(model.encoder.vit.pos_embed[0], expected, atol=1e-6)
    # The decoder's table (SiameseIM: the one of view 1's visible tokens in the predictor).
    decoder = model.decoder_pos_embed if method == "siameseim" else model.decoder.pos_embed
    dim = decoder.shape[-1]
    decoder_expected = torch.from_numpy(official_sincos(dim, grid, row_first)).float()
    assert torch.allclose(decoder[0], decoder_expected, atol=1e-6)
    # The two orders really differ: the test would catch a swap.
    other = torch.from_numpy(official_sincos(192, grid, not row_first)).float()
    assert not torch.allclose(model.encoder.vit.pos_embed[0], other, atol=1e-3)


def test_sincos_orders() -> None:
    assert torch.allclose(
        sincos_2d(8, 3, 5, order="hw"),
        torch.from_numpy(np.asarray(_rect(8, 3, 5))).float(),
        atol=1e-6,
    )


def _rect(dim: int, gh: int, gw: int) -> np.ndarray:
    """SiameseIM's order on a non-square grid: the row's half first."""
    half = dim // 2
    omega = 1.0 / 10000 ** (np.arange(half // 2) / (half / 2))
    rows = [np.zeros(dim)]
    for r in range(gh):
        for c in range(gw):
            rows.append(
                np.concatenate(
                    [np.sin(r * omega), np.cos(r * omega), np.sin(c * omega), np.cos(c * omega)]
                )
            )
    return np.stack(rows)
