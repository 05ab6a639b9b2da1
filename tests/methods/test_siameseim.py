"""SiameseIM: geometry, block masks, views, the EMA target, UniGrad, training and transfer."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file

from ddp_helpers import train_in_processes
from siamae.data.siameseim_views import BlockMaskGenerator, SiameseIMViews
from siamae.data.views import crop_resize
from siamae.engine.trainer import train
from siamae.errors import ConfigError
from siamae.export import export_encoder
from siamae.loading import load_encoder
from siamae.methods.base import denormalize
from siamae.methods.siameseim import (
    SiameseIM,
    TokenBatchNorm,
    momentum_at,
    relative_embedding,
    relative_positions,
    unigrad_loss,
)
from siamae.models.vit import Encoder
from siamae.recipes import load_config
from siamae.registry import build_method

TINY = [
    "method=siameseim",
    "model.arch=vit_tiny",
    "model.img_size=32",
    "model.patch_size=8",
    "decoder.dim=64",
    "decoder.num_heads=4",
    "decoder.mlp_dim=128",
    "data.source=synthetic",
    "data.synthetic_count=16",
    "data.synthetic_size=48",
    "data.batch_size=8",
    "data.num_workers=0",
    "optim.base_lr=1e-3",
    "optim.warmup_steps=1",
    "run.log_every=1",
    "run.progress=false",
    "run.visualize=false",
    "run.tensorboard=false",
]


def _cfg(tmp: Path | None = None, *extra: str):  # noqa: ANN202
    out = [f"run.out_dir={tmp}"] if tmp is not None else []
    return load_config(None, [*TINY, *out, *extra])


def _t(*rows: float) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _positions(box1, box2, flip1=False, flip2=False, width=100.0, grid=4):  # noqa: ANN001, ANN202
    y, x, sh, sw = relative_positions(
        _t(*box1)[None], _t(*box2)[None], torch.tensor([flip1]), torch.tensor([flip2]),
        _t(width), grid,
    )  # fmt: skip
    return y.view(grid, grid), x.view(grid, grid), sh.item(), sw.item()


# -- relative position --------------------------------------------------------------------------


@pytest.mark.parametrize("flips", [(False, False), (True, True)])
def test_identical_crops_give_exactly_the_integer_grid(flips: tuple[bool, bool]) -> None:
    box = (13.0, 7.0, 57.0, 91.0)
    y, x, sh, sw = _positions(box, box, *flips, width=117.0, grid=5)
    rows, cols = torch.meshgrid(torch.arange(5.0), torch.arange(5.0), indexing="ij")
    assert torch.equal(y, rows.double()) and torch.equal(x, cols.double())
    assert sh == sw == 1.0
    emb = relative_embedding(y.view(1, -1), x.view(1, -1), _t(sh), _t(sw), 16)
    # ln 1 = 0: the scale channels are sin 0 = 0 and cos 0 = 1.
    assert torch.equal(
        emb[..., 16:], torch.tensor([0.0] * 4 + [1.0] * 4).repeat(2).expand(1, 25, 16).double()
    )


def test_shifted_and_scaled_crop_by_hand() -> None:
    # View 1: rows 0-99, columns 0-99 (patches of 25 px, grid 4). View 2: rows 50-99 and
    # columns 25-74 (12.5 px patches). View 2's patch (0, 0) has its centre at pixel
    # (56.25, 31.25) = view-1 patch units (2.25, 1.25), minus the half patch: (1.75, 0.75); each
    # further view-2 patch is half a view-1 patch.
    y, x, sh, sw = _positions((0, 0, 100, 100), (50, 25, 50, 50))
    assert (sh, sw) == (0.5, 0.5)
    assert torch.allclose(y[:, 0], _t(1.75, 2.25, 2.75, 3.25))
    assert torch.allclose(x[0], _t(0.75, 1.25, 1.75, 2.25))
    assert torch.allclose(y[:, 3], y[:, 0]) and torch.allclose(x[3], x[0])
    # A taller, narrower view 2 further down: rows 20-119 of a view 1 at rows 10-59 (h1 50),
    # columns 40-59 of a view 1 at columns 30-109 (w1 80): sh = 2, sw = 0.25.
    y, x, sh, sw = _positions((10, 30, 50, 80), (20, 40, 100, 20), width=200.0)
    assert (sh, sw) == (2.0, 0.25)
    # centre of view-2 row 0: pixel 20 + 12.5 = 32.5 -> (32.5 - 10) / 12.5 = 1.8 -> 1.3
    # centre of view-2 col 0: pixel 40 + 2.5 = 42.5 -> (42.5 - 30) / 20 = 0.625 -> 0.125
    assert torch.allclose(y[:, 0], _t(1.3, 3.3, 5.3, 7.3))
    assert torch.allclose(x[0], _t(0.125, 0.375, 0.625, 0.875))


def test_flipped_crop_by_hand() -> None:
    # The whole image (width 100) as view 1; view 2 is the whole image flipped: its column c
    # shows view 1's column 3 - c.
    y, x, _, _ = _positions((0, 0, 100, 100), (0, 0, 100, 100), False, True)
    assert torch.allclose(x[0], _t(3, 2, 1, 0)) and torch.allclose(y[:, 0], _t(0, 1, 2, 3))
    # Image width 120. View 1 is flipped, its box (10, 20, 80, 80) in the flipped image: it
    # shows original columns 20-99 mirrored, view-1 column u at original x = 100 - 20 (u + .5).
    # View 2 is not flipped: box (30, 40, 40, 40), column c centre at original x = 45 + 10 c.
    # So 100 - 20 (u + .5) = 45 + 10 c -> u = 2.25 - 0.5 c; rows: (30 + 5 + 10 r - 10) / 20 - .5.
    y, x, sh, sw = _positions((10, 20, 80, 80), (30, 40, 40, 40), True, False, width=120.0)
    assert (sh, sw) == (0.5, 0.5)
    assert torch.allclose(x[0], _t(2.25, 1.75, 1.25, 0.75))
    assert torch.allclose(y[:, 0], _t(0.75, 1.25, 1.75, 2.25))
    # Flipping both views of that pair changes nothing: only the relative flip matters.
    y2, x2, _, _ = _positions((10, 20, 80, 80), (30, 40, 40, 40), False, True, width=120.0)
    assert torch.allclose(x2, x) and torch.allclose(y2, y)


def test_relative_embedding_layout() -> None:
    y, x = _t(2.0)[None], _t(-1.5)[None]
    sh, sw = _t(0.5), _t(2.0)
    emb = relative_embedding(y, x, sh, sw, 8)[0, 0]  # 2 frequencies: 1 and 1/100
    omega = _t(1.0, 0.01)
    expected = []
    for v in (2.0, -1.5, 10 * math.log(0.5), 10 * math.log(2.0)):
        expected += [torch.sin(v * omega), torch.cos(v * omega)]
    assert torch.allclose(emb, torch.cat(expected))


# -- masking and views ---------------------------------------------------------------------------


def _components(mask: np.ndarray) -> list[int]:
    """Sizes of the 4-connected components of True cells."""
    seen = np.zeros_like(mask)
    sizes = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, size = [start], 0
        seen[start] = True
        while stack:
            r, c = stack.pop()
            size += 1
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= nr < mask.shape[0] and 0 <= nc < mask.shape[1]:
                    if mask[nr, nc] and not seen[nr, nc]:
                        seen[nr, nc] = True
                        stack.append((nr, nc))
        sizes.append(size)
    return sizes


def _boundary(mask: np.ndarray) -> int:
    return int((mask[1:] != mask[:-1]).sum() + (mask[:, 1:] != mask[:, :-1]).sum())


def test_block_mask_hides_exactly_118_patches_in_blocks() -> None:
    gen = BlockMaskGenerator(14, 14, 118, min_block=16)
    block_edges, random_edges, in_big = [], [], []
    for seed in range(100):
        rng = np.random.default_rng(seed)
        mask = gen(rng)
        assert mask.shape == (14, 14) and mask.sum() == 118
        sizes = _components(mask)
        in_big.append(sum(s for s in sizes if s >= 16) / 118)
        block_edges.append(_boundary(mask))
        scattered = np.zeros(196, dtype=bool)
        scattered[rng.permutation(196)[:118]] = True
        random_edges.append(_boundary(scattered.reshape(14, 14)))
    # Blocks: nearly every hidden patch sits in a connected region of 16+ patches, and the
    # hidden/visible border is far shorter than for 118 scattered patches.
    assert np.mean(in_big) > 0.95
    assert np.mean(block_edges) < 0.6 * np.mean(random_edges)
    # Same generator state, same mask.
    assert np.array_equal(gen(np.random.default_rng(3)), gen(np.random.default_rng(3)))


class _ArraySource:
    """Images as PIL from fixed random pixels (not JPEG: decoded at full resolution)."""

    def __init__(self, count: int = 16) -> None:
        rng = np.random.default_rng(0)
        self.images = [
            rng.integers(0, 256, (60 + 7 * i, 90 - 3 * i, 3), np.uint8) for i in range(count)
        ]

    def __len__(self) -> int:
        return len(self.images)

    def name(self, index: int) -> str:
        return f"image{index}"

    def open_image(self, index: int, rng: np.random.Generator) -> Image.Image:
        return Image.fromarray(self.images[index])


def test_boxes_reproduce_the_views_when_cropped_from_the_flipped_image() -> None:
    source = _ArraySource()
    maker = SiameseIMViews(out=32, patch_size=8, num_masked=10, min_block=2, photometric=False)
    flips_seen = set()
    for index in range(len(source)):
        sample = maker(source, index, np.random.default_rng([0, 0, index]))
        pixels = source.images[index]
        assert sample.extras["image_width"][0] == pixels.shape[1]
        assert sample.extras["mask"].shape == (16,) and sample.extras["mask"].sum() == 10
        for view, box, flip in zip(sample.views, sample.extras["box"], sample.extras["flip"]):
            image = np.ascontiguousarray(pixels[:, ::-1]) if flip else pixels
            expected = crop_resize(image, tuple(float(v) for v in box), 32, "bicubic")
            assert np.array_equal(view, expected)
            flips_seen.add(bool(flip))
    assert flips_seen == {False, True}
    # Seeded by (seed, epoch, index): the same generator state gives the same sample.
    augmenting = SiameseIMViews(out=32, patch_size=8, num_masked=10, min_block=2)
    a, b = (augmenting(source, 3, np.random.default_rng([0, 1, 3])) for _ in range(2))
    assert all(np.array_equal(u, v) for u, v in zip(a.views, b.views))
    assert all(np.array_equal(a.extras[k], b.extras[k]) for k in a.extras)


# -- model pieces --------------------------------------------------------------------------------


def _small(norm: str = "batch") -> SiameseIM:
    """A 2-block ViT-Tiny/8 at 32 px with a 64-d, 2-block predictor: the pieces, quickly."""
    encoder = Encoder("vit_tiny", 8, 32, depth=2)
    return SiameseIM(encoder, dim=64, num_heads=4, predictor_depth=2, mlp_ratio=2, norm=norm)


def _batch(model: SiameseIM, b: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = model.encoder.num_patches
    size = model.encoder.img_size
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i in range(b):
        mask[i, torch.randperm(n, generator=g)[: n // 2]] = True
    top_left = torch.randint(0, 20, (b, 2, 2), generator=g).float()
    sides = torch.randint(20, 40, (b, 2, 2), generator=g).float()
    return {
        "images": torch.randn(b, 2, 3, size, size, generator=g),
        "mask": mask,
        "box": torch.cat([top_left, sides], dim=-1),
        "flip": torch.rand(b, 2, generator=g) < 0.5,
        "image_width": torch.full((b, 1), 60.0),
    }


def test_target_gets_no_gradient_and_moves_by_the_momentum_rule() -> None:
    torch.manual_seed(0)
    model = _small()
    batch = _batch(model)
    model(batch).loss.backward()
    target = {n: p for n, p in model.named_parameters() if n.startswith("target_")}
    assert target and all(p.grad is None and not p.requires_grad for p in target.values())
    assert all(n.startswith("target_") for n in model.ddp_ignored_names())
    # Starts as a copy of the online weights it follows.
    online = dict(model.named_parameters())
    assert torch.equal(
        target["target_projector.0.attn.qkv.weight"], online["projector.0.attn.qkv.weight"]
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    before = {n: p.detach().clone() for n, p in target.items()}
    model.after_step(3, 10)
    m = momentum_at(3, 10, 0.995)
    for name in (
        "encoder.vit.blocks.1.mlp.fc1.weight",
        "embed.bias",
        "projector.1.norm2.weight",
        "encoder.vit.cls_token",
    ):
        expected = m * before["target_" + name] + (1 - m) * online[name]
        assert torch.allclose(target["target_" + name], expected, atol=1e-7), name
    assert not torch.equal(target["target_embed.bias"], before["target_embed.bias"])


def test_momentum_schedule_end_points() -> None:
    assert momentum_at(0, 1000) == pytest.approx(0.995)
    assert momentum_at(1000, 1000) == pytest.approx(1.0)
    assert momentum_at(500, 1000) == pytest.approx(1 - 0.005 / 2)
    values = [momentum_at(t, 100, 0.9) for t in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_unigrad_matches_a_direct_formula() -> None:
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    target = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    loss, pull, push = unigrad_loss(pred, target, 0.3)
    p, z = pred.reshape(6, 4), target.reshape(6, 4)
    corr = sum(torch.outer(z[i], z[i]) for i in range(6)) / 6
    direct_pull = sum(float(((p[i] - z[i]) ** 2).sum()) for i in range(6)) / 6
    direct_push = sum(float(p[i] @ corr @ p[i]) for i in range(6)) / 6
    assert pull.item() == pytest.approx(direct_pull / 4, rel=1e-12)
    assert push.item() == pytest.approx(direct_push / 4, rel=1e-12)
    assert loss.item() == pytest.approx((direct_pull + 0.3 * direct_push) / 4, rel=1e-12)


def test_batchnorm_over_tokens_and_the_layernorm_switch() -> None:
    torch.manual_seed(0)
    ours, reference = TokenBatchNorm(6), nn.BatchNorm1d(6)
    with torch.no_grad():
        for bn in (ours, reference):
            bn.weight.copy_(torch.linspace(0.5, 2, 6))
            bn.bias.copy_(torch.linspace(-1, 1, 6))
    x = (torch.randn(3, 5, 6) * 3 + 2).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out, out_ref = ours(x), reference(x_ref.permute(0, 2, 1)).permute(0, 2, 1)
    assert torch.allclose(out, out_ref, atol=1e-5)
    (out * torch.arange(6.0)).sum().backward()
    (out_ref * torch.arange(6.0)).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    assert torch.allclose(ours.running_mean, reference.running_mean, atol=1e-6)
    assert torch.allclose(ours.running_var, reference.running_var, atol=1e-5)
    ours.eval(), reference.eval()
    assert torch.allclose(ours(x), reference(x.permute(0, 2, 1)).permute(0, 2, 1), atol=1e-5)

    for norm, kind in (("batch", TokenBatchNorm), ("layer", nn.LayerNorm)):
        model = _small(norm)
        for blocks in (model.projector, model.predictor, model.target_projector):
            assert all(isinstance(b.norm1, kind) and isinstance(b.norm2, kind) for b in blocks)
        assert torch.isfinite(model(_batch(model)).loss)
    configured = build_method(_cfg(None, "siameseim.norm=layer"))
    assert isinstance(configured.predictor[0].norm1, nn.LayerNorm)
    with pytest.raises(ConfigError, match="siameseim.norm"):
        _cfg(None, "siameseim.norm=group")


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="data.source"):
        _cfg(None, "data.source=videos", "data.path=/tmp")
    with pytest.raises(ConfigError, match="data.repeated_sampling"):
        _cfg(None, "data.repeated_sampling=2")
    with pytest.raises(ConfigError, match="siameseim.momentum"):
        _cfg(None, "siameseim.momentum=1.5")
    cfg = load_config(None, ["method=siameseim", "model.arch=vit_base", "data.source=synthetic"])
    s = cfg.siameseim
    assert s.dim == 768 and s.num_heads == 16 and s.predictor_depth == 4
    assert round(196 * s.mask_ratio) == 118 and cfg.data.global_scale == (0.08, 1.0)
    assert cfg.data.interpolation == "bicubic"


def test_picture_draws_view_2s_box_on_view_1() -> None:
    model = _small().eval()
    batch = _batch(model, b=2)
    batch["box"] = torch.tensor([[[0.0, 0, 100, 100], [50, 25, 50, 50]]] * 2)
    batch["flip"] = torch.tensor([[False, False], [True, False]])
    batch["image_width"] = torch.full((2, 1), 200.0)
    columns = dict(model.picture(batch))
    assert list(columns) == [
        "view 1 + view 2's box",
        "visible patches",
        "view 2",
        "prediction error",
    ]
    assert all(
        c.shape == (2, 3, 32, 32) and 0 <= c.min() and c.max() <= 1 for c in columns.values()
    )
    # the error panel is coloured on one scale for every sample, named with its units
    scale = model.picture_scales["prediction error"]
    assert scale.vmin == 0.0 and scale.vmax > 0 and "squared error per patch" in scale.label
    top = scale.colour(torch.full((1, 1, 1, 1), scale.vmax))[0, :, 0, 0]  # the largest error
    distance = (columns["prediction error"] - top[None, :, None, None]).abs().amax(dim=1)
    assert distance.min() < 1e-6  # some patch has it: the scale ends at the batch's largest error
    boxed = columns["view 1 + view 2's box"]
    red = torch.tensor([1.0, 0.0, 0.0])
    # Sample 0: view 2 covers view-1 pixels rows 16-31, columns 8-23; the 2-px outline lies
    # just outside. Sample 1 (one view flipped): columns mirrored, 200 - 0 - 25 - 50 = 125 ->
    # beyond view 1 (0-100 of the image), so nothing is drawn.
    assert torch.equal(boxed[0, :, 15, 12], red) and torch.equal(boxed[0, :, 20, 7], red)
    view1 = denormalize(batch["images"][:, 0])
    assert torch.equal(boxed[0, :, 20, 12], view1[0, :, 20, 12])
    assert torch.equal(boxed[1], view1[1])


# -- training ------------------------------------------------------------------------------------


def test_siameseim_overfits_one_batch() -> None:
    torch.manual_seed(0)
    model = _small()
    batch = _batch(model, b=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(10):
        loss = model(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_step(step + 1, 10)
        losses.append(loss.item())
    # The target moves too (EMA), so the loss has a floor; on one batch it still falls fast.
    assert losses[-1] < 0.5 * losses[0], losses


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def test_stop_and_resume_is_bit_identical_with_the_ema_target(tmp_path: Path) -> None:
    extra = ["optim.max_steps=3"]  # 2 steps an epoch: the resumed part starts a new epoch
    train(_cfg(tmp_path / "whole", *extra), resume=False)
    train(_cfg(tmp_path / "split", *extra), resume=False, stop_after_steps=2)
    train(_cfg(tmp_path / "split", *extra), resume="auto")
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    assert a.keys() == b.keys() and any(k.startswith("target_") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The target moved away from its initial copy and differs from the online weights.
    name = "encoder.vit.blocks.0.attn.qkv.weight"
    assert not torch.equal(a[name], a["target_" + name])


def test_export_and_load_encoder_take_the_online_encoder(tmp_path: Path) -> None:
    train(_cfg(tmp_path, "optim.max_steps=2"), resume=False)
    weights = _weights(tmp_path)
    encoder = load_encoder(tmp_path / "checkpoints" / "last.pt")
    assert isinstance(encoder, Encoder)
    for key, value in encoder.vit.state_dict().items():
        assert torch.equal(value, weights["encoder.vit." + key]), key
    assert not torch.equal(
        encoder.vit.blocks[0].attn.qkv.weight,
        weights["target_encoder.vit.blocks.0.attn.qkv.weight"],
    )
    # The export holds the online encoder, timm-named, and nothing of the target.
    path, _ = export_encoder(tmp_path, tmp_path / "encoder.safetensors")
    exported = load_file(path)
    assert encoder.vit.state_dict().keys() <= exported.keys()
    assert not any(k.startswith(("target", "mm_")) for k in exported)
    assert all(
        torch.equal(exported[k], weights["encoder.vit." + k]) for k in encoder.vit.state_dict()
    )


def test_ddp_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    # Synced BatchNorm over tokens and the all-reduced UniGrad correlation make two processes
    # of 4 the same computation as one of 8.
    single = tmp_path / "single"
    train(_cfg(single, "data.batch_size=8", "optim.max_steps=2"), resume=False)
    train_in_processes(
        [*TINY, "data.batch_size=4", "optim.max_steps=2", f"run.out_dir={tmp_path / 'ddp'}"]
    )
    a, b = _weights(single), _weights(tmp_path / "ddp")
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), atol=1e-5, rtol=1e-4), k
    losses = [
        [float(line.split(",")[2]) for line in (run / "metrics.csv").read_text().splitlines()[1:]]
        for run in (single, tmp_path / "ddp")
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
