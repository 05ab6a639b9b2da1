"""MAE and CropMAE/SiamMAE: shapes, what the loss sees, and that they can learn (overfit)."""

from __future__ import annotations

import pytest
import torch

from siamae.models.masking import patchify
from siamae.recipes import load_config
from siamae.registry import METHODS, build_method

TINY = [
    "model.arch=vit_tiny",
    "model.img_size=32",
    "model.patch_size=8",
    "data.source=synthetic",
    "decoder.dropout=0",
]


def _tiny(method: str, extra: list[str] | None = None):  # noqa: ANN202
    cfg = load_config(None, [f"method={method}", *TINY, *(extra or [])])
    torch.manual_seed(0)
    return build_method(cfg)


def test_registry_names_every_method() -> None:
    assert set(METHODS) >= {"mae", "cropmae", "siammae"}
    assert METHODS["siammae"].view_kind == "frames" and METHODS["cropmae"].view_kind == "pair"


@pytest.mark.parametrize(("method", "views", "keep"), [("mae", 1, 4), ("cropmae", 2, 1)])
def test_prediction_gradient_is_zero_on_visible_patches(method: str, views: int, keep: int) -> None:
    model = _tiny(method).eval()
    captured = {}

    def hook(module, args, output):  # noqa: ANN001, ANN202
        output.retain_grad()
        captured["pred"] = output

    model.decoder.head.register_forward_hook(hook)
    noise = torch.rand(3, 16)
    out = model({"images": torch.randn(3, views, 3, 32, 32), "mask_noise": noise})
    out.loss.backward()
    grad = captured["pred"].grad[:, 1:]  # drop CLS
    visible = torch.argsort(noise, 1)[:, :keep]  # MAE 0.75 of 16 -> 4; CropMAE 0.985 -> 1
    for b in range(3):
        assert torch.all(grad[b, visible[b]] == 0)
        masked = [i for i in range(16) if i not in visible[b].tolist()]
        assert grad[b, masked].abs().sum() > 0


@pytest.mark.parametrize("method", ["cropmae", "mae", "siammae"])
def test_tiny_model_overfits_one_batch(method: str) -> None:
    model = _tiny(method, [f"{method}.mask_ratio=0.75"] if method != "mae" else None)
    views = model.num_views
    torch.manual_seed(1)
    batch = {"images": torch.randn(4, views, 3, 32, 32), "mask_noise": torch.rand(4, 16)}
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = None
    for _ in range(60):
        loss = model(batch).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 2, f"{method}: loss {first:.3f} -> {loss.item():.3f}"


def test_reconstruction_pastes_prediction_into_masked_patches() -> None:
    model = _tiny("cropmae").eval()
    images = torch.randn(2, 2, 3, 32, 32)
    noise = torch.rand(2, 16)
    rec = model.reconstruct({"images": images, "mask_noise": noise})
    assert rec.reference is not None and torch.equal(rec.reference, images[:, 0])
    visible = torch.argsort(noise, 1)[:, :1]
    orig, pasted = patchify(images[:, 1], 8), patchify(rec.prediction, 8)
    for b in range(2):
        assert torch.allclose(pasted[b, visible[b]], orig[b, visible[b]], atol=1e-5)
    assert rec.masked.shape == rec.prediction.shape == (2, 3, 32, 32)


def test_encoder_state_dict_has_timm_keys() -> None:
    keys = set(_tiny("cropmae").encoder_state_dict())
    assert {
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.weight",
        "norm.weight",
    } <= keys
    assert not any(k.startswith(("vit.", "encoder.")) for k in keys)
