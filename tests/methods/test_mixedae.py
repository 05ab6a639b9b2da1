"""MixedAE: mixing, homologous attention, unmixing, the contrastive loss, and training."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import Block

from ddp_helpers import train_in_processes
from siamae.commands.cli import main as cli_main
from siamae.data.image_folder import EvalTransform, normalize
from siamae.data.mixing import group_partition, mix_images, unmix_index, unmix_latent
from siamae.data.sources import SyntheticImageSource
from siamae.engine.trainer import train
from siamae.errors import ConfigError, SiamaeError
from siamae.export import export_encoder
from siamae.loading import load_encoder
from siamae.methods.mixedae import (
    MixedAE,
    homologous_contrastive_loss,
    parse_contrastive_features,
    parse_topk_blocks,
)
from siamae.models.decoder import MAEDecoder
from siamae.models.homologous import (
    attend,
    attention_logits,
    homologous_block,
    homologous_precision,
    topk_attention,
)
from siamae.models.losses import homologous_mass_loss
from siamae.models.masking import patchify, unshuffle_with_mask_tokens
from siamae.models.vit import Encoder
from siamae.recipes import load_config
from siamae.registry import build_method

R = 4
PATCH = 8


@pytest.fixture(autouse=True)
def _one_thread():  # noqa: ANN202
    # Tiny tensors on a shared 2-core machine: two OpenMP threads only wait for each other.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SIZE = 32  # 4 x 4 = 16 patches, 4 per source


def _images(b: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _noise(b: int = 8, n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, n, generator=torch.Generator().manual_seed(seed))


# -- mixing ------------------------------------------------------------------------------------


def test_partitions_of_a_group_are_disjoint_cover_the_grid_with_n_over_r_each() -> None:
    n = 16
    part = group_partition(_noise(12, n), R)
    assert part.order.shape == (3, n) and part.source_of.shape == (3, n)
    for g in range(3):
        chunks = [set(part.order[g, j * (n // R) : (j + 1) * (n // R)].tolist()) for j in range(R)]
        assert all(len(c) == n // R for c in chunks)
        assert set().union(*chunks) == set(range(n))
        assert sum(len(c) for c in chunks) == n  # so pairwise disjoint
        for j, chunk in enumerate(chunks):
            assert {p for p in range(n) if part.source_of[g, p] == j} == chunk


def test_partition_is_made_from_each_group_s_first_sample_noise() -> None:
    noise = _noise(8)
    part = group_partition(noise, R)
    other = noise.clone()
    other[1:4] = torch.rand(3, 16)  # the other members' noise does not matter
    assert torch.equal(group_partition(other, R).source_of, part.source_of)
    other[4] = torch.rand(16)  # the second group's first sample decides its partition
    changed = group_partition(other, R).source_of
    assert torch.equal(changed[0], part.source_of[0]) and not torch.equal(
        changed[1], part.source_of[1]
    )


def test_mixed_image_equals_the_sources_at_their_positions() -> None:
    images = _images()
    part = group_partition(_noise(), R)
    mixed = mix_images(images, part, PATCH)
    assert mixed.shape == (2, 3, SIZE, SIZE)
    mixed_patches, source_patches = patchify(mixed, PATCH), patchify(images, PATCH)
    for g in range(2):
        for pos in range(16):
            src = g * R + int(part.source_of[g, pos])
            assert torch.equal(mixed_patches[g, pos], source_patches[src, pos])


def test_unmixed_decoder_input_of_each_image_holds_exactly_its_own_tokens() -> None:
    images = _images()
    part = group_partition(_noise(), R)
    mixed_patches = patchify(mix_images(images, part, PATCH), PATCH)  # (G, N, F) as "tokens"
    cls = torch.arange(2, dtype=torch.float32).view(2, 1, 1).expand(-1, 1, mixed_patches.shape[-1])
    latent = torch.cat([cls + 100.0, mixed_patches], dim=1)
    index = unmix_index(part)
    per_image = unmix_latent(latent, index)
    assert per_image.shape == (8, 1 + 16 // R, mixed_patches.shape[-1])
    mask_token = torch.full((1, 1, mixed_patches.shape[-1]), 1e6)
    filled = unshuffle_with_mask_tokens(per_image[:, 1:], mask_token, index.ids_restore)
    own = patchify(images, PATCH)
    for b in range(8):
        g, slot = b // R, b % R
        assert torch.equal(per_image[b, 0], latent[g, 0])  # the group's CLS
        supplied = part.source_of[g] == slot
        assert torch.equal(index.mask[b], (~supplied).float())
        assert torch.equal(filled[b][supplied], own[b][supplied])
        assert (filled[b][~supplied] == 1e6).all()
        assert int(supplied.sum()) == 16 // R


# -- homologous attention ----------------------------------------------------------------------


def _block(dim: int = 32, heads: int = 4) -> Block:
    torch.manual_seed(0)
    return Block(dim, heads, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))


def test_topk_attention_equals_ordinary_attention_at_k_equal_all_tokens() -> None:
    block = _block().eval()
    x = torch.randn(3, 17, 32)
    out, logits, kept = homologous_block(block, x, k=17)
    assert kept.shape == (3, 4, 17, 17) and logits.shape == (3, 4, 17, 17)
    torch.testing.assert_close(out, block(x), atol=1e-5, rtol=1e-5)


def test_topk_attention_keeps_exactly_k_keys_per_query_even_with_ties() -> None:
    block = _block().eval()
    x = torch.randn(2, 17, 32)
    _, kept = topk_attention(block.attn, x, k=5)
    assert kept.shape == (2, 4, 17, 5)
    assert all(len(set(row.tolist())) == 5 for row in kept.reshape(-1, 5))
    # The kept keys are the 5 largest logits of each query.
    attn = block.attn
    q, k, _ = attn.qkv(x).reshape(2, 17, 3, 4, 8).permute(2, 0, 3, 1, 4)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    top_values = logits.topk(5, dim=-1).values
    assert torch.allclose(
        torch.gather(logits, -1, kept).sort(-1).values, top_values.sort(-1).values
    )
    # All logits equal (q = 0): a value threshold would keep all 17 keys; exactly k must stay,
    # so each output is the mean of the values of the k kept keys.
    with torch.no_grad():
        attn.qkv.weight[:32].zero_()
        attn.qkv.bias[:32].zero_()
    out, kept = topk_attention(attn, x, k=5)
    v = attn.qkv(x)[..., 64:].reshape(2, 17, 4, 8).transpose(1, 2)  # (B, H, L, hd)
    chosen = torch.gather(
        v.unsqueeze(2).expand(-1, -1, 17, -1, -1), 3, kept[..., None].expand(-1, -1, -1, -1, 8)
    )
    expected = attn.proj(chosen.mean(3).transpose(1, 2).reshape(2, 17, 32))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_topk_attention_runs_its_selection_in_fp32_under_autocast() -> None:
    block = _block().eval()
    x = torch.randn(2, 17, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _, kept = homologous_block(block, x, k=17)
        reference = block(x)
    assert out.dtype == reference.dtype
    torch.testing.assert_close(out.float(), reference.float(), atol=5e-2, rtol=5e-2)


def test_topk_selection_and_contrastive_loss_stay_fp32_under_bf16_autocast() -> None:
    # Autocast would run the logits' matmul in bf16 (0.4 % steps): the selection must not.
    block = _block().eval()
    x = torch.randn(2, 65, 32, generator=torch.Generator().manual_seed(5))
    attn = block.attn
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, kept = topk_attention(attn, x, k=17)
        q, k, _ = attn.qkv(x).reshape(2, 65, 3, 4, 8).permute(2, 0, 3, 1, 4)
    logits = (q.float() * attn.scale) @ k.float().transpose(-2, -1)  # outside autocast: fp32
    assert torch.equal(kept.sort(-1).values, logits.topk(17, dim=-1).indices.sort(-1).values)
    tokens = torch.randn(2, 16, 8)
    source_of = group_partition(torch.rand(8, 16), R).source_of
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed_precision = homologous_contrastive_loss(tokens, source_of, 0.1)
    assert mixed_precision.item() == pytest.approx(
        homologous_contrastive_loss(tokens, source_of, 0.1).item(), rel=1e-6
    )


def test_homologous_precision_counts_kept_keys_of_the_query_s_own_source() -> None:
    source_of = torch.tensor([[0, 0, 1, 1]])
    # Token 0 is CLS; tokens 1..4 are the patches. Query 1 (source 0) keeps CLS and token 2
    # (source 0): 1 of 2. Query 2 keeps tokens 1, 2: 2 of 2. Queries 3, 4 keep 3 and 1: 1 of 2.
    kept = torch.tensor([[[[0, 1], [0, 2], [1, 2], [3, 1], [4, 1]]]])
    assert homologous_precision(kept, source_of).item() == pytest.approx((1 + 2 + 1 + 1) / 8)


# -- the contrastive loss ----------------------------------------------------------------------


def _supcon_direct(tokens: torch.Tensor, source_of: torch.Tensor, t: float) -> float:
    total, count = 0.0, 0
    for g in range(tokens.shape[0]):
        z = [v / v.norm() for v in tokens[g].double()]
        n = len(z)
        for i in range(n):
            denom = sum(math.exp(float(z[i] @ z[a]) / t) for a in range(n) if a != i)
            pos = [p for p in range(n) if p != i and source_of[g, p] == source_of[g, i]]
            total += -sum(math.log(math.exp(float(z[i] @ z[p]) / t) / denom) for p in pos) / len(
                pos
            )
            count += 1
    return total / count


def test_contrastive_loss_matches_the_supcon_formula_on_a_hand_made_case() -> None:
    # Two sources of two patches in 2-D: source 0 points right, source 1 up (one patch tilted).
    tokens = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    source_of = torch.tensor([[0, 0, 1, 1]])
    t = 0.1
    # Anchor 0: positive 1 (cos 1), others cos 0 and cos 1/sqrt2.
    c = 1 / math.sqrt(2)
    l0 = -math.log(math.exp(1 / t) / (math.exp(1 / t) + math.exp(0) + math.exp(c / t)))
    l2 = -math.log(math.exp(c / t) / (math.exp(0) + math.exp(0) + math.exp(c / t)))
    l3 = -math.log(math.exp(c / t) / (math.exp(c / t) + math.exp(c / t) + math.exp(c / t)))
    expected = (l0 + l0 + l2 + l3) / 4  # anchor 1 is anchor 0 mirrored
    loss = homologous_contrastive_loss(tokens, source_of, t)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert loss.item() == pytest.approx(_supcon_direct(tokens, source_of, t), rel=1e-5)


def test_contrastive_loss_matches_the_direct_formula_on_random_groups() -> None:
    torch.manual_seed(3)
    tokens = torch.randn(2, 16, 8)
    source_of = group_partition(torch.rand(8, 16), R).source_of
    loss = homologous_contrastive_loss(tokens, source_of, 0.1)
    assert loss.item() == pytest.approx(_supcon_direct(tokens, source_of, 0.1), rel=1e-5)


def test_topk_blocks_option_is_parsed_and_checked() -> None:
    assert parse_topk_blocks("all", 3) == (0, 1, 2)
    assert parse_topk_blocks("none", 3) == ()
    assert parse_topk_blocks("2,0", 3) == (0, 2)
    assert parse_topk_blocks(1, 3) == (1,)
    with pytest.raises(ValueError, match="0..2"):
        parse_topk_blocks("0,3", 3)
    with pytest.raises(ValueError, match="block indices"):
        parse_topk_blocks("first", 3)


# -- the method --------------------------------------------------------------------------------


def _method(**kw) -> MixedAE:  # noqa: ANN003
    torch.manual_seed(0)
    encoder = Encoder("vit_tiny", PATCH, SIZE, depth=3)  # 3 blocks keep the tests fast
    decoder = MAEDecoder(encoder.embed_dim, encoder.grid_size, PATCH, dim=64, depth=2, num_heads=4)
    return MixedAE(encoder, decoder, R, **kw)


def _batch(b: int = 8) -> dict[str, torch.Tensor]:
    return {"images": _images(b).unsqueeze(1), "mask_noise": _noise(b)}


def test_default_k_is_one_source_plus_one_and_segment_embeddings_live_outside_the_vit() -> None:
    method = _method(segment_embed="encoder")
    assert method.topk == math.ceil(17 / R) == 5
    assert method.topk_blocks == (0, 1, 2) and method.attention_loss_blocks == (0, 1, 2)
    assert method.segment_embed.shape == (R, 192)
    assert not any("segment" in k for k in method.encoder.vit.state_dict())
    assert _method(cls_key=False).topk == 16 // R  # without the CLS key: one source's keys
    assert _method().segment_embed is None  # the default: recognition from content only


def test_segment_embeddings_start_at_the_position_embedding_scale_and_are_not_decayed() -> None:
    method = _method(segment_embed="encoder")
    pos_std = float(method.encoder.vit.pos_embed[0, 1:].std())
    assert 0.3 < pos_std < 0.8  # sin-cos values in [-1, 1] (0.48 on this 4 x 4 grid)
    assert float(method.segment_embed.detach().std()) == pytest.approx(pos_std, rel=0.2)
    small = _method(segment_embed="encoder", segment_init_std=0.02).segment_embed
    assert float(small.detach().std()) < 0.05
    decayed, exempt = method.param_groups(0.05)
    assert decayed["weight_decay"] == 0.05 and exempt["weight_decay"] == 0.0
    assert any(p is method.segment_embed for p in exempt["params"])
    assert not any(p is method.segment_embed for p in decayed["params"])
    # Every other 2-D weight keeps timm's rule (decayed), and nothing is lost or doubled.
    assert any(p is method.encoder.vit.blocks[0].attn.qkv.weight for p in decayed["params"])
    trainable = [p for p in method.parameters() if p.requires_grad]  # pos_embed is frozen
    assert len(decayed["params"]) + len(exempt["params"]) == len(trainable)
    # AdamW with these groups leaves a segment embedding without gradient where it was.
    before = method.segment_embed.detach().clone()
    opt = torch.optim.AdamW(method.param_groups(0.5), lr=1.0)
    method.segment_embed.grad = torch.zeros_like(method.segment_embed)
    opt.step()
    assert torch.equal(method.segment_embed.detach(), before)


def test_loss_is_finite_logs_its_terms_and_falls_on_a_one_batch_overfit() -> None:
    method = _method(segment_embed="encoder", contrastive_weight=1.0, contrastive_features="final")
    batch = _batch()
    opt = torch.optim.AdamW(method.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        out = method(batch)
        assert torch.isfinite(out.loss)
        losses.append(out.loss.item())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    per_block = {f"homologous_precision/block{i}" for i in range(3)}
    assert set(out.logs) == {
        "loss_recon",
        "loss_contrast",
        "loss_attention",
        "homologous_precision",
        "homologous_mass",
        *per_block,
    }
    terms = out.logs["loss_recon"] + out.logs["loss_contrast"] + out.logs["loss_attention"]
    assert out.loss.item() == pytest.approx(terms.item(), rel=1e-6)
    assert 0.0 <= out.logs["homologous_precision"].item() <= 1.0
    mean_of_blocks = torch.stack([out.logs[k] for k in sorted(per_block)]).mean()
    assert out.logs["homologous_precision"].item() == pytest.approx(mean_of_blocks.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert method.segment_embed.grad is not None and method.segment_embed.grad.abs().sum() > 0


def test_segment_embeddings_in_the_decoder_tell_each_sequence_its_slot() -> None:
    method = _method(segment_embed="decoder")
    assert method.segment_embed.shape == (R, method.decoder.dim)
    out = method(_batch())
    out.loss.backward()
    assert torch.isfinite(out.loss) and method.segment_embed.grad.abs().sum() > 0
    # Every slot's vector is used: each group has one source per slot.
    assert (method.segment_embed.grad.abs().sum(1) > 0).all()


def test_naive_mixing_has_ordinary_attention_no_segments_and_no_contrastive_gradient() -> None:
    method = _method(
        topk_blocks=(), segment_embed="none", contrastive_weight=0.0, attention_loss_weight=0.0
    )
    out = method(_batch())
    assert "homologous_precision" not in out.logs and "loss_attention" not in out.logs
    assert out.loss.item() == pytest.approx(out.logs["loss_recon"].item())
    assert method.segment_embed is None


def test_picture_shows_each_group_mixed_outlined_and_every_source_reconstructed() -> None:
    method = _method().eval()
    batch = _batch()
    columns = method.picture({k: v[:6] for k, v in batch.items()})  # 6 -> one whole group
    assert [title for title, _ in columns][2:] == ["reconstruction", "original"]
    for _, image in columns:
        assert image.shape == (R, 3, SIZE, SIZE) and image.min() >= 0 and image.max() <= 1
    mixed = columns[0][1]
    assert torch.equal(mixed[0], mixed[3])  # one mixed input per group, on each source's row
    red = torch.tensor([0.90, 0.10, 0.10]).view(3, 1)
    corner = mixed[0][:, 0, :]  # top border row of the top row of patches: outline colours
    assert (corner == red).all(0).any()
    assert method.picture({k: v[:3] for k, v in batch.items()}) is None
    with pytest.raises(SiamaeError, match="at least 4 samples"):
        method.reconstruct({k: v[:3] for k, v in batch.items()})


# -- training on the engine --------------------------------------------------------------------

TINY = [
    "method=mixedae",
    "model.arch=vit_tiny",
    "model.img_size=32",
    "model.patch_size=8",
    "decoder.dim=64",
    "decoder.depth=2",
    "decoder.num_heads=4",
    "decoder.mlp_dim=128",
    "data.source=synthetic",
    "data.synthetic_count=16",
    "data.synthetic_size=48",
    "data.batch_size=8",
    "data.num_workers=0",
    "optim.base_lr=1e-3",
    "optim.warmup_steps=2",
    "run.log_every=1",
    "run.progress=false",
    "run.visualize=false",
    "run.tensorboard=false",
]


def _cfg(out: Path, *extra: str):  # noqa: ANN202
    return load_config(None, [*TINY, f"run.out_dir={out}", *extra])


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


@pytest.mark.parametrize(
    ("override", "field_name"),
    [
        ("data.batch_size=6", "data.batch_size"),
        ("mixing.ratio=3", "mixing.ratio"),  # 16 patches do not split in 3
        ("mixing.topk=18", "mixing.topk"),
        ("mixing.topk_blocks=0,12", "mixing.topk_blocks"),
        ("mask_ratio=0.5", "mask_ratio"),
        ("mixing.temperature=0", "mixing.temperature"),
        ("mixing.attention_loss_blocks=5,99", "mixing.attention_loss_blocks"),
        ("mixing.attention_loss_weight=-1", "mixing.attention_loss_weight"),
        ("mixing.contrastive_features=middle", "mixing.contrastive_features"),
        ("mixing.contrastive_features=12", "mixing.contrastive_features"),
        ("mixing.segment_init_std=0", "mixing.segment_init_std"),
        ("mixing.homology_data=/no/such/folder", "mixing.homology_data"),
        ("mixing.cls_key=false", "mixing.topk"),  # with mixing.topk=17 below: 16 keys only
    ],
)
def test_bad_mixing_settings_are_refused_naming_the_field(override: str, field_name: str) -> None:
    extra = ["mixing.topk=17"] if override == "mixing.cls_key=false" else []
    with pytest.raises(ConfigError, match=f"'{field_name}'"):
        load_config(None, [*TINY, override, *extra])


def test_config_builds_the_method_and_the_naive_switch() -> None:
    method = build_method(load_config(None, TINY))
    assert isinstance(method, MixedAE) and method.topk == 5 and method.segment_place == "none"
    assert method.attention_loss_weight == 1.0 and method.contrastive_weight == 0.0
    naive = build_method(load_config(None, [*TINY, "mixing.naive=true"]))
    assert naive.topk_blocks == () and naive.segment_embed is None
    assert naive.contrastive_weight == 0.0 and naive.attention_loss_blocks == ()
    some = build_method(load_config(None, [*TINY, "mixing.topk_blocks=0,11", "mixing.topk=9"]))
    assert some.topk_blocks == (0, 11) and some.topk == 9


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 3 steps cross an epoch boundary (16 images, batch 8: 2 steps an epoch).
    root = tmp_path_factory.mktemp("mixedae")
    # Every parameter the method can own: segment embeddings and the contrastive head.
    extra = [
        "optim.max_steps=3",
        "mixing.segment_embed=encoder",
        "mixing.contrastive_weight=1.0",
        "mixing.contrastive_features=head",
    ]
    train(_cfg(root / "whole", *extra), resume=False)
    first = train(_cfg(root / "split", *extra), resume=False, stop_after_steps=1)
    assert first["step"] == 1
    train(_cfg(root / "split", *extra), resume="auto")
    return root


def test_stop_and_resume_gives_bit_identical_weights(resumed_runs: Path) -> None:
    a, b = _weights(resumed_runs / "whole"), _weights(resumed_runs / "split")
    assert a.keys() == b.keys() and "segment_embed" in a
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_encoder_loads_strictly_into_timm_with_the_same_features(
    resumed_runs: Path, tmp_path: Path
) -> None:
    import json

    import timm

    run = resumed_runs / "whole"
    weights, sidecar = export_encoder(run, tmp_path / "encoder.safetensors")
    info = json.loads(sidecar.read_text())
    model = timm.create_model(
        info["timm_name"],
        pretrained=True,
        num_classes=0,
        pretrained_cfg_overlay=dict(file=str(weights)),
        **info["timm_kwargs"],
    ).eval()
    # The plain ViT's keys are exactly the checkpoint's encoder.vit.* tensors (strict).
    state = {
        k[len("encoder.vit.") :]: v
        for k, v in _weights(run).items()
        if k.startswith("encoder.vit.")
    }
    model.load_state_dict(state, strict=True)
    encoder = load_encoder(run)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), encoder(x), atol=1e-6, rtol=1e-6)


def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    # Per-device batch 4 = one group: each process mixes the group one process of batch 8 does.
    single = tmp_path / "single"
    train(_cfg(single, "data.batch_size=8", "optim.max_steps=2"), resume=False)
    train_in_processes(
        [*TINY, "data.batch_size=4", "optim.max_steps=2", f"run.out_dir={tmp_path / 'ddp'}"]
    )
    a, b = _weights(single), _weights(tmp_path / "ddp")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


# -- homologous recognition: the loss, the CLS option, learning it, logging it -----------------


def test_homologous_mass_loss_matches_the_formula_on_a_hand_made_case() -> None:
    # One sequence: CLS + 4 patches, sources [0, 0, 1, 1]; one head.
    logits = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0, 0.0],
            [1.0, 9.0, 2.0, 0.5, -1.0],  # patch 1 (source 0): its other homologous key is 2
            [0.0, 1.0, 7.0, 3.0, 0.0],
            [2.0, 0.0, 0.0, 5.0, 1.0],
            [0.0, 0.0, 0.0, 0.0, 0.0],
        ]
    ).view(1, 1, 5, 5)
    source_of = torch.tensor([[0, 0, 1, 1]])
    e = torch.exp(logits[0, 0])

    def mass(q: int, own: list[int], keys: list[int]) -> float:
        return float(sum(e[q, j] for j in own) / sum(e[q, j] for j in keys))

    # The query's own key (1 + its patch index) is never a candidate; CLS (0) is one.
    with_cls = [mass(1, [2], [0, 2, 3, 4]), mass(2, [1], [0, 1, 3, 4])]
    with_cls += [mass(3, [4], [0, 1, 2, 4]), mass(4, [3], [0, 1, 2, 3])]
    loss, m = homologous_mass_loss(logits, source_of, cls_key=True)
    assert loss.item() == pytest.approx(-sum(math.log(v) for v in with_cls) / 4, rel=1e-5)
    assert m.item() == pytest.approx(sum(with_cls) / 4, rel=1e-5)
    no_cls = [mass(1, [2], [2, 3, 4]), mass(2, [1], [1, 3, 4])]
    no_cls += [mass(3, [4], [1, 2, 4]), mass(4, [3], [1, 2, 3])]
    loss, m = homologous_mass_loss(logits, source_of, cls_key=False)
    assert loss.item() == pytest.approx(-sum(math.log(v) for v in no_cls) / 4, rel=1e-5)


def test_without_the_cls_key_patch_queries_never_keep_or_weigh_the_cls() -> None:
    block = _block().eval()
    x = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(2))
    _, kept = topk_attention(block.attn, x, k=16, cls_key=True)
    assert (kept[:, :, 1:] == 0).any()  # with it, 16 of 17 keys: most queries keep the CLS
    _, kept = topk_attention(block.attn, x, k=16, cls_key=False)
    assert not (kept[:, :, 1:] == 0).any()  # without it, no patch query keeps the CLS
    assert (kept[:, :, 0] == 0).any()  # the CLS query may still keep itself: all 17 candidates
    # Ordinary attention without the CLS key: each patch query attends to the patches alone.
    logits, v = attention_logits(block.attn, x)
    full, none_kept = attend(block.attn, logits, v, None, cls_key=False)
    assert none_kept is None
    weights = logits[:, :, 1:, 1:].softmax(-1)  # (B, H, 16, 16)
    b, h, q, _ = weights.shape
    alone = (weights @ v[:, :, 1:]).transpose(1, 2).reshape(b, q, -1)
    torch.testing.assert_close(full[:, 1:], block.attn.proj(alone), atol=1e-5, rtol=1e-5)


def _textured_images(count: int, size: int = 32) -> torch.Tensor:
    source = SyntheticImageSource(count, 48, seed=0)
    transform = EvalTransform(size, crop_pct=1.0)
    rng = np.random.default_rng(0)
    return torch.stack([transform(source.open_image(i, rng)) for i in range(count)])


def _train_toy(pixels: torch.Tensor, steps: int, **kw) -> MixedAE:  # noqa: ANN003
    method = _method(**kw)
    opt = torch.optim.AdamW(method.param_groups(0.05), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, 48, (16,), generator=g)
        batch = {
            "images": normalize(pixels[idx], "cpu").unsqueeze(1),
            "mask_noise": torch.rand(16, 16, generator=g),
        }
        loss = method(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return method


def test_the_recognition_loss_is_what_lifts_precision_above_chance_on_textured_images() -> None:
    # 64 synthetic scenes of distinct textures: 48 to train on, 16 held out (4 mixtures).
    pixels = _textured_images(64)
    noise = torch.rand(16, 16, generator=torch.Generator().manual_seed(5))
    old = _train_toy(
        pixels,
        40,
        segment_embed="encoder",
        segment_init_std=0.02,
        contrastive_weight=1.0,
        contrastive_features="final",
        attention_loss_weight=0.0,
    )
    new = _train_toy(pixels, 40)  # the defaults: recognition loss, no segment embeddings
    chance = 4 / 17  # 4 homologous tokens (self included) among 17 for k = 5
    before = _method().homology(pixels[48:], noise)["homologous_precision"]
    after_old = old.homology(pixels[48:], noise)["homologous_precision"]
    after_new = new.homology(pixels[48:], noise)
    assert abs(before - chance) < 0.08 and abs(after_old - chance) < 0.08, (before, after_old)
    assert after_new["homologous_precision"] > 0.5, after_new
    assert after_new["homologous_mass"] > 0.5
    assert all(after_new[f"homologous_precision/block{i}"] > 0.4 for i in range(3)), after_new


def test_contrastive_term_reads_a_head_or_a_block_never_silently_the_final_tokens() -> None:
    batch = _batch()
    head = _method(contrastive_weight=1.0, contrastive_features="head")
    assert head.contrastive_head is not None
    head(batch).loss.backward()
    assert head.contrastive_head[0].weight.grad.abs().sum() > 0
    at_block = _method(contrastive_weight=1.0, contrastive_features=1)
    run = at_block._run(batch)
    rec = run["recognition"]
    assert rec.features is not None and rec.features.shape == (2, 16, 192)
    assert torch.equal(at_block.contrastive_tokens(run["latent"], rec), rec.features)
    at_block(batch).loss.backward()
    # The block after the one it reads gets no gradient from the contrastive term alone.
    only_contrast = _method(
        contrastive_weight=1.0,
        contrastive_features=0,
        attention_loss_weight=0.0,
        topk_blocks=(),
    )
    run = only_contrast._run(batch)
    loss = homologous_contrastive_loss(
        only_contrast.contrastive_tokens(run["latent"], run["recognition"]),
        run["part"].source_of,
    )
    loss.backward()
    assert only_contrast.encoder.vit.blocks[2].attn.qkv.weight.grad is None
    assert parse_contrastive_features("HEAD", 3) == "head"
    assert parse_contrastive_features("2", 3) == 2


def _write_images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(_textured_images(count, 48)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"img{i:02d}.png")
    return folder


def test_training_logs_per_block_precision_and_eval_homology_gives_the_same_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    heldout = _write_images(tmp_path / "heldout", 8)
    run = tmp_path / "run"
    # 16 images, batch 8: 2 steps an epoch; the held-out figures at each epoch's end.
    summary = train(
        _cfg(
            run,
            "optim.max_steps=4",
            f"mixing.homology_data={heldout}",
            "mixing.homology_images=8",
            "mixing.homology_seed=3",
            "run.tensorboard=true",
        ),
        resume=False,
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    window = [r for r in records if "loss" in r]
    assert [r["step"] for r in window] == [1, 2, 3, 4]
    for r in window:  # every log window: the mean and every block of the 12
        assert {f"homologous_precision/block{i}" for i in range(12)} <= set(r)
        assert 0 <= r["homologous_precision"] <= 1 and 0 <= r["homologous_mass"] <= 1
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"homologous_precision", "homologous_precision/block11", "homologous_mass"} <= set(
        header
    )
    tb = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = tb.EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {
        "homologous_precision",
        "homologous_precision/block11",
        "homologous_mass",
        "heldout_homologous_precision",
    } <= set(events.Tags()["scalars"])
    heldout_records = [r for r in records if "heldout_homologous_precision" in r]
    assert [r["step"] for r in heldout_records] == [2, 4]
    logged = heldout_records[-1]
    out = tmp_path / "homology.json"
    code = cli_main(
        [
            "eval",
            "homology",
            "--checkpoint",
            summary["checkpoint"],
            "--data",
            str(heldout),
            "--count",
            "8",
            "--seed",
            "3",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    figures = json.loads(out.read_text())
    for key in ("homologous_precision", "homologous_precision/block7", "homologous_mass"):
        assert figures[key] == pytest.approx(logged[f"heldout_{key}"], abs=1e-6), key
    # Another seed draws other partitions: other figures.
    cli_main(["eval", "homology", "--checkpoint", str(run), "--data", str(heldout), "--count",
              "8", "--seed", "4", "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text())["homologous_mass"] != pytest.approx(
        logged["heldout_homologous_mass"], abs=1e-9
    )
    # Bad input: one line naming it, exit code 2.
    capsys.readouterr()
    bad = cli_main(["eval", "homology", "--checkpoint", str(run), "--data", str(heldout),
                    "--blocks", "0,99"])  # fmt: skip
    assert bad == 2 and "--blocks" in capsys.readouterr().err
    missing = cli_main(
        ["eval", "homology", "--checkpoint", str(run), "--data", str(tmp_path / "none")]
    )
    assert missing == 2 and "does not exist" in capsys.readouterr().err


def test_eval_homology_measures_any_encoder_with_ordinary_attention(tmp_path: Path) -> None:
    encoder = Encoder("vit_tiny", PATCH, SIZE, depth=3)
    method = method_for_encoder(encoder)
    pixels = _textured_images(16)
    noise = torch.rand(16, 16, generator=torch.Generator().manual_seed(0))
    figures = method.homology(pixels, noise)
    assert set(figures) == {
        "homologous_precision",
        "homologous_mass",
        *(f"homologous_precision/block{i}" for i in range(3)),
    }
    # Measuring does not change the forward: the encoder's output is its ordinary one.
    images = normalize(pixels[:4], "cpu")
    part = group_partition(noise[:4], R)
    latent, _ = method.encode_mixed(images, part, measure_blocks=(0, 1, 2))
    plain = encoder(mix_images(images, part, PATCH))
    torch.testing.assert_close(latent, plain, atol=1e-5, rtol=1e-5)


def method_for_encoder(encoder: Encoder) -> MixedAE:
    decoder = MAEDecoder(encoder.embed_dim, encoder.grid_size, PATCH, dim=16, depth=1, num_heads=1)
    return MixedAE(
        encoder, decoder, R, topk_blocks=(), attention_loss_weight=0.0, contrastive_features="final"
    ).eval()
