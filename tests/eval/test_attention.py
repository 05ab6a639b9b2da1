"""Attention maps: the last block's CLS attention per head, the mass mask, the picture command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from image_bombs import write_bomb
from siamae.commands.cli import build_parser, main
from siamae.eval.attention import (
    AttentionResult,
    attention_figure,
    attention_for_image,
    cls_attention,
    mass_mask,
    patches_after_resize,
    save_attention_figure,
)
from siamae.models.vit import Encoder


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    torch.manual_seed(0)
    return Encoder("vit_tiny", 8, 32).eval()


def test_maps_are_the_last_blocks_cls_attention_and_sum_to_one_per_head(encoder: Encoder) -> None:
    # a non-square size the encoder was not built for: 5 x 7 patches, grid interpolated
    images = torch.randn(2, 3, 40, 56)
    maps = cls_attention(encoder, images)
    assert maps.shape == (2, 3, 5, 7)
    assert torch.allclose(maps.sum(dim=(-2, -1)), torch.ones(2, 3), atol=1e-5)
    assert (maps >= 0).all()
    # The block's own (unfused) attention, caught where timm applies attention dropout.
    attn = encoder.vit.blocks[-1].attn
    caught: list[torch.Tensor] = []
    handle = attn.attn_drop.register_forward_hook(lambda m, i, o: caught.append(o))
    fused = attn.fused_attn
    attn.fused_attn = False
    try:
        with torch.no_grad():
            encoder(images)
    finally:
        attn.fused_attn = fused
        handle.remove()
    row = caught[-1][:, :, 0, 1:]
    expected = (row / row.sum(-1, keepdim=True)).reshape(2, 3, 5, 7)
    assert torch.allclose(maps, expected, atol=1e-5)


def test_mask_keeps_the_fewest_patches_holding_the_asked_share() -> None:
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(4, 6, 6, generator=gen) ** 4
    maps = maps / maps.sum(dim=(-2, -1), keepdim=True)
    for keep in (0.3, 0.6, 0.9):
        mask = mass_mask(maps, keep)
        for m, a in zip(mask, maps):
            kept = a[m]
            assert kept.sum() >= keep - 1e-6
            # minimal: without its least attended patch the mask holds less than asked
            assert kept.sum() - kept.min() < keep
            # the most attended patches are the ones kept
            assert kept.min() >= a[~m].max()
    assert mass_mask(maps, 1.0).all()
    one_hot = torch.zeros(1, 3, 3)
    one_hot[0, 1, 2] = 1.0
    assert mass_mask(one_hot, 0.6).sum() == 1


def test_figure_from_python_and_command_line(encoder: Encoder, tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for name, size in (("wide", (70, 45)), ("small", (33, 30))):
        path = tmp_path / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    result = attention_for_image(encoder, paths[0])
    assert result.image.shape == (40, 64, 3) and result.maps.shape == (3, 5, 8)
    png = save_attention_figure(result, tmp_path / "py.png", keep=0.6)
    assert Image.open(png).size[0] > 300

    torch.save(encoder.vit.state_dict(), tmp_path / "encoder.pt")
    code = main(
        [
            "visualize",
            "attention",
            "--checkpoint",
            str(tmp_path / "encoder.pt"),
            "--images",
            *map(str, paths),
            "--out",
            str(tmp_path / "maps"),
            "--keep",
            "0.5",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == [
        "small_attention.png",
        "wide_attention.png",
    ]
    # the reconstruction form still parses as before
    args = build_parser().parse_args(["visualize", "--checkpoint", "run"])
    assert args.what == "reconstruction" and args.checkpoint == "run"
    assert main(["visualize", "attention", "--checkpoint", str(tmp_path / "encoder.pt")]) == 2


def test_a_huge_image_is_refused_before_decoding_naming_resize(
    encoder: Encoder, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:  # noqa: ANN001
    from PIL import Image

    import siamae.eval.attention as attention

    # 1104 x 1104 at patch 8: 138 x 138 = 19044 patches, above the 16384 budget
    huge = tmp_path / "huge.png"
    Image.new("L", (1104, 1104)).save(huge)
    torch.save(encoder.vit.state_dict(), tmp_path / "encoder.pt")
    ran = []
    monkeypatch.setattr(attention, "cls_attention", lambda *a: ran.append(a))
    monkeypatch.setattr(Image.Image, "load", lambda self: ran.append("decoded"))
    argv = ["visualize", "attention", "--checkpoint", str(tmp_path / "encoder.pt")]
    argv += ["--images", str(huge), "--out", str(tmp_path / "maps"), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"siamae: error: image {str(huge)!r} is 1104x1104 pixels: 19,044 patches of 8 pixels, "
        "above the budget of 16,384 (attention grows with the square of the count); pass "
        "--resize with a short side of at most 1024 pixels, e.g. --resize 480"
    ]
    assert ran == [] and not (tmp_path / "maps").exists()  # nothing decoded, nothing written
    assert patches_after_resize((1104, 1104), 8, 64) == 64
    assert patches_after_resize((12000, 9000), 16, None) == 750 * 562


def test_an_image_over_the_decompression_bomb_limit_is_one_line_naming_resize(
    encoder: Encoder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """196 million pixels: PIL refuses the file as it reads the header (a traceback, exit 1,
    before); now the one line of a huge image, naming the file, the limit and --resize."""
    bomb = write_bomb(tmp_path / "huge.png")
    torch.save(encoder.vit.state_dict(), tmp_path / "encoder.pt")
    argv = ["visualize", "attention", "--checkpoint", str(tmp_path / "encoder.pt")]
    argv += ["--images", str(bomb), "--out", str(tmp_path / "maps"), "--device", "cpu"]
    for resize in ([], ["--resize", "480"]):
        assert main(argv + resize) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"siamae: error: image {str(bomb)!r} is 196,000,000 pixels, over PIL's "
            "decompression-bomb limit of 178,956,970 (not decoded, even with --resize); save a "
            "smaller copy (e.g. a short side of 480 pixels) and pass that"
        ]
        assert not (tmp_path / "maps").exists()


def test_the_picture_has_clear_titles_one_contour_per_region_and_a_colour_bar(
    encoder: Encoder,
) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.contour import ContourSet
    from scipy import ndimage

    maps = torch.full((2, 6, 8), 0.1)
    maps[0, 1:3, 1:3] = 5.0  # head 0: two separate regions hold the mass
    maps[0, 4:6, 5:8] = 5.0
    maps[1, 2:5, 2:6] = 5.0  # head 1: one region
    maps = maps / maps.sum(dim=(1, 2), keepdim=True)
    image = np.full((48, 64, 3), 128, np.uint8)
    result = AttentionResult(maps, image, 8, "synthetic")
    fig = attention_figure(result, keep=0.6)
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    panels = [ax for ax in fig.axes if ax.images]
    bars = [ax for ax in fig.axes if "% of the CLS token's attention" in ax.get_ylabel()]
    assert len(bars) == 1  # one colour scale, with its units
    for ax in panels:  # no title lies over another panel's image
        title = ax.title.get_window_extent(renderer)
        for other in panels:
            if other is not ax:
                assert not title.overlaps(other.get_window_extent(renderer)), ax.get_title()
    masks = mass_mask(maps, 0.6)
    heads = {ax.get_title().split(" (")[0]: ax for ax in panels}
    for h in range(2):
        (outline,) = [c for c in heads[f"head {h}"].collections if isinstance(c, ContourSet)]
        regions = ndimage.label(masks[h].numpy())[1]
        # one smooth outline per region of kept patches (not a speckle of patch edges)
        assert len(outline.allsegs[0]) == regions == (2 if h == 0 else 1)
