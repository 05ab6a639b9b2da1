"""Encoder, position embeddings, masking, patchify and the decoders."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from siamae.models.decoder import CrossSelfDecoder
from siamae.models.losses import masked_mse, pixel_targets
from siamae.models.masking import (
    num_visible,
    patchify,
    random_masking,
    unpatchify,
    unshuffle_with_mask_tokens,
)
from siamae.models.pos_embed import resample_grid_dino, resample_position_table, sincos_2d
from siamae.models.vit import Encoder


@pytest.mark.parametrize(
    ("n", "ratio", "keep"), [(196, 0.985, 2), (196, 0.95, 9), (196, 0.75, 49), (64, 0.985, 1)]
)
def test_masking_keeps_mae_rounding(n: int, ratio: float, keep: int) -> None:
    assert num_visible(n, ratio) == keep
    ids_keep, mask, ids_restore = random_masking(3, n, ratio)
    assert ids_keep.shape == (3, keep)
    assert mask.shape == (3, n)
    assert torch.all(mask.sum(1) == n - keep)
    # the kept patches are exactly the unmasked ones
    for b in range(3):
        assert set(ids_keep[b].tolist()) == set(torch.nonzero(mask[b] == 0).flatten().tolist())


def test_inverse_permutation_restores_order() -> None:
    noise = torch.rand(4, 16)
    ids_keep, mask, ids_restore = random_masking(4, 16, 0.5, noise=noise)
    shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(torch.gather(shuffle, 1, ids_restore), torch.arange(16).expand(4, 16))
    tokens = torch.arange(16.0).view(1, 16, 1).expand(4, 16, 1)
    visible = torch.gather(tokens, 1, ids_keep.unsqueeze(-1))
    restored = unshuffle_with_mask_tokens(visible, torch.full((1, 1, 1), -1.0), ids_restore)
    expected = torch.where(mask.bool().unsqueeze(-1), torch.tensor(-1.0), tokens)
    assert torch.equal(restored, expected)


def test_given_noise_makes_masks_reproducible() -> None:
    noise = torch.rand(2, 49)
    a = random_masking(2, 49, 0.75, noise=noise)
    b = random_masking(2, 49, 0.75, noise=noise.clone())
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_patchify_round_trip_and_layout() -> None:
    images = torch.randn(2, 3, 32, 48)
    patches = patchify(images, 8)
    assert patches.shape == (2, 24, 8 * 8 * 3)
    assert torch.equal(unpatchify(patches, 8, (4, 6)), images)
    # patch 1 is the second patch of the first row, channels last inside a patch
    assert torch.equal(patches[0, 1].view(8, 8, 3), images[0, :, 0:8, 8:16].permute(1, 2, 0))


def test_norm_pix_targets_are_normalised_per_patch() -> None:
    target = pixel_targets(torch.rand(2, 3, 32, 32) * 5 + 2, 16, norm_pix=True)
    assert torch.allclose(target.mean(-1), torch.zeros(2, 4), atol=1e-5)
    assert torch.allclose(target.var(-1), torch.ones(2, 4), atol=1e-3)


def test_loss_only_counts_masked_patches() -> None:
    target = torch.randn(2, 10, 12)
    mask = torch.zeros(2, 10)
    mask[:, :4] = 1
    pred = target.clone()
    pred[:, 4:] += 100.0  # visible patches wildly wrong: must not matter
    assert masked_mse(pred, target, mask).item() == 0.0
    pred[:, :4] += 1.0
    assert masked_mse(pred, target, mask).item() == pytest.approx(1.0)


def test_sincos_position_embedding_layout() -> None:
    emb = sincos_2d(16, 3, 4)
    assert emb.shape == (13, 16)
    assert torch.equal(emb[0], torch.zeros(16))  # CLS
    # first half encodes the column (w), second half the row (h): MAE's layout
    grid = emb[1:].view(3, 4, 16)
    assert torch.allclose(grid[0, :, :8], grid[2, :, :8])  # same column -> same first half
    assert not torch.allclose(grid[0, 0, 8:], grid[1, 0, 8:])  # different rows differ
    assert torch.allclose(grid[1, 0, 8:], grid[1, 3, 8:])  # same row -> same second half
    assert grid[0, 0, 0].item() == pytest.approx(math.sin(0.0))
    assert grid[0, 1, 0].item() == pytest.approx(math.sin(1.0))  # lowest frequency is 1


def test_encoder_is_timm_native_and_position_embedding_is_frozen() -> None:
    enc = Encoder("vit_tiny", 16, 64)
    assert not enc.vit.pos_embed.requires_grad
    assert torch.equal(enc.vit.pos_embed[0], sincos_2d(192, 4, 4))
    reference = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64
    )
    reference.load_state_dict(enc.vit.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    reference.eval()
    enc.eval()
    assert torch.allclose(reference.forward_features(x), enc(x), atol=1e-5)


def test_encoder_subset_and_other_sizes() -> None:
    enc = Encoder("vit_tiny", 16, 64).eval()
    x = torch.randn(2, 3, 64, 64)
    full = enc(x)
    assert full.shape == (2, 17, 192)
    ids = torch.tensor([[0, 5, 7], [1, 2, 15]])
    sub = enc(x, ids)
    assert sub.shape == (2, 4, 192)
    # with every token kept in order, the subset path equals the full path
    all_ids = torch.arange(16).expand(2, 16)
    assert torch.allclose(enc(x, all_ids), full, atol=1e-6)
    feats = enc.patch_features(torch.randn(1, 3, 96, 128))
    assert feats.shape == (1, 192, 6, 8)


def _tiny_decoder() -> CrossSelfDecoder:
    return CrossSelfDecoder(
        encoder_dim=24,
        grid_size=4,
        patch_size=4,
        dim=16,
        depth=2,
        num_heads=2,
        mlp_dim=32,
        dropout=0.0,
    )


def test_cross_self_decoder_never_mixes_samples() -> None:
    dec = _tiny_decoder().eval()
    _, _, ids_restore = random_masking(3, 16, 0.75)
    latent = torch.randn(3, 5, 24)
    reference = torch.randn(3, 17, 24)
    out = dec(latent, ids_restore, reference)
    latent2, reference2 = latent.clone(), reference.clone()
    latent2[1:] = torch.randn(2, 5, 24)
    reference2[1:] = torch.randn(2, 17, 24)
    out2 = dec(latent2, ids_restore, reference2)
    assert torch.allclose(out[0], out2[0], atol=1e-6)
    assert not torch.allclose(out[1], out2[1])


def test_cross_attention_keys_are_the_reference_view() -> None:
    dec = _tiny_decoder().eval()
    _, _, ids_restore = random_masking(2, 16, 0.75)
    latent = torch.randn(2, 5, 24)
    reference = torch.randn(2, 17, 24)
    seen = []
    handle = dec.blocks[0].cross_attn.register_forward_hook(
        lambda m, args, out: seen.append(args[1])
    )
    out = dec(latent, ids_restore, reference)
    handle.remove()
    # keys/values: every reference token (CLS included), projected, with no position embedding
    assert torch.allclose(seen[0], dec.embed(reference))
    changed = dec(latent, ids_restore, reference + 1.0)
    assert not torch.allclose(out, changed)


def test_pre_norm_option_builds_and_differs() -> None:
    torch.manual_seed(0)
    post = CrossSelfDecoder(
        24, 4, 4, dim=16, depth=1, num_heads=2, mlp_dim=32, dropout=0.0, norm_style="post"
    )
    pre = CrossSelfDecoder(
        24, 4, 4, dim=16, depth=1, num_heads=2, mlp_dim=32, dropout=0.0, norm_style="pre"
    )
    pre.load_state_dict(post.state_dict())
    _, _, ids_restore = random_masking(1, 16, 0.75)
    inputs = (torch.randn(1, 5, 24), ids_restore, torch.randn(1, 17, 24))
    a, b = post.eval()(*inputs), pre.eval()(*inputs)
    assert a.shape == b.shape == (1, 16, 48)
    assert not torch.allclose(a, b)  # same weights, other norm placement
    with pytest.raises(ValueError, match="norm_style"):
        CrossSelfDecoder(24, 4, 4, dim=16, depth=1, num_heads=2, norm_style="middle")  # type: ignore[arg-type]


def test_decoder_qkv_init_is_one_joint_xavier_draw() -> None:
    """q, k, v drawn as ONE Xavier-uniform (3D, D) matrix, as nn.MultiheadAttention does."""
    torch.manual_seed(0)
    dim = 256
    dec = CrossSelfDecoder(64, 4, 8, dim=dim, depth=2, num_heads=8, mlp_dim=64)
    joint_std = math.sqrt(2.0 / (dim + 3 * dim))  # 0.0442 at D=256
    reference = torch.nn.MultiheadAttention(dim, 8).in_proj_weight.detach().std().item()
    assert abs(joint_std - reference) / reference < 0.05
    for block in dec.blocks:
        for attn in (block.cross_attn, block.self_attn):
            q, kv = attn.q.weight.detach(), attn.kv.weight.detach()
            for part in (q, kv, torch.cat([q, kv])):
                assert abs(part.std().item() - joint_std) / joint_std < 0.05
            bound = math.sqrt(6.0 / (4 * dim))  # the joint draw's uniform bound, not q's own
            assert q.abs().max() <= bound and q.abs().max() > 0.95 * bound
            assert torch.count_nonzero(attn.q.bias) == 0 and torch.count_nonzero(attn.kv.bias) == 0
            # the output projection keeps the per-Linear Xavier init, as out_proj does
            proj_std = math.sqrt(2.0 / (2 * dim))
            assert abs(attn.proj.weight.std().item() - proj_std) / proj_std < 0.05


def _cubic_weights(scale: float, n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) bicubic (a = -0.75) resampling matrix, half-pixel centres, from 1/scale.

    Written out by hand (not F.interpolate) so the test checks which scale is used: DINO's
    (h + 0.1) / h0, not h / h0.
    """

    def kernel(x: float) -> float:
        a, x = -0.75, abs(x)
        if x <= 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        if x < 2:
            return (((x - 5) * x + 8) * x - 4) * a
        return 0.0

    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    for out in range(n_out):
        src = (out + 0.5) / scale - 0.5
        base = math.floor(src)
        for tap in range(base - 1, base + 3):
            weights[out, min(max(tap, 0), n_in - 1)] += kernel(src - tap)
    return weights


@pytest.mark.parametrize(
    ("old", "new"), [((4, 4), (6, 10)), ((14, 14), (30, 55)), ((7, 5), (3, 4))]
)
def test_dino_position_resampling_equals_direct_reference(old, new) -> None:
    torch.manual_seed(0)
    (h0, w0), (h, w) = old, new
    table = torch.randn(1, h0 * w0, 8)
    got = resample_grid_dino(table, old, new)
    assert got.shape == (1, h * w, 8)
    # The direct F.interpolate call of the published evaluation code ...
    grid = table.reshape(1, h0, w0, 8).permute(0, 3, 1, 2)
    direct = torch.nn.functional.interpolate(
        grid, scale_factor=((h + 0.1) / h0, (w + 0.1) / w0), mode="bicubic", align_corners=False
    )
    assert torch.allclose(got, direct.permute(0, 2, 3, 1).reshape(1, h * w, 8), atol=1e-6)
    # ... and a hand-written bicubic with the same scale factors.
    rows = _cubic_weights((h + 0.1) / h0, h0, h)
    cols = _cubic_weights((w + 0.1) / w0, w0, w)
    by_hand = torch.einsum("yi,dij,xj->yxd", rows, grid[0].double(), cols).reshape(1, h * w, 8)
    assert torch.allclose(got.double(), by_hand, atol=1e-5)
    # Resampling to the exact size (h / h0) samples elsewhere: the +0.1 is not a no-op.
    exact = _cubic_weights(h / h0, h0, h)
    by_size = torch.einsum("yi,dij,xj->yxd", exact, grid[0].double(), cols).reshape(1, h * w, 8)
    assert not torch.allclose(got.double(), by_size, atol=1e-4)


def test_encoder_position_resampling_option() -> None:
    from timm.layers import resample_abs_pos_embed

    enc = Encoder("vit_tiny", 8, 32).eval()
    assert enc.pos_resample == "dino"  # the published evaluations' formula is the default
    assert enc.position_embedding((4, 4)) is enc.vit.pos_embed  # trained grid: untouched
    pos = enc.vit.pos_embed.detach()
    dino = enc.position_embedding((6, 10))
    assert torch.equal(dino[:, :1], pos[:, :1])  # CLS row kept
    assert torch.allclose(dino[:, 1:], resample_grid_dino(pos[:, 1:], (4, 4), (6, 10)))
    enc.pos_resample = "timm"
    timm_table = enc.position_embedding((6, 10))
    expected = resample_abs_pos_embed(pos, new_size=[6, 10], old_size=[4, 4], num_prefix_tokens=1)
    assert torch.allclose(timm_table, expected)
    assert not torch.allclose(timm_table, dino, atol=1e-3)  # antialiased: another table
    x = torch.randn(1, 3, 48, 80)
    timm_features = enc.patch_features(x)
    enc.pos_resample = "dino"
    assert not torch.allclose(enc.patch_features(x), timm_features)
    with pytest.raises(ValueError, match="pos_resample"):
        enc.pos_resample = "nearest"
    assert torch.equal(
        resample_position_table(pos, (4, 4), (4, 4), mode="timm"), pos
    )  # same grid, any mode
